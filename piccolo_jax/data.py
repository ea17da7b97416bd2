"""Task-homogeneous multi-dataset input pipeline on grain (Piccolo2's data recipe).

Epoch plan. Dataset d with n_d usable rows and repeat r_d gives r_d * (n_d // U) units of U
rows, each copy an independent permutation. Plan(epoch) depends only on (seed, epoch), so
epochs re-shuffle and every process computes the same plan.
- data.mix="dataset" (default): a unit is a global batch (U = global_batch_size) and the units
  of all datasets are shuffled together, so a step trains one dataset, task and loss.
- data.mix="groups": a unit is one of the step's loss.groups groups (U = global batch / groups)
  and each group draws its own dataset, as the original's GPUs did. A step's composition (groups
  per task, tasks in name order) comes from `compositions`: each task's share of the epoch's
  groups, floor or ceil of it every step, the extra groups to the tasks furthest behind their
  share. So a run compiles a few compositions only (at most 3 for 3 tasks), every task has
  exactly its share by the end of each epoch, and within a task its datasets' units are
  shuffled together (every unit of every dataset once an epoch, bar the last
  sum(units) mod groups units, fewer than one step, left out of that epoch).
  The steps' texts are packed together (it needs data.packing) and each task's arrays sit under
  its name, whole on every process (step.step_loss).

Sampling. For global step s, one positive per row and K negatives per row are drawn from
a numpy generator seeded with (seed, s) over the rows of the whole global batch (cheap:
ids only, no text). A row takes up to its dataset's K negatives without replacement (K: the
entry's neg_num, else the config's neg_num / cls_neg_num), as the original; a task's batch
field holds the task's largest K, and slots past a row's negatives are "" masked by
neg_valid (a retrieval row without negatives has in-batch negatives only).

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

Unlike the original, rows with an empty text or no positive are dropped and counted at
start-up instead of being replaced by a random row at batch time; n_d counts the rows kept.
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


def unit_rows(c, groups=1) -> int:
  """Rows of a plan's unit: the global batch (data.mix="dataset") or one of its loss groups ("groups")."""
  if c.mix not in ("dataset", "groups"):
    raise ValueError(f"data.mix={c.mix!r}: expected 'dataset' or 'groups'")
  if groups < 1 or c.global_batch_size % groups:
    raise ValueError(f"data.global_batch_size={c.global_batch_size} is not divisible by loss.groups={groups}")
  return c.global_batch_size // groups if c.mix == "groups" else c.global_batch_size


