"""C-MTEB-style evaluation of a piccolo_jax encoder at several Matryoshka dims in one pass.

Usage: python -m piccolo_jax.evaluate MODEL_DIR --task sts:FILE [--task retrieval:FILE ...]
           [--dims 64,128,384] [--output results.json]
"""
import argparse
import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats
from sklearn import cluster, linear_model, metrics

from piccolo_jax import encode
from piccolo_jax import sources

KINDS_HELP = """\
task specs: [NAME=]KIND:PATH, NAME defaulting to the file name up to its first dot. Metrics are
named NAME/METRIC@DIM; dim d scores the L2-normalised first d coordinates of the full embeddings.
Scores are x100 and follow MTEB's definitions, on cosine similarity:
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
KINDS = ("sts", "pair", "retrieval", "reranking", "classification", "clustering")
RETRIEVAL_KS = (1, 10, 100)


EvalError = sources.DataError  # A bad task spec or eval file; the message names the file and line.


@dataclasses.dataclass
class Task:
  """A loaded task: its distinct texts (encoded once) and kind-specific indices into them."""
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


def read_rows(path, tsv_columns):
  suffix = pathlib.Path(path).suffix
  if suffix in (".jsonl", ".json"):
    return read_jsonl(path)
  if suffix in (".tsv", ".txt"):
    return read_tsv(path, tsv_columns)
  raise EvalError(f"{path}: unsupported file type {suffix!r}; use .jsonl or .tsv")


def _field(where, row, *names):
  """row[first of names present], or an error naming it."""
  name = next((n for n in names if n in row), None)
  if name is None:
    raise EvalError(f"{where}: missing field '{names[0]}'" + (f" (or {names[1:]})" if names[1:] else ""))
  return row[name]


def _text(where, row, name):
  return sources.text(where, name, _field(where, row, name))


def _texts(where, row, name):
  """A list of strings (a lone string counts as one), blanks dropped; [] if absent."""
  value = row.get(name, [])
  return sources.texts(where, name, [value] if isinstance(value, str) else value)


def _number(where, row, *names):
  name = next((n for n in names if n in row), names[0])
  return sources.number(where, name, _field(where, row, *names))


def _nonempty(path, rows, what="rows"):
  if not rows:
    raise EvalError(f"{path}: no usable {what} (empty split)")
  return rows


# Loaders: path -> (texts, data); `ix` adds a text to the task's pool and returns its index.

def _pool():
  pool = {}
  return pool, lambda t: pool.setdefault(t, len(pool))


def load_pairs(path, kind):
  pool, ix = _pool()
  a, b, y = [], [], []
  for where, row in read_rows(path, ("sentence1", "sentence2", "score")):
    a.append(ix(_text(where, row, "sentence1")))
    b.append(ix(_text(where, row, "sentence2")))
    y.append(_number(where, row, "score", "label"))
    if kind == "pair" and y[-1] not in (0.0, 1.0):
      raise EvalError(f"{where}: pair classification label must be 0 or 1, got {y[-1]:g}")
  _nonempty(path, y)
  return list(pool), {"a": np.array(a), "b": np.array(b), "label": np.array(y)}


def load_triplets(path, kind):
  pool, ix = _pool()
  corpus, corpus_ix = _pool()  # retrieval: distinct pos+neg texts, in order of appearance
  q, cands, rels = [], [], []
  for where, row in read_jsonl(path):
    query, pos, neg = _text(where, row, "query"), _texts(where, row, "pos"), _texts(where, row, "neg")
    if not pos or (kind == "reranking" and not neg):
      continue
    q.append(ix(query))
    if kind == "retrieval":
      rels.append(np.array([corpus_ix(t) for t in pos]))
      for t in neg:
        corpus_ix(t)
    else:
      cands.append(np.array([ix(t) for t in pos + neg]))
      rels.append(np.arange(len(pos) + len(neg)) < len(pos))
  _nonempty(path, q, "queries (each needs a pos" + (" and a neg)" if kind == "reranking" else ")"))
  if kind == "reranking":
    return list(pool), {"q": np.array(q), "cands": cands, "rels": rels}
  c = np.array([ix(t) for t in corpus])
  return list(pool), {"q": np.array(q), "c": c, "qrels": rels}


def load_beir(path):
  """A BEIR directory: corpus.jsonl {_id, title, text}, queries.jsonl {_id, text}, qrels tsv."""
  path = pathlib.Path(path)
  qrels_path = next((p for p in (path / "qrels.tsv", path / "qrels" / "test.tsv") if p.is_file()), None)
  if qrels_path is None:
    raise EvalError(f"{path}: a BEIR directory needs qrels.tsv or qrels/test.tsv")
  pool, ix = _pool()
  corpus = {}
  for where, row in read_jsonl(path / "corpus.jsonl"):
    text = (str(row.get("title") or "") + " " + _text(where, row, "text")).strip()
    corpus.setdefault(str(_field(where, row, "_id")), (len(corpus), ix(text)))
  queries = {str(_field(w, r, "_id")): _text(w, r, "text") for w, r in read_jsonl(path / "queries.jsonl")}
  qrels = {}
  for where, row in read_tsv(qrels_path, ("query-id", "corpus-id", "score")):
    qid, did, score = row["query-id"], row["corpus-id"], _number(where, row, "score")
    if qid not in queries or did not in corpus:
      raise EvalError(f"{where}: unknown {'query' if qid not in queries else 'corpus'} id "
                      f"{qid if qid not in queries else did!r}")
    if score > 0:
      qrels.setdefault(qid, []).append(corpus[did][0])
  _nonempty(qrels_path, qrels, "relevance judgements")
  q = [ix(queries[qid]) for qid in qrels]
  return list(pool), {"q": np.array(q), "c": np.array([i for _, i in corpus.values()]),
                      "qrels": [np.array(v) for v in qrels.values()]}


def load_labelled(path, kind):
  paths = path.split(",")
  if kind == "classification" and len(paths) != 2:
    raise EvalError(f"classification:{path}: expected TRAIN,TEST (two files separated by a comma)")
  pool, ix = _pool()
  data = {}
  for split, p in zip(("train", "test") if kind == "classification" else ("text",), paths):
    rows = _nonempty(p, list(read_rows(p, ("text", "label"))))
    data[split] = np.array([ix(_text(w, r, "text")) for w, r in rows])
    data[split + "_label"] = np.array([str(_field(w, r, "label")) for w, r in rows])
    if split != "test" and len(set(data[split + "_label"])) < 2:
      raise EvalError(f"{p}: {kind} needs at least 2 distinct labels, found {set(data[split + '_label'])}")
  return list(pool), data


def parse_task(spec: str) -> Task:
  """'[NAME=]KIND:PATH' -> a loaded Task; errors name the spec, file and line."""
  name, eq, rest = spec.partition("=")
  name, rest = (name, rest) if eq and ":" not in name else ("", spec)
  kind, colon, path = rest.partition(":")
  if not colon or not path:
    raise EvalError(f"task spec {spec!r}: expected [NAME=]KIND:PATH, e.g. sts:data/sts-b-en/sts-b-en.dev.tsv")
  if kind not in KINDS:
    raise EvalError(f"task spec {spec!r}: unknown task kind {kind!r}, expected one of {', '.join(KINDS)}")
  if kind in ("sts", "pair"):
    texts, data = load_pairs(path, kind)
  elif kind in ("retrieval", "reranking"):
    is_beir = kind == "retrieval" and pathlib.Path(path).is_dir()
    texts, data = load_beir(path) if is_beir else load_triplets(path, kind)
  else:
    texts, data = load_labelled(path, kind)
  name = name or pathlib.Path(path.split(",")[-1]).name.split(".")[0]
  return Task(name=name, kind=kind, path=path, texts=texts, data=data)


# Scorers: (normalised embeddings of the task's texts, **task.data) -> {metric: value x100}.

def score_sts(e_ND, a, b, label):
  cos_N = (e_ND[a] * e_ND[b]).sum(1)
  return {"spearman": 100 * stats.spearmanr(cos_N, label)[0],
          "pearson": 100 * stats.pearsonr(cos_N, label)[0]}


def score_pair(e_ND, a, b, label):
  return {"ap": 100 * metrics.average_precision_score(label, (e_ND[a] * e_ND[b]).sum(1))}


@functools.partial(jax.jit, static_argnames="k")
def _top_k(q_QD, c_CD, k):
  return jax.lax.top_k(jnp.matmul(q_QD, c_CD.T, precision="highest"), k)[1]


def top_k(q_QD, c_CD, k, chunk=256) -> np.ndarray:
  """Corpus indices [Q, min(k, C)] of the highest dot products per query: exact, in query chunks."""
  k, chunk = min(k, len(c_CD)), min(chunk, len(q_QD))
  c_CD = jnp.asarray(c_CD)
  out = []
  for s in range(0, len(q_QD), chunk):
    q_BD = np.zeros((chunk, q_QD.shape[1]), np.float32)  # Fixed shape: one compilation.
    n = len(q_QD[s:s + chunk])
    q_BD[:n] = q_QD[s:s + n]
    out.append(np.asarray(_top_k(jnp.asarray(q_BD), c_CD, k))[:n])
  return np.concatenate(out)


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


def score_retrieval(e_ND, q, c, qrels):
  return retrieval_metrics(top_k(e_ND[q], e_ND[c], max(RETRIEVAL_KS)), qrels)


def score_reranking(e_ND, q, cands, rels):
  ap, rr = [], []
  for qi, cand, rel in zip(q, cands, rels):
    s_C = e_ND[cand] @ e_ND[qi]
    ap.append(metrics.average_precision_score(rel, s_C))
    ranked = rel[np.argsort(-s_C, kind="stable")][:10]
    rr.append(1 / (ranked.argmax() + 1) if ranked.any() else 0.0)
  return {"map": 100 * np.mean(ap), "mrr_at_10": 100 * np.mean(rr)}


def score_classification(e_ND, train, train_label, test, test_label, seed=0):
  pred = linear_model.LogisticRegression(max_iter=100, random_state=seed).fit(e_ND[train], train_label).predict(e_ND[test])
  return {"accuracy": 100 * metrics.accuracy_score(test_label, pred),
          "f1": 100 * metrics.f1_score(test_label, pred, average="macro")}


def score_clustering(e_ND, text, text_label, seed=0):
  km = cluster.MiniBatchKMeans(n_clusters=len(set(text_label)), batch_size=500, n_init="auto", random_state=seed)
  return {"v_measure": 100 * metrics.v_measure_score(text_label, km.fit_predict(e_ND[text]))}


SCORERS = {"sts": score_sts, "pair": score_pair, "retrieval": score_retrieval, "reranking": score_reranking,
           "classification": score_classification, "clustering": score_clustering}


def normalize(x_ND):
  return x_ND / np.maximum(np.linalg.norm(x_ND, axis=1, keepdims=True), 1e-12)


def check_dims(dims, full_dim) -> tuple:
  dims = tuple(dict.fromkeys(dims or (full_dim,)))
  for d in dims:
    if not 0 < d <= full_dim:
      raise EvalError(f"dim {d} out of range: the embeddings have {full_dim} dims")
  return dims


def evaluate_tasks(encoder, tasks, dims=None, *, batch_size=64) -> dict[str, float]:
  """{'NAME/METRIC@DIM': value} for every task and dim, with one encode call per task.

  encoder: an encode.Embedder (called with normalize=False) or a function texts -> [N, D]
  array. tasks: Task objects or spec strings. dims: Matryoshka dims (default: the full dim);
  each scores the L2-normalised first d coordinates of the full embeddings.
  """
  tasks = [t if isinstance(t, Task) else parse_task(t) for t in tasks]
  names = [t.name for t in tasks]
  if len(set(names)) < len(names):
    raise EvalError(f"task names {names} repeat; name them apart with NAME=KIND:PATH")
  if hasattr(encoder, "encode"):
    check_dims(dims, encoder.dim)  # Fail before encoding.
    encoder = functools.partial(encoder.encode, batch_size=batch_size, normalize=False)
  out = {}
  for task in tasks:
    emb_ND = np.asarray(encoder(task.texts), np.float32)
    for d in check_dims(dims, emb_ND.shape[1]):
      for metric, value in SCORERS[task.kind](normalize(emb_ND[:, :d]), **task.data).items():
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
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
  args = parser.parse_args(argv)
  try:
    tasks = [parse_task(s) for s in args.task]  # Data errors surface before the model loads.
    results = evaluate_tasks(encode.load_embedder(args.model_dir, args.dtype), tasks, args.dims,
                             batch_size=args.batch_size)
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
