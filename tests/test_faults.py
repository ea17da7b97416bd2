"""Fault injection on the tiny config: every exit path leaves a complete checkpoint, damaged
checkpoints fall back, a workdir keeps one run's identity, bad input gives one `error:` line.

CLI runs share the session's straight run and its compilation cache (conftest.run_tiny); what
needs no process boundary runs in-process on one dataset (one compiled step program)."""
import json
import os
import random
import shutil
import signal
import time

import jax
import numpy as np
import pytest

import conftest
import tiny_config
from piccolo_jax import data, encode, evaluate, export, modeldir, rundir, sources, train
from piccolo_jax import convert as convert_lib


def _run(workdir, cache, *extra):
  proc = conftest.run_tiny(workdir, cache, *extra)
  out = proc.communicate()[0]
  return proc.returncode, out


def _steps(workdir):
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _leftovers(workdir):
  return [p.name for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]


def _params(model_dir):
  return modeldir.load_params(model_dir, modeldir.load_config(model_dir))


def _same_params(a, b):
  jax.tree.map(np.testing.assert_array_equal, _params(a), _params(b))


def _metric_steps(workdir):
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["step"] for r in rows if "task" in r]


def _error_line(out):
  """The one `error:` line a CLI printed for bad input, with no traceback."""
  assert "Traceback" not in out, out
  lines = [l for l in out.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, out
  return lines[0]


def _sts_only(**train):
  """The tiny config on its STS dataset only (one compiled program)."""
  c = tiny_config.get_config()
  c.data.datasets = c.data.datasets[1:2]
  c.train.update(train)
  return c


def test_nonfinite_stop_keeps_the_checkpoint_in_flight(tmp_path):
  """lr 1e30: the first update is huge and step 2 goes NaN while checkpoint 1 is still being written."""
  c = _sts_only(max_steps=20, max_nonfinite_steps=2)
  c.optim.lr, c.checkpoint.every = 1e30, 1
  with pytest.raises(train.NonFiniteError, match="3 non-finite steps in a row") as e:
    train.train(c, tmp_path)
  resume = int(str(e.value).split("resumes from checkpoint step ")[1])
  assert max(_steps(tmp_path)) == resume >= 1 and not _leftovers(tmp_path)
  assert "commit_success.txt" in os.listdir(tmp_path / "checkpoints" / str(resume))


def test_nonfinite_with_grad_accum_waits_for_the_save(tmp_path):
  c = _sts_only(max_steps=20, max_nonfinite_steps=0)
  c.optim.update(lr=1e30, grad_accum=5)
  c.checkpoint.every = 5
  with pytest.raises(train.NonFiniteError) as e:
    train.train(c, tmp_path)
  resume = int(str(e.value).split("resumes from checkpoint step ")[1])
  assert _steps(tmp_path) == [resume] and resume >= 5 and not _leftovers(tmp_path)


def test_nonfinite_steps_are_skipped_below_the_limit(tmp_path):
  c = _sts_only(max_steps=3, max_nonfinite_steps=5)
  c.tasks.sts.temperature = 0.0  # cos / 0: every step NaN.
  train.train(c, tmp_path)
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["nonfinite_skipped"] for r in rows if "task" in r] == [1, 2, 3]
  init = train.state_lib.init_params(c)[1]
  jax.tree.map(np.testing.assert_array_equal, _params(tmp_path / "model"), init)  # Nothing applied.


def test_sigint_saves_and_resumes_bit_identical_without_duplicate_logs(straight_run, tmp_path):
  cache = straight_run / "jax_cache"
  proc = conftest.run_tiny(tmp_path, cache)
  while not _steps(tmp_path) and proc.poll() is None:
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  out = proc.communicate()[0]
  assert proc.returncode == 0 and "preempted: saved step" in out and not _leftovers(tmp_path), out
  assert not (tmp_path / "model").exists(), "finished before the signal"
  rc, out = _run(tmp_path, cache)
  assert rc == 0 and "resuming at step" in out, out
  _same_params(straight_run / "straight" / "model", tmp_path / "model")
  assert _metric_steps(tmp_path) == list(range(1, 13))


def test_random_kill9_during_saves_resumes_bit_identical(straight_run, tmp_path):
  """kill -9 three times at seeded random moments; saves every step, so kills land mid-save too."""
  cache, rng = straight_run / "jax_cache", random.Random(int(os.environ.get("CRASH_SEED", "0")))
  for _ in range(3):
    proc = conftest.run_tiny(tmp_path, cache, "--config.checkpoint.every=1")
    before = _steps(tmp_path)
    while _steps(tmp_path) == before and proc.poll() is None:  # Start-up done: saves are under way.
      time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.5))
    proc.kill()
    proc.wait()
  rc, out = _run(tmp_path, cache, "--config.checkpoint.every=1")
  assert rc == 0, out
  _same_params(straight_run / "straight" / "model", tmp_path / "model")
  assert _metric_steps(tmp_path) == list(range(1, 13))


