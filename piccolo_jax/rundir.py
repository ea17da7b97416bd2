"""The run directory: its identity (the resolved config), its best model, and the final model and export.

A workdir belongs to one run (config.check_workdir). `model/` and `export/` are always those of the run's final
step: rebuilt when missing or when the run was extended.
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
STAMP = "export.json"  # {"step": N}: the step model/ and export/ hold.
def write_config(workdir, config):
  if jax.process_index() == 0:
    (pathlib.Path(workdir) / config_lib.RUN_FILE).write_text(config.to_json_best_effort(indent=2) + "\n")


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


def export_final(workdir, config, mcfg, tok_dir, tables, step, params, evals, merged=()):
  """Writes workdir/model (collective) and workdir/export (sentence-transformers, with a model card and the
  training prefixes as prompts) of step, unless they already hold that step. evals: the step's eval metrics;
  merged: the checkpoint steps params are the mean of (train.merge_last)."""
  is_main = jax.process_index() == 0
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
    card = export_lib.model_card(mcfg, base=config.model.init or "random init", step=step, tables=tables,
                                 config=config.to_json_best_effort(indent=1), evals=evals, merged=merged)
    export_lib.write_sentence_transformers(mcfg, params, tok_dir, new_export, config.export.truncate_dim or None,
                                           prompts=export_lib.prompts(config.tasks, config.data.datasets), card=card)
    _replace(new_model, workdir / "model")
    _replace(new_export, workdir / "export")
    stamp.write_text(json.dumps(made) + "\n")
    log.info("exported step %d: %s and %s", step, workdir / "model", workdir / "export")
  modeldir.sync("export: done")
