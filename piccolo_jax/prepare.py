"""Prepared datasets: every source tokenised once into flat memory-mapped arrays that training reads.

Usage: python -m piccolo_jax.prepare --config=finetune [--shard=I --num_shards=N] [--config.X=...]

A prepared dataset is the directory `PREPARED_DIR/NAME-KEY`; KEY hashes everything its contents
depend on: the dataset entry, its source files' sizes and mtimes, the tokenizer, the token caps,
the prefixes and `strict` (not `repeat` or `neg_num`: they apply when it is read). A changed
source, tokenizer or cap maps to another directory and is prepared afresh, so a stale cache is
never read. It is written to a temporary directory and renamed when complete: an interrupted
preparation leaves no dataset.

Files (raw little-endian arrays, opened with np.memmap; n rows, m distinct passages):
  q_tok  uint16 (int32 for vocabularies over 65535)  token ids of every query: prefix included,
         special tokens included, truncated at the field's cap (what the batch holds, unpadded)
  q_off  int64 [n+1]  row i's tokens are q_tok[q_off[i]:q_off[i+1]]
  p_tok, p_off  the same for the m distinct passages (positives and negatives, deduplicated by a
         16-byte BLAKE2b digest of the text)
  pos_off int64 [n+1], pos_ids int32: row i's positives are passages pos_ids[pos_off[i]:pos_off[i+1]]
  neg_off, neg_ids  its negatives, the same way (cls label rows: every other class)
  labels float32 [n]  STS scores (zeros otherwise)
  pos_score, neg_score float32  teacher scores aligned with pos_ids and neg_ids (NaN where a row has none)
  manifest.json  name, task, rows, passages, scored_rows (rows with teacher scores), skipped rows by
         reason, longest query and passage, pad id, token dtype, and the fingerprint.
  teacher-KEY.npy float16 [n, D]  where a teacher embeds the queries (task distill): teacher_vectors().
"""
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import time
import uuid

from absl import flags
import numpy as np
import tqdm

from piccolo_jax import cli
from piccolo_jax import config
from piccolo_jax import digest
from piccolo_jax import encode
from piccolo_jax import modeldir
from piccolo_jax import models
from piccolo_jax import sources
from piccolo_jax import tasks as tasks_lib

FORMAT = 3
CHUNK = 1024  # rows per tokenizer batch: ~50 KB per passage while in flight (Encoding objects)
ARRAYS = {"q_tok": None, "q_off": np.int64, "p_tok": None, "p_off": np.int64, "pos_off": np.int64,
          "pos_ids": np.int32, "neg_off": np.int64, "neg_ids": np.int32, "labels": np.float32,
          "pos_score": np.float32, "neg_score": np.float32}
log = logging.getLogger(__name__)
READ_KEYS = ("repeat", "neg_num")  # Entry keys applied when a prepared dataset is read, not in its contents.


def default_dir() -> pathlib.Path:
  """$PICCOLO_JAX_CACHE, else ~/.cache/piccolo_jax/prepared."""
  return pathlib.Path(os.environ.get("PICCOLO_JAX_CACHE") or "~/.cache/piccolo_jax/prepared").expanduser()


class Encoders:
  """Per-max-length copies of the fast tokenizer's backend: fixed settings, thread-safe."""

  def __init__(self, tokenizer, caps):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
      raise TypeError(f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer")
    self.pad_id = tokenizer.pad_token_id or 0
    self.vocab_size = backend.get_vocab_size()
    self.enc = {}
    for cap in set(caps):
      self.enc[cap] = type(backend).from_str(backend.to_str())
      self.enc[cap].no_padding()
      self.enc[cap].enable_truncation(cap)

  def __call__(self, texts, cap):
    """Token ids per text (special tokens included, truncated at cap)."""
    return [e.ids for e in self.enc[cap].encode_batch_fast(texts)] if texts else []  # no offsets


def source_files(entry) -> list:
  """The files a dataset entry reads (their sizes and mtimes are part of its key)."""
  kind = entry.get("kind", "piccolo")
  if kind == "tfds":
    root = entry.get("data_dir") or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    path = pathlib.Path(root).expanduser() / entry["name"].split(":")[0].split("/")[0]
  else:
    path = pathlib.Path(entry["path"])
  return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def tokenizer_hash(tokenizer) -> str:
  """SHA-256 of the tokenizer's definition, without the truncation and padding state that calling
  a transformers tokenizer leaves on its backend."""
  backend = type(tokenizer.backend_tokenizer).from_str(tokenizer.backend_tokenizer.to_str())
  backend.no_truncation()
  backend.no_padding()
  return hashlib.sha256(backend.to_str().encode()).hexdigest()


def fingerprint(entry, data_cfg, tasks_cfg, tokenizer) -> dict:
  """What a prepared dataset's contents depend on (`repeat` and `neg_num` apply when it is read)."""
  stat = lambda p: [str(p), p.stat().st_size, p.stat().st_mtime_ns] if p.is_file() else [str(p), None]
  return {"format": FORMAT,
          "entry": {k: v for k, v in sorted(entry.items()) if k not in READ_KEYS},
          "files": [stat(p) for p in source_files(entry)],
          "tokenizer": tokenizer_hash(tokenizer),
          "caps": sorted([*k, v] for k, v in tasks_lib.caps(tasks_cfg).items()),
          "prefixes": {name: [tasks_cfg[name][k] if k in task.prefixes else "" for k in tasks_lib.PREFIXES]
                       for name, task in tasks_lib.TASKS.items()},
          "strict": bool(data_cfg.strict)}


def location(entry, data_cfg, tasks_cfg, tokenizer, root=None) -> tuple[pathlib.Path, dict]:
  """(directory, fingerprint) of an entry's prepared dataset."""
  fp = fingerprint(entry, data_cfg, tasks_cfg, tokenizer)
  key = hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()[:16]
  name = entry.get("name") or pathlib.Path(entry["path"]).name
  root = pathlib.Path(root or data_cfg.get("prepared_dir") or default_dir())
  return root / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[-64:]}-{key}", fp


