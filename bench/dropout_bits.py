"""Dropout cost per element by mask scheme and PRNG impl, and whether each compiles batch-sharded."""
import os

import jax
import jax.numpy as jnp
from flax import nnx

from bench import harness
from piccolo_jax import model as model_lib, sharding

IMPLS = ("threefry2x32", "threefry4x32", "philox4x32")
SCHEMES = {"nnx.Dropout (32 bits)": nnx.Dropout, "model.Dropout (16 bits)": model_lib.Dropout}


def main():
  p = harness.parser(__doc__, reps=5, append=True)
  p.add_argument("--shape", default="32,12,128,128", help="B,H,L,L of the tensor dropped")
  args = p.parse_args()
  x = jnp.ones(tuple(int(s) for s in args.shape.split(",")))
  x_sharded = jax.device_put(x, sharding.batch_sharding(sharding.make_mesh(1)))
  rows = [("mask", "PRNG impl", "ms", "ns / element", f"compiles on {jax.device_count()} devices")]
  for name, cls in SCHEMES.items():
    for impl in IMPLS:
      drop, f = cls(0.1, rngs=nnx.Rngs(dropout=jax.random.key(0, impl=impl))), nnx.jit(lambda m, x: m(x))
      t = min(harness.alternate({"dropout": lambda: f(drop, x).block_until_ready()}, args.reps)[0]["dropout"])
      try:
        f(drop, x_sharded).block_until_ready()
        sharded = "yes"
      except Exception as e:  # noqa: BLE001 - the error is the finding.
        sharded = "no: " + str(e).strip().splitlines()[-1][:80]
      rows.append((name, impl, f"{t * 1e3:.1f}", f"{t / x.size * 1e9:.2f}", sharded))
  notes = [f"shape {x.shape}, drop rate 0.1, best of {args.reps} after one warm-up call; "
           f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"]
  harness.report("dropout: cost per element by mask scheme and PRNG", rows, notes, {"rows": rows[1:]}, args.append)


if __name__ == "__main__":
  main()
