"""Hard-negative mining: python -m piccolo_jax.mine MODEL --input DATA --output mined.jsonl.

Every query is scored against a corpus (the input's positives and given negatives, plus --corpus files,
deduplicated by text) by exact search on all devices (search.place / iter_top_k: the corpus sharded over the
mesh, queries in chunks). From each query's ranks START..END, candidates sharing a positive's or the query's
text are dropped, then likely false negatives (scoring within a margin of the positive), and NUM of the rest
are kept. The output is the trainer's jsonl ({query, pos, neg}, and with --scores a teacher's pos_scores and neg_scores);
stats are printed and written to OUTPUT.stats.json.
"""
import argparse
import ast
import dataclasses
import hashlib
import itertools
import json
import pathlib
import sys
import time

import jax
import numpy as np
import tqdm

from piccolo_jax import encode
from piccolo_jax import modeldir
from piccolo_jax import models
from piccolo_jax import search
from piccolo_jax import sharding
from piccolo_jax import sources

ROW_CHUNK = 4096  # Queries embedded, searched and written at a time.
RANK_BINS = (1, 2, 4, 11, 101)  # Lower edges of the positive-rank histogram's bins (1-based ranks).


@dataclasses.dataclass(frozen=True)
class Options:
  """What to keep from each query's ranked corpus (ranks are 0-based: the best hit is rank 0)."""
  start: int = 2  # First rank sampled (inclusive), as FlagEmbedding's --range_for_sampling 2-200.
  end: int = 200  # Past the last rank sampled (exclusive): the search returns the top END.
  num: int = 15  # Negatives per query.
  sampling: str = "random"  # random: NUM of the remaining candidates at random; top: the NUM best.
  absolute_margin: float = None  # Drop candidates scoring > positive - margin (None: off).
  relative_margin: float = 0.05  # Drop candidates scoring > positive x (1 - margin) (None: off).
  originals: str = "replace"  # Given negatives: replace | append (mined after them) | keep (mine rows without).
  seed: int = 0


def normal(text) -> str:
  """The text compared when deduplicating against positives: whitespace collapsed, case folded."""
  return " ".join(text.split()).casefold()


@dataclasses.dataclass
class Corpus:
  """Distinct texts (corpus id = position) and the id of each one's normal() form."""
  texts: list
  ids: dict  # text -> corpus id
  norm_C: np.ndarray
  norms: dict  # normal(text) -> its id

  def norm_ids(self, texts) -> list:
    return [self.norms.get(normal(t), -1) for t in texts]


def build_corpus(rows, extra=()) -> Corpus:
  """The rows' positives and negatives, then the extra texts, in order of first appearance."""
  ids = {}
  for _, pos, neg in rows:
    for t in (*pos, *neg):
      ids.setdefault(t, len(ids))
  for t in extra:
    ids.setdefault(t, len(ids))
  norms = {}
  norm_C = np.array([norms.setdefault(normal(t), len(norms)) for t in ids], np.int64)
  return Corpus(list(ids), ids, norm_C, norms)


def threshold(pos_score, opts: Options) -> float:
  """Candidates scoring above this are dropped as likely false negatives (+inf: no filter)."""
  out = np.inf
  if opts.absolute_margin is not None:
    out = min(out, pos_score - opts.absolute_margin)
  if opts.relative_margin is not None:
    out = min(out, pos_score * (1 - opts.relative_margin))
  return out


def row_rng(key, row) -> np.random.Generator:
  """Row `row`'s own generator, seeded (*key, row): sampling is the same whatever the chunking, devices or
  processes. key: (--seed,) for mine; (config.seed, step) for a refresh in training."""
  return np.random.default_rng([*key, row])


