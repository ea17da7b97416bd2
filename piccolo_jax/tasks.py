"""The task registry: everything task-specific about reading, batching and the loss, one entry each.

Adding a task is one `Task(...)` in TASKS plus its loss in `losses` (docs/extending.md). Its config
section `tasks.NAME` is built from `defaults`: token caps of its `query` slot (a row's first text) and
`passage` slot (its positives and negatives), `neg_num` K (tasks with negatives), the loss's
`temperature` and `weight`, and `query_prefix` / `passage_prefix` (tasks that take prefixes).
"""
import dataclasses
from typing import Callable, NamedTuple

from piccolo_jax import losses


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  aliases: tuple  # Other `type` values rows may carry.
  layouts: tuple  # Column layouts it reads (slot -> column); the best-matching one is used.
  fields: tuple  # (batch field, slot) of its texts, slot query | pos | neg; K `neg` texts a row.
  loss: Callable  # A loss of losses.py: embeddings positional, settings and arrays as keywords.
  loss_args: Callable  # ({field: emb [N, D]}, the task's arrays, its config section) -> LossArgs of the loss on
  # one loss group's rows: the one route by which its settings and arrays reach it.
  defaults: dict  # Its config section tasks.NAME.
  extras: tuple = ()  # Its non-text arrays: label float32 [B], neg_valid bool [B, K], pos_id int32 [B] and
  # neg_id [B, K] (passage ids, -1 none), pos_score float32 [B] and neg_score [B, K] (teacher scores, NaN where
  # none), teacher float32 [B, D] (teacher embeddings).
  negatives: bool = False  # Rows have K negatives (tasks.NAME.neg_num; a dataset entry's neg_num).
  prefixes: tuple = ()  # The prefixes it takes: query_prefix, passage_prefix (tasks.NAME and dataset entries).
  scored: bool = False  # Rows may carry teacher scores, for a KL term (SCORE_KL).
  mapped: bool = False  # Its embeddings go through model.Bert.project (to a teacher's dimension) first.
  label: str = ""  # "score": the label slot is a number; "class": a class name, which becomes the
  # positive, with the other classes as negatives.
  pos_list: bool = True  # The pos slot may hold a list of positives (else exactly one string).


class LossArgs(NamedTuple):
  args: tuple  # Positional: embeddings (and arrays).
  kwargs: dict  # Settings and arrays as keywords.
  stats: dict | None = None  # {name: scalar} logged per step as TASK/NAME.


def settings(s, *names) -> dict:
  """The fields `names` of a task's config section, as a loss's keywords."""
  return {k: s[k] for k in names}


PICCOLO_TRIPLET = {"query": "text", "pos": "text_pos", "neg": "text_neg"}
PREFIXES = dict(query_prefix="", passage_prefix="")
# Retrieval rows' teacher scores (pos_scores, neg_scores): the KL term's weight (0: off), student and
# teacher temperatures (student 0: the task's temperature; teacher 0.02 suits cosine scores such as
# `mine --scores` writes, a reranker's logits want about 1). losses.retrieval.
SCORE_KL = ("kl_weight", "kl_temperature", "teacher_temperature")
# Distillation from teacher embeddings of plain texts (tasks.distill.teacher: a model spec; teacher_max_len
# 0: query_max_len): the weights of the three terms of losses.embedding_distill and its margin.
EMBED_DISTILL = ("cosine", "similarity", "relative", "margin")

# In-batch candidates left out of a row's denominator (losses.candidate_mask, docs/training.md): its own positive
# passage appearing again (another row's positive or negative), and with false_negatives "model" or "teacher"
# (the judge of the scores; "off") those scoring above the positive's score - fn_margin (fn_relative:
# x (1 - fn_margin)). The shares masked are logged per step.
MASKING = dict(mask_duplicates=True, false_negatives="off", fn_margin=0.0, fn_relative=False)


