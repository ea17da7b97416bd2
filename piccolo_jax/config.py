"""The training config: its schema (every field with its default and meaning; the tasks.NAME sections come from
the task registry, tasks.TASKS) and its validation (check, check_workdir, check_run). docs/reference.md lists both.

A config file (configs/NAME.py, or any path) defines `get_config()` that edits `base()`;
`--config.SECTION.FIELD=VALUE` overrides a field from the command line (piccolo_jax/cli.py).
Sections are ConfigDicts read by attribute (`c.data.global_batch_size`); modules take their section.
"""
import json
import logging
import pathlib

import ml_collections

from piccolo_jax import decoder
from piccolo_jax import losses
from piccolo_jax import packing
from piccolo_jax import tasks as tasks_lib

MRL_DIMS = losses.MRL_DIMS
log = logging.getLogger("piccolo_jax.train")
RUN_FILE = "config.json"  # A run's resolved config, in its workdir (rundir.write_config).


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Initialisation, dropout and data order (data.seed follows it).
  c.model = dict(
      init="",  # sentence-transformers/HF dir of a BERT or a decoder (Qwen3, Qwen2, Llama, Mistral), piccolo_jax model
      # dir, "minilm", or "stella-shape" (random init at stella's shape); "" = random init of model.arch.
      tokenizer="",  # Tokenizer dir, needed by a random init ("" or stella-shape); else the init's own is used.
      arch=ml_collections.ConfigDict(dict(  # Random init only: model.Config's fields, or decoder.Config's with a
          # `family` (configs/decoder_tiny.py).
          vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536)),
      pooling="",  # "" keeps the checkpoint's; mean | cls (BERT) | lasttoken (decoders).
      bidirectional=False,  # Decoders: attention within each text both ways (GritLM, NV-Embed); False: causal.
      lora=ml_collections.ConfigDict(dict(  # Decoders: LoRA adapters (decoder.py); rank 0: full fine-tuning.
          rank=0, alpha=16.0, dropout=0.0,
          targets=decoder.LORA_TARGETS,  # Regexps on the projections' parameter paths.
          base_dtype="bfloat16")),  # The frozen base weights' dtype (no optimizer state, no float32 copy).
      dtype="float32",  # Compute dtype; trained parameters and optimizer state stay float32.
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
      # Mappings with `kind` (piccolo|meta|jsonl|tsv|text|tfds), `path` (tfds: `name`, `data_dir`,
      # `split`), optional `task`, `repeat`, `limit` (first n usable rows), `name`,
      # `query_prefix`, `passage_prefix`, `neg_num`; meta: `path` of a `name repeat` list and its `root`.
      datasets=(),
      global_batch_size=32,  # Rows (queries, pairs, texts) a step, over all devices and processes.
      mix="dataset",  # dataset: one dataset a global step; groups: one a loss group (docs/training.md).
      pack_length=128,  # Packed row length (longer if a task's longest text is; docs/training.md).
      pack_lengths=2,  # Most row lengths a step's rows take, chosen per task from the token lengths (1: one).
      pack_attention=256,  # Choosing them, a row of L tokens costs L * (1 + L / pack_attention): the row length
      # where a token's attention costs what the rest of its step does (160-290 on CPU; docs/training.md).
      pack_segments=packing.SEGMENTS,  # Most texts in one packed row (1: one text a row, unpacked).
      pack_menu=3,  # Row-count tuples per task: at most this many compiled programs per task.
      prepared_dir="",  # Tokenised datasets (prepare.py); "" = $PICCOLO_JAX_CACHE or ~/.cache/piccolo_jax/prepared.
      strict=False,  # True: empty texts and rows without a positive are errors, not counted skips.
      worker_count=0,  # grain worker processes (0: none).
      worker_threads=2,  # grain read threads per process.
      prefetch=4,  # Batches read ahead.
      seed=c.get_ref("seed"))
  # Per task (tasks.TASKS): token caps, negatives K, loss temperature and weight, prefixes.
  c.tasks = {name: dict(spec.defaults) for name, spec in tasks_lib.TASKS.items()}
  c.loss = dict(
      groups=1,  # G: each loss is taken within G equal groups of the global batch and averaged, as
      # the original's per-GPU losses under DDP (G = its GPUs); 1: over the whole global batch.
      mrl_dims=MRL_DIMS, mrl_weights=None)  # None: the plain mean over dims, as the original.
  c.optim = dict(
      lr=1e-5, warmup_ratio=0.0, warmup_steps=-1,  # Peak LR after a linear warmup, then linear decay to 0 at the
      # run's end; warmup_steps >= 0 overrides the ratio (of the updates).
      weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,  # AdamW's (no decay on biases and LayerNorms).
      clip_norm=1.0,  # Global-norm clip; 0 turns it off.
      grad_accum=1,  # Steps whose gradients are averaged into one update (optax.MultiSteps).
      freeze=("embeddings/position",))  # Regexps on parameter paths (positions: see model.max_position).
  c.train = dict(epochs=3, max_steps=0, log_every=10,  # max_steps > 0 overrides epochs; metrics every N steps.
                 tensorboard=True,  # Metrics also to WORKDIR/tb (tensorboardX), beside metrics.jsonl.
                 chunk_size=0,  # > 0: gradient caching, chunk_size packed rows at a time.
                 max_nonfinite_steps=5,  # NaN/Inf steps in a row that are skipped before the run stops.
                 merge_last=1)  # N > 1: model/ and export/ are the mean of the last N checkpoints (merge.py).
  # Retrieval negatives re-mined while training (refresh.py), chosen as piccolo_jax.mine chooses them.
  c.refresh = dict(every=0,  # N > 0: before every N-th step; 0: off.
                   start=2, end=200,  # Ranks sampled, 0-based, END excluded (mine's --range START-END).
                   num=15,  # Negatives per query (mine's --negatives).
                   sampling="random",  # random | top: NUM of the candidates left at random, or the NUM best.
                   relative_margin=0.05,  # Drop candidates scoring above (1 - M) x the positive's; < 0: off.
                   absolute_margin=-1.0)  # Drop candidates scoring above the positive's - M; < 0: off.
  c.mesh = dict(fsdp=1)  # Devices that shard parameters and optimizer state (ZeRO-style).
  c.checkpoint = dict(every=1000, keep=3, dir="")  # Every N steps, the last `keep` kept; dir: default
  # WORKDIR/checkpoints; may be gs://
  # Eval task specs (docs/tools.md), run before training, every N steps (0: at the end only) and at the end, at
  # Matryoshka dims (() = the full dim); best_metric (NAME/METRIC@DIM) keeps WORKDIR/best/.
  c.eval = dict(tasks=(), every=0, dims=(), batch_size=64, best_metric="")
  c.export = dict(truncate_dim=0)  # > 0: the export keeps the first N dims (sentence-transformers truncate_dim).
  return c


