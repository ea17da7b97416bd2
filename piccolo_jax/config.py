"""The training config schema: every field, its default and its meaning, in one place.

A config file (configs/NAME.py, or any path) defines `get_config()` that edits `base()`;
`--config.SECTION.FIELD=VALUE` overrides a field from the command line. Sections are
ConfigDicts read by attribute (`c.data.global_batch_size`); modules take their section.
"""
import difflib
import logging
import importlib.util
import os
import pathlib
import re
import sys

from absl import app
from absl import flags
import ml_collections

from piccolo_jax import packing

MRL_DIMS = (256, 512, 768, 1024, 1280, 1536, 1792)  # stella-v3.5's Matryoshka dims.
BUCKETS = (32, 64, 128, 256, 512)  # Padded text lengths: one compiled program per (task, bucket).


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Initialisation, dropout and data order (data.seed follows it).
  c.model = dict(
      init="",  # sentence-transformers/HF BERT dir, piccolo_jax model dir or "minilm" ("" = random init).
      tokenizer="",  # tokenizer dir for random init (default: the init dir).
      arch=ml_collections.ConfigDict(dict(  # Random init only.
          vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536)),
      dtype="float32",  # Compute dtype; parameters and optimizer state stay float32.
      remat=False,
      dropout=-1.0,  # -1 keeps the checkpoint's; 0 turns dropout off.
      dense_out=0,  # Scaling layer output dim; 0 keeps the checkpoint's (new ones start random).
      max_position=0,  # > 0: this many positions (rows past the checkpoint's copy it) and the
      # position embeddings train (all rows: optim.freeze skips them), as the original's extend_pe.
      position_extension="tile",  # tile | hierarchical
  )
  c.data = dict(
      # Mappings with `kind` (piccolo|meta|jsonl|tsv|tfds), `path` (tfds: `name`, `data_dir`,
      # `split`), optional `task`, `repeat`, `limit` (first n usable rows), `name`,
      # `query_prefix`, `passage_prefix`, `neg_num`; meta: `path` of a `name repeat` list and its `root`.
      datasets=(),
      global_batch_size=32,
      mix="dataset",  # dataset: one dataset per global step; groups: one per loss group (loss.groups),
      # so a step mixes tasks as the original's per-GPU batches (data.py: the composition per step).
      neg_num=1,  # Retrieval hard negatives per query; a dataset entry's `neg_num` overrides it.
      cls_neg_num=10,  # Cls label negatives per query. Rows with fewer pad and mask the rest.
      query_prefix="", passage_prefix="",  # Retrieval and STS only; per-dataset entries override.
      query_max_len=64, passage_max_len=512, cls_query_max_len=512,  # Token caps per field.
      sts_max_len=64, sts_pair_max_len=512,  # STS first / second text, as the original.
      buckets=BUCKETS,
      packing=True,  # Pack several texts per row (data.py, packing.py); False pads each field to a bucket.
      pack_length=128,  # Packed row length (longer if a task's longest text is): more texts per row,
      # more attention per token. Positions restart at each text, so it may exceed the model's 512.
      pack_segments=packing.SEGMENTS,  # Most texts in one packed row.
      pack_menu=3,  # Packed row counts per task: at most this many compiled programs per task.
      prepared_dir="",  # Tokenised datasets (prepare.py); "" = $PICCOLO_JAX_CACHE or ~/.cache/piccolo_jax/prepared.
      strict=False,  # True: empty texts and rows without a positive are errors, not counted skips.
      worker_count=0,  # grain worker processes (0: none).
      worker_threads=2,  # grain read threads per process.
      prefetch=4,
      seed=c.get_ref("seed"))
  c.loss = dict(
      groups=1,  # G: each loss is taken within G equal groups of the global batch and averaged, as
      # the original's per-GPU losses under DDP (G = its GPUs); 1: over the whole global batch.
      mrl_dims=MRL_DIMS, mrl_weights=None,  # None: the plain mean over dims, as the original.
      retrieval=dict(temperature=0.01, weight=1.0),
      sts=dict(temperature=0.05, weight=0.04),
      cls=dict(temperature=0.05, weight=0.2))
  c.optim = dict(
      lr=1e-5, warmup_ratio=0.0, warmup_steps=-1,  # warmup_steps >= 0 overrides the ratio.
      weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
      clip_norm=1.0,  # Global-norm clip; 0 turns it off.
      grad_accum=1,
      freeze=("embeddings/position",))  # Regexps on parameter paths (positions: see model.max_position).
  c.train = dict(epochs=3, max_steps=0, log_every=10,
                 chunk_size=0,  # > 0: gradient caching, chunk_size texts at a time.
                 max_nonfinite_steps=5)  # NaN/Inf steps in a row that are skipped before the run stops.
  c.mesh = dict(fsdp=1)  # Devices that shard parameters and optimizer state (ZeRO-style).
  c.checkpoint = dict(every=1000, keep=3, dir="")  # dir: default WORKDIR/checkpoints; may be gs://
  c.eval = dict(tasks=(), every=0, dims=(), batch_size=64, best_metric="")
  c.export = dict(truncate_dim=0)
  return c


