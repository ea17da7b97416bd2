"""Training-set formats: piccolo `save_to_disk` dirs, meta lists, jsonl, tsv, plain text and TFDS.

A `Reader` streams one dataset entry as validated, normalised rows (query, positives,
negatives, label); `prepare` turns them into token arrays once. Errors name dataset, row and
field. Which columns a task reads is its `layouts` entry in `tasks.TASKS`; a new format is one
reader in READERS: entry -> (dataset name, iterator of (location, row dict)).
"""
import dataclasses
import difflib
import json
import math
import os
import pathlib

import numpy as np
import pyarrow as pa

from piccolo_jax import config
from piccolo_jax import tasks as tasks_lib


class DataError(ValueError):
  """Bad training data; the message names the dataset, row and field."""


# Row validators, shared with evaluate: `where` names the file and row.

def text(where, field, value):
  """A string (None reads as empty)."""
  if value is None or isinstance(value, str):
    return value or ""
  raise DataError(f"{where}: field '{field}': expected a string, got {type(value).__name__}")


def texts(where, field, value):
  """A list of strings, blanks dropped."""
  if not isinstance(value, (list, tuple)):
    raise DataError(f"{where}: field '{field}': expected a list of strings, "
                    f"got {type(value).__name__}")
  return [t for t in (text(where, field, v) for v in value) if t.strip()]


def number(where, field, value):
  """A finite number (bools, None, NaN and inf are errors)."""
  try:
    if isinstance(value, bool) or value is None or not math.isfinite(float(value)):
      raise ValueError
    return float(value)
  except (TypeError, ValueError):
    raise DataError(f"{where}: field '{field}': expected a finite number, got {value!r}") from None


def lines(path):
  """Yields (line number, text) of the non-blank lines of a UTF-8 file; errors name the line."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"{path}: {'a directory, expected a file' if path.is_dir() else 'no such file'}")
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8").rstrip("\r\n")
      except UnicodeDecodeError as e:
        raise DataError(f"{path}: line {n}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
      if line.strip():
        yield n, line


def jsonl_rows(path):
  """Yields (line number, JSON object) per non-blank line."""
  for n, line in lines(path):
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
      raise DataError(f"{path}: line {n}: expected a JSON object, got {type(row).__name__}")
    yield n, row


def tsv_rows(path, columns):
  """Yields (line number, row dict): tab-separated, no quoting; a first line naming all `columns`
  is a header, else every line has exactly len(columns) columns."""
  header = None
  for n, line in lines(path):
    cols = line.split("\t")
    if header is None and n == 1 and set(columns) <= set(cols):
      header = cols
      continue
    names = header or columns
    if len(cols) != len(names):
      raise DataError(f"{path}: line {n}: expected {len(names)} tab-separated columns "
                      f"({', '.join(names)}), got {len(cols)}")
    yield n, dict(zip(names, cols))


def _jsonl(entry):
  return entry["path"], ((f"line {n}", row) for n, row in jsonl_rows(entry["path"]))


def _tsv(entry):
  """STS pairs: a header naming sentence1/sentence2/score, or exactly those three columns."""
  rows = tsv_rows(entry["path"], ("sentence1", "sentence2", "score"))
  return entry["path"], ((f"line {n}", row) for n, row in rows)


def _piccolo(entry):
  """A Hugging Face `save_to_disk` dir (Dataset or DatasetDict), read with pyarrow."""
  path = pathlib.Path(entry["path"])
  dirs = [path]
  if (path / "dataset_dict.json").exists():  # a DatasetDict: all splits, as the original
    dirs = [path / s for s in json.loads((path / "dataset_dict.json").read_text())["splits"]]
  files = [d / f["filename"] for d in dirs
           for f in json.loads((d / "state.json").read_text())["_data_files"]]

  def rows():
    i = 0
    for f in files:
      with pa.memory_map(str(f)) as stream:
        for batch in pa.ipc.open_stream(stream):
          for row in batch.to_pylist():
            yield f"row {i}", row
            i += 1
  return entry.get("name") or path.name, rows()


def _decode(value):
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, (list, tuple, np.ndarray)):
    return [_decode(v) for v in value]
  return value.item() if isinstance(value, np.generic) else value


def _text(entry):
  """Plain text, one text a line (a distillation corpus): rows {"text"}."""
  return entry["path"], ((f"line {n}", {"text": line}) for n, line in lines(entry["path"]))


def _tfds(entry):
  """`tfds.data_source` over ArrayRecord files; no TensorFlow needed."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow to import)
  split = entry.get("split", "train")
  src = tfds.data_source(entry["name"], data_dir=entry.get("data_dir"), split=split)
  rows = ((f"row {i}", {k: _decode(v) for k, v in src[i].items()}) for i in range(len(src)))
  return f"tfds:{entry['name']}/{split}", rows