# Fields that moved or went: a config or flag that sets one stops with a line naming where it went.
MOVED = {f"data.{k}": f"is now tasks.{v}" for k, v in (
    ("neg_num", "retrieval.neg_num"), ("cls_neg_num", "cls.neg_num"), ("cls_query_max_len", "cls.query_max_len"),
    ("query_max_len", "retrieval.query_max_len"), ("passage_max_len", "{retrieval,cls}.passage_max_len"),
    ("sts_max_len", "sts.query_max_len"), ("sts_pair_max_len", "sts.passage_max_len"),
    ("query_prefix", "{retrieval,sts}.query_prefix"), ("passage_prefix", "{retrieval,sts}.passage_prefix"))} | {
    f"loss.{t}": f"is now tasks.{t}.temperature and tasks.{t}.weight" for t in ("retrieval", "sts", "cls")} | {
    "data.packing": "is gone: batches are always packed (data.pack_segments=1 puts one text in a row)",
    "data.buckets": "is gone: texts are packed into rows of data.pack_length tokens",
    "train.refresh_negatives_every": "is now refresh.every",
    "train.refresh_options": "is now the section refresh (start, end, num, sampling, relative_margin, absolute_margin)"}


def moved(field: str) -> str:
  """The line for a dotted field that moved or went ("" if it did not)."""
  key = next((k for k in MOVED if field == k or field.startswith(k + ".")), None)
  return f"{field} {MOVED[key]}" if key else ""


