"""Piccolo2 multi-task training: python -m piccolo_jax.train --config=NAME --workdir=DIR.

NAME is a file in configs/ (finetune, piccolo2, demo, stsb) or a path to a config file; override any
field with --config.optim.lr=2e-5. The run resumes from the workdir's latest checkpoint.
"""
import json
import math
import logging
import os
import pathlib
import shutil
import signal

from absl import flags
import jax
from jax.experimental import multihost_utils
from flax import nnx
from ml_collections import config_flags

from piccolo_jax import checkpoint
from piccolo_jax import config as config_lib
from piccolo_jax import data as data_lib
from piccolo_jax import encode
from piccolo_jax import evaluate
from piccolo_jax import logs
from piccolo_jax import modeldir
from piccolo_jax import rundir
from piccolo_jax import sharding
from piccolo_jax import state as state_lib
from piccolo_jax import step as step_lib

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


def make_evaluator(ecfg, graphdef, rngs, tokenizer):
  """host params -> {metric: value} on the configured eval tasks ({} when none)."""
  if not ecfg.tasks:
    return lambda params: {}
  tasks = [evaluate.parse_task(t) for t in ecfg.tasks]

  def run(params):
    model = nnx.merge(graphdef, params, rngs)
    model.eval()
    return evaluate.evaluate_tasks(encode.Embedder(model, tokenizer), tasks, dims=tuple(ecfg.dims) or None,
                                   batch_size=ecfg.batch_size)

  return run


class Best:
  """Keeps workdir/best (a model dir) and best.json at the best value of eval metric `metric`
  (every metric here is higher-is-better); no metric, no tracking."""

  def __init__(self, workdir, metric, mcfg, tok_dir):
    self.dir, self.mcfg, self.tok_dir = workdir / "best", mcfg.replace(dtype="float32", remat=False), tok_dir
    self.json, self.metric = workdir / "best.json", metric
    old = json.loads(self.json.read_text()) if self.json.is_file() else {}
    self.value, self.step = old.get("value", -math.inf), old.get("step", -1)

  def improved(self, step, metrics) -> bool:
    """Records metrics[metric] at step; True if it is a new best."""
    if self.metric not in metrics:
      raise KeyError(f"best metric {self.metric!r} is not among the eval metrics {sorted(metrics)}")
    if metrics[self.metric] <= self.value:
      return False
    self.value, self.step = float(metrics[self.metric]), step
    return True

  def update(self, step, metrics, params):
    """Saves params as the best model if metrics improve on the best so far."""
    if not self.metric or not self.improved(step, metrics):
      return
    if jax.process_index() == 0:
      shutil.rmtree(self.dir, ignore_errors=True)
    modeldir.sync("best: removed")
    modeldir.save_model_dir(self.dir, self.mcfg, params, self.tok_dir)
    if jax.process_index() == 0:
      self.json.write_text(json.dumps({"metric": self.metric, "value": self.value, "step": step}) + "\n")
      log.info("new best %s = %.4f at step %d -> %s", self.metric, self.value, step, self.dir)


def row_multiple(chunk_size) -> int:
  """A global batch's packed rows are a multiple of this: the devices, and with gradient caching the
  chunk size."""
  return math.lcm(jax.device_count(), max(chunk_size, 1))


def load_data(c, tokenizer, groups):
  """The prepared datasets; process 0 prepares missing ones first, so that processes sharing a
  prepared_dir prepare each once (with local dirs, every process prepares its own)."""
  if jax.process_index() == 0:
    tables = data_lib.load_tables(c, tokenizer, groups)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("piccolo_jax: prepared data")
  return tables if jax.process_index() == 0 else data_lib.load_tables(c, tokenizer, groups)


