"""What the checkpoint digests cost (piccolo_jax/digest.py) at the stella shape: parameters and Adam moments,
float32, about 4 GB. Saves and restores through the trainer's Orbax manager and checkpoint.restore_latest, with the
digests (checkpoint.save) and without them (the same items less `digests`: restore_latest then checks the rest
as before), alternating; the digest alone in GB/s."""
import shutil
import time
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import xxhash

from bench import harness
from piccolo_jax import checkpoint, config, digest, sharding, state as state_lib
from piccolo_jax import models


class _Position:
  def get_state(self):
    return {"next_index": 1000}


def _save(mngr, step, state, with_digests):
  """(s the training loop waits, s to a complete checkpoint): the arguments (the digests) and Orbax's save."""
  t = time.perf_counter()
  if with_digests:
    checkpoint.save(mngr, step, state, _Position())
  else:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(
        {**_Position().get_state(), "negatives": ""})), force=True)
  blocking = time.perf_counter() - t
  mngr.wait_until_finished()
  return blocking, time.perf_counter() - t


def _restore(mngr, state, shardings):
  """The trainer's restore (checkpoint.restore_latest): it checks the digests where the checkpoint has them."""
  t = time.perf_counter()
  jax.block_until_ready(checkpoint.restore_latest(mngr, state, shardings)[0])
  return time.perf_counter() - t


def hash_rates(mb=512) -> dict:
  """GB/s of crc32 (zlib) and xxh3-64 over one buffer of `mb` MB, the best of 3."""
  buf = memoryview(np.random.default_rng(0).random(mb << 18, dtype=np.float32)).cast("B")
  rates = {}
  for name, fn in (("crc32 (zlib)", zlib.crc32), ("xxh3-64", xxhash.xxh3_64_intdigest)):
    rates[name] = buf.nbytes / min(harness.timed(lambda: fn(buf))[1] for _ in range(3)) / 1e9
  return rates


def main():
  p = harness.parser(__doc__, reps=2)
  p.add_argument("--dir", default="/tmp/piccolo_jax_integrity", help="checkpoints go here (removed after)")
  args = p.parse_args()
  cfg = models.STELLA
  params = models.random_params(cfg, 0)
  tx, _ = state_lib.make_optimizer(config.section("optim"), params, 1000)
  mesh = sharding.make_mesh(1)
  state, shardings, _, _ = state_lib.init_state(cfg, params, tx, mesh, 0)
  del params
  gb = sum(x.nbytes for x in jax.tree.leaves(state)) / 1e9
  _, digest_s = harness.timed(lambda: digest.shards(state))
  rows, times = [("", "with digests", "without", "digest share")], {}
  for rep in range(args.reps + 1):  # The first round warms up, untimed.
    for with_digests in (True, False):
      root = f"{args.dir}/{'with' if with_digests else 'without'}"
      shutil.rmtree(root, ignore_errors=True)
      with checkpoint.manager(root, config.section("checkpoint", dir=root)) as mngr:
        blocking, total = _save(mngr, 1000, state, with_digests)
        restore = _restore(mngr, state, shardings)
      if rep:
        for k, v in (("save, blocking s", blocking), ("save, total s", total), ("restore s", restore)):
          times.setdefault((k, with_digests), []).append(v)
      shutil.rmtree(root, ignore_errors=True)
      print(f"rep {rep} digests {with_digests}: save {blocking:.2f} / {total:.2f} s, restore {restore:.2f} s",
            flush=True)
  for k in ("save, blocking s", "save, total s", "restore s"):
    a, b = harness.median(times[k, True]), harness.median(times[k, False])
    rows.append((k, f"{a:.2f}", f"{b:.2f}", f"{(a - b) / b:+.1%}"))
  rates = hash_rates()
  harness.report(f"checkpoint digests: stella-shape state, {gb:.2f} GB", rows,
                 [f"xxh3-64 of every shard of the state on the host: {digest_s:.2f} s, {gb / digest_s:.1f} GB/s",
                  "one 512 MB buffer: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in rates.items()),
                  f"median of {args.reps} alternating rounds after a warm-up round; checkpoints in {args.dir}"],
                 {"gb": gb, "digest_s": digest_s, "hash_gb_s": rates, **{f"{k} {w}": v for (k, w), v in times.items()}})


if __name__ == "__main__":
  main()
