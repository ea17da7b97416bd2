"""Dropout cost per element by mask scheme and PRNG impl, and whether each compiles batch-sharded.

  XLA_FLAGS=--xla_force_host_platform_device_count=2 HF_HUB_OFFLINE=1 .venv/bin/python bench/dropout_bits.py

Times one jitted dropout of an attention-probability tensor (MiniLM, 32 x 128 tokens) on one device:
nnx.Dropout (jax.random.bernoulli, 32 bits per element) and model.Dropout (16 bits), each under the
PRNG impls JAX ships. Then compiles each batch-sharded over two devices, as training does.
"""
import argparse
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from piccolo_jax import bench  # noqa: E402
from piccolo_jax import model as model_lib  # noqa: E402

IMPLS = ("threefry2x32", "threefry4x32", "philox4x32")
SCHEMES = {"nnx.Dropout (32 bits)": nnx.Dropout, "model.Dropout (16 bits)": model_lib.Dropout}


def best_time(fn, reps):
  fn()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shape", default="32,12,128,128", help="B,H,L,L of the tensor dropped")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--append", default=None, metavar="FILE")
  args = p.parse_args()
  shape = tuple(int(s) for s in args.shape.split(","))
  x = jnp.ones(shape)
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x_sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  rows = [("mask", "PRNG impl", "ms", "ns / element", f"compiles on {jax.device_count()} devices")]
  for name, cls in SCHEMES.items():
    for impl in IMPLS:
      drop = cls(0.1, rngs=nnx.Rngs(dropout=jax.random.key(0, impl=impl)))
      f = nnx.jit(lambda m, x: m(x))
      t = best_time(lambda: f(drop, x).block_until_ready(), args.reps)
      try:
        f(drop, x_sharded).block_until_ready()
        sharded = "yes"
      except Exception as e:  # noqa: BLE001 - the error is the finding.
        sharded = "no: " + str(e).strip().splitlines()[-1][:80]
      rows.append((name, impl, f"{t * 1e3:.1f}", f"{t / x.size * 1e9:.2f}", sharded))
  notes = [f"shape {shape}, drop rate 0.1, best of {args.reps} after one warm-up call; "
           f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"]
  bench.report("dropout: cost per element by mask scheme and PRNG", rows, notes,
               {"rows": rows[1:], "machine": bench.machine()}, args.append)


if __name__ == "__main__":
  main()