def test_damaged_checkpoints_fall_back_then_stop_with_one_line(straight_run, tmp_path):
  w = tmp_path / "w"
  shutil.copytree(straight_run / "straight", w)
  assert _steps(w) == [8, 10, 12]
  biggest = max((p for p in (w / "checkpoints/12").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  os.truncate(biggest, biggest.stat().st_size // 2)  # 12: a truncated array file.
  (w / "checkpoints/10/data/metadata").unlink()  # 10: no data position.
  shutil.rmtree(w / "model")
  rc, out = _run(w, straight_run / "jax_cache")
  assert rc == 0 and out.count("is damaged") == 2 and "resuming at step 8" in out, out
  assert sorted(p.name.split(".")[0] for p in (w / "checkpoints").glob("*.corrupt-*")) == ["10", "12"]
  _same_params(straight_run / "straight" / "model", w / "model")
  for step in _steps(w):
    (w / "checkpoints" / str(step) / "state" / "_METADATA").unlink()
  rc, out = _run(w, straight_run / "jax_cache")
  assert rc != 0 and "no usable checkpoint" in _error_line(out)


def test_extend_finished_run_reexports_and_config_changes_are_refused(tmp_path):
  c = _sts_only(max_steps=2)
  train.train(c, tmp_path)
  lr, wide = c.copy_and_resolve_references(), c.copy_and_resolve_references()
  lr.optim.lr, wide.model.arch.hidden_size = 0.01, 64
  for changed, shown in ((lr, "optim.lr 0.003 -> 0.01"), (wide, "model.arch.hidden_size 32 -> 64")):
    with pytest.raises(rundir.ConfigChangeError, match=shown):
      train.train(changed, tmp_path)
  assert json.loads((tmp_path / "export.json").read_text()) == {"step": 2}
  before = _params(tmp_path / "model")
  c.train.max_steps = 4
  train.train(c, tmp_path)
  assert json.loads((tmp_path / "export.json").read_text()) == {"step": 4}
  assert _metric_steps(tmp_path) == [1, 2, 3, 4]
  assert np.abs(_params(tmp_path / "model")["embeddings"]["word"]["embedding"]
                - before["embeddings"]["word"]["embedding"]).max() > 0
  shutil.rmtree(tmp_path / "export")  # Missing: rebuilt by the next run, which trains nothing.
  train.train(c, tmp_path)
  assert (tmp_path / "export" / "modules.json").is_file()


def test_bad_config_and_entries(straight_run, tmp_path):
  cache = straight_run / "jax_cache"
  rc, out = _run(tmp_path / "w", cache, "--config.optim.lrr=1")
  assert rc != 0 and "did you mean 'optim.lr'" in _error_line(out)
  sts = str(conftest.DATA / "sts-b-en/sts-b-en.train.tsv")
  rc, out = _run(tmp_path / "w", cache, f"--config.data.datasets=({{'kind':'tsv','path':'{sts}','limt':32}},)")
  assert rc != 0 and "unknown key 'limt'; did you mean 'limit'?" in _error_line(out)
  assert not (tmp_path / "w").exists()  # A failed start-up leaves no workdir behind.
  with pytest.raises(data.DataError, match="missing 'path'"):
    sources.expand(({"kind": "jsonl", "limit": 3},))
  (tmp_path / "file").write_text("")
  with pytest.raises(OSError):  # train's CLI prints OSErrors as one line, as the DataError above.
    train.train(_sts_only(max_steps=1), tmp_path / "file" / "w")


def test_clis_give_one_error_line(minilm_path, tmp_path, capsys):
  bad = tmp_path / "bad_model"
  shutil.copytree(minilm_path, bad)
  os.truncate(bad / "model.safetensors", (bad / "model.safetensors").stat().st_size // 3)
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "one.txt").write_text("a text\n")
  nope = str(tmp_path / "nope")
  cases = [(convert_lib.main, [str(bad), str(tmp_path / "out")], "model.safetensors: not a readable"),
           (encode.main, [str(minilm_path), "--input", str(tmp_path / "empty.txt"), "--output", "e.npy"], "no texts"),
           (encode.main, [nope, "--input", str(tmp_path / "one.txt"), "--output", "e.npy"], "nope"),
           (export.main, [nope, str(tmp_path / "o")], "nope"),
           (evaluate.main, [nope, "--task", f"sts:{conftest.DATA}/sts-b-en/sts-b-en.dev.tsv"], "nope")]
  for main, args, message in cases:
    with pytest.raises(SystemExit) as e:
      main(args)
    assert e.value.code != 0 and message in _error_line(capsys.readouterr().err), main
  assert not (tmp_path / "out").exists()
  c = _sts_only(max_steps=1)
  c.model.init = str(bad)
  with pytest.raises(ValueError, match="model.safetensors: not a readable"):
    train.train(c, tmp_path / "w")


def test_skip_counts_are_logged_at_startup(tmp_path):
  path = tmp_path / "s.tsv"
  rows = [f"a{i}\tb{i}\t{i % 5}" for i in range(16)] + ["\tb\t1"]
  path.write_text("\n".join(rows) + "\n")
  c = _sts_only(max_steps=1)
  c.data.datasets = ({"kind": "tsv", "path": str(path), "task": "sts"},)
  train.train(c, tmp_path / "w")
  first = json.loads((tmp_path / "w" / "metrics.jsonl").read_text().splitlines()[0])
  assert first["step"] == 0 and first[f"data/{path}/skipped/empty text"] == 1
