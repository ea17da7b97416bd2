"""Task-homogeneous multi-dataset input pipeline on grain (Piccolo2's data recipe).

Epoch plan. Dataset d with n_d usable rows and repeat r_d gives r_d * (n_d // G) global
batches of G rows, each copy an independent permutation; the batches of all datasets are
shuffled together. Plan(epoch) depends only on (seed, epoch), so epochs re-shuffle and
every process computes the same plan. A global batch holds rows of one dataset only, so
every device trains the same task and loss in the same step.

Sampling. For global step s, one positive per row and K negatives per row are drawn from
a numpy generator seeded with (seed, s) over the rows of the whole global batch (cheap:
ids only, no text). Retrieval takes neg_num negatives without replacement and cycles them
when a row has fewer; cls takes up to cls_neg_num and pads with "" masked by neg_valid.

Buckets. At start-up the fast tokenizer measures every text once in batch mode (with its
prefix, truncated at its field's max length) into a per-dataset length index. A global
batch's bucket is the smallest bucket >= its longest selected text; each field is padded
to min(bucket, field max, field ceiling), the ceiling being the field's longest text over
all datasets of the task rounded up to a multiple of 8 (keeps cls label fields short next
to long cls queries). Shapes are a function of (task, bucket): at most len(buckets) per
task, and each process picks them from the index alone while tokenising only its slice.

State. Batch s is a pure function of s, so the grain iterator's state is the next step;
restoring it replays exactly the batches of an uninterrupted run.

Batch (process-local numpy; `{f}_ids`/`{f}_mask` int32 [N, L], mask 1 = real token):
  retrieval: query [B], pos [B], neg [B*K] (rows i*K..i*K+K-1 belong to query i);
  sts: text_a [B], text_b [B], label float32 [B];
  cls: query [B], pos [B], neg [B*K], neg_valid bool [B, K];
  plus task, dataset (str), step, bucket (int) and pad_frac (float, padding share).

Unlike the original, rows with an empty text or no positive (and, when neg_num > 0,
retrieval rows with no negative) are dropped and counted at start-up instead of being
replaced by a random row at batch time; n_d counts the rows kept.
"""
import collections
import dataclasses
import logging

from absl import flags
import grain
import jax
import numpy as np

from piccolo_jax import sources

