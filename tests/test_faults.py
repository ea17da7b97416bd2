"""Fault injection on the tiny config: every exit path leaves a complete checkpoint, damaged
checkpoints fall back, a workdir keeps one run's identity, bad input gives one `error:` line."""
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import tiny_config
from piccolo_jax import modeldir

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = "--config=tests/tiny_config.py"
SHORT = ["--config.data.buckets=(64,)", "--config.train.max_steps=6", "--config.checkpoint.every=2",
         "--config.checkpoint.keep=10", "--config.model.dropout=0.1"]


def _env(cache):
  return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", HF_HUB_OFFLINE="1",
              JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _start(args, cache, module="piccolo_jax.train"):
  return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=_env(cache),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(args, cache, module="piccolo_jax.train"):
  proc = _start(args, cache, module)
  out = proc.communicate()[0]
  return proc.returncode, out


def _train(workdir, cache, *extra):
  return _run([TINY, f"--workdir={workdir}", *SHORT, *extra], cache)


def _steps(workdir):
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _leftovers(workdir):
  return [p.name for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if "tmp" in p.name]


def _params(model_dir):
  return modeldir.load_params(model_dir, modeldir.load_config(model_dir))


def _same_params(a, b):
  jax.tree.map(np.testing.assert_array_equal, _params(a), _params(b))


def _metric_steps(workdir):
  rows = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return [r["step"] for r in rows if "task" in r]


def _error_line(out):
  """The one line the CLI printed for a bad input (and that there is no traceback)."""
  assert "Traceback" not in out, out
  lines = [l for l in out.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, out
  return lines[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def straight(root):
  """An uninterrupted 6-step run; its compiled programs fill a cache the others reuse."""
  rc, out = _train(root / "straight", root / "cache")
  assert rc == 0, out
  assert _steps(root / "straight") == [2, 4, 6]
  return root / "straight"


def test_nonfinite_stop_keeps_the_checkpoint_in_flight(root):
  """lr 1e30: step 1's update is huge, step 2 goes NaN while checkpoint 1 is still being written."""
  w = root / "nan"
  rc, out = _run([TINY, f"--workdir={w}", "--config.data.buckets=(64,)", "--config.optim.lr=1e30",
                  "--config.checkpoint.every=1", "--config.train.max_steps=20",
                  "--config.train.max_nonfinite_steps=2"], root / "cache")
  line = _error_line(out)
  assert rc != 0 and "3 non-finite steps in a row" in line, out
  resume = int(line.split("resumes from checkpoint step ")[1].split()[0].rstrip(";."))
  assert _steps(w) and max(_steps(w)) == resume and not _leftovers(w)
  assert "commit_success.txt" in os.listdir(w / "checkpoints" / str(resume))


def test_nonfinite_with_grad_accum_waits_for_the_save(root):
  w = root / "nan_accum"
  rc, out = _run([TINY, f"--workdir={w}", "--config.data.buckets=(64,)", "--config.optim.lr=1e30",
                  "--config.optim.grad_accum=5", "--config.train.max_steps=20", "--config.checkpoint.every=5",
                  "--config.train.max_nonfinite_steps=0"], root / "cache")
  line = _error_line(out)
  resume = int(line.split("resumes from checkpoint step ")[1].split()[0].rstrip(";."))
  assert rc != 0 and _steps(w) == [resume] and resume >= 5 and not _leftovers(w), out


def test_nonfinite_steps_are_skipped_below_the_limit(tmp_path):
  from piccolo_jax import train
  c = tiny_config.get_config()
  c.data.datasets = c.data.datasets[1:2]  # STS only: temperature 0 makes every step NaN.
  c.loss.sts.temperature = 0.0
  c.train.update(max_steps=3, max_nonfinite_steps=5)
  train.train(c, tmp_path)  # Three skipped steps, no stop.
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["nonfinite_skipped"] for r in rows if "task" in r] == [1, 2, 3]
  init = train.state_lib.init_params(c)[1]
  jax.tree.map(np.testing.assert_array_equal, _params(tmp_path / "model"), init)  # Nothing applied.


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_signal_resumes_bit_identical_without_duplicate_logs(straight, root, tmp_path, sig):
  proc = _start([TINY, f"--workdir={tmp_path}", *SHORT], root / "cache")
  while not _steps(tmp_path) and proc.poll() is None:
    time.sleep(0.2)
  proc.send_signal(sig)
  out = proc.communicate()[0]
  assert not (tmp_path / "model").exists(), "finished before the signal"
  if sig == signal.SIGINT:
    assert proc.returncode == 0 and "preempted: saved step" in out and not _leftovers(tmp_path), out
  rc, out = _train(tmp_path, root / "cache")
  assert rc == 0 and "resuming at step" in out, out
  _same_params(straight / "model", tmp_path / "model")
  assert _metric_steps(tmp_path) == list(range(1, 7))


def test_random_kill9_during_saves_resumes_bit_identical(straight, root, tmp_path):
  """kill -9 at seeded random moments (saves every step, so some land mid-save), three times."""
  rng = random.Random(int(os.environ.get("CRASH_SEED", "0")))
  for _ in range(3):
    proc = _start([TINY, f"--workdir={tmp_path}", *SHORT, "--config.checkpoint.every=1"], root / "cache")
    before = _steps(tmp_path)
    while _steps(tmp_path) == before and proc.poll() is None:  # Start-up done, the first save is under way.
      time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.5))
    proc.kill()
    proc.wait()
  rc, out = _train(tmp_path, root / "cache", "--config.checkpoint.every=1")
  assert rc == 0, out
  _same_params(straight / "model", tmp_path / "model")
  assert _metric_steps(tmp_path) == list(range(1, 7))