def select(ids_T, s_T, pos_score, drop, norm_C, opts: Options, rng) -> tuple[np.ndarray, dict]:
  """(chosen corpus ids in rank order, counts) from one query's ranked hits: ranks start..end, minus texts in
  `drop` (normal-form ids: positives, query), minus scores above threshold(pos_score), then NUM of the rest."""
  ids_N, s_N = ids_T[opts.start:opts.end], s_T[opts.start:opts.end]
  same_N = np.isin(norm_C[ids_N], drop)
  high_N = ~same_N & (s_N > threshold(pos_score, opts))
  keep_N = ids_N[~same_N & ~high_N]
  if len(keep_N) > opts.num:
    pick = np.arange(opts.num) if opts.sampling == "top" else np.sort(rng.choice(len(keep_N), opts.num, replace=False))
    keep_N = keep_N[pick]
  return keep_N, {"in_range": len(ids_N), "same_text": int(same_N.sum()), "filtered": int(high_N.sum())}


class Stats:
  """Counts over all rows: the best positive's rank, what the filters removed, short rows."""

  def __init__(self, opts: Options):
    self.opts, self.bins = opts, [b for b in RANK_BINS if b <= opts.end]
    self.ranks = np.zeros(len(self.bins) + 1, np.int64)
    self.counts = {"rows": 0, "in_range": 0, "same_text": 0, "filtered": 0, "negatives": 0, "rows_short": 0,
                   "rows_without": 0}

  def add(self, rank, chosen, counts):
    """rank: the best positive's 1-based rank (0: not in the top END)."""
    self.ranks[np.searchsorted(self.bins, rank, "right") - 1 if rank else -1] += 1
    for key, n in counts.items():
      self.counts[key] += n
    self.counts["rows"] += 1
    self.counts["negatives"] += len(chosen)
    self.counts["rows_short"] += len(chosen) < self.opts.num
    self.counts["rows_without"] += not len(chosen)

  def report(self) -> dict:
    edges = [*self.bins, self.opts.end + 1]
    names = [f"{a}" if b == a + 1 else f"{a}-{b - 1}" for a, b in zip(edges, edges[1:])]
    return {**self.counts, "positive_rank": dict(zip([*names, f">{self.opts.end}"], self.ranks.tolist()))}


def mine_chunk(q_BD, corpus: search.Sharded, pos_BP, drop, norm_C, opts, first_row, stats, *, key, approx=False,
               q_chunk=search.Q_CHUNK) -> list:
  """Chosen corpus ids per query of a chunk. pos_BP: positives' corpus ids (-1 padded after them); drop:
  normal-form ids per query to leave out; first_row: the chunk's first row index; key: row_rng's."""
  out, k = [], min(opts.end, corpus.size)
  for qs, s_BT, i_BT, g_BP in search.iter_top_k(q_BD, corpus, k, ids_QP=pos_BP, q_chunk=q_chunk, approx=approx):
    for r, (s_T, i_T, g_P) in enumerate(zip(s_BT, i_BT, g_BP)):
      b = qs + r
      pos_P = pos_BP[b][pos_BP[b] >= 0]
      hit_T = np.isin(i_T, pos_P)
      rng = row_rng(key, first_row + b)
      chosen, counts = select(i_T, s_T, g_P[:len(pos_P)].min(), drop[b], norm_C, opts, rng)
      stats.add(int(hit_T.argmax()) + 1 if hit_T.any() else 0, chosen, counts)
      out.append(chosen)
  return out


def padded(lists, fill=-1) -> np.ndarray:
  """int32 [len(lists), a power of two >= the longest] (few shapes: few compiled programs)."""
  out = np.full((len(lists), max(1, 1 << (max(map(len, lists)) - 1).bit_length())), fill, np.int32)
  for i, x in enumerate(lists):
    out[i, :len(x)] = x
  return out


# Input, corpus embeddings, output.

