"""Piccolo2 multi-task training: python -m piccolo_jax.train --config=NAME --workdir=DIR.

NAME is a file in configs/ (finetune, piccolo2, demo, stsb, distill) or a path to a config file; override any
field with --config.optim.lr=2e-5. The run resumes from the workdir's latest checkpoint.
"""
import dataclasses
import logging
import math
import os
import pathlib
import signal

from absl import flags
import jax
from flax import nnx

from piccolo_jax import attention
from piccolo_jax import checkpoint
from piccolo_jax import cli
from piccolo_jax import config as config_lib
from piccolo_jax import data as data_lib
from piccolo_jax import encode
from piccolo_jax import evaluate
from piccolo_jax import flops
from piccolo_jax import logs
from piccolo_jax import merge
from piccolo_jax import mine
from piccolo_jax import models
from piccolo_jax import plan as plan_lib
from piccolo_jax import refresh
from piccolo_jax import rundir
from piccolo_jax import sharding
from piccolo_jax import state as state_lib
from piccolo_jax import step as step_lib
from piccolo_jax import tasks as tasks_lib

log = logging.getLogger("piccolo_jax.train")


class Preemption:
  """Within the block, SIGTERM and the first Ctrl-C (SIGINT) set a flag the loop checks between steps."""

  def __enter__(self):
    self.requested = False
    self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    return self

  def __exit__(self, *_):
    for s, handler in self.old.items():
      signal.signal(s, handler)

  def _handle(self, signum, _):
    log.warning("%s: saving a checkpoint and stopping after this step%s", signal.Signals(signum).name,
                " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")
    self.requested = True
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)


class NonFiniteError(RuntimeError):
  """Too many consecutive NaN/Inf losses or gradients; their updates were not applied."""


class NonFinite:
  """The non-finite policy: a NaN/Inf step applies no update; more than `limit` in a row stop the run."""

  def __init__(self, limit, mngr):
    self.limit, self.mngr, self.bad = limit, mngr, 0

  def check(self, host):
    """host: a finished step's metrics (logs.MetricLogger), or None."""
    if host is None:
      return
    self.bad = 0 if host["ok"] else self.bad + 1
    if not self.bad:
      return
    task = host["task"]
    what = (f"step {host['step']} (task {task}, dataset {host['dataset']}): loss {host['loss/' + task]}, "
            f"grad norm {host['grad_norm']}")
    if self.bad <= self.limit:
      log.warning("%s: update skipped (%d in a row; train.max_nonfinite_steps=%d)", what, self.bad, self.limit)
      return
    self.mngr.wait_until_finished()
    raise NonFiniteError(f"{what}; {self.bad} non-finite steps in a row (train.max_nonfinite_steps={self.limit}), "
                         f"none of them applied; a rerun resumes from checkpoint step {self.mngr.latest_step() or 0}")


class Evals:
  """Runs the configured eval tasks on host params, logs them and keeps the best model (rundir.Best)."""

  def __init__(self, config, run, logger):
    self.tasks = [evaluate.parse_task(t) for t in config.eval.tasks]
    self.ecfg, self.run, self.logger, self.results = config.eval, run, logger, {}
    self.best = rundir.Best(run.workdir, config.eval.best_metric, run.mcfg, run.tok_dir)

  def __call__(self, step, params) -> dict:
    if not self.tasks:
      return {}
    model = nnx.merge(self.run.graphdef, params, self.run.rngs)
    model.eval()
    self.results[step] = metrics = evaluate.evaluate_tasks(
        encode.Embedder(model, self.run.tokenizer), self.tasks, dims=tuple(self.ecfg.dims) or None,
        batch_size=self.ecfg.batch_size)
    self.logger.write(step, {f"eval/{k}": v for k, v in metrics.items()})
    self.best.update(step, metrics, params)
    return metrics

  def summary(self) -> str:
    first, last = min(self.results), max(self.results)
    return "\n".join([f"\neval: step {first} -> step {last}"] + [
        f"  {k:40s} {self.results[first][k]:8.2f} -> {v:8.2f}" for k, v in self.results[last].items()])


