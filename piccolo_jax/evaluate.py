"""C-MTEB-style evaluation of a piccolo_jax encoder at several Matryoshka dims in one pass.

Usage: python -m piccolo_jax.evaluate MODEL_DIR --task sts:FILE [--task retrieval:FILE ...]
           [--dims 64,128,384] [--max-length 512] [--output results.json]
"""
import argparse
import dataclasses
import functools
import json
import pathlib

import numpy as np

from piccolo_jax import encode
from piccolo_jax import search
from piccolo_jax import sources

KINDS_HELP = """\
task specs: [NAME=]KIND:PATH[?COLUMN=FIELD&...]. NAME defaults to the file name up to its first dot.
?COLUMN=FIELD reads one of the kind's columns (named below) from the file's FIELD (tsv header or jsonl
key), e.g. sts:pairs.tsv?sentence1=text1&sentence2=text2&score=label (PATH cannot contain '?'; BEIR
dirs take none). Metrics are named NAME/METRIC@DIM; dim d scores the L2-normalised first d coordinates
of the full embeddings. Scores are x100 and follow MTEB's definitions, on cosine similarity:
  sts             spearman, pearson vs gold. tsv (header naming sentence1, sentence2, score|label,
                  or exactly those 3 columns) or jsonl {sentence1, sentence2, score|label}
  pair            ap: average precision, labels 0/1. Same files as sts
  retrieval       ndcg_at_10 (binary relevance), mrr_at_10, recall_at_{1,10,100}, exact top-100.
                  jsonl {query, pos[], neg[]} (corpus: all pos+neg; relevant: pos), or a BEIR dir
                  with corpus.jsonl, queries.jsonl and qrels.tsv (or qrels/test.tsv)
  reranking       map, mrr_at_10 over each query's pos+neg. jsonl {query, pos[], neg[]}
  classification  accuracy, f1 (macro) of linear_model.LogisticRegression(max_iter=100, seed 0) fit on the
                  train embeddings, one run. PATH = TRAIN,TEST: jsonl (or tsv) {text, label}
  clustering      v_measure of cluster.MiniBatchKMeans(k = number of labels, batch 500, seed 0).
                  jsonl (or tsv) {text, label}
Rows whose query has no pos (retrieval) or no pos or neg (reranking) are skipped, as MTEB does."""
_PAIR, _TRIPLET, _LABELLED = ("sentence1", "sentence2", "score"), ("query", "pos", "neg"), ("text", "label")
KINDS = {"sts": _PAIR, "pair": _PAIR, "retrieval": _TRIPLET, "reranking": _TRIPLET,
         "classification": _LABELLED, "clustering": _LABELLED}  # kind -> the columns it reads
ALIASES = {"score": ("score", "label")}  # Fields read for a column unless the spec names one.
RETRIEVAL_KS = (1, 10, 100)


EvalError = sources.DataError  # A bad task spec or eval file; the message names the file and line.


@dataclasses.dataclass
class Task:
  """A loaded task: its texts (encoded once) and kind-specific indices into them; retrieval: the corpus is
  texts[:n_corpus], in corpus order."""
  name: str
  kind: str
  path: str
  texts: list
  data: dict


# Readers: (where, row dict) per non-blank line.

def read_jsonl(path):
  return ((f"{path}: line {n}", row) for n, row in sources.jsonl_rows(path))


def read_tsv(path, columns):
  return ((f"{path}: line {n}", row) for n, row in sources.tsv_rows(path, columns))


def read_rows(path, cols):
  """Rows of a jsonl or tsv file; a tsv names its columns in a header or has exactly those of cols."""
  suffix = pathlib.Path(path).suffix
  if suffix in (".jsonl", ".json"):
    return read_jsonl(path)
  if suffix in (".tsv", ".txt"):
    return read_tsv(path, tuple(fields[0] for fields in cols.values()))
  raise EvalError(f"{path}: unsupported file type {suffix!r}; use .jsonl or .tsv")