def input_entries(spec) -> list:
  """--input: a path (a .jsonl file or a piccolo save_to_disk dir) or a dataset entry as in the trainer's
  data.datasets ({"kind": "tfds", "name": ...}, {"kind": "meta", ...}): retrieval rows."""
  if spec.lstrip().startswith("{"):
    try:
      entry = ast.literal_eval(spec)
    except (SyntaxError, ValueError) as e:
      raise sources.DataError(f"--input {spec!r}: not a dataset entry ({e})") from None
    if not isinstance(entry, dict):
      raise sources.DataError(f"--input {spec!r}: not a dataset entry (a dict)")
  else:
    path = pathlib.Path(spec)
    if not path.exists():
      raise sources.DataError(f"{path}: no such file or directory")
    entry = {"kind": "piccolo" if path.is_dir() else "jsonl", "path": spec}
  return [_with_task(e) for e in sources.expand([entry])]


def _with_task(entry) -> dict:
  """The entry, read as retrieval rows unless it names a task or its rows carry a `type` (meta lists mix tasks)."""
  if "task" in entry:
    return entry
  first = next(iter(sources.READERS[entry.get("kind", "piccolo")](entry)[1]), (None, {}))[1]
  return entry if "type" in first else {**entry, "task": "retrieval"}


def read_rows(entries, limit=0) -> tuple[list, dict]:
  """([(query, pos, neg)] of every entry, {dataset: skipped reason counts}); rows without negatives are kept,
  datasets of other tasks skipped."""
  rows, skipped = [], {}
  for entry in entries:
    reader = sources.read({**entry, "limit": limit} if limit else entry)
    for q, p, n, *_ in reader:
      if reader.task.name != "retrieval":
        reader.skipped = {f"task {reader.task.name}, not retrieval": "all"}
        break
      rows.append((q, p, n))
    skipped[reader.name] = reader.skipped
  return rows, skipped


def corpus_texts(paths):
  """The texts of --corpus files: jsonl {"text": ...} (FlagEmbedding's candidate_pool) or one per line."""
  for path in paths:
    if str(path).endswith((".jsonl", ".json")):
      for n, row in sources.jsonl_rows(path):
        yield sources.text(f"{path}: line {n}", "text", row.get("text"))
    else:
      yield from (line for _, line in sources.lines(path))


def embed_corpus(embedder, texts, lo, hi, *, prefix="", max_length=None, dim=None, batch_size=64, cache=None,
                 key=(), progress=True) -> np.ndarray:
  """float32 [hi - lo, dim] unit embeddings of corpus texts lo..hi; with a cache dir, read from or written to
  CACHE/corpus-HASH-LO-HI.npy, HASH covering the model key, settings and every corpus text in order."""
  dim = embedder.check_dim(dim)
  if cache:
    h = hashlib.sha256(json.dumps([key, prefix, max_length, dim]).encode())
    for t in texts:
      h.update(t.encode() + b"\0")
    path = pathlib.Path(cache) / f"corpus-{h.hexdigest()[:20]}-{lo}-{hi}.npy"
    if path.is_file():
      return np.load(path, mmap_mode="r")
    path.parent.mkdir(parents=True, exist_ok=True)
  out_ND = np.empty((hi - lo, dim), np.float32)
  with tqdm.tqdm(total=hi - lo, unit=" text", desc="embed corpus", file=sys.stderr, disable=not progress) as bar:
    embedder.encode_to((prefix + t for t in texts[lo:hi]), out_ND, batch_size=batch_size, max_length=max_length,
                       normalize=True, progress=bar.update)
  if cache:
    np.save(path.with_suffix(".partial.npy"), out_ND)
    path.with_suffix(".partial.npy").replace(path)  # Complete files only.
  return out_ND


def output_negatives(mined, given, mode) -> list:
  return {"replace": mined, "append": given + mined, "keep": given or mined}[mode]


