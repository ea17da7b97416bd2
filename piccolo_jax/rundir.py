"""The run directory: its identity (the resolved config), and the final model and export it holds.

A workdir belongs to one run. Resuming with a config that changes the model, data, loss or
optimizer is refused; the fields in RESUMABLE may change (with a warning). `model/` and `export/`
are always those of the run's final step: rebuilt when missing or when the run was extended.
"""
import json
import logging
import pathlib
import shutil

import jax

from piccolo_jax import export as export_lib
from piccolo_jax import modeldir

log = logging.getLogger("piccolo_jax.train")
CONFIG = "config.json"
STAMP = "export.json"  # {"step": N}: the step model/ and export/ hold.
# Fields that may change when a run resumes: the length of the run, logging, checkpoint cadence,
# evaluation, export, the input pipeline's parallelism and the mesh (none changes the math of a step).
RESUMABLE = ("train.epochs", "train.max_steps", "train.log_every", "train.max_nonfinite_steps",
             "train.chunk_size", "checkpoint.every", "checkpoint.keep", "eval.", "export.",
             "data.worker_count", "data.prepared_dir", "data.worker_threads", "data.prefetch", "mesh.")


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
  diff = config_diff(json.loads(path.read_text()), json.loads(config.to_json_best_effort()))
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


def _replace(new: pathlib.Path, final: pathlib.Path):
  """Moves new to final, replacing what is there (old one kept aside until the move is done)."""
  old = final.with_name(f".{final.name}.old")
  shutil.rmtree(old, ignore_errors=True)
  if final.exists():
    final.rename(old)
  new.rename(final)
  shutil.rmtree(old, ignore_errors=True)


def export_final(workdir, step, mcfg, params, tok_dir, truncate_dim=0):
  """Writes workdir/model (collective) and workdir/export (sentence-transformers) of step, unless
  they already hold that step."""
  workdir, is_main = pathlib.Path(workdir), jax.process_index() == 0
  stamp = workdir / STAMP
  done = stamp.is_file() and json.loads(stamp.read_text()).get("step") == step
  if done and (workdir / "model").is_dir() and (workdir / "export").is_dir():
    return
  mcfg = mcfg.replace(dtype="float32", remat=False)
  new_model, new_export = workdir / ".model.new", workdir / ".export.new"
  if is_main:
    shutil.rmtree(new_model, ignore_errors=True)
    shutil.rmtree(new_export, ignore_errors=True)
  modeldir.sync("export: cleared")
  modeldir.save_model_dir(new_model, mcfg, params, tok_dir)
  if is_main:
    export_lib.write_sentence_transformers(mcfg, params, tok_dir, new_export, truncate_dim or None)
    _replace(new_model, workdir / "model")
    _replace(new_export, workdir / "export")
    stamp.write_text(json.dumps({"step": step}) + "\n")
    log.info("exported step %d: %s and %s", step, workdir / "model", workdir / "export")
  modeldir.sync("export: done")