def _field(where, row, *names):
  """(the first of names in row, its value), or an error naming them."""
  name = next((n for n in names if n in row), None)
  if name is None:
    raise EvalError(f"{where}: missing field '{names[0]}'" + (f" (or {names[1:]})" if names[1:] else ""))
  return name, row[name]


def _text(where, row, *names):
  return sources.text(where, *_field(where, row, *names))


def _texts(where, row, name):
  """A list of strings (a lone string counts as one), blanks dropped; [] if absent."""
  value = row.get(name, [])
  return sources.texts(where, name, [value] if isinstance(value, str) else value)


def _number(where, row, *names):
  return sources.number(where, *_field(where, row, *names))


def _nonempty(path, rows, what="rows"):
  if not rows:
    raise EvalError(f"{path}: no usable {what} (empty split)")
  return rows


# Loaders: (path, kind, cols: {column: fields it is read from}) -> (texts, data); `ix` adds a text to the
# task's texts unless already there, and returns its index.

def _pool(texts=()):
  texts, index = list(texts), {}
  for i, t in enumerate(texts):
    index.setdefault(t, i)

  def ix(t):
    if t not in index:
      index[t] = len(texts)
      texts.append(t)
    return index[t]
  return texts, ix


def load_pairs(path, kind, cols):
  texts, ix = _pool()
  a, b, y = [], [], []
  for where, row in read_rows(path, cols):
    a.append(ix(_text(where, row, *cols["sentence1"])))
    b.append(ix(_text(where, row, *cols["sentence2"])))
    y.append(_number(where, row, *cols["score"]))
    if kind == "pair" and y[-1] not in (0.0, 1.0):
      raise EvalError(f"{where}: pair classification label must be 0 or 1, got {y[-1]:g}")
  _nonempty(path, y)
  return texts, {"a": np.array(a), "b": np.array(b), "label": np.array(y)}


def load_triplets(path, kind, cols):
  (query_field,), (pos_field,), (neg_field,) = cols.values()
  texts, ix = _pool()
  corpus, corpus_ix = _pool()  # retrieval: distinct pos+neg texts, in order of appearance
  q, cands, rels = [], [], []
  for where, row in read_jsonl(path):
    query, pos, neg = _text(where, row, query_field), _texts(where, row, pos_field), _texts(where, row, neg_field)
    if not pos or (kind == "reranking" and not neg):
      continue
    if kind == "retrieval":
      q.append(query)
      rels.append(np.array([corpus_ix(t) for t in pos]))
      for t in neg:
        corpus_ix(t)
    else:
      q.append(ix(query))
      cands.append(np.array([ix(t) for t in pos + neg]))
      rels.append(np.arange(len(pos) + len(neg)) < len(pos))
  _nonempty(path, q, "queries (each needs a pos" + (" and a neg)" if kind == "reranking" else ")"))
  if kind == "reranking":
    return texts, {"q": np.array(q), "cands": cands, "rels": rels}
  texts, ix = _pool(corpus)  # The corpus first: texts[:n_corpus].
  return texts, {"q": np.array([ix(t) for t in q]), "n_corpus": len(corpus), "qrels": rels}