@dataclasses.dataclass
class Run:
  """What a run is made of, once started: model, data, state, step function."""
  workdir: pathlib.Path
  config: object
  mesh: object
  mcfg: object
  tok_dir: str
  tokenizer: object
  tables: list
  total: int
  schedule: object
  state: dict
  shardings: dict
  graphdef: object
  rngs: dict
  train_step: object
  assemble: object
  data: object


def data_at(run, version, position):
  """The data iterator at `position` (a grain state), on the negatives refreshed at `version` ("": the datasets'
  own), with the run's packing menus."""
  it = run.data
  if version:
    tables = refresh.with_version(run.tables, run.config.tasks, run.workdir, version)
    it = data_lib.make_iterator(run.assemble.with_tables(tables), run.config.data)
  it.set_state(position)
  return it


def start(config, workdir) -> Run:
  """Checks the config against the workdir, loads model and data, builds the state and step function."""
  config_lib.check(config)
  config_lib.check_workdir(workdir, config)
  mesh = sharding.make_mesh(config.mesh.fsdp)
  mcfg, params, tok_dir = models.init_params(config)
  tokenizer = encode.load_tokenizer(tok_dir)
  tables = data_lib.open_tables(config.data, config.tasks, tokenizer, config.loss.groups)
  config_lib.check_run(config, tables, refresh.refreshed(tables, config.tasks), mcfg.embed_dim)
  if teachers := {t.teacher.shape[1] for t in tables if t.teacher is not None}:
    mcfg, params = models.add_distill_map(mcfg, params, teachers.pop(), config.seed)
  workdir.mkdir(parents=True, exist_ok=True)  # Only once start-up has succeeded.
  rundir.write_config(workdir, config)
  if tok_dir:
    rundir.write_model(workdir, mcfg, tok_dir)
  groups, chunk = config.loss.groups, config.train.chunk_size
  total = config.train.max_steps or plan_lib.steps_per_epoch(config.data, tables, groups) * config.train.epochs
  params, frozen = state_lib.split_frozen(params, mcfg, config.model.lora.base_dtype)
  tx, schedule = state_lib.make_optimizer(config.optim, params, total, train_positions=config.model.max_position > 0)
  state, shardings, graphdef, rngs = state_lib.init_state(mcfg, params, tx, mesh, config.seed, frozen)
  multiple = math.lcm(jax.device_count(), max(chunk, 1))  # Packed rows split over the devices and chunks.
  assemble = data_lib.assembler(config.data, config.tasks, tables, jax.process_index(), jax.process_count(),
                                multiple, groups, total, attention.block(mcfg.attention))
  return Run(workdir, config, mesh, mcfg, tok_dir, tokenizer, tables, total, schedule, state, shardings, graphdef,
             rngs, step_lib.make_train_step(graphdef, tx, config, chunk, mesh), assemble,
             data_lib.make_iterator(assemble, config.data))