READERS = {"jsonl": _jsonl, "tsv": _tsv, "text": _text, "piccolo": _piccolo, "tfds": _tfds}


def read_meta_list(entry):
  """Expands {kind: meta, path: list file, root: dir}: lines `dataset_name repeat`."""
  rest = {k: v for k, v in entry.items() if k not in ("kind", "path", "root", "name")}
  out = []
  for n, line in lines(entry["path"]):
    parts = line.split()
    if len(parts) != 2 or not parts[1].isdigit():
      raise DataError(f"{entry['path']}: line {n}: expected 'dataset_name repeat'")
    path = os.path.join(entry["root"], parts[0])
    if not os.path.isdir(path):
      raise DataError(f"{entry['path']}: line {n}: dataset {parts[0]!r}: no directory {path} (root {entry['root']})")
    out.append({**rest, "kind": "piccolo", "name": parts[0], "repeat": int(parts[1]), "path": path})
  return out


ENTRY_KEYS = {"kind", "path", "task", "repeat", "limit", "name", "query_prefix", "passage_prefix", "neg_num",
              "instruction"}
KIND_KEYS = {"tfds": {"data_dir", "split"}, "meta": {"root"}}  # beyond ENTRY_KEYS
REQUIRED = {"tfds": ("name",), "meta": ("path", "root")}  # every other kind: path


def check_entry(entry):
  """Raises a DataError naming the first unknown or missing key of a dataset entry."""
  kind, where = entry.get("kind", "piccolo"), f"dataset entry {dict(entry)}"
  if kind not in READERS and kind != "meta":
    raise DataError(f"{where}: unknown kind {kind!r}, expected one of {sorted([*READERS, 'meta'])}")
  allowed = ENTRY_KEYS | KIND_KEYS.get(kind, set())
  for key in entry:
    if key not in allowed:
      close = difflib.get_close_matches(key, sorted(allowed), 1)
      raise DataError(f"{where}: unknown key {key!r}; " +
                      (f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(allowed))}"))
  for key in REQUIRED.get(kind, ("path",)):
    if key not in entry:
      raise DataError(f"{where}: missing {key!r}")
  for key in ("repeat", "neg_num"):
    if key in entry and (not isinstance(entry[key], int) or isinstance(entry[key], bool) or entry[key] < 0):
      raise DataError(f"{where}: {key!r} must be an integer >= 0, got {entry[key]!r}")


def expand(datasets):
  """Checked dataset entries with meta lists expanded into their piccolo dirs."""
  for d in datasets:
    check_entry(d)
  return [e for d in datasets for e in (read_meta_list(d) if d.get("kind") == "meta" else [d])]


def _task(where, value, field) -> tasks_lib.Task:
  task = tasks_lib.lookup(value)
  if task is None:
    raise DataError(f"{where}: field '{field}': unknown task type {value!r}, expected one of {tasks_lib.names()}")
  return task


def _infer_task(where, row) -> tasks_lib.Task:
  """The row's `type`, else the one task with the most columns matched by a complete layout."""
  if "type" in row:
    return _task(where, row["type"], "type")
  score = {name: max((all(c in row for c in lay.values()), sum(c in row for c in lay.values()))
                     for lay in spec.layouts) for name, spec in tasks_lib.TASKS.items()}
  best = max(score.values())
  found = [name for name, s in score.items() if s == best]
  if best[1] == 0 or len(found) > 1:
    raise DataError(f"{where}: no 'type' field and the columns {sorted(row)} do not tell "
                    "the task; set `task` for this dataset in the config")
  return tasks_lib.TASKS[found[0]]


def _layout(task, row):
  return max(task.layouts, key=lambda lay: sum(c in row for c in lay.values()) / len(lay))


SCORE_COLUMNS = {"pos": "pos_scores", "neg": "neg_scores"}  # Teacher scores, FlagEmbedding's layout.


def _scored(where, layout, slot, row, with_scores):
  """(texts, their teacher scores or None) of list column `slot`; blanks are dropped with their scores."""
  v, field, sfield = row[layout[slot]], layout[slot], SCORE_COLUMNS[slot]
  raw = list(v) if isinstance(v, (list, tuple)) else [text(where, field, v)] if slot == "pos" else texts(where, field, v)
  if not with_scores:
    return texts(where, field, raw), None
  sv = row[sfield]
  sc = [number(where, sfield, x) for x in (sv if isinstance(sv, (list, tuple)) else [sv])]
  if len(sc) != len(raw):
    raise DataError(f"{where}: field '{sfield}': {len(sc)} scores for {len(raw)} texts in '{field}'")
  kept = [(t, x) for t, x in zip((text(where, field, t) for t in raw), sc) if t.strip()]
  return [t for t, _ in kept], [x for _, x in kept]