def load_beir(path):
  """A BEIR directory: corpus.jsonl {_id, title, text}, queries.jsonl {_id, text}, qrels tsv."""
  path = pathlib.Path(path)
  qrels_path = next((p for p in (path / "qrels.tsv", path / "qrels" / "test.tsv") if p.is_file()), None)
  if qrels_path is None:
    raise EvalError(f"{path}: a BEIR directory needs qrels.tsv or qrels/test.tsv")
  docs = {}  # id -> text, in corpus order
  for where, row in read_jsonl(path / "corpus.jsonl"):
    text = (str(row.get("title") or "") + " " + _text(where, row, "text")).strip()
    docs.setdefault(str(_field(where, row, "_id")[1]), text)
  queries = {str(_field(w, r, "_id")[1]): _text(w, r, "text") for w, r in read_jsonl(path / "queries.jsonl")}
  doc_ix = {d: i for i, d in enumerate(docs)}
  qrels = {}
  for where, row in read_tsv(qrels_path, ("query-id", "corpus-id", "score")):
    qid, did, score = row["query-id"], row["corpus-id"], _number(where, row, "score")
    if qid not in queries or did not in docs:
      raise EvalError(f"{where}: unknown {'query' if qid not in queries else 'corpus'} id "
                      f"{qid if qid not in queries else did!r}")
    if score > 0:
      qrels.setdefault(qid, []).append(doc_ix[did])
  _nonempty(qrels_path, qrels, "relevance judgements")
  texts, ix = _pool(docs.values())  # The corpus first: texts[:n_corpus].
  return texts, {"q": np.array([ix(queries[qid]) for qid in qrels]), "n_corpus": len(docs),
                 "qrels": [np.array(v) for v in qrels.values()]}


def load_labelled(path, kind, cols):
  paths = path.split(",")
  if kind == "classification" and len(paths) != 2:
    raise EvalError(f"classification:{path}: expected TRAIN,TEST (two files separated by a comma)")
  texts, ix = _pool()
  data = {}
  for split, p in zip(("train", "test") if kind == "classification" else ("text",), paths):
    rows = _nonempty(p, list(read_rows(p, cols)))
    data[split] = np.array([ix(_text(w, r, *cols["text"])) for w, r in rows])
    data[split + "_label"] = np.array([str(_field(w, r, *cols["label"])[1]) for w, r in rows])
    if split != "test" and len(set(data[split + "_label"])) < 2:
      raise EvalError(f"{p}: {kind} needs at least 2 distinct labels, found {set(data[split + '_label'])}")
  return texts, data


def _columns(spec, kind, mapping) -> dict:
  """{column: the fields it is read from} for a kind, with the spec's COLUMN=FIELD overrides."""
  cols = {c: ALIASES.get(c, (c,)) for c in KINDS[kind]}
  for item in mapping.split("&") if mapping else ():
    col, eq, field = item.partition("=")
    if col not in cols:
      raise EvalError(f"task spec {spec!r}: unknown column {col!r} for {kind}, expected one of {', '.join(cols)}")
    if not eq or not field:
      raise EvalError(f"task spec {spec!r}: expected COLUMN=FIELD, got {item!r}")
    cols[col] = (field,)
  return cols


def parse_task(spec: str) -> Task:
  """'[NAME=]KIND:PATH[?COLUMN=FIELD&...]' -> a loaded Task; errors name the spec, file and line."""
  name, eq, rest = spec.partition("=")
  name, rest = (name, rest) if eq and ":" not in name else ("", spec)
  kind, colon, path = rest.partition(":")
  path, _, mapping = path.partition("?")
  if not colon or not path:
    raise EvalError(f"task spec {spec!r}: expected [NAME=]KIND:PATH, e.g. sts:data/sts-b-en/sts-b-en.dev.tsv")
  if kind not in KINDS:
    raise EvalError(f"task spec {spec!r}: unknown task kind {kind!r}, expected one of {', '.join(KINDS)}")
  cols = _columns(spec, kind, mapping)
  if kind in ("sts", "pair"):
    texts, data = load_pairs(path, kind, cols)
  elif kind == "retrieval" and pathlib.Path(path).is_dir():
    if mapping:
      raise EvalError(f"task spec {spec!r}: a BEIR directory takes no column names")
    texts, data = load_beir(path)
  elif kind in ("retrieval", "reranking"):
    texts, data = load_triplets(path, kind, cols)
  else:
    texts, data = load_labelled(path, kind, cols)
  name = name or pathlib.Path(path.split(",")[-1]).name.split(".")[0]
  return Task(name=name, kind=kind, path=path, texts=texts, data=data)


# Scorers: (the task's embeddings [N, D], dim d, **task.data) -> {metric: value x100}, on cosine similarity
# of the first d coordinates.