class Flat:
  """An append-only flat array file; a context manager that closes it."""

  def __init__(self, path, dtype):
    self.f, self.dtype, self.n = open(path, "wb"), dtype, 0

  def __enter__(self):
    return self

  def __exit__(self, *_):
    self.f.close()

  def add(self, values):
    a = np.asarray(values, self.dtype)
    self.f.write(a.tobytes())
    self.n += a.size


class Offsets(Flat):
  """Offsets of a ragged array: starts at 0, each add() appends the running ends of its lengths."""

  def __init__(self, path):
    super().__init__(path, np.int64)
    self.end = 0
    self.add([0])

  def extend(self, lengths):
    ends = self.end + np.cumsum(np.asarray(lengths, np.int64))
    self.add(ends)
    self.end = int(ends[-1]) if len(ends) else self.end


def _write(reader, caps, enc, tmp):
  """Streams the reader's rows into tmp's arrays; returns the manifest's counts."""
  tok_dt = np.uint16 if enc.vocab_size <= 65535 else np.int32
  with contextlib.ExitStack() as files:  # Closed (flushed) before the cls negatives below read them.
    flat = lambda k, dtype: files.enter_context(Flat(tmp / f"{k}.bin", dtype))
    q_tok, p_tok = flat("q_tok", tok_dt), flat("p_tok", tok_dt)
    q_off, p_off, pos_off, neg_off = (files.enter_context(Offsets(tmp / f"{k}.bin"))
                                      for k in ("q_off", "p_off", "pos_off", "neg_off"))
    pos_ids, neg_ids, labels = flat("pos_ids", np.int32), flat("neg_ids", np.int32), flat("labels", np.float32)
    pos_score, neg_score = flat("pos_score", np.float32), flat("neg_score", np.float32)
    pool, longest, n, scored = {}, [0, 0], 0, 0
    rows = iter(reader)
    bar = tqdm.tqdm(desc=f"prepare {reader.name}", unit=" rows", disable=None, file=sys.stderr)
    while chunk := list(itertools.islice(rows, CHUNK)):  # the first row sets reader.task
      q_cap = caps[reader.task.name, "query"]
      p_cap = caps.get((reader.task.name, "pos"), q_cap)
      qp, pp = reader.prefix("query_prefix"), reader.prefix("passage_prefix")
      new, ids = [], lambda texts: [_passage_id(pool, new, t) for t in texts]
      pos, neg = [ids(p) for _, p, *_ in chunk], [ids(m) for _, _, m, *_ in chunk]
      q_ids = enc([qp + q for q, *_ in chunk], q_cap)
      p_ids = enc([pp + t for t in new], p_cap)
      for store, off, seqs, i in ((q_tok, q_off, q_ids, 0), (p_tok, p_off, p_ids, 1)):
        if seqs:
          store.add(np.concatenate(seqs))
          off.extend([len(s) for s in seqs])
          longest[i] = max(longest[i], max(len(s) for s in seqs))
      for store, off, lists in ((pos_ids, pos_off, pos), (neg_ids, neg_off, neg)):
        store.add([j for x in lists for j in x])
        off.extend([len(x) for x in lists])
      labels.add([label for *_, label, _ in chunk])
      for store, i, lists in ((pos_score, 0, pos), (neg_score, 1, neg)):
        store.add([x for (*_, sc), ids_ in zip(chunk, lists) for x in (sc[i] if sc else [np.nan] * len(ids_))])
      scored += sum(sc is not None for *_, sc in chunk)
      n += len(chunk)
      bar.update(len(chunk))
    bar.close()
  if reader.label_layout:  # cls label rows: the negatives are every other class, in order of appearance
    own, k = np.fromfile(tmp / "pos_ids.bin", np.int32), len(pool)
    np.concatenate([[0], np.arange(1, n + 1, dtype=np.int64) * (k - 1)]).tofile(tmp / "neg_off.bin")
    with open(tmp / "neg_ids.bin", "wb") as f:
      for s in range(0, n, CHUNK):
        others = np.broadcast_to(np.arange(k, dtype=np.int32), (len(own[s:s + CHUNK]), k))
        f.write(others[others != own[s:s + CHUNK, None]].tobytes())
    np.full(n * (k - 1), np.nan, np.float32).tofile(tmp / "neg_score.bin")
  return {"rows": n, "passages": len(pool), "scored_rows": scored, "longest_query": longest[0],
          "longest_passage": longest[1],
          "token_dtype": np.dtype(tok_dt).name}