def load_tables(c, tokenizer, groups=1) -> list[prepare.Prepared]:
  """Every dataset of data config c, prepared where needed (validated, tokenised) and memory-mapped."""
  out, unit = prepare.open_all(c, tokenizer), unit_rows(c, groups)
  for t in out:
    if len(t) < unit:
      what = "group" if unit < c.global_batch_size else "global batch"
      raise DataError(f"{t.name}: {len(t)} usable rows, fewer than one {what} of {unit} "
                      f"(skipped: {t.skipped or 'none'})")
    log.info("data: %s: task %s, %d rows, repeat %d, %d batches of %d rows/epoch, skipped %s",
             t.name, t.task, len(t), t.repeat, t.repeat * (len(t) // unit), unit, t.skipped or "none")
    if t.skipped:
      log.warning("data: %s: skipped rows %s", t.name, t.skipped)
  return out


def _bucket(buckets, n):
  return next((b for b in sorted(buckets) if b >= n), max(buckets))


def steps_per_epoch(c, tables, groups=1):
  unit = unit_rows(c, groups)
  return sum(t.repeat * (len(t) // unit) for t in tables) * unit // c.global_batch_size


def compositions(units_T, groups):
  """[S, T] groups of each task in each of an epoch's S = sum(units_T) // groups steps.

  Task t gets C_t slots in all, its share of S * groups by largest remainder (C_t <= units_T[t]),
  and every step floor(C_t / S) of them or one more: the extra groups of a step go to the tasks
  furthest behind their share so far. So a run has at most comb(T, extras) compositions (programs),
  and after the epoch each task has had exactly C_t groups.
  """
  units_T = np.asarray(units_T, np.int64)
  S = int(units_T.sum()) // groups
  if not S:
    return np.zeros((0, len(units_T)), np.int64)
  want = S * groups * units_T  # C_t * total, before rounding
  C_T = want // units_T.sum()
  rem = want - C_T * units_T.sum()
  C_T[np.lexsort((np.arange(len(C_T)), -rem))[:S * groups - C_T.sum()]] += 1
  base_T, out, given_T = C_T // S, np.zeros((S, len(C_T)), np.int64), np.zeros(len(C_T), np.int64)
  extras = groups - base_T.sum()
  for s in range(S):
    behind_T = (s + 1) * C_T - S * (given_T + base_T)  # S * how far behind its share the task would be
    out[s] = base_T
    out[s, np.lexsort((np.arange(len(C_T)), -behind_T))[:extras]] += 1
    given_T += out[s]
  return out


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
  return out


class Batcher:
  """step -> (arrays, meta) of this process's slice of global batch `step`; the pipeline's map."""

  def __init__(self, c, tables, process_index=0, process_count=1, row_multiple=1, groups=1):
    """row_multiple: the global batch's packed rows are a multiple of it (the devices). groups: loss.groups."""
    self.c, self.tables, self.groups = c.copy_and_resolve_references(), tables, groups
    self.process_index, self.process_count, self.row_multiple = process_index, process_count, row_multiple
    g, self.unit = c.global_batch_size, unit_rows(c, groups)
    if g % process_count:
      raise ValueError(f"global batch {g} is not divisible by {process_count} processes")
    if c.mix == "groups" and not c.packing:
      raise ValueError("data.mix='groups' packs the step's texts: it needs data.packing=True")
    self.local = g // process_count
    if c.packing and row_multiple % process_count:
      raise ValueError(f"packed rows multiple {row_multiple} is not divisible by {process_count} processes")
    self.lo = process_index * self.local
    self.steps_per_epoch = steps_per_epoch(c, tables, groups)
    if not self.steps_per_epoch:
      raise DataError(f"the datasets hold no global batch of {g} rows")
    longest, self.k = collections.defaultdict(int), collections.defaultdict(int)
    for t in tables:
      longest[t.task, "query"] = max(longest[t.task, "query"], t.longest_query)
      longest[t.task, "pos"] = longest[t.task, "neg"] = max(longest[t.task, "pos"], t.longest_passage)
      self.k[t.task] = max(self.k[t.task], self.negatives(t))
    self.ceil = {k: -(-n // 8) * 8 for k, n in longest.items()}  # longest, rounded up to 8s
    self.tasks = sorted({t.task for t in tables})  # a mixed step's tasks, in this order
    self._plans = {}
    self.menus = self.pack_menus() if c.packing else {}

  def negatives(self, t):
    """K of dataset t: its entry's neg_num, else the data config's for its task."""
    task = tasks_lib.TASKS[t.task]
    if t.neg_num is not None and not task.neg_num:
      raise DataError(f"{t.name}: neg_num={t.neg_num} is set, but task {t.task} takes no negatives")
    return tasks_lib.negatives(task, self.c) if t.neg_num is None else t.neg_num

  def fields(self, task, bucket):
    """[(batch field, slot, max length, padded length)] of a task's tokenised fields."""
    return [(f.name, f.slot, cap, min(bucket, cap, self.ceil[task, f.slot]))
            for f, cap in tasks_lib.fields(tasks_lib.TASKS[task], self.c, self.k[task])]

  def plan(self, epoch):
    """(dataset ids [S, U], rows [S, G]) of an epoch in training order: each step's U units (1, or
    loss.groups under data.mix="groups", in task order) of G / U rows."""
    plan = self._plans.get(epoch)
    if plan is None:
      units, unit_ds = [], []  # per dataset copy: [n, unit] rows, and their dataset
      for d, t in enumerate(self.tables):
        for r in range(t.repeat):
          perm = np.random.default_rng([self.c.seed, epoch, d, r]).permutation(len(t))
          units.append(perm[:len(t) // self.unit * self.unit].reshape(-1, self.unit).astype(np.int32))  # rows < 2**31
          unit_ds.append(np.full(len(t) // self.unit, d, np.int32))
      rows, ds = np.concatenate(units), np.concatenate(unit_ds)
      rng = np.random.default_rng([self.c.seed, epoch])
      if self.c.mix == "dataset":
        order = rng.permutation(len(ds))[:, None]
      else:  # each task's units shuffled, dealt to the steps' task slots (compositions)
        task_U = np.array([self.tasks.index(self.tables[d].task) for d in ds])
        mine = [rng.permutation(np.flatnonzero(task_U == i)) for i in range(len(self.tasks))]
        comp_ST = compositions([len(m) for m in mine], self.groups)
        used = np.zeros(len(mine), np.int64)
        order = np.zeros((len(comp_ST), self.groups), np.int64)
        for s, comp in enumerate(comp_ST):
          order[s] = np.concatenate([m[u:u + n] for m, u, n in zip(mine, used, comp)])
          used += comp
      plan = ds[order], rows[order].reshape(len(order), -1)
      self._plans = {epoch: plan}  # one epoch cached; replaced whole, so thread-safe
    return plan

  def units(self, step):
    """[(dataset index, ids)] of global batch `step`'s units: query rows, a positive each, K negatives
    each (the task's K; past the dataset's K, and past a row's candidates, -1 with neg_valid False)."""
    ds, rows = self.plan(step // self.steps_per_epoch)
    ds, rows = ds[step % self.steps_per_epoch], rows[step % self.steps_per_epoch]
    rng, out = np.random.default_rng([self.c.seed, step]), []
    for d, rows_u in zip(ds, rows.reshape(len(ds), -1)):
      t = self.tables[d]
      pos = _pick(rng, t.pos_off, rows_u, 1)
      sel = {"query": rows_u, "pos": t.pos_ids[pos[:, 0]]}
      if k := self.k[t.task]:
        neg = np.pad(_pick(rng, t.neg_off, rows_u, self.negatives(t)), ((0, 0), (0, k - self.negatives(t))),
                     constant_values=-1)
        sel["neg_valid"] = neg >= 0
        sel["neg"] = np.where(sel["neg_valid"], t.neg_ids[np.maximum(neg, 0)], -1)
      out.append((int(d), sel))
    return out

  def select(self, step):
    """(dataset index, ids) of a single-dataset step (data.mix="dataset")."""
    (d, sel), = self.units(step)
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

  def row_length(self, tasks):
    """L of packed rows holding these tasks' texts: pack_length, or their longest text (rounded up to 8s)."""
    return max(self.c.pack_length, *(length for task in tasks for *_, length in self.fields(task, max(self.c.buckets))))

  def texts(self, t, sel):
    """[(field, slot, ids, keep)] of a unit's texts, keep False for padding negatives (the loss masks
    them; they are not packed), and the lengths of the kept ones."""
    texts, lens = [], self.lengths(t, sel)
    for field, slot, _, _ in self.fields(t.task, max(self.c.buckets)):
      keep = sel["neg_valid"] if slot == "neg" else np.ones(sel[slot].shape, bool)
      texts.append((field, slot, sel[slot].reshape(-1), keep.reshape(-1)))
    return texts, np.concatenate([lens[slot].reshape(-1)[keep] for _, slot, _, keep in texts])

  def fit(self, units, L):
    """(per unit (table, texts), lengths [N], first_fit) of the packing of the units' texts."""
    parts = [(self.tables[d], *self.texts(self.tables[d], sel)) for d, sel in units]
    lens_N = np.concatenate([lens for *_, lens in parts])
    return [p[:2] for p in parts], lens_N, packing.first_fit(lens_N, L, self.c.pack_segments)

  def menu_key(self, units):
    """(the menu and meta name of a step, its tasks): its one task, or "mixed" under data.mix="groups"."""
    if self.c.mix == "groups":
      return "mixed", self.tasks
    task = self.tables[units[0][0]].task
    return task, [task]

  def pack_menus(self):
    """menu key -> row-count menu, from the batches of the first PACK_SAMPLE steps."""
    needed = collections.defaultdict(list)
    for step in range(PACK_SAMPLE):
      units = self.units(step)
      key, tasks = self.menu_key(units)
      needed[key].append(self.fit(units, self.row_length(tasks))[2][2])
    return {key: packing.row_menu(n, self.c.pack_menu, self.row_multiple) for key, n in needed.items()}

  def packed(self, units):
    """(pack arrays of this process's rows of the global batch's packing, per unit {field: slots of its
    texts [n]}, meta)."""
    key, tasks = self.menu_key(units)
    L, S, p = self.row_length(tasks), self.c.pack_segments, self.process_index
    parts, lens_N, (row_N, slot_N, rows) = self.fit(units, L)
    R = packing.rows_for(rows, self.menus.get(key, ()), self.row_multiple) // self.process_count
    mine_N, slots_N = row_N // R == p, row_N * S + slot_N
    tokens, order, idx, first = [], [], [], 0
    for t, texts in parts:
      idx.append({})
      for field, slot, ids, keep in texts:
        at = first + np.arange(keep.sum())  # the field's packed texts, in lens_N
        tokens.append(t.flat(slot, ids[keep][mine_N[at]]))
        order.append(at[mine_N[at]])
        idx[-1][field] = np.zeros(len(ids), np.int32)  # padding negatives read slot 0 (the loss masks them)
        idx[-1][field][keep] = slots_N[at]
        first += len(at)
    order = np.concatenate(order)
    arrays = packing.pack(np.concatenate(tokens), lens_N[order], row_N[order] - p * R, slot_N[order], R, L, S)
    real = int(lens_N[mine_N].sum())
    return arrays, idx, dict(bucket=L, rows=R * self.process_count, tokens=real, pad_frac=float(1 - real / (R * L)))

  def extras(self, t, sel):
    """The task's non-text arrays of a unit, whole."""
    get = {"label": lambda: np.asarray(t.labels[sel["query"]]), "neg_valid": lambda: sel["neg_valid"]}
    return {k: get[k]() for k in tasks_lib.TASKS[t.task].extras if k in sel or k == "label"}

  def mixed(self, units):
    """(arrays, meta) of a step of several tasks' groups: pack arrays of this process's rows, and under
    each task's name its fields' slots and extras, global (every process holds them whole)."""
    arrays, idx, meta = self.packed(units)
    mix = []
    for task in self.tasks:
      mine = [i for i, (d, _) in enumerate(units) if self.tables[d].task == task]
      if not mine:
        continue
      parts = [{f"{f}_idx": v for f, v in idx[i].items()} | self.extras(self.tables[units[i][0]], units[i][1])
               for i in mine]
      arrays[task] = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
      mix.append((task, len(mine)))
    names = sorted({self.tables[d].name for d, _ in units})
    return arrays, meta | dict(task="mixed", dataset=",".join(names), mix=tuple(mix))

  def __call__(self, step, _=None):
    units = self.units(step)
    if self.c.mix == "groups":
      arrays, meta = self.mixed(units)
      return arrays, meta | dict(step=step)
    (d, sel), = units
    t, lo, hi = self.tables[d], self.lo, self.lo + self.local
    if self.c.packing:
      arrays, idx, meta = self.packed(units)
      k = {f: len(v) // self.c.global_batch_size for f, v in idx[0].items()}  # texts per batch row
      arrays |= {f"{f}_idx": v[lo * k[f]:hi * k[f]] for f, v in idx[0].items()}
    else:
      arrays, meta = self.padded(t, sel, self.lengths(t, sel))
    arrays |= {k: v[lo:hi] for k, v in self.extras(t, sel).items()}
    return arrays, dict(task=t.task, dataset=t.name, step=step, mix=((t.task, self.groups),)) | meta


def make_iterator(c, tables, process_index=0, process_count=1, row_multiple=1, groups=1):
  """A grain iterator (get_state/set_state) of (arrays, meta): this process's slices, forever."""
  batcher = Batcher(c, tables, process_index, process_count, row_multiple, groups)
  ds = grain.MapDataset.range(batcher.steps_per_epoch).repeat(None)
  it = ds.map_with_index(batcher).to_iter_dataset(
      grain.ReadOptions(num_threads=c.worker_threads, prefetch_buffer_size=c.prefetch))
  if c.worker_count:
    if not flags.FLAGS.is_parsed():  # grain 0.2.18 reads an absl flag there (grain#1355)
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=c.worker_count))
  return iter(it)