def mine_rows(embedder, rows, corpus: Corpus, corpus_ND, opts, stats, *, prefix="", max_length=None,
              dim=None, batch_size=64, approx=False, progress=True):
  """Yields (query, pos, neg) per row, neg per opts.originals, mining ROW_CHUNK queries at a time."""
  with tqdm.tqdm(total=len(rows), unit=" query", desc="mine", file=sys.stderr, disable=not progress) as bar:
    for first in range(0, len(rows), ROW_CHUNK):
      chunk = rows[first:first + ROW_CHUNK]
      q_BD = embedder.encode([prefix + q for q, _, _ in chunk], batch_size=batch_size, max_length=max_length, dim=dim)
      pos_BP = padded([[corpus.ids[t] for t in p] for _, p, _ in chunk])
      drop = [corpus.norm_ids([q, *p, *(n if opts.originals == "append" else ())]) for q, p, n in chunk]
      mined = mine_chunk(q_BD, corpus_ND, pos_BP, drop, corpus.norm_C, opts, first, stats, key=(opts.seed,),
                         approx=approx)
      for (q, p, n), ids in zip(chunk, mined):
        yield q, p, output_negatives([corpus.texts[i] for i in ids], n, opts.originals)
      bar.update(len(chunk))


def with_scores(embedder, rows, *, query_prefix="", passage_prefix="", query_max_length=None,
                passage_max_length=None, batch_size=64):
  """Yields {query, pos, neg, pos_scores, neg_scores} of (query, pos, neg) rows: the cosines of the
  teacher's (embedder's) embeddings of each query and its texts, ROW_CHUNK rows at a time."""
  rows = iter(rows)
  for chunk in iter(lambda: list(itertools.islice(rows, ROW_CHUNK)), []):
    texts = list(dict.fromkeys(t for _, p, n in chunk for t in (*p, *n)))
    at = {t: i for i, t in enumerate(texts)}
    q_BD = embedder.encode([query_prefix + q for q, _, _ in chunk], batch_size=batch_size,
                           max_length=query_max_length)
    t_ND = embedder.encode([passage_prefix + t for t in texts], batch_size=batch_size, max_length=passage_max_length)
    for (q, p, n), q_D in zip(chunk, q_BD):
      score = lambda ts: [round(float(x), 6) for x in t_ND[[at[t] for t in ts]] @ q_D] if ts else []
      yield {"query": q, "pos": p, "neg": n, "pos_scores": score(p), "neg_scores": score(n)}


def _margin(text):
  return None if text.lower() in ("off", "none") else float(text)


