"""Smoke tests of the benchmarks (python -m bench.NAME from the repository root) at tiny sizes."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import conftest
from bench import step as bench_step
from piccolo_jax import config
from piccolo_jax import model as model_lib
from piccolo_jax import modeldir
from piccolo_jax import models
from piccolo_jax import step

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = model_lib.Config(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, dense_out=48)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, minilm_path):
  out = tmp_path_factory.mktemp("bench") / "tiny"
  modeldir.save_model_dir(out, TINY, models.random_params(TINY, 0), minilm_path)
  return out


def run_cli(module, *args) -> dict:
  """python -m bench.MODULE in a fresh process on the one real CPU device (no fake devices); its last line as JSON."""
  env = dict(os.environ, XLA_FLAGS=conftest.xla_flags(1), HF_HUB_OFFLINE="1")
  r = subprocess.run([sys.executable, "-m", f"bench.{module}", *args], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("task", ["retrieval", "sts", "cls"])
def test_torch_losses_match_ours(task):
  import torch
  from bench import torch_ref
  batch, padded = bench_step.synthetic(task, 4, 8, 8, 2, 2000)
  emb_ND = np.random.default_rng(0).normal(size=(sum(r.lengths.size for r in batch.rows), 48)).astype(np.float32)
  c = config.base()
  c.loss.mrl_dims = (16, 48)
  ours, _ = step.step_loss(emb_ND, batch, c)
  emb = {f: torch.from_numpy(emb_ND[s]) for f, s in batch.slots[task].items()}
  theirs = torch_ref.torch_losses(task, emb, {k: torch.from_numpy(v) for k, v in padded.items()}, c)
  np.testing.assert_allclose(float(theirs), float(ours), rtol=1e-5)


def test_step_cli(tiny_dir, tmp_path):
  md = tmp_path / "b.md"
  out = run_cli("step", "--model", str(tiny_dir), "--task", "cls", "--neg", "2", "--batch", "2", "--seq", "8",
                "--reps", "1", "--dropout", "0", "--memory", "--budget-gb", "2", "--append", str(md))
  assert {"jax_step_s", "torch_step_s", "ratio", "jax_mfu_pct", "jax_max_batch", "torch_max_batch"} <= out.keys()
  np.testing.assert_allclose(out["jax_loss0"], out["torch_loss0"], rtol=1e-4)  # Same weights, texts, loss math.
  assert out["mrl_dims"] == [16, 32, 48] and out["tokens"] == 2 * 8 * (2 + 2) and "| jax |" in md.read_text()


def test_packing_bench(tiny_dir, tmp_path):
  md = tmp_path / "b.md"
  out = run_cli("packing_bench", "--model", str(tiny_dir), "--data", "retrieval-zh 64/512", "--limit", "32",
                "--reps", "0", "--block", "1", "--out", str(md))
  e = out["epochs"]["retrieval-zh 64/512"]
  assert e["real_tokens"] <= e["padded"]["packed"] < e["padded"]["torch pad-to-longest"]
  assert set(e["secs"]) == {"packed", "packed, one row length", "torch pad-to-longest"} and "| packed |" in md.read_text()
  # Rows of several lengths compute fewer attention pairs than rows of one.
  assert e["squares"]["packed"] < e["squares"]["packed, one row length"]


def test_accel_run_dry_run():
  """python -m bench.accel run --dry-run: the device benchmark's whole path at a tiny shape on CPU, every attention
  implementation that runs here (the fused kernels interpreted) and the PyTorch original on the same texts."""
  out = run_cli("accel", "run", "--dry-run", "--reps", "1")
  runs = {(r["task"], r["attention"]): r for r in out["runs"]}
  assert set(runs) == {("retrieval", a) for a in ("xla", "splash", "pallas_gpu", "torch")}
  for (task, impl), r in runs.items():
    assert r["step_s"] > 0 and r["real_tokens_per_s"] > 0 and r["mfu"] is None, r  # No peak for a CPU.
    if impl in ("splash", "pallas_gpu"):  # The same step: losses within bfloat16 rounding of xla's.
      np.testing.assert_allclose(r["loss"], runs[task, "xla"]["loss"], rtol=2e-2)