def train(config, workdir) -> dict:
  """Runs (or resumes) training into workdir; returns the last step's and final eval metrics."""
  workdir = pathlib.Path(workdir)
  rundir.check_config(workdir, config)
  mesh = sharding.make_mesh(config.mesh.fsdp)
  mcfg, params, tok_dir = state_lib.init_params(config)
  tokenizer = encode.load_tokenizer(tok_dir)
  groups = config.loss.groups
  tables = load_data(config.data, tokenizer, groups)
  workdir.mkdir(parents=True, exist_ok=True)  # Only once start-up has succeeded.
  rundir.write_config(workdir, config)
  total = config.train.max_steps or data_lib.steps_per_epoch(config.data, tables, groups) * config.train.epochs
  tx, schedule = state_lib.make_optimizer(config.optim, params, total, train_positions=config.model.max_position > 0)
  state, shardings, graphdef, rngs = state_lib.init_state(mcfg, params, tx, mesh, config.seed)
  data_it = data_lib.make_iterator(config.data, tables, jax.process_index(), jax.process_count(),
                                   row_multiple(config.train.chunk_size), groups)
  # Every exit waits for the save in flight; signals are handled only while training.
  with Preemption() as preempt, checkpoint.manager(workdir, config.checkpoint) as mngr:
    is_main = jax.process_index() == 0
    state, start = checkpoint.restore_latest(mngr, state, shardings, data_it)
    log.info("%s steps of global batch %d (loss groups %d, data.mix %s) on %d devices %s%s", total,
             config.data.global_batch_size, groups, config.data.mix, jax.device_count(), dict(mesh.shape),
             f", resuming at step {start}" if start else "")
    train_step = step_lib.make_train_step(graphdef, tx, config.loss, config.seed, config.train.chunk_size)
    evaluator = make_evaluator(config.eval, graphdef, rngs, tokenizer)
    best = Best(workdir, config.eval.best_metric, mcfg, tok_dir)
    logger = logs.MetricLogger(workdir, total, start, config.data.global_batch_size, config.loss.mrl_dims,
                               schedule, config.train.log_every, enabled=is_main)
    if not start:  # Start-up facts: the rows each dataset dropped, by reason.
      logger.write(0, {f"data/{t.name}/skipped/{why}": n for t in tables
                       for why, n in t.skipped.items()}, echo=False)
    evals = {}

    def run_eval(step, params):
      evals[step] = metrics = evaluator(params)
      logger.write(step, {f"eval/{k}": v for k, v in metrics.items()})
      best.update(step, metrics, params)
      return metrics

    if not start and config.eval.tasks:
      run_eval(0, state_lib.host_params(state["params"], mesh))
    pending, step, bad = None, start, 0

    def finish(pending):  # Host side of a finished step: metrics, and the non-finite policy.
      nonlocal bad
      host = logger.step(*pending)
      bad = 0 if host["ok"] else bad + 1
      if not bad:
        return
      n, task = pending[:2]
      what = (f"step {n} (task {task}, dataset {host['dataset']}): loss {host[f'loss/{task}']}, "
              f"grad norm {host['grad_norm']}")
      if bad <= config.train.max_nonfinite_steps:
        log.warning("%s: update skipped (%d in a row; train.max_nonfinite_steps=%d)", what, bad,
                    config.train.max_nonfinite_steps)
        return
      mngr.wait_until_finished()
      raise NonFiniteError(f"{what}; {bad} non-finite steps in a row (train.max_nonfinite_steps="
                           f"{config.train.max_nonfinite_steps}), none of them applied; a rerun resumes from "
                           f"checkpoint step {mngr.latest_step() or 0}")

    while step < total and not preempt.requested:
      arrays, meta = next(data_it)
      state, metrics = train_step(state, sharding.put_batch(arrays, mesh), rngs, meta["mix"])
      if pending:  # Fetching the previous step's metrics keeps one step in flight.
        finish(pending)
      pending, step = (step + 1, meta["task"], metrics, meta), step + 1
      if step % config.checkpoint.every == 0 or step == total or preempt.requested:
        finish(pending)
        pending = None
        mngr.save(step, args=checkpoint.save_args(state, data_it), force=True)
      if config.eval.every and step % config.eval.every == 0 and step < total:
        run_eval(step, state_lib.host_params(state["params"], mesh))
    if pending:
      finish(pending)
    mngr.wait_until_finished()
    if preempt.requested:
      log.warning("preempted: saved step %d in %s; run the same command again to resume", step, workdir)
      return logger.last
    params = state_lib.host_params(state["params"], mesh)
    final = run_eval(step, params) if config.eval.tasks else {}
    logger.close()
    if is_main and len(evals) > 1:
      first = min(evals)
      print(f"\neval: step {first} -> step {step}")
      for k, v in final.items():
        print(f"  {k:40s} {evals[first][k]:8.2f} -> {v:8.2f}")
    rundir.export_final(workdir, step, mcfg, params, tok_dir, config.export.truncate_dim)
    return logger.last | {f"eval/{k}": v for k, v in final.items()}


def initialize_distributed(coordinator: str, num_processes: int, process_id: int):
  """jax.distributed.initialize(): explicit flags, else auto-detected on TPU pods and SLURM."""
  if coordinator:
    jax.distributed.initialize(coordinator, num_processes, process_id)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    jax.distributed.initialize()


def main():
  config_flag = config_flags.DEFINE_config_file("config", None, "config name (configs/NAME.py) or path")
  flags.DEFINE_string("workdir", None, "run directory: checkpoints, logs, exported model")
  flags.DEFINE_string("coordinator_address", "", "multi-process: host:port of process 0 "
                      "(not needed on TPU pods and SLURM, where it is auto-detected)")
  flags.DEFINE_integer("num_processes", 1, "multi-process: number of processes")
  flags.DEFINE_integer("process_id", 0, "multi-process: this process's index")
  flags.DEFINE_bool("verbose", False, "show tracebacks for errors in the input (data, config, files)")
  flags.mark_flags_as_required(["config", "workdir"])

  def run():
    f = flags.FLAGS
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # A restart reuses the compiled steps.
      jax.config.update("jax_compilation_cache_dir", str(pathlib.Path("~/.cache/piccolo_jax/xla").expanduser()))
    initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
    train(config_flag.value, f.workdir)

  # DataError is a ValueError.
  config_lib.run_cli(run, (ValueError, OSError, NonFiniteError, checkpoint.CheckpointError))

if __name__ == "__main__":
  main()
