"""Negatives re-mined during training (piccolo_jax/refresh.py): resumes across a refresh and a kill -9 inside one
give the uninterrupted run's parameters, bit for bit. 2 processes = 1: tests/test_launch.py."""
import json
import os
import pathlib
import shutil
import signal
import time

import numpy as np
import pytest

import conftest
import tiny_config
from conftest import DATA, same_params
from piccolo_jax import prepare, train

ENTRY = {"kind": "jsonl", "path": str(DATA / "retrieval-zh/triplets.train.jsonl"), "task": "retrieval", "limit": 512}
# 32 steps an epoch; refreshes before batches 3 and 6 of 8, with false-negative masking.
RUN = {"data.datasets": (ENTRY,), "data.pack_menu": 1, "train.max_steps": 8, "refresh.every": 3,
       "checkpoint.every": 1, "checkpoint.keep": 20, "tasks.retrieval.neg_num": 2,
       "tasks.retrieval.false_negatives": "model"}
FLAGS = [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}" for k, v in RUN.items()]


def _config():
  c = tiny_config.get_config()
  for k, v in RUN.items():
    section, field = k.split(".", 1)
    if "." in field:
      c[section][field.split(".")[0]][field.split(".")[1]] = v
    else:
      c[section][field] = v
  return c


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  w = tmp_path_factory.mktemp("refresh") / "straight"
  train.train(_config(), w)
  return w


def _files(w):
  """{relative path: bytes} of a run's refreshed negatives."""
  root = w / "negatives"
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.bin"))}


def test_straight_run_refreshes_and_logs(straight):
  assert sorted(p.name for p in (straight / "negatives").iterdir()) == ["step-3", "step-6"]
  rows = [json.loads(l) for l in (straight / "metrics.jsonl").open()]
  refresh = {r["step"]: r for r in rows if "refresh/seconds" in r}
  assert sorted(refresh) == [3, 6] and all(r["refresh/seconds"] > 0 for r in refresh.values())
  steps = [r for r in rows if "task" in r]
  assert all(0 <= r["retrieval/masked_false_negatives"] < 1 for r in steps)
  assert any(r["retrieval/masked_false_negatives"] > 0 for r in steps)
  # The refreshed negatives, memory-mapped in place of the dataset's: passages of the dataset, none a positive.
  mined = next(p for p in (straight / "negatives/step-6").iterdir() if p.is_dir())
  orig = prepare.Prepared(pathlib.Path(os.environ["PICCOLO_JAX_CACHE"]) / mined.name)
  new = prepare.Prepared(orig.path, negatives=str(mined))
  assert len(new.neg_off) == len(orig) + 1 and new.neg_ids.max() < len(orig.p_off) - 1
  assert not np.array_equal(new.neg_ids, orig.neg_ids)
  for r in range(len(orig)):
    negs, pos = new.neg_ids[new.neg_off[r]:new.neg_off[r + 1]], orig.pos_ids[orig.pos_off[r]:orig.pos_off[r + 1]]
    assert not np.isin(negs, pos).any() and len(set(negs)) == len(negs)
  assert np.isnan(new.neg_score).all() and len(new.neg_score) == len(new.neg_ids)


def _resume(straight, w, step, negatives=()):
  """w: the straight run as a kill right after checkpoint `step` leaves it (its metrics.jsonl whole)."""
  (w / "checkpoints").mkdir(parents=True)
  shutil.copytree(straight / "checkpoints" / str(step), w / "checkpoints" / str(step))
  shutil.copy(straight / "metrics.jsonl", w / "metrics.jsonl")
  for v in negatives:
    shutil.copytree(straight / "negatives" / v, w / "negatives" / v)


def test_resume_across_a_refresh_is_bit_identical(straight, tmp_path):
  """From checkpoint 3 (saved before the refresh at 3, which the resume computes again) and from 5 (which trains
  on step-3's negatives, read back from disk): the straight run's parameters and negatives, bit for bit."""
  _resume(straight, tmp_path / "from3", 3)
  train.train(_config(), tmp_path / "from3")
  same_params(straight / "model", tmp_path / "from3" / "model")
  assert _files(tmp_path / "from3") == _files(straight)
  rows = [json.loads(l) for l in (tmp_path / "from3" / "metrics.jsonl").open()]  # Each step's rows once.
  assert [r["step"] for r in rows if "refresh/seconds" in r] == [3, 6]
  assert conftest.metric_steps(tmp_path / "from3") == list(range(1, 9))
  _resume(straight, tmp_path / "from5", 5)
  with pytest.raises(FileNotFoundError, match=r"negatives/step-3: the checkpoint trains on negatives refreshed at "
                                              r"step-3, which are missing"):
    train.train(_config(), tmp_path / "from5")
  _resume(straight, tmp_path / "from5b", 5, ["step-3"])
  train.train(_config(), tmp_path / "from5b")
  same_params(straight / "model", tmp_path / "from5b" / "model")
  assert _files(tmp_path / "from5b") == _files(straight)


def test_kill9_during_a_refresh_loses_nothing(straight, tmp_path):
  """kill -9 while the refresh at step 3 writes, then the same command: the straight run's result."""
  proc = conftest.run_tiny(tmp_path, *FLAGS)
  partial = tmp_path / "negatives" / ".step-3.tmp"
  while not partial.exists() and proc.poll() is None:
    time.sleep(0.005)
  os.kill(proc.pid, signal.SIGKILL)
  out = proc.communicate()[0]
  assert proc.returncode == -signal.SIGKILL, out
  assert not (tmp_path / "negatives" / "step-3").exists()  # Killed inside the refresh (its save may be cut too).
  proc = conftest.run_tiny(tmp_path, *FLAGS)
  out = proc.communicate()[0]
  assert proc.returncode == 0 and "resuming at step" in out, out
  same_params(straight / "model", tmp_path / "model")
  assert _files(tmp_path) == _files(straight) and not list((tmp_path / "negatives").glob(".*"))


def test_refresh_config_errors(tmp_path):
  c = _config()
  c.tasks.retrieval.kl_weight = 1.0
  with pytest.raises(ValueError, match="refreshed negatives have no teacher scores"):
    train.train(c, tmp_path / "a")
  c = _config()
  c.refresh.start = 300  # Past refresh.end.
  with pytest.raises(ValueError, match="expected 0 <= start < end"):
    train.train(c, tmp_path / "b")
  c = _config()
  c.train.refresh_options = "--range 2-50"  # A config of the older schema: one line naming the new home.
  with pytest.raises(ValueError, match="train.refresh_options is now the section refresh"):
    train.train(c, tmp_path / "b")
  c = _config()
  c.tasks.retrieval.neg_num = 0
  with pytest.raises(ValueError, match="no retrieval dataset trains with negatives"):
    train.train(c, tmp_path / "c")
  assert not any(tmp_path.iterdir())