def train(config, workdir) -> dict:
  """Runs (or resumes) training into workdir; returns the last step's and final eval metrics."""
  run, c = start(config, pathlib.Path(workdir)), config
  # Every exit waits for the save in flight; signals are handled only while training.
  with Preemption() as preempt, checkpoint.manager(run.workdir, c.checkpoint) as mngr:
    state, step, position = checkpoint.restore_latest(mngr, run.state, run.shardings)
    negatives = (position or {}).pop("negatives", "")  # The version of refreshed negatives it trains on.
    if position:
      run.data = data_at(run, negatives, position)
    log.info("%s steps of global batch %d (loss groups %d, data.mix %s) on %d devices %s%s", run.total,
             c.data.global_batch_size, c.loss.groups, c.data.mix, jax.device_count(), dict(run.mesh.shape),
             f", resuming at step {step}" if step else "")
    logger = logs.MetricLogger(run.workdir, run.total, step, c.data.global_batch_size, c.loss.mrl_dims,
                               run.schedule, c.train.log_every, enabled=jax.process_index() == 0,
                               flops=lambda info: flops.step_flops(run.mcfg, info), tensorboard=c.train.tensorboard)
    evals, nonfinite = Evals(c, run, logger), NonFinite(c.train.max_nonfinite_steps, mngr)
    embed = refresh.Embed(run.graphdef, run.rngs, run.mesh, c.data, attention.block(run.mcfg.attention)) \
        if c.refresh.every else None
    if not step:  # Start-up facts: the rows each dataset dropped, by reason, and those with teacher scores
      # (tasks.retrieval.kl_weight); the model before training.
      logger.write(0, {f"data/{t.name}/skipped/{why}": n for t in run.tables for why, n in t.skipped.items()} |
                   {f"data/{t.name}/teacher_scored_rows": t.scored_rows for t in run.tables
                    if tasks_lib.TASKS[t.task].scored and c.tasks[t.task].kl_weight}, echo=False)
      if c.eval.tasks:
        evals(0, state_lib.host_params(state_lib.full_params(state), run.mesh))
    while step < run.total and not preempt.requested:
      if refresh.due(c.refresh, step):
        nonfinite.check(logger.flush())
        negatives, facts = refresh.refresh(run.workdir, embed, state_lib.full_params(state),
                                           refresh.refreshed(run.tables, c.tasks),
                                           mine.config_options(c.refresh), c.seed, step)
        logger.write(step, facts, echo=False)
        run.data = data_at(run, negatives, run.data.get_state())
      batch, info = next(run.data)
      state, metrics = run.train_step(state, sharding.put_batch(batch, run.mesh), run.rngs)
      nonfinite.check(logger.push(step + 1, metrics, info))  # The step before's: one step stays in flight.
      step += 1
      if step % c.checkpoint.every == 0 or step == run.total or preempt.requested:
        nonfinite.check(logger.flush())
        checkpoint.save(mngr, step, state, run.data, negatives)
      if c.eval.every and step % c.eval.every == 0 and step < run.total:
        evals(step, state_lib.host_params(state_lib.full_params(state), run.mesh))
    nonfinite.check(logger.flush())
    mngr.wait_until_finished()
    final, merged = state["params"], ()
    if c.train.merge_last > 1 and not preempt.requested:
      final, merged = merge.last_checkpoints(mngr, c.train.merge_last, final, run.shardings["params"])
  if preempt.requested:
    log.warning("preempted: saved step %d in %s; run the same command again to resume", step, run.workdir)
    return logger.last
  params = state_lib.host_params(state_lib.combine(final, state["frozen"]), run.mesh)
  scores = evals(step, params)
  logger.close()
  if jax.process_index() == 0 and len(evals.results) > 1:
    print(evals.summary())
  rundir.export_final(run.workdir, c, run.mcfg, run.tok_dir, run.tables, step, params, scores, merged)
  return logger.last | {f"eval/{k}": v for k, v in scores.items()}


def main():
  config_flag = cli.define_config_flag()
  flags.DEFINE_string("workdir", None, "run directory: checkpoints, logs, exported model")
  flags.DEFINE_string("coordinator_address", "", "multi-process: host:port of process 0 "
                      "(not needed on TPU pods and SLURM, where it is auto-detected)")
  flags.DEFINE_integer("num_processes", 1, "multi-process: number of processes")
  flags.DEFINE_integer("process_id", 0, "multi-process: this process's index")
  flags.mark_flags_as_required(["config", "workdir"])

  def run():
    f = flags.FLAGS
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # A restart reuses the compiled steps.
      jax.config.update("jax_compilation_cache_dir", str(pathlib.Path("~/.cache/piccolo_jax/xla").expanduser()))
    sharding.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
    train(config_flag.value, f.workdir)

  # DataError is a ValueError.
  cli.run(run, (ValueError, OSError, NonFiniteError, checkpoint.CheckpointError))


if __name__ == "__main__":
  main()
