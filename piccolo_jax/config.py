"""The training config schema: every field, its default and its meaning, in one place.

A config file (configs/NAME.py, or any path) defines `get_config()` that edits `base()`;
`--config.SECTION.FIELD=VALUE` overrides a field from the command line (piccolo_jax/cli.py).
Sections are ConfigDicts read by attribute (`c.data.global_batch_size`); modules take their section.
"""
import ml_collections

from piccolo_jax import losses
from piccolo_jax import packing
from piccolo_jax import tasks as tasks_lib

MRL_DIMS = losses.MRL_DIMS


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Initialisation, dropout and data order (data.seed follows it).
  c.model = dict(
      init="",  # sentence-transformers/HF BERT dir, piccolo_jax model dir or "minilm" ("" = random init).
      tokenizer="",  # tokenizer dir for random init (default: the init dir).
      arch=ml_collections.ConfigDict(dict(  # Random init only.
          vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536)),
      dtype="float32",  # Compute dtype; parameters and optimizer state stay float32.
      remat="none",  # none | full | a jax.checkpoint_policies policy, e.g. dots_with_no_batch_dims_saveable
      # (model.REMAT_POLICIES; True/False still read as full/none).
      attention="auto",  # auto | xla | splash | pallas_gpu | cudnn (piccolo_jax/attention.py; auto: by platform).
      dropout=-1.0,  # -1 keeps the checkpoint's; 0 turns dropout off (hidden and attention).
      attention_dropout=-1.0,  # -1: model.dropout's, else the checkpoint's (0 on a fused kernel that cannot
      # apply it); >= 0 sets it (an error on such a kernel).
      dense_out=0,  # Scaling layer output dim; 0 keeps the checkpoint's (new ones start random).
      max_position=0,  # > 0: this many positions (rows past the checkpoint's copy it) and the
      # position embeddings train (all rows: optim.freeze skips them), as the original's extend_pe.
      position_extension="tile",  # tile | hierarchical
      keep_layers=(),  # A student of these encoder layers of the init, e.g. (0, 2, 4); () keeps all.
  )
  c.data = dict(
      # Mappings with `kind` (piccolo|meta|jsonl|tsv|tfds), `path` (tfds: `name`, `data_dir`,
      # `split`), optional `task`, `repeat`, `limit` (first n usable rows), `name`,
      # `query_prefix`, `passage_prefix`, `neg_num`; meta: `path` of a `name repeat` list and its `root`.
      datasets=(),
      global_batch_size=32,
      mix="dataset",  # dataset: one dataset a global step; groups: one a loss group (docs/training.md).
      pack_length=128,  # Packed row length (longer if a task's longest text is; docs/training.md).
      pack_segments=packing.SEGMENTS,  # Most texts in one packed row (1: one text a row, unpacked).
      pack_menu=3,  # Packed row counts per task: at most this many compiled programs per task.
      prepared_dir="",  # Tokenised datasets (prepare.py); "" = $PICCOLO_JAX_CACHE or ~/.cache/piccolo_jax/prepared.
      strict=False,  # True: empty texts and rows without a positive are errors, not counted skips.
      worker_count=0,  # grain worker processes (0: none).
      worker_threads=2,  # grain read threads per process.
      prefetch=4,
      seed=c.get_ref("seed"))
  # Per task (tasks.TASKS): token caps, negatives K, loss temperature and weight, prefixes.
  c.tasks = {name: dict(spec.defaults) for name, spec in tasks_lib.TASKS.items()}
  c.loss = dict(
      groups=1,  # G: each loss is taken within G equal groups of the global batch and averaged, as
      # the original's per-GPU losses under DDP (G = its GPUs); 1: over the whole global batch.
      mrl_dims=MRL_DIMS, mrl_weights=None)  # None: the plain mean over dims, as the original.
  c.optim = dict(
      lr=1e-5, warmup_ratio=0.0, warmup_steps=-1,  # warmup_steps >= 0 overrides the ratio.
      weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
      clip_norm=1.0,  # Global-norm clip; 0 turns it off.
      grad_accum=1,
      freeze=("embeddings/position",))  # Regexps on parameter paths (positions: see model.max_position).
  c.train = dict(epochs=3, max_steps=0, log_every=10,
                 chunk_size=0,  # > 0: gradient caching, chunk_size packed rows at a time.
                 max_nonfinite_steps=5,  # NaN/Inf steps in a row that are skipped before the run stops.
                 refresh_negatives_every=0,  # N > 0: retrieval negatives re-mined every N steps (refresh.py).
                 refresh_options="",  # How: piccolo_jax.mine's --range, --negatives, --sampling, --*-margin.
                 merge_last=1)  # N > 1: model/ and export/ are the mean of the last N checkpoints (merge.py).
  c.mesh = dict(fsdp=1)  # Devices that shard parameters and optimizer state (ZeRO-style).
  c.checkpoint = dict(every=1000, keep=3, dir="")  # dir: default WORKDIR/checkpoints; may be gs://
  c.eval = dict(tasks=(), every=0, dims=(), batch_size=64, best_metric="")
  c.export = dict(truncate_dim=0)
  return c


# Fields that moved or went: a config or flag that sets one stops with a line naming where it went.
MOVED = {f"data.{k}": f"is now tasks.{v}" for k, v in (
    ("neg_num", "retrieval.neg_num"), ("cls_neg_num", "cls.neg_num"), ("cls_query_max_len", "cls.query_max_len"),
    ("query_max_len", "retrieval.query_max_len"), ("passage_max_len", "{retrieval,cls}.passage_max_len"),
    ("sts_max_len", "sts.query_max_len"), ("sts_pair_max_len", "sts.passage_max_len"),
    ("query_prefix", "{retrieval,sts}.query_prefix"), ("passage_prefix", "{retrieval,sts}.passage_prefix"))} | {
    f"loss.{t}": f"is now tasks.{t}.temperature and tasks.{t}.weight" for t in ("retrieval", "sts", "cls")} | {
    "data.packing": "is gone: batches are always packed (data.pack_segments=1 puts one text in a row)",
    "data.buckets": "is gone: texts are packed into rows of data.pack_length tokens"}


def moved(field: str) -> str:
  """The line for a dotted field that moved or went ("" if it did not)."""
  key = next((k for k in MOVED if field == k or field.startswith(k + ".")), None)
  return f"{field} {MOVED[key]}" if key else ""


def check(c: ml_collections.ConfigDict):
  """Raises a ValueError naming the first field of c that moved (a config file written for an older schema), or
  a value no run takes."""
  for section, fields in c.items():
    for field in fields.keys() if isinstance(fields, ml_collections.ConfigDict) else ():
      if line := moved(f"{section}.{field}"):
        raise ValueError(line)
  if not 1 <= c.train.merge_last <= max(c.checkpoint.keep, 1):
    raise ValueError(f"train.merge_last={c.train.merge_last}: expected 1 (off) up to checkpoint.keep="
                     f"{c.checkpoint.keep}, the checkpoints kept to merge")
  judge = c.tasks.retrieval.false_negatives
  if judge not in ("off", "model", "teacher"):
    raise ValueError(f"tasks.retrieval.false_negatives={judge!r}: expected off, model or teacher")


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
