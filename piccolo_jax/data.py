"""The input pipeline: prepared datasets -> epoch plan -> packed batches, on a grain iterator.

Batch s is a pure function of s (plan.py, batch.py), so the iterator's state is the next step and
restoring it replays exactly the batches of an uninterrupted run.
"""
import logging

from absl import flags
import grain
import jax
from jax.experimental import multihost_utils

from piccolo_jax import batch as batch_lib
from piccolo_jax import plan as plan_lib
from piccolo_jax import prepare
from piccolo_jax import sources
from piccolo_jax import tasks as tasks_lib

DataError = sources.DataError
log = logging.getLogger(__name__)


def open_tables(data_cfg, tasks_cfg, tokenizer, groups=1) -> list[prepare.Prepared]:
  """Every dataset of the data config, prepared where needed (validated, tokenised) and memory-mapped. Process 0
  prepares first, so that processes sharing a prepared_dir prepare each once (local dirs: each its own)."""
  entries = sources.expand(data_cfg.datasets)
  out = [prepare.open_one(e, data_cfg, tasks_cfg, tokenizer) for e in entries] if jax.process_index() == 0 else []
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("piccolo_jax: prepared data")
  out = out or [prepare.open_one(e, data_cfg, tasks_cfg, tokenizer) for e in entries]
  unit = plan_lib.unit_rows(data_cfg, groups)
  for t in out:
    if len(t) < unit:
      what = "group" if unit < data_cfg.global_batch_size else "global batch"
      raise DataError(f"{t.name}: {len(t)} usable rows, fewer than one {what} of {unit} "
                      f"(skipped: {t.skipped or 'none'})")
    log.info("data: %s: task %s, %d rows, repeat %d, %d batches of %d rows/epoch, skipped %s",
             t.name, t.task, len(t), t.repeat, t.repeat * (len(t) // unit), unit, t.skipped or "none")
    if t.skipped:
      log.warning("data: %s: skipped rows %s", t.name, t.skipped)
    if tasks_lib.TASKS[t.task].scored and tasks_cfg[t.task].kl_weight:
      log.info("data: %s: teacher scores on %d of %d rows (the others train on InfoNCE alone)", t.name,
               t.scored_rows, len(t))
  return out


def assembler(data_cfg, tasks_cfg, tables, process_index=0, process_count=1, row_multiple=1, groups=1, steps=None,
              length_multiple=1):
  """The Assembler of this process's batches, its packing menus chosen for a run of `steps` steps (default:
  an epoch) and logged; row lengths a multiple of length_multiple (attention.block)."""
  plan = plan_lib.Plan(data_cfg, tasks_cfg, tables, groups)
  menus = batch_lib.choose_menus(plan, data_cfg, row_multiple, steps, length_multiple)
  log.info("data: packed row counts per program: %s", menus)
  return batch_lib.Assembler(data_cfg, plan, menus, process_index, process_count, row_multiple, length_multiple)


def make_iterator(assemble: batch_lib.Assembler, data_cfg):
  """A grain iterator (get_state/set_state) of (Batch, info) forever, with the data config's workers."""
  ds = grain.MapDataset.range(assemble.plan.steps_per_epoch).repeat(None)
  it = ds.map_with_index(assemble).to_iter_dataset(
      grain.ReadOptions(num_threads=data_cfg.worker_threads, prefetch_buffer_size=data_cfg.prefetch))
  if data_cfg.worker_count:
    if not flags.FLAGS.is_parsed():  # grain 0.2.18 reads an absl flag there (grain#1355)
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.worker_count))
  return iter(it)
