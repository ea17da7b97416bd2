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

Prepared data. Every dataset is tokenised once (`prepare`: prefix included, truncated at its
field's max length) into memory-mapped token arrays; start-up maps them and batches copy token
ids straight from them, so per-process memory does not grow with the dataset. A global
batch's bucket is the smallest bucket >= its longest selected text; each field is padded
to min(bucket, field max, field ceiling), the ceiling being the field's longest text over
all datasets of the task rounded up to a multiple of 8 (keeps cls label fields short next
to long cls queries). Shapes are a function of (task, bucket): at most len(buckets) per
task, and each process picks them from the index alone while tokenising only its slice.

Packing (data.packing, piccolo_jax.packing). Instead of padding each field to a bucket, the
texts of the global batch (every field, padding negatives left out) are packed first-fit
decreasing into R rows of L tokens, L = max(pack_length, the task's longest field ceiling), at most
pack_segments texts a row; every process plans the same packing from token lengths alone and
copies the tokens of its own R / P rows only. So where a text lands depends on (seed, step, the
device count) and not on the process count: dropout masks, drawn per row, are the same with 1
process or many. R comes from a per-task menu of pack_menu row counts chosen at start-up from the
batches of the first PACK_SAMPLE steps, a function of the data and seed only, so resumes and all
processes agree. Batch: pack_tok/seg/pos [R/P, L], pack_len [R/P, S] and, for the process's slice
of each field f, {f}_idx [N/P] (global slots: row * S + text).

State. Batch s is a pure function of s, so the grain iterator's state is the next step;
restoring it replays exactly the batches of an uninterrupted run.

Batch: (arrays, meta). arrays: process-local numpy, `{f}_ids`/`{f}_mask` int32 [N, L]
(mask 1 = real token) for each text field f of the task (tasks.TASKS: retrieval query [B],
pos [B], neg [B*K], rows i*K..i*K+K-1 belonging to query i; sts text_a, text_b), plus the
task's extras (sts label float32 [B], cls neg_valid bool [B, K]). meta: task, dataset (str),
step, bucket (int; packed: the row length), rows (packed rows, 0 unpacked), tokens (real tokens
of this process's slice) and pad_frac (float, padding share).

Unlike the original, rows with an empty text or no positive (and, when neg_num > 0,
retrieval rows with no negative) are dropped and counted at start-up instead of being
replaced by a random row at batch time; n_d counts the rows kept.
"""
import collections
import logging

from absl import flags
import grain
import numpy as np

from piccolo_jax import packing
from piccolo_jax import prepare
from piccolo_jax import sources
from piccolo_jax import tasks as tasks_lib

DataError = sources.DataError
log = logging.getLogger(__name__)
PACK_SAMPLE = 256  # The first steps, whose row counts choose the packing menus.


def load_tables(c, tokenizer) -> list[prepare.Prepared]:
  """Every dataset of data config c, prepared where needed (validated, tokenised) and memory-mapped."""
  out = prepare.open_all(c, tokenizer)
  for t in out:
    if len(t) < c.global_batch_size:
      raise DataError(f"{t.name}: {len(t)} usable rows, fewer than one global batch of "
                      f"{c.global_batch_size} (skipped: {t.skipped or 'none'})")
    log.info("data: %s: task %s, %d rows, repeat %d, %d batches/epoch, skipped %s",
             t.name, t.task, len(t), t.repeat, t.repeat * (len(t) // c.global_batch_size),
             t.skipped or "none")
    if t.skipped:
      log.warning("data: %s: skipped rows %s", t.name, t.skipped)
  return out


def _bucket(buckets, n):
  return next((b for b in sorted(buckets) if b >= n), max(buckets))


def steps_per_epoch(c, tables):
  return sum(t.repeat * (len(t) // c.global_batch_size) for t in tables)


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
  """step -> (arrays, meta) of this process's slice of global batch `step`; the pipeline's map."""

  def __init__(self, c, tables, process_index=0, process_count=1, row_multiple=1):
    """row_multiple: the global batch's packed rows are a multiple of it (the devices)."""
    self.c, self.tables = c.copy_and_resolve_references(), tables
    self.process_index, self.process_count, self.row_multiple = process_index, process_count, row_multiple
    g = c.global_batch_size
    if g % process_count:
      raise ValueError(f"global batch {g} is not divisible by {process_count} processes")
    self.local = g // process_count
    if c.packing and row_multiple % process_count:
      raise ValueError(f"packed rows multiple {row_multiple} is not divisible by {process_count} processes")
    self.lo = process_index * self.local
    self.steps_per_epoch = steps_per_epoch(c, tables)
    longest = collections.defaultdict(int)
    for t in tables:
      longest[t.task, "query"] = max(longest[t.task, "query"], t.longest_query)
      longest[t.task, "pos"] = longest[t.task, "neg"] = max(longest[t.task, "pos"], t.longest_passage)
    self.ceil = {k: -(-n // 8) * 8 for k, n in longest.items()}  # longest, rounded up to 8s
    self._plans = {}
    self.menus = self.pack_menus() if c.packing else {}

  def fields(self, task, bucket):
    """[(batch field, slot, max length, padded length)] of a task's tokenised fields."""
    return [(f.name, f.slot, cap, min(bucket, cap, self.ceil[task, f.slot]))
            for f, cap in tasks_lib.fields(tasks_lib.TASKS[task], self.c)]

  def plan(self, epoch):
    """(dataset ids [S], rows [S, G]) of an epoch, in training order."""
    plan = self._plans.get(epoch)
    if plan is None:
      g, ds, rows = self.c.global_batch_size, [], []
      for d, t in enumerate(self.tables):
        for r in range(t.repeat):
          perm = np.random.default_rng([self.c.seed, epoch, d, r]).permutation(len(t))
          rows.append(perm[:len(t) // g * g].reshape(-1, g).astype(np.int32))  # rows < 2**31
          ds.append(np.full(len(t) // g, d, np.int32))
      order = np.random.default_rng([self.c.seed, epoch]).permutation(self.steps_per_epoch)
      plan = np.concatenate(ds)[order], np.concatenate(rows)[order]
      self._plans = {epoch: plan}  # one epoch cached; replaced whole, so thread-safe
    return plan

  def select(self, step):
    """Dataset index and the global batch's ids: query rows, pos/neg passages, neg_valid."""
    ds, rows = self.plan(step // self.steps_per_epoch)
    d, rows = int(ds[step % self.steps_per_epoch]), rows[step % self.steps_per_epoch]
    t, rng = self.tables[d], np.random.default_rng([self.c.seed, step])
    task = tasks_lib.TASKS[t.task]
    pos, _ = _pick(rng, t.pos_off, rows, 1)
    sel = {"query": rows, "pos": t.pos_ids[pos[:, 0]]}
    if k := tasks_lib.negatives(task, self.c):
      neg, cnt = _pick(rng, t.neg_off, rows, k)
      if task.neg_fill == "cycle":  # every row has a negative (else skipped): cycle them
        neg = np.take_along_axis(neg, np.arange(k) % np.maximum(cnt, 1)[:, None], axis=1)
      sel["neg_valid"] = neg >= 0
      sel["neg"] = np.where(sel["neg_valid"], t.neg_ids[np.maximum(neg, 0)], -1)
    return d, sel

  def lengths(self, t, sel):
    """Token length of every selected text (0 for padding negatives), per slot."""
    lens = {"query": t.q_len(sel["query"]), "pos": t.p_len(sel["pos"])}
    if "neg" in sel:
      lens["neg"] = np.where(sel["neg_valid"], t.p_len(np.maximum(sel["neg"], 0)), 0)
    return lens

  def bucket(self, lens):
    return _bucket(self.c.buckets, max(int(v.max()) for v in lens.values()))

  def padded(self, t, sel, lens):
    """(arrays, meta) of the slice, each field padded to the batch's bucket."""
    bucket, lo, hi, arrays, real, total = self.bucket(lens), self.lo, self.lo + self.local, {}, 0, 0
    for field, slot, _, length in self.fields(t.task, bucket):
      ids = sel[slot][lo:hi].reshape(-1)  # neg: rows i*K .. i*K+K-1 belong to query i
      arrays[f"{field}_ids"], arrays[f"{field}_mask"] = t.padded(slot, ids, length)
      real, total = real + arrays[f"{field}_mask"].sum(), total + arrays[f"{field}_mask"].size
    return arrays, dict(bucket=bucket, rows=0, tokens=int(real), pad_frac=float(1 - real / total))

  def row_length(self, task):
    """L of the task's packed rows: pack_length, or its longest text (rounded up to 8s) if longer."""
    return max(self.c.pack_length, *(length for *_, length in self.fields(task, max(self.c.buckets))))

  def fit(self, t, sel, lens):
    """(texts, lengths [N], first_fit) of the global batch's texts to pack: texts holds per field
    (field, slot, ids, packed) for every text, packed False for padding negatives (the loss masks them)."""
    texts, masked = [], "neg_valid" in tasks_lib.TASKS[t.task].extras
    for field, slot, _, _ in self.fields(t.task, max(self.c.buckets)):
      keep = sel["neg_valid"] if slot == "neg" and masked else np.ones(sel[slot].shape, bool)
      texts.append((field, slot, sel[slot].reshape(-1), keep.reshape(-1)))
    lens_N = np.concatenate([lens[slot].reshape(-1)[keep] for _, slot, _, keep in texts])
    return texts, lens_N, packing.first_fit(lens_N, self.row_length(t.task), self.c.pack_segments)

  def pack_menus(self):
    """task -> row-count menu, from the batches of the first PACK_SAMPLE steps."""
    needed = collections.defaultdict(list)
    for step in range(PACK_SAMPLE):
      d, sel = self.select(step)
      t = self.tables[d]
      needed[t.task].append(self.fit(t, sel, self.lengths(t, sel))[2][2])
    return {task: packing.row_menu(n, self.c.pack_menu, self.row_multiple) for task, n in needed.items()}

  def packed(self, t, sel, lens):
    """(arrays, meta) of the slice, packed: this process's rows of the global batch's packing."""
    L, S, p = self.row_length(t.task), self.c.pack_segments, self.process_index
    texts, lens_N, (row_N, slot_N, rows) = self.fit(t, sel, lens)
    R = packing.rows_for(rows, self.menus.get(t.task, ()), self.row_multiple) // self.process_count
    mine_N, slots_N = row_N // R == p, row_N * S + slot_N
    arrays, tokens, order, first = {}, [], [], 0
    for field, slot, ids, keep in texts:
      at = first + np.arange(keep.sum())  # the field's packed texts, in lens_N
      tokens.append(t.flat(slot, ids[keep][mine_N[at]]))
      order.append(at[mine_N[at]])
      idx = np.zeros(len(ids), np.int32)  # padding negatives read slot 0 (the loss masks them)
      idx[keep] = slots_N[at]
      k = len(ids) // self.c.global_batch_size  # texts per batch row; this process's rows of the field
      arrays[f"{field}_idx"], first = idx[self.lo * k:(self.lo + self.local) * k], first + len(at)
    order = np.concatenate(order)
    arrays |= packing.pack(np.concatenate(tokens), lens_N[order], row_N[order] - p * R, slot_N[order], R, L, S)
    real = int(lens_N[mine_N].sum())
    return arrays, dict(bucket=L, rows=R * self.process_count, tokens=real, pad_frac=float(1 - real / (R * L)))

  def __call__(self, step, _=None):
    d, sel = self.select(step)
    t, lo, hi = self.tables[d], self.lo, self.lo + self.local
    arrays, meta = (self.packed if self.c.packing else self.padded)(t, sel, self.lengths(t, sel))
    extras = {"label": lambda: np.asarray(t.labels[sel["query"][lo:hi]]), "neg_valid": lambda: sel["neg_valid"][lo:hi]}
    arrays |= {k: extras[k]() for k in tasks_lib.TASKS[t.task].extras}
    return arrays, dict(task=t.task, dataset=t.name, step=step) | meta


def make_iterator(c, tables, process_index=0, process_count=1, row_multiple=1):
  """A grain iterator (get_state/set_state) of (arrays, meta): this process's slices, forever."""
  batcher = Batcher(c, tables, process_index, process_count, row_multiple)
  ds = grain.MapDataset.range(batcher.steps_per_epoch).repeat(None)
  it = ds.map_with_index(batcher).to_iter_dataset(
      grain.ReadOptions(num_threads=c.worker_threads, prefetch_buffer_size=c.prefetch))
  if c.worker_count:
    if not flags.FLAGS.is_parsed():  # grain 0.2.18 reads an absl flag there (grain#1355)
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=c.worker_count))
  return iter(it)