def unit(emb_ND, rows, d):
  """The L2-normalised first d coordinates of emb_ND[rows]."""
  return search.normalize(emb_ND[rows, :d])


# scipy and scikit-learn are imported by the scorers that use them: a training run without evals skips them.

def score_sts(emb_ND, d, a, b, label):
  from scipy import stats  # pylint: disable=g-import-not-at-top
  cos_N = (unit(emb_ND, a, d) * unit(emb_ND, b, d)).sum(1)
  return {"spearman": 100 * stats.spearmanr(cos_N, label)[0],
          "pearson": 100 * stats.pearsonr(cos_N, label)[0]}


def score_pair(emb_ND, d, a, b, label):
  from sklearn import metrics  # pylint: disable=g-import-not-at-top
  return {"ap": 100 * metrics.average_precision_score(label, (unit(emb_ND, a, d) * unit(emb_ND, b, d)).sum(1))}


def retrieval_metrics(top_QT, qrels, ks=RETRIEVAL_KS) -> dict:
  """nDCG@10 (binary gains), MRR@10 and recall@k x100 from ranked corpus ids and relevant ids per query."""
  width = max(top_QT.shape[1], 10, *ks)
  hit_QW = np.zeros((len(top_QT), width), bool)
  hit_QW[:, :top_QT.shape[1]] = [np.isin(t, r) for t, r in zip(top_QT, qrels)]
  n_rel_Q = np.array([len(r) for r in qrels])
  disc_10 = 1 / np.log2(np.arange(2, 12))
  idcg_Q = np.cumsum(disc_10)[np.minimum(n_rel_Q, 10) - 1]
  first_Q = hit_QW[:, :10].argmax(1)
  out = {"ndcg_at_10": (hit_QW[:, :10] @ disc_10 / idcg_Q).mean(),
         "mrr_at_10": np.where(hit_QW[:, :10].any(1), 1 / (first_Q + 1), 0).mean()}
  out |= {f"recall_at_{k}": (hit_QW[:, :k].sum(1) / n_rel_Q).mean() for k in ks}
  return {m: 100 * v for m, v in out.items()}


def score_retrieval(emb_ND, d, q, n_corpus, qrels):
  """Exact top-100 over the corpus emb_ND[:n_corpus], normalised chunk by chunk inside the search."""
  _, top_QT = search.top_k(emb_ND[q, :d], emb_ND[:n_corpus], max(RETRIEVAL_KS), dim=d, normalize=True)
  return retrieval_metrics(top_QT, qrels)


def score_reranking(emb_ND, d, q, cands, rels):
  from sklearn import metrics  # pylint: disable=g-import-not-at-top
  ap, rr = [], []
  for qi, cand, rel in zip(q, cands, rels):
    s_C = unit(emb_ND, cand, d) @ unit(emb_ND, [qi], d)[0]
    ap.append(metrics.average_precision_score(rel, s_C))
    ranked = rel[np.argsort(-s_C, kind="stable")][:10]
    rr.append(1 / (ranked.argmax() + 1) if ranked.any() else 0.0)
  return {"map": 100 * np.mean(ap), "mrr_at_10": 100 * np.mean(rr)}


def score_classification(emb_ND, d, train, train_label, test, test_label, seed=0):
  from sklearn import linear_model, metrics  # pylint: disable=g-import-not-at-top
  clf = linear_model.LogisticRegression(max_iter=100, random_state=seed).fit(unit(emb_ND, train, d), train_label)
  pred = clf.predict(unit(emb_ND, test, d))
  return {"accuracy": 100 * metrics.accuracy_score(test_label, pred),
          "f1": 100 * metrics.f1_score(test_label, pred, average="macro")}


def score_clustering(emb_ND, d, text, text_label, seed=0):
  from sklearn import cluster, metrics  # pylint: disable=g-import-not-at-top
  km = cluster.MiniBatchKMeans(n_clusters=len(set(text_label)), batch_size=500, n_init="auto", random_state=seed)
  return {"v_measure": 100 * metrics.v_measure_score(text_label, km.fit_predict(unit(emb_ND, text, d)))}


