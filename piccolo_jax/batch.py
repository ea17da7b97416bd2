"""The batch contract between the data side and the train step, and its assembly from prepared data.

A `Batch` is one global step, whatever its tasks (a step of one dataset is a mix of one task):
- `rows`: (packing.Rows, ...): the step's texts packed into groups of R_g rows of L_g tokens, longest first
  (piccolo_jax/packing.py), each group sharded by row over every device; each process holds its R_g / P.
- `slots`: {task: {field: int32 [N]}}: text n of a field is its slot (packing.py) in the model's
  [sum_g R_g * S_g, D] output (model.Bert.embed_rows), in the unpacked order the loss expects (a `neg` field
  holds K texts a row, rows i*K .. i*K+K-1 belonging to row i; padding negatives read slot 0 and are masked by
  `neg_valid`).
- `extras`: {task: {name: array}}: its non-text arrays (tasks.Task.extras: `label` float32 [B], `neg_valid`
  bool [B, K], passage ids `pos_id` [B] and `neg_id` [B, K], teacher scores `pos_score` [B] and `neg_score` [B, K],
  teacher embeddings `teacher` [B, D]).
  Slots and extras are whole on every process (replicated).
- `mix`: ((task, loss groups), ...), static: the step compiles one program per mix and row shapes.
"""
import dataclasses
from typing import NamedTuple

import jax
import numpy as np

from piccolo_jax import packing
from piccolo_jax import tasks as tasks_lib

PLANNED = 256  # Steps of the run whose rows choose the packing menus (spread over the run).


@dataclasses.dataclass(frozen=True)
class Batch:
  rows: tuple
  slots: dict
  extras: dict
  mix: tuple


jax.tree_util.register_dataclass(Batch, data_fields=["rows", "slots", "extras"], meta_fields=["mix"])


class Menu(NamedTuple):
  """A task's packing (choose_menus): its row lengths, longest first, and row-count tuples, one count each."""
  lengths: tuple
  rows: tuple


def menu_key(plan, units) -> tuple[str, list]:
  """(menu key, tasks) of a step's units: its one task, or "mixed" (all tasks) under data.mix="groups"."""
  if plan.mix == "groups":
    return "mixed", plan.tasks
  task = plan.tables[units[0][0]].task
  return task, [task]


def row_length(plan, tasks, pack_length, multiple=1) -> int:
  """L of the rows of a step of these tasks: pack_length, or their longest text, rounded up to a multiple of
  `multiple` (a fused attention kernel's block: attention.block)."""
  return packing.round_up(max(pack_length, *(plan.longest[task, slot] for task in tasks
                                             for _, slot in tasks_lib.fields(tasks_lib.TASKS[task], plan.k[task]))),
                          multiple)


def step_texts(plan, units) -> tuple[list, np.ndarray]:
  """([(unit, field, slot, ids [n], keep [n])] of the units' texts in packing order, token lengths of the kept
  ones [N]); keep is False for padding negatives, which are not packed (the loss masks them)."""
  out, lens = [], []
  for u, (d, sel) in enumerate(units):
    t = plan.tables[d]
    for field, slot in tasks_lib.fields(tasks_lib.TASKS[t.task], plan.k[t.task]):
      ids = sel[slot].reshape(-1)
      keep = sel["neg_valid"].reshape(-1) if slot == "neg" else np.ones(len(ids), bool)
      out.append((u, field, slot, ids, keep))
      lens.append(t.q_len(ids) if slot == "query" else t.p_len(ids[keep]))
  return out, np.concatenate(lens)


def choose_menus(plan, data_cfg, multiple=1, steps=None, length_multiple=1) -> dict:
  """{menu key: Menu}: at most data.pack_lengths row lengths (packing.choose_lengths) and the least-padding
  data.pack_menu row-count tuples for the rows that the run's `steps` steps need (default: an epoch's),
  PLANNED of them spread over the run where it has more; from the token lengths of the prepared data alone, a
  function of the datasets, seed and run length."""
  lens, longest, steps = {}, {}, steps or plan.steps_per_epoch
  for step in np.unique(np.linspace(0, steps - 1, min(steps, PLANNED)).astype(int)):
    units = plan.units(int(step))
    key, tasks = menu_key(plan, units)
    longest[key] = row_length(plan, tasks, data_cfg.pack_length, length_multiple)
    lens.setdefault(key, []).append(step_texts(plan, units)[1])
  menus, S, A = {}, data_cfg.pack_segments, data_cfg.pack_attention
  for key, lens_SN in lens.items():
    lengths = packing.choose_lengths(lens_SN, longest[key], data_cfg.pack_lengths, A, multiple, length_multiple)
    needed = [packing.Packed(l, lengths, S).rows for l in lens_SN]
    weights = packing.row_cost(lengths, A)
    rows = packing.row_menu(needed, data_cfg.pack_menu, multiple, lengths, weights)
    menus[key] = Menu(lengths, packing.repaired(rows, lens_SN, lengths, S, multiple, weights))
  return menus