def _passage_id(pool, new, text):
  key = hashlib.blake2b(text.encode(), digest_size=16).digest()
  j = pool.get(key)
  if j is None:
    j = pool[key] = len(pool)
    new.append(text)
  return j


def prepare(entry, data_cfg, tasks_cfg, tokenizer, root=None) -> pathlib.Path:
  """The prepared directory of one dataset entry under the data config, preparing it if missing."""
  final, fp = location(entry, data_cfg, tasks_cfg, tokenizer, root)
  if (final / "manifest.json").is_file():
    return final
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  try:
    start, caps = time.perf_counter(), tasks_lib.caps(tasks_cfg)
    enc, reader = Encoders(tokenizer, caps.values()), sources.read(entry, tasks_cfg, data_cfg.strict)
    counts = _write(reader, caps, enc, tmp)
    manifest = {"name": reader.name, "task": reader.task.name, **counts, "skipped": reader.skipped,
                "pad_id": enc.pad_id, "fingerprint": fp}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    digest.write_manifest(tmp)  # Every file's digest (python -m piccolo_jax.verify); teacher vectors come later.
    try:
      tmp.rename(final)
    except OSError:  # another process finished it first: theirs is identical
      if not (final / "manifest.json").is_file():
        raise
    secs = time.perf_counter() - start
    log.info("prepare: %s: %d rows, %d passages in %.1f s (%.0f rows/s) -> %s", reader.name,
             counts["rows"], counts["passages"], secs, counts["rows"] / max(secs, 1e-9), final)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final


def teacher_vectors(entry, tasks_cfg, path, strict=False) -> str:
  """The file name of the teacher's unit embeddings (float16 [rows, D], np.save format) of the queries of the
  prepared dataset at `path`, computed once: TEACHER-KEY.npy, KEY hashing the teacher's files, its token cap
  and the prefix (the prepared dir's own key covers the texts), so another teacher never reads them."""
  d, rows = tasks_cfg.distill, json.loads((path / "manifest.json").read_text())["rows"]
  if not d.teacher:
    raise sources.DataError(f"{entry.get('name') or entry.get('path')}: task distill needs a teacher: set "
                            "tasks.distill.teacher (a model dir, or minilm)")
  spec, cap = models.resolve_init(d.teacher), int(d.teacher_max_len or d.query_max_len)
  prefix = tasks_lib.prefix(tasks_lib.TASKS["distill"], tasks_cfg, entry, "query_prefix")
  key = hashlib.sha256(json.dumps([modeldir.files_key(spec), cap, prefix]).encode()).hexdigest()[:16]
  name = f"teacher-{key}.npy"
  if (path / name).is_file():
    return name
  start, embedder, reader = time.perf_counter(), encode.Embedder.load(spec), sources.read(entry, tasks_cfg, strict)
  tmp = path / f".{name}.tmp-{uuid.uuid4().hex[:8]}.npy"
  try:
    out_ND = np.lib.format.open_memmap(tmp, "w+", np.float16, (rows, embedder.dim))
    texts = (prefix + q for q, *_ in reader)  # The prepared rows, in order.
    with tqdm.tqdm(total=rows, desc=f"teacher {reader.name}", unit=" text", disable=None, file=sys.stderr) as bar:
      embedder.encode_to(texts, out_ND, batch_size=64, max_length=cap, progress=bar.update)
    out_ND.flush()
    del out_ND
    tmp.rename(path / name)
  finally:
    tmp.unlink(missing_ok=True)
  log.info("prepare: %s: teacher %s embedded %d texts in %.1f s -> %s", reader.name, d.teacher, rows,
           time.perf_counter() - start, path / name)
  return name


def _map(path, dtype):
  return np.memmap(path, dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)


