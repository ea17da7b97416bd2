"""The task registry: everything task-specific about reading, batching and the loss, one entry each.

Adding a task is one `Task(...)` in TASKS plus its loss in `losses` (docs/extending.md). Its config
section `tasks.NAME` is built from `defaults`: token caps of its `query` slot (a row's first text) and
`passage` slot (its positives and negatives), `neg_num` K (tasks with negatives), the loss's
`temperature` and `weight`, and `query_prefix` / `passage_prefix` (tasks that take prefixes).
"""
import dataclasses
from typing import Callable

from piccolo_jax import losses


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  aliases: tuple  # Other `type` values rows may carry.
  layouts: tuple  # Column layouts it reads (slot -> column); the best-matching one is used.
  fields: tuple  # (batch field, slot) of its texts, slot query | pos | neg; K `neg` texts a row.
  loss: Callable  # A loss of losses.py: embeddings positional, temperature and weight keywords.
  loss_args: Callable  # ({field: emb [N, D]}, the task's arrays) -> (positional args, keyword args).
  defaults: dict  # Its config section tasks.NAME.
  extras: tuple = ()  # Its non-text arrays: label float32 [B], neg_valid bool [B, K].
  label: str = ""  # "score": the label slot is a number; "class": a class name, which becomes the
  # positive, with the other classes as negatives.
  pos_list: bool = True  # The pos slot may hold a list of positives (else exactly one string).


PICCOLO_TRIPLET = {"query": "text", "pos": "text_pos", "neg": "text_neg"}
PREFIXES = dict(query_prefix="", passage_prefix="")

TASKS = {task.name: task for task in (
    Task("retrieval", aliases=("retri_contrast",),
         layouts=(PICCOLO_TRIPLET, {"query": "query", "pos": "pos", "neg": "neg"}),
         fields=(("query", "query"), ("pos", "pos"), ("neg", "neg")), extras=("neg_valid",),
         loss=losses.retrieval_infonce,
         loss_args=lambda e, b: ((e["query"], e["pos"], e.get("neg")), {"n_mask": b.get("neg_valid")}),
         defaults=dict(query_max_len=64, passage_max_len=512, neg_num=1, temperature=0.01, weight=1.0, **PREFIXES)),
    Task("sts", aliases=("cosent",),
         layouts=({"query": "text", "pos": "text_pair", "label": "label"},
                  {"query": "sentence1", "pos": "sentence2", "label": "label"},
                  {"query": "sentence1", "pos": "sentence2", "label": "score"}),
         fields=(("text_a", "query"), ("text_b", "pos")), extras=("label",), label="score", pos_list=False,
         loss=losses.cosent,
         loss_args=lambda e, b: ((e["text_a"], e["text_b"], b["label"]), {}),
         defaults=dict(query_max_len=64, passage_max_len=512, temperature=0.05, weight=0.04, **PREFIXES)),
    Task("cls", aliases=("cls_contrast",),
         layouts=(PICCOLO_TRIPLET, {"query": "text", "label": "label"}),
         fields=(("query", "query"), ("pos", "pos"), ("neg", "neg")), extras=("neg_valid",), label="class",
         loss=losses.cls_contrast,
         loss_args=lambda e, b: ((e["query"], e["pos"], e["neg"]), {"n_mask": b["neg_valid"]}),
         defaults=dict(query_max_len=512, passage_max_len=512, neg_num=10, temperature=0.05, weight=0.2)),
)}


def names() -> list[str]:
  """Every task name and alias."""
  return sorted(a for task in TASKS.values() for a in (task.name, *task.aliases))


def lookup(name: str) -> Task | None:
  """The task of a name or alias (None if none)."""
  return next((task for task in TASKS.values() if name in (task.name, *task.aliases)), None)


def fields(task: Task, k: int) -> list[tuple[str, str]]:
  """(field, slot) of the task's texts with k negatives a row (k = 0: no `neg` field)."""
  return [(f, slot) for f, slot in task.fields if slot != "neg" or k]


def caps(tasks_cfg) -> dict:
  """(task, slot) -> token cap of its `query` and `pos` slots (negatives share the positives' store)."""
  return {(name, slot): int(tasks_cfg[name][f"{kind}_max_len"]) for name in TASKS
          for slot, kind in (("query", "query"), ("pos", "passage"))}


def prefix(task: Task, tasks_cfg, entry, key) -> str:
  """A dataset's query_prefix or passage_prefix: its entry's, else its task's ("" where the task takes none)."""
  return entry.get(key, tasks_cfg[task.name][key]) if key in task.defaults else ""