def section(name: str, **overrides) -> ml_collections.ConfigDict:
  """base()'s section `name`, references resolved, with fields replaced (tests, benchmarks)."""
  c = base()[name].copy_and_resolve_references()
  c.update(overrides)
  return c


def replace(c: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  """A copy of c with fields replaced."""
  c = c.copy_and_resolve_references()
  c.update(overrides)
  return c


# --config=NAME on the command line (train, prepare).

def config_dirs() -> list[pathlib.Path]:
  """Where --config=NAME is looked up: ./configs, then the installed piccolo_jax.configs."""
  spec = importlib.util.find_spec("piccolo_jax.configs")
  return [pathlib.Path.cwd() / "configs"] + [pathlib.Path(p) for p in spec.submodule_search_locations]


def resolve_config_path(name: str) -> str:
  """A config name (configs/NAME.py) or a path -> the path."""
  if os.path.isfile(name):
    return name
  for root in config_dirs():
    if (root / f"{name}.py").is_file():
      return str(root / f"{name}.py")
  raise SystemExit(f"error: no config {name!r}: not a file, and no {name}.py in "
                   f"{', '.join(map(str, config_dirs()))}")


def resolve_argv(argv):
  """Rewrites --config=NAME into --config=configs/NAME.py for config_flags."""
  out = []
  for arg in argv:
    m = re.fullmatch(r"--config=([^.]+?)(\.py)?", arg) if not arg.startswith("--config.") else None
    out.append(f"--config={resolve_config_path(arg.split('=', 1)[1])}" if m else arg)
  return out


def check_overrides(argv):
  """Exits with one line naming a --config.FIELD override that names no field, and the closest one."""
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  fields = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  if not path or not fields:
    return
  spec = importlib.util.spec_from_file_location("_piccolo_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  for field in fields:
    node, keys = c, field.split(".")
    for i, key in enumerate(keys):
      if not isinstance(node, ml_collections.ConfigDict) or key not in node:
        here = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        close = difflib.get_close_matches(key, here, 1)
        hint = f"; did you mean '{'.'.join(keys[:i] + close)}'?" if close else ""
        raise SystemExit(f"error: --config.{field}: the config has no field '{'.'.join(keys[:i + 1])}'{hint}")
      node = node[key]


def cli_logging():
  """piccolo_jax INFO lines as 'HH:MM:SS message'; other libraries' at WARNING (Orbax, JAX: noise)."""
  logging.getLogger().setLevel(logging.WARNING)
  for handler in logging.getLogger().handlers:
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  logging.getLogger("piccolo_jax").setLevel(logging.INFO)


def run_cli(body, errors=(ValueError, OSError)):
  """absl's app.run of body() with --config=NAME resolved and its overrides checked; `errors` exit
  with one line (tracebacks under --verbose, a flag the CLI defines)."""
  def run(argv):
    del argv
    cli_logging()
    try:
      body()
    except errors as e:
      if flags.FLAGS.verbose:
        raise
      sys.exit(f"error: {e}")

  sys.argv = resolve_argv(sys.argv)
  check_overrides(sys.argv)
  app.run(run)