SCORERS = {"sts": score_sts, "pair": score_pair, "retrieval": score_retrieval, "reranking": score_reranking,
           "classification": score_classification, "clustering": score_clustering}


def check_dims(dims, full_dim) -> tuple:
  dims = tuple(dict.fromkeys(dims or (full_dim,)))
  for d in dims:
    if not 0 < d <= full_dim:
      raise EvalError(f"dim {d} out of range: the embeddings have {full_dim} dims")
  return dims


def evaluate_tasks(encoder, tasks, dims=None, *, batch_size=64, max_length=None) -> dict[str, float]:
  """{'NAME/METRIC@DIM': value} for every task and dim, with one encode call per task.

  encoder: an encode.Embedder (called with normalize=False and max_length: default its model's
  max_seq_length) or a function texts -> [N, D] array. tasks: Task objects or spec strings. dims:
  Matryoshka dims (default: the full dim); each scores the L2-normalised first d coordinates of the
  full embeddings, held once (scorers normalise the rows they use).
  """
  tasks = [t if isinstance(t, Task) else parse_task(t) for t in tasks]
  names = [t.name for t in tasks]
  if len(set(names)) < len(names):
    raise EvalError(f"task names {names} repeat; name them apart with NAME=KIND:PATH")
  if hasattr(encoder, "encode"):
    check_dims(dims, encoder.dim)  # Fail before encoding.
    encoder = functools.partial(encoder.encode, batch_size=batch_size, max_length=max_length, normalize=False)
  out = {}
  for task in tasks:
    emb_ND = np.asarray(encoder(task.texts), np.float32)
    for d in check_dims(dims, emb_ND.shape[1]):
      for metric, value in SCORERS[task.kind](emb_ND, d, **task.data).items():
        out[f"{task.name}/{metric}@{d}"] = float(value)
  return out


def format_table(results: dict) -> str:
  """Rows NAME/METRIC, one column per dim."""
  rows, dims = {}, {}
  for key, value in results.items():
    row, d = key.rsplit("@", 1)
    rows.setdefault(row, {})[d], dims[d] = value, None
  width = max(len(r) for r in rows)
  lines = [f"{'task/metric':<{width}}" + "".join(f"{d:>9}" for d in dims)]
  for row, by_dim in rows.items():
    lines.append(f"{row:<{width}}" + "".join(f"{by_dim[d]:>9.2f}" if d in by_dim else " " * 9 for d in dims))
  return "\n".join(lines)


def _dims_arg(text):
  try:
    return tuple(int(d) for d in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m piccolo_jax.evaluate", description=__doc__.split("\n")[0],
                                   epilog=KINDS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("model_dir", help="piccolo_jax model dir, or a sentence-transformers dir (converted)")
  parser.add_argument("--task", action="append", required=True, metavar="[NAME=]KIND:PATH",
                      help="a task to run (repeatable); see below")
  parser.add_argument("--dims", type=_dims_arg, default=None, help="Matryoshka dims, e.g. 64,128,384 "
                      "(default: the full dim); all come from one encoding pass")
  parser.add_argument("--output", help="write {model_dir, tasks, dims, metrics} as JSON here")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the model's max_seq_length)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
  args = parser.parse_args(argv)
  try:
    tasks = [parse_task(s) for s in args.task]  # Data errors surface before the model loads.
    results = evaluate_tasks(encode.Embedder.load(args.model_dir, dtype=args.dtype), tasks, args.dims,
                             batch_size=args.batch_size, max_length=args.max_length)
  except (OSError, ValueError) as e:
    parser.exit(2, f"error: {e}\n")
  print(format_table(results))
  if args.output:
    pathlib.Path(args.output).write_text(json.dumps(
        {"model_dir": str(args.model_dir), "tasks": args.task, "dims": args.dims, "metrics": results},
        indent=2) + "\n")
  return results


if __name__ == "__main__":
  main()
