"""Multi-process training equals single-process training; launch scripts' dry runs."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import conftest
import tiny_config
from piccolo_jax import modeldir

REPO = pathlib.Path(__file__).resolve().parent.parent
OVERRIDES = ["--config.train.epochs=1", "--config.data.pack_menu=1", "--config.train.tensorboard=False",
             "--config.checkpoint.every=2", "--config.checkpoint.keep=10"]  # No tb/: see conftest.TINY_RUN.


def _env(devices):
  return dict(os.environ, XLA_FLAGS=conftest.xla_flags(devices),
              HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHON=sys.executable)


def _train(workdir, devices, *extra, overrides=()):
  return subprocess.run(["bash", "launch/local.sh", *extra, "tests/tiny_config.py", str(workdir), *OVERRIDES,
                         *overrides],
                        cwd=REPO, env=_env(devices), capture_output=True, text=True, timeout=900)


def _losses(workdir):
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {m["step"]: m[f"loss/{m['task']}"] for m in rows if "task" in m}


def _params(workdir):
  return modeldir.load_params(workdir / "model", modeldir.load_config(workdir / "model"))


def test_two_processes_train_like_one_and_resume_in_one(tmp_path):
  """2 processes x 2 devices train like 1 x 4 (steps that mix tasks, so the per-task arrays are whole on
  every process and the packed rows split), with the same negatives refreshed at step 2, and their checkpoint
  resumes in one process."""
  two = tiny_config.get_config().data.datasets[:2]  # Retrieval and STS: one group each a step, one program.
  mixed = ["--config.data.mix=groups", "--config.loss.groups=2", f"--config.data.datasets={two!r}",
           "--config.refresh.every=2", "--config.tasks.retrieval.false_negatives=model"]
  single = _train(tmp_path / "single", 4, overrides=mixed)
  assert single.returncode == 0, single.stdout + single.stderr
  multi = _train(tmp_path / "multi", 2, "--processes", "2", "--port", "12391", overrides=mixed)
  assert multi.returncode == 0, multi.stdout + multi.stderr
  assert "on 4 devices" in multi.stderr
  a, b = _losses(tmp_path / "single"), _losses(tmp_path / "multi")
  assert sorted(a) == sorted(b) == list(range(1, 5))
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)
  negatives = lambda w: {p.relative_to(w): p.read_bytes() for p in sorted((w / "negatives").rglob("*.bin"))}
  assert negatives(tmp_path / "multi") == negatives(tmp_path / "single") and negatives(tmp_path / "single")
  final = _params(tmp_path / "multi")
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), final, _params(tmp_path / "single"))
  # The 2-process checkpoint at step 2 resumes in one process (4 devices).
  (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
  shutil.copytree(tmp_path / "multi" / "checkpoints" / "2", tmp_path / "resumed" / "checkpoints" / "2")
  resumed = _train(tmp_path / "resumed", 4, overrides=mixed)
  assert resumed.returncode == 0 and "resuming at step 2" in resumed.stderr, resumed.stderr
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), _params(tmp_path / "resumed"), final)


def test_two_processes_fall_back_together_when_one_shard_is_damaged(tmp_path):
  """Parameters sharded over 4 devices: checkpoints of 1 process x 4, resumed by 2 processes x 2, where a finite
  change in a shard of the newest that only process 1 holds makes both set it aside and resume from the one before,
  to the same parameters (to rounding)."""
  flags = ["--config.mesh.fsdp=4", "--config.train.max_steps=2", "--config.checkpoint.every=1",
           f"--config.data.datasets={tiny_config.get_config().data.datasets[1:2]!r}"]  # STS: one program.
  first = _train(tmp_path / "w", 4, overrides=flags)
  assert first.returncode == 0, first.stdout + first.stderr
  want = _params(tmp_path / "w")
  for name in ("model", "export"):
    shutil.rmtree(tmp_path / "w" / name)
  (tmp_path / "w" / "export.json").unlink()

  def change(state):  # The word embeddings [30522, 32] are sharded 4 ways on their columns: 16..31 are process 1's.
    x, _ = conftest.leaf(state, "params", "word", "embedding")
    x[5, 20] += 1e-3

  conftest.rewrite_state(tmp_path / "w" / "checkpoints" / "2", change)
  again = _train(tmp_path / "w", 2, "--processes", "2", "--port", "12393", overrides=flags)
  out = again.stdout + again.stderr
  assert again.returncode == 0 and out.count("resuming at step 1") == 2, out
  assert out.count("array params/embeddings/word/embedding (shard 0:30522,16:24) differs from its digest on "
                   "process 1") == 1 and out.count("process 1 found it damaged") == 1, out
  # As from the checkpoint before: to the cross-process reductions' rounding (as the test above).
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), _params(tmp_path / "w"), want)


@pytest.mark.parametrize("script", ["local.sh", "slurm.sh", "tpu_pod.sh"])
def test_launch_scripts_parse(script):
  assert subprocess.run(["bash", "-n", REPO / "launch" / script]).returncode == 0
  if shutil.which("shellcheck"):
    check = subprocess.run(["shellcheck", REPO / "launch" / script], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
  usage = subprocess.run(["bash", REPO / "launch" / script], capture_output=True, text=True)
  assert usage.returncode == 2 and "usage: launch/" in usage.stderr


def _dry(script, *args):
  out = subprocess.run(["bash", f"launch/{script}", "--dry-run", *args], cwd=REPO, capture_output=True,
                       text=True, check=True)
  return out.stdout.splitlines()


def test_dry_runs_print_well_formed_commands():
  lines = _dry("local.sh", "--processes", "2", "demo", "/tmp/w", "--config.optim.lr=2e-5")
  assert lines == [f"CUDA_VISIBLE_DEVICES={i} python -m piccolo_jax.train --config=demo --workdir=/tmp/w "
                   f"--coordinator_address=127.0.0.1:12355 --num_processes=2 --process_id={i} "
                   "--config.optim.lr=2e-5 " for i in (0, 1)]
  sbatch = _dry("slurm.sh", "--nodes", "4", "--gpus-per-node", "8", "finetune", "/shared/run")
  assert "#SBATCH --nodes=4" in sbatch and "#SBATCH --ntasks-per-node=8" in sbatch
  assert any(l.startswith("srun python -m piccolo_jax.train --config=finetune --workdir=/shared/run")
             for l in sbatch)
  assert sbatch[-1] == "sbatch /shared/run/job.sbatch"
  tpu = _dry("tpu_pod.sh", "--create", "--name", "pod", "--zone", "us-east5-a", "--repo", "https://h/r.git",
             "finetune", "/tmp/run", "--config.checkpoint.dir=gs://b/run")
  assert tpu[0] == ("gcloud compute tpus tpu-vm create pod --zone=us-east5-a --accelerator-type=v5p-32 "
                    "--version=tpu-ubuntu2204-base ")
  assert tpu[1].startswith("gcloud compute tpus tpu-vm ssh pod --zone=us-east5-a --worker=all")
  assert "--config.checkpoint.dir=gs://b/run" in tpu[1] and "git clone -q https://h/r.git" in tpu[1]
