"""Training checkpoints: an async Orbax manager over (train state, data position)."""
import pathlib

import jax
import orbax.checkpoint as ocp


def train_manager(workdir, c) -> ocp.CheckpointManager:
  """Async Orbax manager keeping the last c.keep checkpoints in c.dir (default workdir/checkpoints)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=c.keep, enable_async_checkpointing=True)
  directory = c.get("dir") or (pathlib.Path(workdir) / "checkpoints").absolute()
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))


def save_args(state, data_iterator):
  """Orbax args: the train state, and the data iterator's position as JSON.

  The data position (grain state {'next_index': step}) is the same on every process, so a
  checkpoint restores under a different process count (e.g. a 2-process run resumed by 1).
  """
  return ocp.args.Composite(state=ocp.args.StandardSave(state),
                            data=ocp.args.JsonSave(data_iterator.get_state()))


def restore_latest(mngr, state, shardings, data_iterator) -> tuple[dict, int]:
  """(state, step) from the latest checkpoint, restoring the data iterator in place; (state, 0) if none."""
  step = mngr.latest_step()
  if step is None:
    return state, 0
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                        data=ocp.args.JsonRestore()))
  data_iterator.set_state(restored["data"])
  return restored["state"], step