class Assembler:
  """step -> (Batch of this process's rows, host info): a Plan's units packed from the prepared datasets.

  Every process packs the whole global batch from token lengths alone (the same layout whatever the
  process count, so the same dropout masks) and copies the tokens of its own R / P rows only.
  """

  def __init__(self, data_cfg, plan, menus, process_index=0, process_count=1, row_multiple=1, length_multiple=1):
    """menus: choose_menus'; row_multiple: R is a multiple of it (the devices); length_multiple: L is
    (attention.block)."""
    if data_cfg.global_batch_size % process_count or row_multiple % process_count:
      raise ValueError(f"global batch {data_cfg.global_batch_size} and packed rows multiple {row_multiple} must be "
                       f"divisible by {process_count} processes")
    self.data_cfg, self.plan, self.menus = data_cfg, plan, menus
    self.process_index, self.process_count, self.row_multiple = process_index, process_count, row_multiple
    self.groups_per_unit = plan.unit * plan.groups // data_cfg.global_batch_size
    self.length_multiple = length_multiple

  def with_tables(self, tables) -> "Assembler":
    """This assembler (menus included) over other tables of the same datasets (refreshed negatives)."""
    return Assembler(self.data_cfg, self.plan.with_tables(tables), self.menus, self.process_index,
                     self.process_count, self.row_multiple, self.length_multiple)

  def __call__(self, step, _=None) -> tuple[Batch, dict]:
    units, S, tables = self.plan.units(step), self.data_cfg.pack_segments, self.plan.tables
    key, tasks = menu_key(self.plan, units)
    menu = self.menus.get(key) or Menu((row_length(self.plan, tasks, self.data_cfg.pack_length,
                                                   self.length_multiple),), ())
    texts, lens_N = step_texts(self.plan, units)
    packed, R_G = packing.place(lens_N, menu.lengths, menu.rows, S, self.row_multiple,
                                packing.row_cost(menu.lengths, self.data_cfg.pack_attention))
    local_G = [R // self.process_count for R in R_G]  # Every group with texts has R >= row_multiple >= P.
    local_N = packed.row_N // np.maximum(np.take(local_G, packed.group_N), 1) == self.process_index
    at, tokens, order, slots = 0, [], [], [{} for _ in units]
    for u, field, slot, ids, keep in texts:
      n = np.arange(at, at + keep.sum())  # This field's kept texts, in lens_N.
      tokens.append(tables[units[u][0]].flat(slot, ids[keep][local_N[n]]))
      order.append(n[local_N[n]])
      slots[u][field] = np.zeros(len(ids), np.int32)  # Padding negatives read slot 0.
      slots[u][field][keep] = packed.slots(n, R_G)
      at += len(n)
    rows = packed.pack(np.concatenate(tokens), np.concatenate(order), [self.process_index * R for R in local_G],
                       local_G)
    extras = [extra_arrays(tables[d], sel) for d, sel in units]
    task_U = [tables[d].task for d, _ in units]
    mix = tuple((task, task_U.count(task) * self.groups_per_unit) for task in sorted(set(task_U)))
    by_task = lambda per_unit: {task: {k: np.concatenate([a[k] for a, t in zip(per_unit, task_U) if t == task])
                                       for k in per_unit[task_U.index(task)]} for task, _ in mix}
    real, shape = int(lens_N[local_N].sum()), tuple((R, L) for R, L in zip(R_G, menu.lengths) if R)
    info = dict(step=step, task=key, dataset=",".join(sorted({tables[d].name for d, _ in units})),
                shape=shape, rows=R_G, slots=S, tokens=real, texts=int(local_N.sum()),
                pad_frac=float(1 - real * self.process_count / sum(R * L for R, L in shape)),
                squares=int((lens_N[local_N].astype(np.int64) ** 2).sum()))
    return Batch(rows, by_task(slots), by_task(extras), mix), info


def extra_arrays(t, sel) -> dict:
  """A unit's non-text arrays, those its task has (tasks.Task.extras): `neg_valid`, `pos_score`, `neg_score`,
  `pos_id` and `neg_id` (the passage ids of `pos` and `neg`, from the plan), `label` (STS scores) and `teacher`
  (float32 teacher embeddings of the queries)."""
  names = tasks_lib.TASKS[t.task].extras
  out = {k: sel[k] for k in names if k in sel}
  out |= {f"{k}_id": sel[k] for k in ("pos", "neg") if f"{k}_id" in names and k in sel}
  if "label" in names:
    out["label"] = np.asarray(t.labels[sel["query"]])
  if "teacher" in names:
    out["teacher"] = np.asarray(t.teacher[sel["query"]], np.float32)
  return out