DataError = sources.DataError
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Pipeline settings.

  `datasets`: mappings with `kind` (piccolo|meta|jsonl|tsv|tfds), `path` (tfds: `name`,
  `data_dir`, `split`), optional `task`, `repeat`, `limit` (first n usable rows), `name`,
  `query_prefix`, `passage_prefix`; meta: `path` of a `name repeat` list and its `root`.
  """
  datasets: tuple = ()
  global_batch_size: int = 32
  seed: int = 0
  neg_num: int = 1
  cls_neg_num: int = 10
  query_prefix: str = ""
  passage_prefix: str = ""
  query_max_len: int = 64
  passage_max_len: int = 512
  cls_query_max_len: int = 512
  sts_max_len: int = 64  # first text; the second uses sts_pair_max_len as the original
  sts_pair_max_len: int = 512
  buckets: tuple = (32, 64, 128, 256, 512)
  strict: bool = False
  num_epochs: int | None = None  # None: repeat forever
  worker_count: int = 0  # grain worker processes (0: none)
  worker_threads: int = 2  # grain read threads per process
  prefetch: int = 4


def as_config(config):
  """A DataConfig from a DataConfig, an ml_collections ConfigDict, a dict or an object."""
  if isinstance(config, DataConfig):
    return config
  get = config.get if hasattr(config, "get") else lambda k, d: getattr(config, k, d)
  return DataConfig(**{f.name: get(f.name, f.default) for f in dataclasses.fields(DataConfig)})


def _fields(c, task):
  """(batch field, table slot, max length) per task; slot query|pos|neg."""
  return {
      "retrieval": [("query", "query", c.query_max_len), ("pos", "pos", c.passage_max_len)]
                   + [("neg", "neg", c.passage_max_len)] * (c.neg_num > 0),
      "sts": [("text_a", "query", c.sts_max_len), ("text_b", "pos", c.sts_pair_max_len)],
      "cls": [("query", "query", c.cls_query_max_len), ("pos", "pos", c.passage_max_len),
              ("neg", "neg", c.passage_max_len)],
  }[task]


class _Encoders:
  """Per-max-length copies of the fast tokenizer's backend: fixed settings, thread-safe."""

  def __init__(self, tokenizer, caps):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
      raise TypeError(f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer")
    self.pad_id = tokenizer.pad_token_id or 0
    self.enc = {}
    for cap in set(caps):
      self.enc[cap] = type(backend).from_str(backend.to_str())
      self.enc[cap].no_padding()
      self.enc[cap].enable_truncation(cap)

  def lengths(self, texts, cap, chunk=8192):
    """int32 token counts (special tokens included, truncated at cap)."""
    return np.array([len(e.ids) for i in range(0, len(texts), chunk)
                     for e in self.enc[cap].encode_batch(texts[i:i + chunk])], np.int32)

  def __call__(self, texts, cap, length):
    """ids, mask: int32 [len(texts), length], right-padded."""
    ids = np.full((len(texts), length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for i, e in enumerate(self.enc[cap].encode_batch(texts)):
      ids[i, :len(e.ids)] = e.ids
      mask[i, :len(e.ids)] = 1
    return ids, mask


def _caps(c):
  """task -> slot -> max length (at most the largest bucket)."""
  return {task: {slot: min(cap, max(c.buckets)) for _, slot, cap in _fields(c, task)}
          for task in ("retrieval", "sts", "cls")}


def _encoders(c, tokenizer):
  return _Encoders(tokenizer, [cap for caps in _caps(c).values() for cap in caps.values()])


def _bucket(buckets, n):
  return next((b for b in sorted(buckets) if b >= n), max(buckets))


def load_tables(config, tokenizer):
  """Reads and validates every dataset and builds its token-length index."""
  c = as_config(config)
  entries = [e for d in c.datasets
             for e in (sources.read_meta_list(d) if d.get("kind") == "meta" else [d])]
  caps, enc, tables = _caps(c), _encoders(c, tokenizer), []
  for entry in entries:
    t = sources.load_table(entry, strict=c.strict, need_neg=c.neg_num > 0)
    if len(t) < c.global_batch_size:
      raise DataError(f"{t.name}: {len(t)} usable rows, fewer than one global batch of "
                      f"{c.global_batch_size} (skipped: {t.skipped or 'none'})")
    if t.task != "cls":  # the original puts no prefixes on cls texts
      t.query_prefix = entry.get("query_prefix", c.query_prefix)
      t.passage_prefix = entry.get("passage_prefix", c.passage_prefix)
    t.q_len = enc.lengths([t.query_prefix + q for q in t.queries], caps[t.task]["query"])
    t.p_len = enc.lengths([t.passage_prefix + p for p in t.passages], caps[t.task]["pos"])
    log.info("data: %s: task %s, %d rows, repeat %d, %d batches/epoch, skipped %s",
             t.name, t.task, len(t), t.repeat, t.repeat * (len(t) // c.global_batch_size),
             t.skipped or "none")
    if t.skipped:
      log.warning("data: %s: skipped rows %s", t.name, t.skipped)
    tables.append(t)
  return tables


def steps_per_epoch(config, tables):
  g = as_config(config).global_batch_size
  return sum(t.repeat * (len(t) // g) for t in tables)


def _pick(rng, off, rows, k):
  """[R, k] flat candidate ids: uniform without replacement per row, -1 when it runs out."""
  cnt = off[rows + 1] - off[rows]
  first = np.cumsum(cnt) - cnt
  seg = np.repeat(np.arange(len(rows)), cnt)
  rank = np.arange(cnt.sum()) - first[seg]
  flat = (off[rows][seg] + rank)[np.lexsort((rng.random(len(seg)), seg))]
  out = np.full((len(rows), k), -1, np.int64)
  keep = rank < k
  out[seg[keep], rank[keep]] = flat[keep]
  return out, cnt


class Batcher:
  """step -> this process's slice of global batch `step`; the map function of the pipeline."""

  def __init__(self, config, tokenizer, tables, process_index=0, process_count=1):
    self.c, self.tables = as_config(config), tables
    g = self.c.global_batch_size
    if g % process_count:
      raise ValueError(f"global batch {g} is not divisible by {process_count} processes")
    self.local = g // process_count
    self.lo = process_index * self.local
    self.steps_per_epoch = steps_per_epoch(self.c, tables)
    self.caps = _caps(self.c)
    longest = collections.defaultdict(int)
    for t in tables:
      longest[t.task, "query"] = max(longest[t.task, "query"], int(t.q_len.max()))
      longest[t.task, "pos"] = longest[t.task, "neg"] = max(longest[t.task, "pos"],
                                                            int(t.p_len.max()))
    self.ceil = {k: -(-n // 8) * 8 for k, n in longest.items()}  # longest, rounded up to 8s
    self.enc = _encoders(self.c, tokenizer)
    self._plans = {}

  def fields(self, task, bucket):
    """[(batch field, slot, max length, padded length)] of a task's tokenised fields."""
    caps = self.caps[task]
    return [(f, slot, caps[slot], min(bucket, caps[slot], self.ceil[task, slot]))
            for f, slot, _ in _fields(self.c, task)]

  def plan(self, epoch):
    """(dataset ids [S], rows [S, G]) of an epoch, in training order."""
    plan = self._plans.get(epoch)
    if plan is None:
      g, ds, rows = self.c.global_batch_size, [], []
      for d, t in enumerate(self.tables):
        for r in range(t.repeat):
          perm = np.random.default_rng([self.c.seed, epoch, d, r]).permutation(len(t))
          rows.append(perm[:len(t) // g * g].reshape(-1, g))
          ds.append(np.full(len(t) // g, d))
      order = np.random.default_rng([self.c.seed, epoch]).permutation(self.steps_per_epoch)
      plan = np.concatenate(ds)[order], np.concatenate(rows)[order]
      self._plans = {epoch: plan}  # one epoch cached; replaced whole, so thread-safe
    return plan

  def select(self, step):
    """Dataset index and the global batch's ids: query rows, pos/neg passages, neg_valid."""
    ds, rows = self.plan(step // self.steps_per_epoch)
    d, rows = int(ds[step % self.steps_per_epoch]), rows[step % self.steps_per_epoch]
    t, rng = self.tables[d], np.random.default_rng([self.c.seed, step])
    pos, _ = _pick(rng, t.pos_off, rows, 1)
    sel = {"query": rows, "pos": t.pos_ids[pos[:, 0]]}
    k = {"retrieval": self.c.neg_num, "cls": self.c.cls_neg_num}.get(t.task, 0)
    if k:
      neg, cnt = _pick(rng, t.neg_off, rows, k)
      if t.task == "retrieval":  # every row has a negative (else skipped): cycle them
        neg = np.take_along_axis(neg, np.arange(k) % np.maximum(cnt, 1)[:, None], axis=1)
      sel["neg_valid"] = neg >= 0
      sel["neg"] = np.where(sel["neg_valid"], t.neg_ids[np.maximum(neg, 0)], -1)
    return d, sel

  def lengths(self, t, sel):
    """Token length of every selected text (0 for padding negatives), per slot."""
    lens = {"query": t.q_len[sel["query"]], "pos": t.p_len[sel["pos"]]}
    if "neg" in sel:
      lens["neg"] = np.where(sel["neg_valid"], t.p_len[np.maximum(sel["neg"], 0)], 0)
    return lens

  def bucket(self, lens):
    return _bucket(self.c.buckets, max(int(v.max()) for v in lens.values()))

  def __call__(self, step, _=None):
    d, sel = self.select(step)
    t = self.tables[d]
    bucket, lo, hi = self.bucket(self.lengths(t, sel)), self.lo, self.lo + self.local
    batch, real, total = {}, 0, 0
    for field, slot, cap, length in self.fields(t.task, bucket):
      ids = sel[slot][lo:hi].reshape(-1)  # neg: rows i*K .. i*K+K-1 belong to query i
      texts = ([t.query_prefix + t.queries[i] for i in ids] if slot == "query" else
               [t.passage_prefix + t.passages[i] if i >= 0 else "" for i in ids])
      batch[f"{field}_ids"], batch[f"{field}_mask"] = self.enc(texts, cap, length)
      real, total = real + batch[f"{field}_mask"].sum(), total + batch[f"{field}_mask"].size
    if t.task == "sts":
      batch["label"] = t.labels[sel["query"][lo:hi]]
    if t.task == "cls":
      batch["neg_valid"] = sel["neg_valid"][lo:hi]
    batch.update(task=t.task, dataset=t.name, step=step, bucket=bucket,
                 pad_frac=float(1 - real / total))
    return batch


def make_iterator(config, tokenizer, process_index=0, process_count=1, tables=None):
  """A grain iterator (get_state/set_state) over this process's slices of the global batches."""
  c = as_config(config)
  tables = load_tables(c, tokenizer) if tables is None else tables
  batcher = Batcher(c, tokenizer, tables, process_index, process_count)
  ds = grain.MapDataset.range(batcher.steps_per_epoch).repeat(c.num_epochs)
  it = ds.map_with_index(batcher).to_iter_dataset(
      grain.ReadOptions(num_threads=c.worker_threads, prefetch_buffer_size=c.prefetch))
  if c.worker_count:
    if not flags.FLAGS.is_parsed():  # grain 0.2.18 reads an absl flag there (grain#1355)
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=c.worker_count))
  return iter(it)


def to_global(batch, mesh, data_axis="data"):
  """Process-local numpy batch -> global jax.Arrays sharded on the leading axis."""
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(data_axis))
  return {k: jax.make_array_from_process_local_data(sharding, v)
          if isinstance(v, np.ndarray) else v for k, v in batch.items()}
