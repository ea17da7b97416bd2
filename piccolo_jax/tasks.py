"""The task registry: everything task-specific about reading, batching and the loss, one entry each.

Adding a task is one `Task(...)` in TASKS plus its loss in `losses`:
- `layouts`: column layouts it reads (canonical slot -> column); the best-matching one is used.
  Slots: `query` (first text), `pos` (str or list), `neg` (list), `label` (STS score as a number,
  or for cls the class name, which becomes the positive with the other classes as negatives).
- `fields`: the batch's text fields, each from a slot, with the data-config key of its token cap.
  A `neg` field holds K texts per row (rows i*K .. i*K+K-1 belong to row i).
- `neg_num`: the data-config key of K (a dataset entry's `neg_num` overrides it for that dataset;
  the task's K is the largest). A row draws up to its dataset's K of its candidates, as the
  original, and pads the rest with "" masked out by `neg_valid`: a row with no candidate has only
  the batch's other texts as negatives.
- `extras`: non-text batch arrays (`label` float32 [B], `neg_valid` bool [B, K]).
- `loss` and `loss_args(emb, batch)` -> (positional embeddings/labels, keyword arrays).
"""
import dataclasses
from typing import Callable

from piccolo_jax import losses


@dataclasses.dataclass(frozen=True)
class Field:
  name: str  # batch field: {name}_ids / {name}_mask
  slot: str  # query | pos | neg
  cap: str  # data config key of its max length


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  aliases: tuple
  layouts: tuple
  fields: tuple
  loss: Callable
  loss_args: Callable
  neg_num: str = ""
  extras: tuple = ()
  label: str = ""  # "score": the label slot is a number; "class": a class name (see above)
  pos_list: bool = True  # the pos slot may hold a list of positives (else exactly one string)
  prefixes: bool = True  # query_prefix / passage_prefix apply (the original puts none on cls texts)


PICCOLO_TRIPLET = {"query": "text", "pos": "text_pos", "neg": "text_neg"}

TASKS = {t.name: t for t in (
    Task("retrieval", aliases=("retri_contrast",),
         layouts=(PICCOLO_TRIPLET, {"query": "query", "pos": "pos", "neg": "neg"}),
         fields=(Field("query", "query", "query_max_len"), Field("pos", "pos", "passage_max_len"),
                 Field("neg", "neg", "passage_max_len")),
         neg_num="neg_num", extras=("neg_valid",),
         loss=losses.retrieval_infonce,
         loss_args=lambda e, b: ((e["query"], e["pos"], e.get("neg")), {"n_mask": b.get("neg_valid")})),
    Task("sts", aliases=("cosent",),
         layouts=({"query": "text", "pos": "text_pair", "label": "label"},
                  {"query": "sentence1", "pos": "sentence2", "label": "label"},
                  {"query": "sentence1", "pos": "sentence2", "label": "score"}),
         fields=(Field("text_a", "query", "sts_max_len"), Field("text_b", "pos", "sts_pair_max_len")),
         extras=("label",), label="score", pos_list=False,
         loss=losses.cosent,
         loss_args=lambda e, b: ((e["text_a"], e["text_b"], b["label"]), {})),
    Task("cls", aliases=("cls_contrast",),
         layouts=(PICCOLO_TRIPLET, {"query": "text", "label": "label"}),
         fields=(Field("query", "query", "cls_query_max_len"), Field("pos", "pos", "passage_max_len"),
                 Field("neg", "neg", "passage_max_len")),
         neg_num="cls_neg_num", extras=("neg_valid",), label="class",
         prefixes=False,
         loss=losses.cls_contrast,
         loss_args=lambda e, b: ((e["query"], e["pos"], e["neg"]), {"n_mask": b["neg_valid"]})),
)}
ALIASES = {a: t.name for t in TASKS.values() for a in (t.name, *t.aliases)}


def negatives(task: Task, data_cfg) -> int:
  """K: negatives per row under the data config (0: the task has no `neg` field)."""
  return int(data_cfg[task.neg_num]) if task.neg_num else 0


def fields(task: Task, data_cfg, k=None) -> list[tuple[Field, int]]:
  """[(field, token cap)] of the task's text fields under the data config (capped at the largest bucket);
  k: its negatives per row (default: the data config's; 0: no `neg` field)."""
  k = negatives(task, data_cfg) if k is None else k
  return [(f, min(int(data_cfg[f.cap]), max(data_cfg.buckets))) for f in task.fields if f.slot != "neg" or k]


def caps(data_cfg) -> dict:
  """(task, slot) -> token cap; a task's neg slot shares its pos cap (one passage store per dataset)."""
  out = {}
  for task in TASKS.values():
    for f, cap in fields(task, data_cfg, k=1):
      if out.setdefault((task.name, f.slot), cap) != cap:
        raise ValueError(f"task {task.name}: fields of slot {f.slot!r} have different caps")
    if out.get((task.name, "neg"), out[task.name, "pos"]) != out[task.name, "pos"]:
      raise ValueError(f"task {task.name}: neg and pos caps differ; they share one passage store")
  return out
