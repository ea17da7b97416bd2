"""Fault injection on CLI runs of the tiny config: every stop saves a complete checkpoint, resumes are
bit-identical to the session's uninterrupted run, damaged checkpoints fall back, bad flags are one line.

The runs read the compiled steps of the straight run (conftest). What needs no process boundary is in
test_runs.py."""
import contextlib
import io
import json
import os
import random
import shutil
import signal
import time

import pytest

import conftest
from conftest import error_line, metric_steps, same_params, steps
from piccolo_jax import verify


def _run(workdir, *extra):
  proc = conftest.run_tiny(workdir, *extra)
  out = proc.communicate()[0]
  return proc.returncode, out


def _leftovers(workdir):
  return [p.name for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]


def test_sigterm_then_sigint_save_and_resume_bit_identical_without_duplicate_logs(straight_run, tmp_path):
  """A preempted run (SIGTERM), resumed and stopped again by Ctrl-C (SIGINT), then resumed to the end:
  every stop saves the step it ends on, and the result is the uninterrupted run's, step by step."""
  stopped = []
  for sig in (signal.SIGTERM, signal.SIGINT):
    before = steps(tmp_path)
    proc = conftest.run_tiny(tmp_path)
    while steps(tmp_path) == before and proc.poll() is None:  # A new checkpoint: training is under way.
      time.sleep(0.05)
    proc.send_signal(sig)
    out = proc.communicate()[0]
    assert proc.returncode == 0 and "preempted: saved step" in out and not _leftovers(tmp_path), out
    assert not (tmp_path / "model").exists(), f"finished before {sig.name}"
    stopped.append(max(steps(tmp_path)))
    assert len(stopped) == 1 or "resuming at step" in out
  assert stopped[0] < stopped[1] < 12
  rc, out = _run(tmp_path)
  assert rc == 0 and f"resuming at step {stopped[1]}" in out, out
  same_params(straight_run / "straight" / "model", tmp_path / "model")
  assert metric_steps(tmp_path) == list(range(1, 13))
  rows = lambda w: {r["step"]: r[f"loss/{r['task']}"] for r in map(json.loads, (w / "metrics.jsonl").open())
                    if "task" in r}
  assert rows(tmp_path) == rows(straight_run / "straight")  # Same batches, same losses at every step.


def test_random_kill9_during_saves_resumes_bit_identical(straight_run, tmp_path):
  """kill -9 twice at seeded random moments; saves every step, so kills land mid-save too."""
  rng = random.Random(int(os.environ.get("CRASH_SEED", "0")))
  for _ in range(2):
    proc = conftest.run_tiny(tmp_path, "--config.checkpoint.every=1")
    before = steps(tmp_path)
    while steps(tmp_path) == before and proc.poll() is None:  # Start-up done: saves are under way.
      time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.5))
    proc.kill()
    proc.wait()
  rc, out = _run(tmp_path, "--config.checkpoint.every=1")
  assert rc == 0, out
  same_params(straight_run / "straight" / "model", tmp_path / "model")
  assert metric_steps(tmp_path) == list(range(1, 13))


def test_damaged_checkpoints_fall_back_then_stop_with_one_line(straight_run, tmp_path):
  """Checkpoints 4..12 of the uninterrupted run, each newer one damaged another way: a parameter of 8 and an Adam
  moment of 6 changed by a finite amount (python -m piccolo_jax.verify names each), 10 without its data position, 12
  with a truncated array file. The run sets all four aside, resumes at 4 and ends with the uninterrupted run's
  parameters; then the data position of the newest changed: back to 10, the same parameters; then no checkpoint
  readable: one error line. (One run falls back past every kind of damage: the CLI runs of the fall-backs.)"""
  w = tmp_path / "w"
  shutil.copytree(straight_run / "straight", w)
  assert steps(w) == [4, 6, 8, 10, 12]
  shutil.rmtree(w / "model")

  def bump(*words):
    def change(state):
      x, _ = conftest.leaf(state, *words)
      x.reshape(-1)[7] += 1e-3
    return change

  conftest.rewrite_state(w / "checkpoints/8", bump("params", "ffn_in", "kernel"))
  conftest.rewrite_state(w / "checkpoints/6", bump("mu", "query", "kernel"))
  out = io.StringIO()  # verify's CLI in a process of its own: tests/test_verify.py.
  with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
    verify.main([str(w / "checkpoints")])
  lines = out.getvalue().splitlines()
  assert e.value.code == 1, lines
  assert any("checkpoints/8: array params/layers/0/ffn_in/kernel (shard 0:32,0:64) differs from its digest" in l
             for l in lines) and any("checkpoints/6: array opt/" in l and "/mu/" in l for l in lines), lines
  assert all(f"checkpoints/{s}: ok (checkpoint)" in out.getvalue() for s in (4, 10, 12)), lines
  biggest = max((p for p in (w / "checkpoints/12").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  os.truncate(biggest, biggest.stat().st_size // 2)  # 12: a truncated array file.
  (w / "checkpoints/10/data/metadata").unlink()  # 10: no data position.
  rc, out = _run(w)
  assert rc == 0 and out.count("is damaged") == 4 and "resuming at step 4" in out, out
  assert out.count("differs from its digest on process 0") == 2, out
  assert sorted(int(p.name.split(".")[0]) for p in (w / "checkpoints").glob("*.corrupt-*")) == [6, 8, 10, 12]
  same_params(straight_run / "straight" / "model", w / "model")
  data = w / "checkpoints/12/data/metadata"
  data.write_text(data.read_text().replace('"next_index": 12', '"next_index": 11'))
  shutil.rmtree(w / "model")
  rc, out = _run(w)
  assert rc == 0 and "data position" in out and "differs from its digest" in out and "resuming at step 10" in out
  same_params(straight_run / "straight" / "model", w / "model")
  for step in steps(w):
    (w / "checkpoints" / str(step) / "state" / "_METADATA").unlink()
  rc, out = _run(w)
  assert rc != 0 and "no usable checkpoint" in error_line(out)


def test_bad_flags_are_one_line(straight_run, tmp_path):
  rc, out = _run(tmp_path / "w", "--config.optim.lrr=1")
  assert rc != 0 and "did you mean 'optim.lr'" in error_line(out)
  assert not (tmp_path / "w").exists()  # A failed start-up leaves no workdir behind.