@dataclasses.dataclass
class Prepared:
  """A prepared dataset, memory-mapped: the arrays above as attributes, manifest fields too."""
  path: pathlib.Path
  repeat: int = 1
  neg_num: int | None = None  # Negatives per row (None: its task's tasks.TASK.neg_num).
  teacher_file: str = ""  # teacher_vectors()' file, opened as `teacher` (task distill).
  negatives: str = ""  # A dir of neg_off, neg_ids, neg_score read instead of its own (piccolo_jax/refresh.py).

  def __post_init__(self):
    self.path = pathlib.Path(self.path)
    m = json.loads((self.path / "manifest.json").read_text())
    self.name, self.task, self.rows, self.skipped = m["name"], m["task"], m["rows"], m["skipped"]
    self.longest_query, self.longest_passage = m["longest_query"], m["longest_passage"]
    self.pad_id, self.scored_rows = m["pad_id"], m["scored_rows"]
    for k, dtype in ARRAYS.items():
      setattr(self, k, _map(self.path / f"{k}.bin", dtype or m["token_dtype"]))
    self.teacher = np.load(self.path / self.teacher_file, mmap_mode="r") if self.teacher_file else None
    for k in ("neg_off", "neg_ids", "neg_score") if self.negatives else ():
      setattr(self, k, _map(pathlib.Path(self.negatives) / f"{k}.bin", ARRAYS[k]))

  def with_negatives(self, negatives) -> "Prepared":
    """This dataset reading its negatives from the dir `negatives` (refreshed ones) instead."""
    return Prepared(self.path, self.repeat, self.neg_num, self.teacher_file, str(negatives))

  def __reduce__(self):  # grain workers reopen the files instead of receiving a copy of them
    return Prepared, (self.path, self.repeat, self.neg_num, self.teacher_file, self.negatives)

  def __len__(self):
    return self.rows

  def q_len(self, rows):
    return (self.q_off[rows + 1] - self.q_off[rows]).astype(np.int32)

  def p_len(self, ids):
    return (self.p_off[ids + 1] - self.p_off[ids]).astype(np.int32)

  def tokens(self, slot, i):
    """Token ids of query i (slot "query") or passage i (else)."""
    tok, off = (self.q_tok, self.q_off) if slot == "query" else (self.p_tok, self.p_off)
    return tok[off[i]:off[i + 1]]

  def flat(self, slot, ids):
    """int32 token ids of queries or passages `ids` (>= 0), concatenated."""
    tok, off = (self.q_tok, self.q_off) if slot == "query" else (self.p_tok, self.p_off)
    start, n = off[ids], off[ids + 1] - off[ids]
    return tok[np.repeat(start - np.cumsum(n) + n, n) + np.arange(n.sum())].astype(np.int32)


def open_one(entry, data_cfg, tasks_cfg, tokenizer, root=None) -> Prepared:
  """One dataset entry, prepared where missing (with its teacher's vectors: task distill) and memory-mapped."""
  path = prepare(entry, data_cfg, tasks_cfg, tokenizer, root)
  is_distill = json.loads((path / "manifest.json").read_text())["task"] == "distill"
  teacher = teacher_vectors(entry, tasks_cfg, path, data_cfg.strict) if is_distill else ""
  return Prepared(path, int(entry.get("repeat", 1)), entry.get("neg_num"), teacher)


def shard_entries(entries, shard, num_shards) -> list:
  """Shard `shard` of num_shards: entries dealt largest source first to the least-loaded shard."""
  size = lambda e: sum(p.stat().st_size for p in source_files(e) if p.is_file())
  load, ours = [0] * num_shards, []
  for i in sorted(range(len(entries)), key=lambda i: -size(entries[i])):
    s = load.index(min(load))
    load[s] += size(entries[i])
    if s == shard:
      ours.append(entries[i])
  return ours


def main():
  config_flag = cli.define_config_flag()
  flags.DEFINE_integer("shard", 0, "this process's shard of the datasets (several hosts or processes)")
  flags.DEFINE_integer("num_shards", 1, "number of shards: each prepares its share of the datasets")
  flags.mark_flags_as_required(["config"])

  def run():
    f, c = flags.FLAGS, config_flag.value
    config.check(c)
    if not 0 <= f.shard < f.num_shards:
      raise ValueError(f"--shard={f.shard} is not in [0, --num_shards={f.num_shards})")
    tokenizer = encode.load_tokenizer(models.tokenizer_dir(c.model))
    for e in shard_entries(sources.expand(c.data.datasets), f.shard, f.num_shards):
      t = open_one(e, c.data, c.tasks, tokenizer)
      print(f"{t.name}: {t.task}, {len(t)} rows, {t.p_off.size - 1} passages, "
            f"skipped {t.skipped or 'none'} -> {t.path}")

  cli.run(run)


if __name__ == "__main__":
  main()