@pytest.mark.parametrize("damage", ["truncate", "state_metadata", "data_metadata"])
def test_damaged_newest_checkpoint_falls_back(straight, root, tmp_path, damage):
  import shutil
  w = tmp_path / "w"
  shutil.copytree(straight, w)
  newest = w / "checkpoints" / "6"
  if damage == "truncate":
    biggest = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(biggest, biggest.stat().st_size // 2)
  else:
    (newest / ("state/_METADATA" if damage == "state_metadata" else "data/metadata")).unlink()
  shutil.rmtree(w / "model")
  rc, out = _train(w, root / "cache")
  assert rc == 0 and "checkpoint" in out and "is damaged" in out and "resuming at step 4" in out, out
  assert [p.name.split(".")[0] for p in (w / "checkpoints").glob("6.corrupt-*")] == ["6"]
  _same_params(straight / "model", w / "model")


def test_no_usable_checkpoint_is_one_line(straight, root, tmp_path):
  import shutil
  w = tmp_path / "w"
  shutil.copytree(straight, w)
  for step in _steps(w):
    (w / "checkpoints" / str(step) / "state" / "_METADATA").unlink()
  rc, out = _train(w, root / "cache")
  assert rc != 0 and "no usable checkpoint" in _error_line(out)


def test_extend_finished_run_reexports_and_config_changes_are_refused(straight, root, tmp_path):
  import shutil
  w = tmp_path / "w"
  shutil.copytree(straight, w)
  rc, out = _train(w, root / "cache", "--config.optim.lr=0.01")
  assert rc != 0 and "optim.lr 0.003 -> 0.01" in _error_line(out)
  rc, out = _train(w, root / "cache", "--config.model.arch.hidden_size=64")
  assert rc != 0 and "model.arch.hidden_size 32 -> 64" in _error_line(out)
  assert json.loads((w / "export.json").read_text()) == {"step": 6}
  rc, out = _train(w, root / "cache", "--config.train.max_steps=8")
  assert rc == 0 and "train.max_steps 6 -> 8" in out, out
  assert json.loads((w / "export.json").read_text()) == {"step": 8}
  assert np.abs(_params(w / "model")["embeddings"]["word"]["embedding"]
                - _params(straight / "model")["embeddings"]["word"]["embedding"]).max() > 0
  shutil.rmtree(w / "export")  # Missing: rebuilt by the next run, which trains nothing.
  rc, out = _train(w, root / "cache", "--config.train.max_steps=8")
  assert rc == 0 and (w / "export" / "modules.json").is_file(), out


def test_bad_config_and_entries_are_one_line(root, tmp_path):
  data = REPO / "data/sts-b-en/sts-b-en.train.tsv"
  cases = {
      "--config.optim.lrr=1": "did you mean 'optim.lr'",
      f"--config.data.datasets=({{'kind':'tsv','path':'{data}','limt':32,'tsk':'sts'}},)":
          "unknown key 'limt'; did you mean 'limit'",
      "--config.data.datasets=({'kind':'jsonl'},)": "missing 'path'",
  }
  for arg, message in cases.items():
    rc, out = _run([TINY, f"--workdir={tmp_path / 'w'}", arg], root / "cache")
    assert rc != 0 and message in _error_line(out), (arg, out)
  assert not (tmp_path / "w").exists()  # A failed start-up leaves no workdir behind.
  (tmp_path / "file").write_text("")
  rc, out = _run([TINY, f"--workdir={tmp_path / 'file' / 'w'}", "--config.train.max_steps=1"], root / "cache")
  assert rc != 0 and "file/w" in _error_line(out)


def test_clis_give_one_error_line(minilm_path, root, tmp_path):
  import shutil
  bad = tmp_path / "bad_model"
  shutil.copytree(minilm_path, bad)
  st = bad / "model.safetensors"
  os.truncate(st, st.stat().st_size // 3)
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "one.txt").write_text("a text\n")
  cases = [
      ("piccolo_jax.convert", [str(bad), str(tmp_path / "out")], "model.safetensors"),
      ("piccolo_jax.train", [TINY, f"--workdir={tmp_path / 'w'}", f"--config.model.init={bad}"], "model.safetensors"),
      ("piccolo_jax.encode", [str(minilm_path), "--input", str(tmp_path / "empty.txt"), "--output",
                              str(tmp_path / "e.npy")], "no texts"),
      ("piccolo_jax.encode", [str(tmp_path / "nope"), "--input", str(tmp_path / "one.txt"), "--output",
                              str(tmp_path / "e.npy")], "nope"),
      ("piccolo_jax.export", [str(tmp_path / "nope"), str(tmp_path / "o")], "nope"),
      ("piccolo_jax.evaluate", [str(tmp_path / "nope"), "--task", "sts:data/sts-b-en/sts-b-en.dev.tsv"], "nope"),
  ]
  for module, args, message in cases:
    rc, out = _run(args, root / "cache", module)
    assert rc != 0 and message in _error_line(out), (module, out)
  assert not (tmp_path / "out").exists()


def test_skip_counts_are_logged_at_startup(tmp_path):
  from piccolo_jax import train
  path = tmp_path / "s.jsonl"
  rows = [{"query": f"q{i}", "pos": [f"p{i}"], "neg": ["n"]} for i in range(16)] + [{"query": " ", "pos": ["p"],
                                                                                        "neg": ["n"]}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  c = tiny_config.get_config()
  c.data.datasets = ({"kind": "jsonl", "path": str(path)},)
  c.train.max_steps = 1
  train.train(c, tmp_path / "w")
  first = json.loads((tmp_path / "w" / "metrics.jsonl").read_text().splitlines()[0])
  assert first["step"] == 0 and first[f"data/{path}/skipped/empty text"] == 1