# Validation: every check of a run's config, alone, against the workdir and against its datasets, here; each
# raises a ValueError of one line naming the field and what to set.

def check(c: ml_collections.ConfigDict):
  """The config alone: fields that moved (a config written for an older schema), fields a run needs, values none
  takes."""
  for section_name, fields in c.items():
    for field in fields.keys() if isinstance(fields, ml_collections.ConfigDict) else ():
      if line := moved(f"{section_name}.{field}"):
        raise ValueError(line)
  missing = [f"--config.{k} ({what})" for k, v, what in (
      ("model.init", c.model.init or c.model.tokenizer, "the model to train: a sentence-transformers dir such as "
       "stella-mrl-large-zh-v3.5-1792d's, a piccolo_jax model dir or minilm"),
      ("data.datasets", c.data.datasets, "the training data: docs/data.md")) if not v]
  if missing:
    raise ValueError(f"set {' and '.join(missing)}")
  if c.data.pack_lengths < 1 or c.data.pack_attention <= 0 or c.data.pack_menu < 1:
    raise ValueError(f"data.pack_lengths={c.data.pack_lengths}, data.pack_menu={c.data.pack_menu} and "
                     f"data.pack_attention={c.data.pack_attention}: expected at least 1, 1 and above 0")
  if c.data.mix not in ("dataset", "groups"):
    raise ValueError(f"data.mix={c.data.mix!r}: expected 'dataset' or 'groups'")
  lora = c.model.lora
  if lora.rank < 0 or lora.rank and (lora.alpha <= 0 or not 0 <= lora.dropout < 1 or not lora.targets or
                                     lora.base_dtype not in ("bfloat16", "float32")):
    raise ValueError(f"model.lora: rank={lora.rank}, alpha={lora.alpha}, dropout={lora.dropout}, targets="
                     f"{tuple(lora.targets)}, base_dtype={lora.base_dtype!r}: expected rank >= 0 (0: off), alpha > 0, "
                     "dropout in [0, 1), some targets, base_dtype bfloat16 or float32")
  if c.loss.groups < 1 or c.data.global_batch_size % c.loss.groups:
    raise ValueError(f"data.global_batch_size={c.data.global_batch_size} is not divisible by "
                     f"loss.groups={c.loss.groups}")
  if not 1 <= c.train.merge_last <= max(c.checkpoint.keep, 1):
    raise ValueError(f"train.merge_last={c.train.merge_last}: expected 1 (off) up to checkpoint.keep="
                     f"{c.checkpoint.keep}, the checkpoints kept to merge")
  if c.tasks.retrieval.false_negatives not in ("off", "model", "teacher"):
    raise ValueError(f"tasks.retrieval.false_negatives={c.tasks.retrieval.false_negatives!r}: expected off, "
                     "model or teacher")
  r, kl = c.refresh, c.tasks.retrieval.kl_weight
  if r.every < 0:
    raise ValueError(f"refresh.every={r.every}: expected 0 (off) or a number of steps")
  if r.every and kl:
    raise ValueError(f"refresh.every={r.every} with tasks.retrieval.kl_weight={kl}: refreshed negatives have no "
                     "teacher scores; score them offline (mine --scores) instead")
  if not 0 <= r.start < r.end or r.num < 0 or r.sampling not in ("random", "top"):
    raise ValueError(f"refresh: start={r.start}, end={r.end}, num={r.num}, sampling={r.sampling!r}: expected "
                     "0 <= start < end, num >= 0, sampling random or top")


