"""The run directory: its identity (the resolved config), its best model, and the final model and export.

A workdir belongs to one run. Resuming with a config that changes the model, data, loss or
optimizer is refused; the fields in RESUMABLE may change (with a warning). `model/` and `export/`
are always those of the run's final step: rebuilt when missing or when the run was extended.
"""
import json
import logging
import math
import pathlib
import shutil

import jax

from piccolo_jax import config as config_lib
from piccolo_jax import export as export_lib
from piccolo_jax import modeldir

log = logging.getLogger("piccolo_jax.train")
CONFIG = "config.json"
STAMP = "export.json"  # {"step": N}: the step model/ and export/ hold.
# Fields that may change when a run resumes: the length of the run, logging, checkpoint cadence,
# evaluation, export, the input pipeline's parallelism, the mesh, the attention kernel and remat (none changes the
# math of a step).
RESUMABLE = ("train.epochs", "train.max_steps", "train.log_every", "train.max_nonfinite_steps",
             "train.chunk_size", "checkpoint.every", "checkpoint.keep", "eval.", "export.",
             "data.worker_count", "data.prepared_dir", "data.worker_threads", "data.prefetch", "mesh.",
             "model.attention", "model.remat", "train.merge_last")


class ConfigChangeError(ValueError):
  """The workdir holds a run with another config."""


def _flat(tree, prefix=""):
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
  return {prefix[:-1]: tree}


def config_diff(old: dict, new: dict) -> dict:
  """{dotted field: (old, new)} of the fields that differ."""
  a, b = _flat(old), _flat(new)
  return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def check_config(workdir, config):
  """Refuses to resume a run under a config that changes what it trains; warns on RESUMABLE changes."""
  path = pathlib.Path(workdir) / CONFIG
  if not path.is_file():
    return
  old = json.loads(path.read_text())
  if gone := sorted({line for k in _flat(old) if (line := config_lib.moved(k))}):
    raise ConfigChangeError(f"{workdir} holds a run of an older config schema ({'; '.join(gone)}): finish it "
                            "with the piccolo_jax that started it, or use a new --workdir")
  diff = config_diff(old, json.loads(config.to_json_best_effort()))
  added = _flat(json.loads(config_lib.base().to_json_best_effort()))  # Fields new since, at their defaults:
  diff = {k: v for k, v in diff.items() if k in _flat(old) or v[1] != added.get(k, v[0])}  # the same run.
  fixed = {k: v for k, v in diff.items() if not any(k == p or k.startswith(p) for p in RESUMABLE if p)}
  show = lambda d: ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in d.items())
  if fixed:
    raise ConfigChangeError(f"{workdir} holds a run with another config ({show(fixed)}); use a new "
                            "--workdir, or the run's own values (its config.json)")
  if diff:
    log.warning("resuming %s with changed settings: %s", workdir, show(diff))


def write_config(workdir, config):
  if jax.process_index() == 0:
    (pathlib.Path(workdir) / CONFIG).write_text(config.to_json_best_effort(indent=2) + "\n")


def write_model(workdir, mcfg, tok_dir):
  """WORKDIR/model_config.json and WORKDIR/tokenizer/: what makes the run's checkpoints a model (merge.py)."""
  if jax.process_index() == 0:
    mcfg.portable().save(workdir / "model_config.json")
    (workdir / "tokenizer").mkdir(exist_ok=True)
    for f in modeldir.tokenizer_files(tok_dir):
      shutil.copy2(f, workdir / "tokenizer" / f.name)


def _replace(new: pathlib.Path, final: pathlib.Path):
  """Moves new to final, replacing what is there (old one kept aside until the move is done)."""
  old = final.with_name(f".{final.name}.old")
  shutil.rmtree(old, ignore_errors=True)
  if final.exists():
    final.rename(old)
  new.rename(final)
  shutil.rmtree(old, ignore_errors=True)


class Best:
  """Keeps workdir/best (a model dir) and best.json at the best value of eval metric `metric`
  (every metric here is higher-is-better); no metric, no tracking."""

  def __init__(self, workdir, metric, mcfg, tok_dir):
    self.dir, self.mcfg, self.tok_dir = workdir / "best", mcfg.portable(), tok_dir
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


def export_final(run, step, params, evals, merged=()):
  """Writes run.workdir/model (collective) and run.workdir/export (sentence-transformers, with a model card
  and the training prefixes as prompts) of step, unless they already hold that step. run: a train.Run;
  evals: the step's eval metrics; merged: the checkpoint steps params are the mean of (train.merge_last)."""
  workdir, is_main, mcfg, tok_dir = run.workdir, jax.process_index() == 0, run.mcfg, run.tok_dir
  stamp, made = workdir / STAMP, {"step": step} | ({"merged": list(merged)} if merged else {})
  done = stamp.is_file() and json.loads(stamp.read_text()) == made
  if done and (workdir / "model").is_dir() and (workdir / "export").is_dir():
    return
  mcfg = mcfg.portable()
  new_model, new_export = workdir / ".model.new", workdir / ".export.new"
  if is_main:
    shutil.rmtree(new_model, ignore_errors=True)
    shutil.rmtree(new_export, ignore_errors=True)
  modeldir.sync("export: cleared")
  modeldir.save_model_dir(new_model, mcfg, params, tok_dir)
  if is_main:
    c = run.config
    card = export_lib.model_card(mcfg, base=c.model.init or "random init", step=step, tables=run.tables,
                                 config=c.to_json_best_effort(indent=1), evals=evals, merged=merged)
    export_lib.write_sentence_transformers(mcfg, params, tok_dir, new_export, c.export.truncate_dim or None,
                                           prompts=export_lib.prompts(c.tasks), card=card)
    _replace(new_model, workdir / "model")
    _replace(new_export, workdir / "export")
    stamp.write_text(json.dumps(made) + "\n")
    log.info("exported step %d: %s and %s", step, workdir / "model", workdir / "export")
  modeldir.sync("export: done")
