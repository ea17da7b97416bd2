"""The epoch plan: which rows of which dataset each global step trains, and the texts it samples for them.

A pure function of (seed, epoch, step) and the datasets, so epochs reshuffle, a resume replays the same
steps, and every process computes the same plan without talking to the others (docs/training.md).
"""
import numpy as np

from piccolo_jax import sources
from piccolo_jax import tasks as tasks_lib

DataError = sources.DataError


def unit_rows(data_cfg, groups=1) -> int:
  """Rows of a plan's unit: the global batch (data.mix="dataset") or one of its loss groups ("groups"); the
  config is checked (config.check)."""
  return data_cfg.global_batch_size // groups if data_cfg.mix == "groups" else data_cfg.global_batch_size


def steps_per_epoch(data_cfg, tables, groups=1) -> int:
  unit = unit_rows(data_cfg, groups)
  return sum(t.repeat * (len(t) // unit) for t in tables) * unit // data_cfg.global_batch_size


def negatives(t, tasks_cfg) -> int:
  """K of dataset t: its entry's neg_num, else its task's (0: the task takes no negatives)."""
  takes = tasks_lib.TASKS[t.task].negatives
  own = tasks_cfg[t.task].neg_num if takes else 0
  if t.neg_num is not None and not takes:
    raise DataError(f"{t.name}: neg_num={t.neg_num} is set, but task {t.task} takes no negatives")
  return own if t.neg_num is None else t.neg_num


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


class Plan:
  """The datasets' epoch plans and each step's sampled texts.

  Dataset d with n_d rows and repeat r_d gives r_d * (n_d // U) units of U rows (the global batch, or one
  loss group under data.mix="groups"), each copy of it an independent permutation. data.mix="dataset"
  shuffles the units of all datasets together, so a step trains one dataset. data.mix="groups" gives each
  step `compositions` of groups per task, and within a task its datasets' units are shuffled together.
  Step s then draws one positive and up to its dataset's K negatives per row, without replacement, from a
  generator seeded with (seed, s); slots past a row's negatives are -1 (neg_valid False).
  """

  def __init__(self, data_cfg, tasks_cfg, tables, groups=1):
    self.data_cfg, self.tasks_cfg, self.tables, self.groups = data_cfg, tasks_cfg, tables, groups
    self.seed, self.mix, self.unit = data_cfg.seed, data_cfg.mix, unit_rows(data_cfg, groups)
    self.steps_per_epoch = steps_per_epoch(data_cfg, tables, groups)
    if not self.steps_per_epoch:
      raise DataError(f"the datasets hold no global batch of {data_cfg.global_batch_size} rows")
    self.k_D = [negatives(t, tasks_cfg) for t in tables]
    self.k = {t.task: max(k for u, k in zip(tables, self.k_D) if u.task == t.task) for t in tables}
    self.tasks = sorted(self.k)  # A mixed step's tasks, in this order.
    self.longest = {}  # (task, slot) -> its longest text over the task's datasets, rounded up to 8s.
    for t in tables:
      for slot, n in (("query", t.longest_query), ("pos", t.longest_passage), ("neg", t.longest_passage)):
        self.longest[t.task, slot] = max(self.longest.get((t.task, slot), 0), -(-n // 8) * 8)
    self._cache = {}

  def with_tables(self, tables) -> "Plan":
    """The plan of the same settings over other tables (the same datasets, other negatives)."""
    return Plan(self.data_cfg, self.tasks_cfg, tables, self.groups)

  def epoch(self, epoch):
    """(dataset ids [S, U], rows [S, G]) of an epoch in training order: each step's U units (1, or
    loss.groups in task order) of G / U rows."""
    if epoch in self._cache:
      return self._cache[epoch]
    units, unit_ds = [], []  # per dataset copy: [n, unit] rows, and their dataset
    for d, t in enumerate(self.tables):
      for r in range(t.repeat):
        perm = np.random.default_rng([self.seed, epoch, d, r]).permutation(len(t))
        units.append(perm[:len(t) // self.unit * self.unit].reshape(-1, self.unit).astype(np.int32))  # rows < 2**31
        unit_ds.append(np.full(len(t) // self.unit, d, np.int32))
    rows, ds = np.concatenate(units), np.concatenate(unit_ds)
    rng = np.random.default_rng([self.seed, epoch])
    if self.mix == "dataset":
      order = rng.permutation(len(ds))[:, None]
    else:  # each task's units shuffled, dealt to the steps' task slots (compositions)
      task_U = np.array([self.tasks.index(self.tables[d].task) for d in ds])
      by_task = [rng.permutation(np.flatnonzero(task_U == i)) for i in range(len(self.tasks))]
      comp_ST = compositions([len(m) for m in by_task], self.groups)
      used = np.zeros(len(by_task), np.int64)
      order = np.zeros((len(comp_ST), self.groups), np.int64)
      for s, comp in enumerate(comp_ST):
        order[s] = np.concatenate([m[u:u + n] for m, u, n in zip(by_task, used, comp)])
        used += comp
    self._cache = {epoch: (ds[order], rows[order].reshape(len(order), -1))}  # replaced whole: thread-safe
    return self._cache[epoch]

  def units(self, step) -> list[tuple[int, dict]]:
    """[(dataset index, ids)] of global batch `step`'s units: `query` rows [U], a `pos` passage each [U]
    (tasks with positives), and for tasks with negatives `neg` [U, K] (the task's K: -1 past the dataset's K
    or a row's candidates) and `neg_valid` [U, K]; with teacher scores `pos_score` [U] and `neg_score` [U, K]
    for tasks that take them (NaN where none)."""
    ds, rows = self.epoch(step // self.steps_per_epoch)
    ds, rows = ds[step % self.steps_per_epoch], rows[step % self.steps_per_epoch]
    rng, out = np.random.default_rng([self.seed, step]), []
    for d, rows_u in zip(ds, rows.reshape(len(ds), -1)):
      t, k, sel = self.tables[d], self.k_D[d], {"query": rows_u}
      task = tasks_lib.TASKS[t.task]
      scored = "pos_score" in task.extras
      if tasks_lib.has_slot(task, "pos"):
        pos = _pick(rng, t.pos_off, rows_u, 1)[:, 0]
        sel |= {"pos": t.pos_ids[pos]} | ({"pos_score": t.pos_score[pos]} if scored else {})
      if self.k[t.task]:
        neg = np.pad(_pick(rng, t.neg_off, rows_u, k), ((0, 0), (0, self.k[t.task] - k)), constant_values=-1)
        sel["neg_valid"], at = neg >= 0, np.maximum(neg, 0)
        some = len(t.neg_ids) > 0  # A table without negatives (a refresh that kept none) has none to read.
        sel["neg"] = np.where(sel["neg_valid"], t.neg_ids[at] if some else -1, -1)
        if scored:
          sel["neg_score"] = np.where(sel["neg_valid"], t.neg_score[at] if some else np.nan, np.nan).astype(np.float32)
      out.append((int(d), sel))
    return out