def _range(text):
  try:
    start, end = (int(x) for x in text.split("-"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected START-END, e.g. 2-200, got {text!r}") from None
  if not 0 <= start < end:
    raise argparse.ArgumentTypeError(f"range {text}: need 0 <= START < END")
  return start, end


def add_selection_flags(p):
  """The flags that choose each query's negatives from its ranked hits (Options' fields)."""
  d = Options()
  p.add_argument("--range", type=_range, default=(d.start, d.end), metavar="START-END", help="ranks sampled, a 0-based "
                 "slice as FlagEmbedding's: 2-200 skips the 2 best hits and samples from 1-based ranks 3..200 "
                 f"(default {d.start}-{d.end})")
  p.add_argument("--negatives", type=int, default=d.num, help="negatives per query (default %(default)s)")
  p.add_argument("--sampling", choices=("random", "top"), default=d.sampling,
                 help="which of the candidates left: NUM at random, or the NUM best (default %(default)s)")
  p.add_argument("--relative-margin", type=_margin, default=d.relative_margin, help="drop candidates scoring above "
                 "(1 - M) x the positive's score (default %(default)s: NV-Retriever's TopK-PercPos 95%%; "
                 "off: no filter)")
  p.add_argument("--absolute-margin", type=_margin, default=d.absolute_margin, help="drop candidates scoring above "
                 "the positive's score - M (default off). With several positives, the lowest-scoring one counts")


def selection(args, **kw) -> Options:
  """Options from add_selection_flags' parsed flags (and kw: originals, seed)."""
  return Options(*args.range, num=args.negatives, sampling=args.sampling, absolute_margin=args.absolute_margin,
                 relative_margin=args.relative_margin, **kw)


def config_options(refresh_cfg) -> Options:
  """Options of the config section `refresh` (its margins < 0: off)."""
  off = lambda margin: None if margin < 0 else margin
  r = refresh_cfg
  return Options(r.start, r.end, r.num, r.sampling, off(r.absolute_margin), off(r.relative_margin))


def parse_args(argv=None):
  d = Options()
  p = argparse.ArgumentParser(prog="python -m piccolo_jax.mine", description=__doc__.split("\n\n")[1])
  p.add_argument("model", help="piccolo_jax model dir, sentence-transformers / HF BERT dir (converted), or minilm")
  p.add_argument("--input", action="append", required=True, help="retrieval rows {query, pos[], neg[]}: a .jsonl "
                 "file, a piccolo save_to_disk dir, or a data.datasets entry such as '{\"kind\": \"tfds\", \"name\": "
                 "\"x\"}' or a meta list (repeatable; every row goes to the one output)")
  p.add_argument("--output", required=True, help="mined jsonl (written once complete); stats in OUTPUT.stats.json")
  p.add_argument("--corpus", action="append", default=[], help="extra corpus texts: jsonl {text} or one per line")
  add_selection_flags(p)
  p.add_argument("--originals", choices=("replace", "append", "keep"), default=d.originals, help="given negatives: "
                 "replaced by the mined ones, followed by them, or kept (only rows without any are mined); "
                 "default %(default)s")
  p.add_argument("--scores", action="store_true", help="also write each positive's and negative's teacher score "
                 "(pos_scores, neg_scores: cosines of the --teacher's embeddings), for tasks.retrieval.kl_weight")
  p.add_argument("--teacher", default="", help="the embedding model that scores with --scores: any model the "
                 "project loads (default: MODEL); it embeds with the prefixes and token caps given here")
  p.add_argument("--seed", type=int, default=d.seed,
                 help="sampling seed (row i draws from its own generator; default %(default)s)")
  p.add_argument("--query-prefix", default="", help="prepended to queries when embedding (not in the output)")
  p.add_argument("--passage-prefix", default="", help="prepended to corpus texts when embedding")
  p.add_argument("--dim", type=int, default=None, help="Matryoshka dim to mine at (default: the full dim)")
  p.add_argument("--query-max-length", type=int, default=None, help="tokens per query (default: the model's)")
  p.add_argument("--passage-max-length", type=int, default=None, help="tokens per passage (default: the model's)")
  p.add_argument("--batch-size", type=int, default=64, help="texts per encoder batch (default %(default)s)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
  p.add_argument("--limit", type=int, default=0, help="first N usable rows of each input (0: all)")
  p.add_argument("--cache", default=None, help="dir for corpus embeddings, reused when model, settings and texts match")
  p.add_argument("--approx", action="store_true", help="jax.lax.approx_max_k per block (TPU; exact elsewhere)")
  p.add_argument("--coordinator_address", "--coordinator-address", default="",
                 help="multi-process: host:port of process 0 (the trainer's flags)")
  p.add_argument("--num_processes", "--num-processes", type=int, default=1)
  p.add_argument("--process_id", "--process-id", type=int, default=0)
  args = p.parse_args(argv)
  return p, args, selection(args, originals=args.originals, seed=args.seed)


def run(args, opts) -> dict:
  """Mines and writes args.output (process 0); returns the stats."""
  if args.coordinator_address or args.num_processes > 1:
    sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  if args.teacher and not args.scores:
    raise ValueError(f"--teacher {args.teacher}: a teacher only scores; add --scores")
  main_process, t0 = jax.process_index() == 0, time.perf_counter()
  rows, skipped = read_rows([e for spec in args.input for e in input_entries(spec)], args.limit)
  if not rows:
    raise sources.DataError(f"{', '.join(args.input)}: no usable rows (skipped: {skipped})")
  corpus = build_corpus(rows, corpus_texts(args.corpus))
  model = models.resolve_init(args.model)
  embedder = encode.Embedder.load(model, dtype=args.dtype)
  mesh = sharding.make_mesh()
  lo, hi = search.process_rows(len(corpus.texts), mesh)  # Each process embeds the rows on its devices.
  t1 = time.perf_counter()
  corpus_ND = search.place(  # The host rows are dropped once on the devices.
      embed_corpus(embedder, corpus.texts, lo, hi, prefix=args.passage_prefix, max_length=args.passage_max_length,
                   dim=args.dim, batch_size=args.batch_size, cache=args.cache, key=[modeldir.files_key(model), args.dtype],
                   progress=main_process), mesh, size=len(corpus.texts), start=lo)
  t2, stats = time.perf_counter(), Stats(opts)
  out = pathlib.Path(args.output)
  partial = out.with_name(out.name + ".partial")
  mined = mine_rows(embedder, rows, corpus, corpus_ND, opts, stats, prefix=args.query_prefix,
                    max_length=args.query_max_length, dim=args.dim, batch_size=args.batch_size, approx=args.approx,
                    progress=main_process)
  if args.scores:
    teacher = embedder if args.teacher in ("", args.model) else encode.Embedder.load(models.resolve_init(args.teacher),
                                                                                      dtype=args.dtype)
    out_rows = with_scores(teacher, mined, query_prefix=args.query_prefix, passage_prefix=args.passage_prefix,
                           query_max_length=args.query_max_length, passage_max_length=args.passage_max_length,
                           batch_size=args.batch_size)
  else:
    out_rows = ({"query": q, "pos": p, "neg": n} for q, p, n in mined)
  lines = (json.dumps(row, ensure_ascii=False) + "\n" for row in out_rows)
  if main_process:
    try:
      with open(partial, "w", encoding="utf-8") as f:
        f.writelines(lines)
      partial.replace(out)
    finally:
      partial.unlink(missing_ok=True)
  else:
    for _ in lines:  # The search is collective: every process runs it.
      pass
  report = {"output": str(out), "corpus": len(corpus.texts), "skipped": skipped, **stats.report(),
            "seconds": {"read_load": t1 - t0, "embed_corpus": t2 - t1, "mine": time.perf_counter() - t2},
            "options": dataclasses.asdict(opts), "devices": jax.device_count(), "processes": jax.process_count()}
  if main_process:
    out.with_suffix(".stats.json").write_text(json.dumps(report, indent=1) + "\n")
  return report


def format_report(r) -> str:
  c, asked = r["rows"], r["options"]["num"]
  ranks = ", ".join(f"{k}: {v}" for k, v in r["positive_rank"].items())
  return "\n".join([
      f"wrote {r['output']}: {c} rows, corpus {r['corpus']} texts, {r['negatives']} mined negatives "
      f"({r['negatives'] / max(c, 1):.1f} per row); skipped input rows: {r['skipped']}",
      f"best positive's rank (1-based): {ranks}",
      f"candidates in range {r['in_range']}: {r['same_text']} a positive's or the query's text, "
      f"{r['filtered']} removed by the false-negative filter",
      f"rows with fewer than {asked} negatives: {r['rows_short']} ({r['rows_without']} with none" +
      ("; those train on in-batch negatives only: a wider --range or smaller margins give them some)"
       if r["rows_without"] else ")"),
      "seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items())])


def main(argv=None) -> dict:
  parser, args, opts = parse_args(argv)
  try:
    report = run(args, opts)
  except (OSError, ValueError) as e:  # DataError is a ValueError.
    parser.exit(2, f"error: {e}\n")
  if jax.process_index() == 0:
    print(format_report(report))
  return report


if __name__ == "__main__":
  main()
