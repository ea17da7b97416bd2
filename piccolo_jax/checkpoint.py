"""Training checkpoints: an async Orbax manager over (train state, data position), restored with fallback.

Orbax writes each step into a temporary directory and renames it when complete, so a save cut
short (a crash, kill -9) leaves only a `*.orbax-checkpoint-tmp*` directory, which is ignored and
cleaned up. A damaged complete checkpoint (missing or truncated files, non-finite values) is
moved aside as `N.corrupt-<time>` on restore, and the previous one is used.
"""
import contextlib
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from piccolo_jax import modeldir

log = logging.getLogger("piccolo_jax.train")


class CheckpointError(RuntimeError):
  """No usable checkpoint where some exist."""


@contextlib.contextmanager
def manager(workdir, c):
  """Async Orbax manager keeping the last c.keep checkpoints in c.dir (default workdir/checkpoints).

  However the block exits (an exception included), the save in flight completes first, so the
  newest checkpoint on disk is always whole.
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=c.keep, enable_async_checkpointing=True,
                                         cleanup_tmp_directories=True)
  directory = c.get("dir") or (pathlib.Path(workdir) / "checkpoints").absolute()
  mngr = ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))
  try:
    yield mngr
  finally:
    mngr.wait_until_finished()
    mngr.close()


def save_args(state, data_iterator, negatives=""):
  """Orbax args: the train state, and the data position as JSON: the iterator's state, and the version of
  refreshed negatives it reads ("": the datasets' own; piccolo_jax/refresh.py).

  The data position (grain state {'next_index': step}) is the same on every process, so a
  checkpoint restores under a different process count (e.g. a 2-process run resumed by 1).
  """
  return ocp.args.Composite(state=ocp.args.StandardSave(state),
                            data=ocp.args.JsonSave({**data_iterator.get_state(), "negatives": negatives}))


@jax.jit
def _all_finite(tree):
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.stack(leaves).all() if leaves else jnp.array(True)


def _restore(mngr, step, target):
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                        data=ocp.args.JsonRestore()))
  if not bool(_all_finite(restored["state"])):
    raise ValueError("non-finite values in the restored state")
  if not isinstance(restored["data"], dict) or "next_index" not in restored["data"]:
    raise ValueError(f"data position {restored['data']!r} is not a grain iterator state")
  return restored


def _set_aside(mngr, step, reason):
  bad = epath.Path(mngr.directory) / str(step)
  aside = bad.parent / f"{step}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
  log.warning("checkpoint %s is damaged (%s); moved to %s, trying the one before", bad, reason, aside)
  if jax.process_index() == 0:
    bad.rename(aside)
  modeldir.sync(f"checkpoint {step} set aside")
  mngr.reload()


def restore_latest(mngr, state, shardings) -> tuple[dict, int, dict | None]:
  """(state, step, data position) from the newest good checkpoint; (state, 0, None) if none."""
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
  steps = sorted(mngr.all_steps(), reverse=True)
  for step in steps:
    try:
      restored = _restore(mngr, step, target)
    except Exception as e:  # pylint: disable=broad-except  (any failure to read means damaged)
      _set_aside(mngr, step, " ".join(str(e).split())[:300] or type(e).__name__)
      continue
    return restored["state"], step, restored["data"]
  if steps:
    raise CheckpointError(f"no usable checkpoint in {mngr.directory}: all of steps {sorted(steps)} are "
                          "damaged (set aside as *.corrupt-*); remove the directory to start over")
  return state, 0, None