def check_run(c, tables, refreshed, embed_dim):
  """The config against its datasets (tables: prepare.Prepared; refreshed: those a refresh would re-mine) and its
  model's embedding size."""
  teachers = sorted({t.teacher.shape[1] for t in tables if t.teacher is not None})
  if len(teachers) > 1:
    raise ValueError(f"the distill datasets' teacher vectors differ in size {teachers}: one teacher a run")
  if teachers and teachers[0] != embed_dim and c.train.chunk_size:
    raise ValueError(f"train.chunk_size={c.train.chunk_size}: gradient caching cannot train the map to the "
                     f"teacher's dimension {teachers[0]}; use a teacher of the student's {embed_dim}")
  if not 0 <= c.export.truncate_dim <= embed_dim:
    raise ValueError(f"export.truncate_dim={c.export.truncate_dim}: expected 0 (off) up to the model's "
                     f"{embed_dim} dims")
  if c.refresh.every and not refreshed:
    raise ValueError(f"refresh.every={c.refresh.every}: no retrieval dataset trains with negatives "
                     "(tasks.retrieval.neg_num > 0) to refresh")


def section(name: str, **overrides) -> ml_collections.ConfigDict:
  """base()'s section `name`, references resolved, with fields replaced (tests, benchmarks)."""
  return replace(base()[name], **overrides)


def replace(c: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  """A copy of c with fields replaced."""
  c = c.copy_and_resolve_references()
  c.update(overrides)
  return c


# Fields that may change when a run resumes: the length of the run, logging, checkpoint cadence,
# evaluation, export, the input pipeline's parallelism, the mesh, the attention kernel and remat (none changes the
# math of a step).
RESUMABLE = ("train.epochs", "train.max_steps", "train.log_every", "train.max_nonfinite_steps",
             "train.chunk_size", "checkpoint.every", "checkpoint.keep", "eval.", "export.",
             "data.worker_count", "data.prepared_dir", "data.worker_threads", "data.prefetch", "mesh.",
             "model.attention", "model.remat", "train.merge_last", "train.tensorboard")


class ConfigChangeError(ValueError):
  """The workdir holds a run with another config."""


def flat(tree, prefix="") -> dict:
  """{dotted field: value} of a config or its JSON."""
  if hasattr(tree, "items"):
    return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
  return {prefix[:-1]: tree}


def config_diff(old: dict, new: dict) -> dict:
  """{dotted field: (old, new)} of the fields that differ."""
  a, b = flat(old), flat(new)
  return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def check_workdir(workdir, config):
  """Refuses to resume a run under a config that changes what it trains; warns on RESUMABLE changes."""
  path = pathlib.Path(workdir) / RUN_FILE
  if not path.is_file():
    return
  old = json.loads(path.read_text())
  if gone := sorted({line for k in flat(old) if (line := moved(k))}):
    raise ConfigChangeError(f"{workdir} holds a run of an older config schema ({'; '.join(gone)}): finish it "
                            "with the piccolo_jax that started it, or use a new --workdir")
  diff = config_diff(old, json.loads(config.to_json_best_effort()))
  added = flat(json.loads(base().to_json_best_effort()))  # Fields new since, at their defaults:
  diff = {k: v for k, v in diff.items() if k in flat(old) or v[1] != added.get(k, v[0])}  # the same run.
  fixed = {k: v for k, v in diff.items() if not any(k == p or k.startswith(p) for p in RESUMABLE if p)}
  show = lambda d: ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in d.items())
  if fixed:
    raise ConfigChangeError(f"{workdir} holds a run with another config ({show(fixed)}); use a new "
                            "--workdir, or the run's own values (its config.json)")
  if diff:
    log.warning("resuming %s with changed settings: %s", workdir, show(diff))