def _parse(where, task, layout, row):
  """One row -> (query, positives, negatives, label, (pos scores, neg scores) or None, skip reason or None)."""
  col = lambda slot: row[layout[slot]]
  q = text(where, layout["query"], col("query"))
  label = number(where, layout["label"], col("label")) if task.label == "score" else 0.0
  present = [c for c in SCORE_COLUMNS.values() if c in row] if "pos_score" in task.extras else []
  if len(present) == 1:
    raise DataError(f"{where}: field '{present[0]}' is given without "
                    f"'{({*SCORE_COLUMNS.values()} - {present[0]}).pop()}': teacher scores need both")
  scores = None
  if "pos" in layout and task.pos_list:
    p, ps = _scored(where, layout, "pos", row, bool(present))
    n, ns = _scored(where, layout, "neg", row, bool(present)) if "neg" in layout else ([], [])
    scores = (ps, ns) if present else None
  elif "pos" in layout:
    p = [text(where, layout["pos"], col("pos"))]
    n = texts(where, layout["neg"], col("neg")) if "neg" in layout else []
  else:  # the class name is the positive (or the task has no positive)
    p = [] if "label" not in layout or col("label") is None else [str(col("label")).strip()]
    n = texts(where, layout["neg"], col("neg")) if "neg" in layout else []
  p = [t for t in p if t.strip()]
  if not q.strip():
    return q, p, n, label, scores, ("empty text", layout["query"])
  if not p and tasks_lib.has_slot(task, "pos"):
    return q, p, n, label, scores, ("no positive", layout.get("pos", layout.get("label")))
  return q, p, n, label, scores, None


@dataclasses.dataclass
class Reader:
  """One dataset entry read and validated row by row: iterate for (query, pos, neg, label, scores), scores
  the row's teacher scores (pos scores, neg scores) or None.

  `task`, `label_layout` (the class name is the positive) and `skipped` (reason -> count) are
  set as iteration goes; the first row fixes the task and the layout. `limit` ends it early.
  """
  entry: dict
  tasks_cfg: object  # The config's `tasks` section (prefixes).
  strict: bool = False  # Empty texts and rows without a positive are errors, not counted skips.
  name: str = ""
  task: tasks_lib.Task = None
  label_layout: bool = False
  skipped: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    kind = self.entry.get("kind", "piccolo")
    if kind not in READERS:
      raise DataError(f"dataset {self.entry.get('name') or self.entry.get('path')}: unknown kind "
                      f"{kind!r}, expected one of {sorted(READERS)}")
    self.name, self._rows = READERS[kind](self.entry)
    if self.entry.get("task"):
      self.task = _task(self.name, self.entry["task"], "task")

  def prefix(self, key):
    return tasks_lib.prefix(self.task, self.tasks_cfg, self.entry, key)

  def __iter__(self):
    limit, layout, columns, kept = self.entry.get("limit") or float("inf"), None, (), 0
    for loc, row in self._rows:
      where = f"{self.name}: {loc}"
      if layout is None:  # the first row fixes the task and the layout
        typed, self.task = self.task is None and "type" in row, self.task or _infer_task(where, row)
        layout = _layout(self.task, row)
        self.label_layout = self.task.label == "class" and "pos" not in layout
        columns = list(layout.values()) + ["type"] * typed
      for c in columns:
        if c not in row:
          raise DataError(f"{where}: missing field '{c}'")
      if "type" in columns and _task(where, row["type"], "type") != self.task:
        raise DataError(f"{where}: field 'type': {row['type']!r} differs from the "
                        f"dataset's task {self.task.name!r} (set by its first row)")
      q, p, n, label, scores, reason = _parse(where, self.task, layout, row)
      if reason and self.strict:
        raise DataError(f"{where}: field '{reason[1]}': {reason[0]} (strict mode)")
      if reason:
        self.skipped[reason[0]] = self.skipped.get(reason[0], 0) + 1
        continue
      yield q, p, n, label, scores
      kept += 1
      if kept >= limit:
        break
    if layout is None:
      raise DataError(f"{self.name}: no rows")


def read(entry, tasks_cfg=None, strict=False) -> Reader:
  """A Reader of one dataset entry (a mapping); tasks_cfg (default: config.base().tasks) gives the prefixes."""
  return Reader(dict(entry), config.section("tasks") if tasks_cfg is None else tasks_cfg, strict)
