"""Training checkpoints: an async Orbax manager over (train state, data position, their digests), restored with
fallback.

Orbax writes each step into a temporary directory and renames it when complete, so a save cut
short (a crash, kill -9) leaves only a `*.orbax-checkpoint-tmp*` directory, which is ignored and
cleaned up. Each process's digests of its state shards and of the data position (digest.py) are an item of the
checkpoint, so written before it counts as complete. A damaged complete checkpoint (missing or truncated files,
non-finite values, content that differs from its digests) is moved aside as `N.corrupt-<time>` on restore, and
the previous one is used: every process takes the same decision.
"""
import contextlib
import dataclasses
import json
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from piccolo_jax import digest
from piccolo_jax import modeldir

log = logging.getLogger("piccolo_jax.train")


class CheckpointError(RuntimeError):
  """No usable checkpoint where some exist."""


@contextlib.contextmanager
def manager(workdir, checkpoint_cfg):
  """Async Orbax manager keeping the last checkpoint.keep checkpoints in checkpoint.dir (default WORKDIR/checkpoints).

  However the block exits (an exception included), the save in flight completes first, so the
  newest checkpoint on disk is always whole.
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=checkpoint_cfg.keep, enable_async_checkpointing=True,
                                         cleanup_tmp_directories=True)
  directory = checkpoint_cfg.get("dir") or (pathlib.Path(workdir) / "checkpoints").absolute()
  mngr = ocp.CheckpointManager(directory, options=options, item_names=ITEMS)
  try:
    yield mngr
  finally:
    mngr.wait_until_finished()
    mngr.close()


ITEMS = ("state", "data", "digests")


class DigestHandler(ocp.JsonCheckpointHandler):
  """The `digests` item: one JSON file per process (its own shards'), written in Orbax's background commit (the
  checkpoint is complete only once it is), read back merged."""

  async def _save_fn(self, x, directory):
    (directory / f"process_{jax.process_index()}.json").write_text(json.dumps(x))

  def restore(self, directory, item=None, args=None) -> dict:
    out = {"arrays": {}, "data": None}
    for f in sorted(epath.Path(directory).glob("process_*.json")):
      d = json.loads(f.read_text())
      out["data"] = d["data"]
      for name, by_key in d["arrays"].items():
        out["arrays"].setdefault(name, {}).update(by_key)
    return out


@ocp.args.register_with_handler(DigestHandler, for_save=True)
@dataclasses.dataclass
class DigestSave(ocp.args.CheckpointArgs):
  item: dict


@ocp.args.register_with_handler(DigestHandler, for_restore=True)
@dataclasses.dataclass
class DigestRestore(ocp.args.CheckpointArgs):
  item: None = None


SAVED = ("params", "opt", "step")  # Of the train state: all but `frozen`, which model.init gives again (state.py).


def saved(state) -> dict:
  return {k: state[k] for k in SAVED}


def save(mngr, step, state, data_iterator, negatives=""):
  """Saves the train state, the data position as JSON (the iterator's state, and the version of refreshed negatives
  it reads, "": the datasets' own; piccolo_jax/refresh.py), and this process's digests of both, asynchronously.

  The digests are taken first, while the state's buffers are this step's (the next step reuses them): 0.26 s for
  3.9 GB on this CPU (BENCHMARKS.md "Integrity", with what the alternatives measured). The data position (grain
  state {'next_index': step}) is the same on every process, so a checkpoint restores under a different process
  count (e.g. a 2-process run resumed by 1).
  """
  data, state = {**data_iterator.get_state(), "negatives": negatives}, saved(state)
  digests = {"arrays": digest.shards(state), "data": digest.of_json(data)}
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
                                          digests=DigestSave(digests)), force=True)


@jax.jit
def _all_finite(tree):
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.stack(leaves).all() if leaves else jnp.array(True)


def _restore(mngr, step, target):
  """The checkpoint, checked: readable, finite, a data position, and (where it has them) its digests, on every
  process; raises what is wrong, the same on every process."""
  checked = (epath.Path(mngr.directory) / str(step) / "digests").is_dir()
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
        **({"digests": DigestRestore()} if checked else {})))
    problem = _problem(restored, checked, step)
  except Exception as e:  # pylint: disable=broad-except  (any failure to read means damaged)
    problem = " ".join(str(e).split())[:300] or type(e).__name__
  found = _agree(bool(problem))
  if found is not None:
    raise ValueError(problem or f"process {found} found it damaged")
  return restored


def _problem(restored, checked, step) -> str:
  """What is wrong with a restored checkpoint on this process ("": nothing)."""
  finite = _all_finite(restored["state"])  # On the devices, while the host hashes.
  data, problem = restored["data"], ""
  if not isinstance(data, dict) or "next_index" not in data:
    problem = f"data position {data!r} is not a grain iterator state"
  elif not checked:
    log.info("checkpoint %d has no digests (an older piccolo_jax): its content is not checked", step)
  elif digest.of_json(data) != restored["digests"]["data"]:
    problem = f"its data position {data} differs from its digest"
  else:
    bad, unchecked = digest.check(restored["state"], restored["digests"]["arrays"])
    if unchecked:
      log.warning("checkpoint %d: %d stored shards span devices of this mesh and are not checked", step, unchecked)
    if bad:
      problem = f"array {bad[0]} (shard {bad[1] or 'whole'}) differs from its digest on process {jax.process_index()}"
  return "non-finite values in the restored state" if not bool(finite) else problem


def _agree(bad: bool) -> int | None:
  """The first process that found the checkpoint damaged (None: none), the same answer on every process."""
  flags = multihost_utils.process_allgather(np.array(bad)) if jax.process_count() > 1 else np.array([bad])
  return int(np.argmax(flags)) if np.any(flags) else None


def restore_params(directory, step, target) -> dict:
  """The parameters alone of checkpoint `step` in `directory`, onto target (ShapeDtypeStructs with shardings),
  checked against its digests where it has them: a ValueError names the array that differs, on every process."""
  target = {"params": target}
  args = ocp.args.PyTreeRestore(item=target, partial_restore=True, restore_args=jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target))
  checked = (epath.Path(directory) / str(step) / "digests").is_dir()
  with ocp.CheckpointManager(epath.Path(directory), item_names=ITEMS) as mngr:
    restored = mngr.restore(step, args=ocp.args.Composite(state=args, **(
        {"digests": DigestRestore()} if checked else {})))
  if checked:
    stored = {k: v for k, v in restored["digests"]["arrays"].items() if k.startswith("params/")}
    bad, _ = digest.check(restored["state"], stored)
    if (found := _agree(bad is not None)) is not None:
      raise ValueError(f"checkpoint {directory}/{step}: " + (f"array {bad[0]} (shard {bad[1]}) differs from its "
                       f"digest on process {found}" if bad else f"process {found} found it damaged"))
  return restored["state"]["params"]


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
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), saved(state),
                        saved(shardings))
  steps = sorted(mngr.all_steps(), reverse=True)
  for step in steps:
    try:
      restored = _restore(mngr, step, target)
    except ValueError as e:
      _set_aside(mngr, step, str(e))
      continue
    return {**state, **restored["state"]}, step, restored["data"]
  if steps:
    raise CheckpointError(f"no usable checkpoint in {mngr.directory}: all of steps {sorted(steps)} are "
                          "damaged (set aside as *.corrupt-*); remove the directory to start over")
  return state, 0, None