def _retrieval_args(e, b, s):
  q, p, n = e["query"], e["pos"], e.get("neg")
  arrays = {k: b.get(k) for k in ("neg_valid", "pos_score", "neg_score")}
  keep, shares = losses.candidate_mask(
      q, p, n, n_mask=arrays["neg_valid"], pos_id=b.get("pos_id"), neg_id=b.get("neg_id"),
      pos_score=arrays["pos_score"], neg_score=arrays["neg_score"], duplicates=s.mask_duplicates,
      judge=s.false_negatives, margin=s.fn_margin, relative=s.fn_relative)
  return LossArgs((q, p, n), {"n_mask": arrays["neg_valid"], "keep": keep, "pos_score": arrays["pos_score"],
                             "neg_score": arrays["neg_score"], **settings(s, "temperature", "weight", *SCORE_KL)},
                  shares)


TASKS = {task.name: task for task in (
    Task("retrieval", aliases=("retri_contrast",),
         layouts=(PICCOLO_TRIPLET, {"query": "query", "pos": "pos", "neg": "neg"}),
         fields=(("query", "query"), ("pos", "pos"), ("neg", "neg")),
         extras=("neg_valid", "pos_id", "neg_id", "pos_score", "neg_score"),
         loss=losses.retrieval, loss_args=_retrieval_args, negatives=True, prefixes=tuple(PREFIXES), scored=True,
         defaults=dict(query_max_len=64, passage_max_len=512, neg_num=1, temperature=0.01, weight=1.0,
                       kl_weight=0.0, kl_temperature=0.0, teacher_temperature=0.02, **MASKING, **PREFIXES)),
    Task("sts", aliases=("cosent",),
         layouts=({"query": "text", "pos": "text_pair", "label": "label"},
                  {"query": "sentence1", "pos": "sentence2", "label": "label"},
                  {"query": "sentence1", "pos": "sentence2", "label": "score"}),
         fields=(("text_a", "query"), ("text_b", "pos")), extras=("label",), label="score", pos_list=False,
         loss=losses.cosent, prefixes=tuple(PREFIXES),
         loss_args=lambda e, b, s: LossArgs((e["text_a"], e["text_b"], b["label"]),
                                            settings(s, "temperature", "weight")),
         defaults=dict(query_max_len=64, passage_max_len=512, temperature=0.05, weight=0.04, **PREFIXES)),
    Task("cls", aliases=("cls_contrast",),
         layouts=(PICCOLO_TRIPLET, {"query": "text", "label": "label"}),
         fields=(("query", "query"), ("pos", "pos"), ("neg", "neg")), extras=("neg_valid",), label="class",
         loss=losses.cls_contrast, negatives=True,
         loss_args=lambda e, b, s: LossArgs((e["query"], e["pos"], e["neg"]),
                                            {"n_mask": b["neg_valid"], **settings(s, "temperature", "weight")}),
         defaults=dict(query_max_len=512, passage_max_len=512, neg_num=10, temperature=0.05, weight=0.2)),
    Task("distill", aliases=(), layouts=({"query": "text"},), fields=(("text", "query"),), extras=("teacher",),
         loss=losses.embedding_distill, mapped=True, prefixes=("query_prefix",),
         loss_args=lambda e, b, s: LossArgs((e["text"], b["teacher"]), settings(s, "weight", *EMBED_DISTILL)),
         defaults=dict(query_max_len=128, teacher="", teacher_max_len=0, weight=1.0, cosine=1.0, similarity=1.0,
                       relative=1.0, margin=0.015, query_prefix="")),
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
          for slot, kind in (("query", "query"), ("pos", "passage")) if has_slot(TASKS[name], slot)}


def has_slot(task: Task, slot: str) -> bool:
  return any(s == slot for _, s in task.fields)


INSTRUCTION = "Instruct: {}\nQuery:"  # A dataset entry's `instruction` as a query prefix: Qwen3-Embedding's format.


def prefix(task: Task, tasks_cfg, entry, key) -> str:
  """A dataset's query_prefix or passage_prefix: its entry's (an `instruction` is the query prefix
  INSTRUCTION.format(it)), else its task's ("" where the task takes none)."""
  if key not in task.prefixes:
    return ""
  if key == "query_prefix" and "instruction" in entry:
    return INSTRUCTION.format(entry["instruction"])
  return entry.get(key, tasks_cfg[task.name][key])
