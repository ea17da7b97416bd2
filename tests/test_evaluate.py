"""Evaluators vs independent references, one encoding pass for all dims, CLI, errors, mteb adapter.

PICCOLO_EVAL_FULL=1 runs the sentence-transformers comparison on all of STS-B dev (slow).
"""
import csv
import json
import os
import zlib

import numpy as np
import pytest
from scipy import stats

from piccolo_jax import convert, encode, search
from piccolo_jax import evaluate as ev
from piccolo_jax.mteb_adapter import MtebEncoder


def hash_vec(text, D=16):
  return np.random.default_rng(zlib.crc32(text.encode())).normal(size=D).astype(np.float32)


class HashEncoder:
  """A deterministic fake encoder (random vector per text) that counts its calls."""
  dim = 16

  def __init__(self):
    self.calls = 0

  def __call__(self, texts):
    self.calls += 1
    return np.stack([hash_vec(t) for t in texts])

  def encode(self, texts, batch_size=32, max_length=None, dim=None, normalize=True):  # Embedder's signature.
    return search.normalize(self(texts)[:, :dim])


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
  return path


def stsb_rows(data_dir):
  with open(data_dir / "sts-b-en" / "sts-b-en.dev.tsv", encoding="utf-8") as f:
    return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


@pytest.fixture(scope="module")
def minilm_jax(minilm_path, tmp_path_factory):
  out = tmp_path_factory.mktemp("conv") / "minilm"
  convert.convert(minilm_path, out)
  return out


def test_stsb_dev_matches_sentence_transformers(minilm_path, data_dir, tmp_path, capsys):
  st_lib = pytest.importorskip("sentence_transformers")
  rows = stsb_rows(data_dir)
  rows = rows if os.environ.get("PICCOLO_EVAL_FULL") else rows[:301]  # header + 300 pairs
  dev = tmp_path / "sts-b-en.dev.tsv"
  dev.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
  # Through the CLI, on the sentence-transformers dir itself (converted on the fly).
  ev.main([str(minilm_path), "--task", f"sts:{dev}", "--dims", "128,384",
           "--output", str(tmp_path / "r.json")])
  ours = json.loads((tmp_path / "r.json").read_text())["metrics"]
  assert capsys.readouterr().out.splitlines()[1].startswith("sts-b-en/spearman ")
  st = st_lib.SentenceTransformer(str(minilm_path), device="cpu")
  a = st.encode([r[6] for r in rows[1:]], batch_size=64, normalize_embeddings=True)
  b = st.encode([r[7] for r in rows[1:]], batch_size=64, normalize_embeddings=True)
  gold = [float(r[5]) for r in rows[1:]]
  for d in (128, 384):
    ref = 100 * stats.spearmanr((unit(a[:, :d]) * unit(b[:, :d])).sum(1), gold)[0]
    print(f"STS-B dev ({len(gold)} pairs) spearman@{d}: ours {ours[f'sts-b-en/spearman@{d}']:.4f}, "
          f"sentence-transformers {ref:.4f}")
    assert abs(ours[f"sts-b-en/spearman@{d}"] - ref) <= 0.01


def test_four_dims_cost_one_encode_pass(minilm_jax, data_dir, tmp_path, monkeypatch):
  rows = stsb_rows(data_dir)[1:61]
  (tmp_path / "s.tsv").write_text("".join(f"{r[6]}\t{r[7]}\t{r[5]}\n" for r in rows), encoding="utf-8")
  write_jsonl(tmp_path / "r.jsonl", [{"query": r[6], "pos": [r[7]], "neg": [rows[i - 1][7]]}
                                     for i, r in enumerate(rows)])
  embedder = encode.Embedder.load(minilm_jax)
  calls = []
  real = embedder.encode
  monkeypatch.setattr(embedder, "encode", lambda texts, **kw: calls.append(kw) or real(texts, **kw))
  dims = (32, 64, 128, 384)
  res = ev.evaluate_tasks(embedder, [f"sts:{tmp_path / 's.tsv'}", f"retrieval:{tmp_path / 'r.jsonl'}"], dims)
  assert len(calls) == 2 and all(kw["normalize"] is False for kw in calls)  # One pass per task.
  assert {k.rsplit("@", 1)[1] for k in res} == {str(d) for d in dims}
  for d in (32, 128):  # Each dim equals a separate encode at that dim.
    a = real([r[6] for r in rows], dim=d)
    b = real([r[7] for r in rows], dim=d)
    ref = 100 * stats.spearmanr((a * b).sum(1), [float(r[5]) for r in rows])[0]
    assert res[f"s/spearman@{d}"] == pytest.approx(ref, abs=1e-3)


def reference_retrieval(q_QD, c_CD, relevant):
  """Straightforward per-query metrics from a full sort; relevant: corpus indices per query."""
  out = {m: [] for m in ("ndcg_at_10", "mrr_at_10", "recall_at_1", "recall_at_10", "recall_at_100")}
  for s_C, rel in zip(q_QD @ c_CD.T, relevant):
    order = list(np.argsort(-s_C))
    ranks = sorted(order.index(r) + 1 for r in rel)  # 1-based
    dcg = sum(1 / np.log2(r + 1) for r in ranks if r <= 10)
    out["ndcg_at_10"].append(dcg / sum(1 / np.log2(r + 1) for r in range(1, min(len(rel), 10) + 1)))
    out["mrr_at_10"].append(1 / ranks[0] if ranks[0] <= 10 else 0.0)
    for k in (1, 10, 100):
      out[f"recall_at_{k}"].append(sum(r <= k for r in ranks) / len(rel))
  return {m: 100 * np.mean(v) for m, v in out.items()}


@pytest.fixture(scope="module")
def retrieval_case(tmp_path_factory):
  """40 queries, 150 documents, 1-3 relevant each, as triplets jsonl and as a BEIR dir."""
  rng = np.random.default_rng(0)
  root = tmp_path_factory.mktemp("retrieval")
  docs = [f"document {j}" for j in range(150)]
  rel = [sorted(rng.choice(150, rng.integers(1, 4), replace=False)) for _ in range(40)]
  negs = [[j % 150 for j in range(4 * i, 4 * i + 4) if j % 150 not in r] for i, r in enumerate(rel)]
  rows = [{"query": f"query {i}", "pos": [docs[j] for j in r], "neg": [docs[j] for j in n]}
          for i, (r, n) in enumerate(zip(rel, negs))]  # Together, the negatives cover all documents.
  write_jsonl(root / "triplets.jsonl", rows)
  (root / "beir").mkdir()
  write_jsonl(root / "beir" / "corpus.jsonl", [{"_id": f"d{j}", "title": "", "text": t}
                                               for j, t in enumerate(docs)])
  write_jsonl(root / "beir" / "queries.jsonl", [{"_id": f"q{i}", "text": f"query {i}"} for i in range(45)])
  (root / "beir" / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
      f"q{i}\td{j}\t1\n" for i, r in enumerate(rel) for j in r) + "q0\td149\t0\n", encoding="utf-8")
  return root, docs, rel


def test_retrieval_matches_numpy_reference(retrieval_case):
  root, docs, rel = retrieval_case
  enc = HashEncoder()
  res = ev.evaluate_tasks(enc, [f"retrieval:{root / 'triplets.jsonl'}", f"beir=retrieval:{root / 'beir'}"],
                          (8, 16))
  assert enc.calls == 2
  q = np.stack([hash_vec(f"query {i}") for i in range(40)])
  c = np.stack([hash_vec(t) for t in docs])
  for d in (8, 16):
    ref = reference_retrieval(unit(q[:, :d]), unit(c[:, :d]), rel)
    for m, v in ref.items():
      assert res[f"triplets/{m}@{d}"] == pytest.approx(v, abs=1e-9), (m, d)
      assert res[f"beir/{m}@{d}"] == pytest.approx(v, abs=1e-9), (m, d)
  assert 0 < res["triplets/ndcg_at_10@16"] < 100
  assert res["triplets/recall_at_100@16"] > res["triplets/recall_at_10@16"]


def test_retrieval_hand_made_ranks():
  # Query 0: relevant docs at ranks 2 and 4; query 1: its only relevant doc at rank 1.
  top = np.array([[5, 1, 6, 2, 7], [3, 0, 1, 2, 4]])
  res = ev.retrieval_metrics(top, [np.array([1, 2]), np.array([3])], ks=(1, 10))
  ndcg0 = (1 / np.log2(3) + 1 / np.log2(5)) / (1 + 1 / np.log2(3))
  assert res["ndcg_at_10"] == pytest.approx(100 * (ndcg0 + 1) / 2)
  assert res["mrr_at_10"] == pytest.approx(100 * (1 / 2 + 1) / 2)
  assert res["recall_at_1"] == pytest.approx(50) and res["recall_at_10"] == pytest.approx(100)


def average_precision(rel, scores):
  """Mean over relevant items of the precision at their rank (full sort)."""
  rel = np.asarray(rel, bool)[np.argsort(-np.asarray(scores))]
  return np.mean([rel[:i + 1].mean() for i in np.flatnonzero(rel)])


def test_sts_pair_and_reranking_match_references(tmp_path):
  rng = np.random.default_rng(2)
  pairs = [(f"a {i}", f"b {i % 25}") for i in range(60)]
  gold = rng.uniform(0, 5, 60).round(1)
  (tmp_path / "sts.tsv").write_text("".join(f"{a}\t{b}\t{g}\n" for (a, b), g in zip(pairs, gold)))
  write_jsonl(tmp_path / "pair.jsonl", [{"sentence1": a, "sentence2": b, "label": int(g > 2.5)}
                                        for (a, b), g in zip(pairs, gold)])
  rr = [{"query": f"q {i}", "pos": [f"p {i} {j}" for j in range(1 + i % 3)],
         "neg": [f"n {i} {j}" for j in range(6)]} for i in range(30)]
  write_jsonl(tmp_path / "rr.jsonl", rr + [{"query": "no negatives", "pos": ["x"], "neg": []}])
  res = ev.evaluate_tasks(HashEncoder(), [f"sts:{tmp_path / 'sts.tsv'}", f"pair:{tmp_path / 'pair.jsonl'}",
                                          f"reranking:{tmp_path / 'rr.jsonl'}"], (4, 16))
  for d in (4, 16):
    e = lambda t: unit(hash_vec(t)[:d])
    cos = np.array([e(a) @ e(b) for a, b in pairs])
    assert res[f"sts/spearman@{d}"] == pytest.approx(100 * stats.spearmanr(cos, gold)[0])
    assert res[f"sts/pearson@{d}"] == pytest.approx(100 * np.corrcoef(cos, gold)[0, 1])
    assert res[f"pair/ap@{d}"] == pytest.approx(100 * average_precision(gold > 2.5, cos))
    aps, rrs = [], []
    for r in rr:
      s = [e(r["query"]) @ e(t) for t in r["pos"] + r["neg"]]
      rel = [True] * len(r["pos"]) + [False] * len(r["neg"])
      aps.append(average_precision(rel, s))
      first = 1 + min(int(np.sum(np.array(s) > s[j])) for j in range(len(r["pos"])))
      rrs.append(1 / first if first <= 10 else 0)
    assert res[f"rr/map@{d}"] == pytest.approx(100 * np.mean(aps))
    assert res[f"rr/mrr_at_10@{d}"] == pytest.approx(100 * np.mean(rrs))


def test_classification_and_clustering(tmp_path):
  from sklearn.linear_model import LogisticRegression
  from sklearn.metrics import f1_score
  rng = np.random.default_rng(3)
  centers = {lab: rng.normal(size=16) * 3 for lab in ("sport", "finance", "tech")}
  table = {}

  def rows(n, tag):
    out = []
    for i in range(n):
      lab = list(centers)[i % 3]
      table[f"{tag} {i}"] = centers[lab] + rng.normal(size=16)
      out.append({"text": f"{tag} {i}", "label": lab})
    return out

  write_jsonl(tmp_path / "train.jsonl", rows(60, "train"))
  write_jsonl(tmp_path / "test.jsonl", rows(30, "test"))
  clu = "".join(f"{r['text']}\t{r['label']}\n" for r in rows(45, "c"))
  (tmp_path / "clu.tsv").write_text("text\tlabel\n" + clu)
  enc = lambda texts: np.stack([table[t] for t in texts])
  res = ev.evaluate_tasks(enc, [f"cls=classification:{tmp_path / 'train.jsonl'},{tmp_path / 'test.jsonl'}",
                                f"clustering:{tmp_path / 'clu.tsv'}"], (16,))
  train, test = ([json.loads(l) for l in open(tmp_path / f)] for f in ("train.jsonl", "test.jsonl"))
  x = lambda rs: unit(np.stack([table[r["text"]] for r in rs]))
  clf = LogisticRegression(max_iter=100, random_state=0).fit(x(train), [r["label"] for r in train])
  pred, gold = clf.predict(x(test)), [r["label"] for r in test]
  assert res["cls/accuracy@16"] == pytest.approx(100 * np.mean(pred == np.array(gold)))
  assert res["cls/f1@16"] == pytest.approx(100 * f1_score(gold, pred, average="macro"))
  assert res["cls/accuracy@16"] > 90 and res["clu/v_measure@16"] == pytest.approx(100)  # Separable.


ERRORS = {  # name: (kind, file name, content, message)
    "unknown kind": ("regression", "x.jsonl", "{}\n",
                     r"unknown task kind 'regression', expected one of sts, pair"),
    "bad json": ("retrieval", "r.jsonl", '{"query": "a", "pos": ["b"]}\n\n{"query": oops}\n',
                 r"r.jsonl: line 3: not valid JSON"),
    "missing field": ("retrieval", "r.jsonl", '{"query": "a", "pos": ["b"]}\n{"pos": ["b"]}\n',
                      r"r.jsonl: line 2: missing field 'query'"),
    "pos not strings": ("reranking", "r.jsonl", '{"query": "a", "pos": [1], "neg": ["c"]}\n',
                       r"r.jsonl: line 1: field 'pos': expected a string, got int"),
    "bad score": ("sts", "s.tsv", "a\tb\t1\nc\td\thigh\n",
                  r"s.tsv: line 2: field 'score': expected a finite number, got 'high'"),
    "bad label": ("sts", "s.jsonl", '{"sentence1": "a", "sentence2": "b", "label": null}\n',
                  r"s.jsonl: line 1: field 'label': expected a finite number, got None"),
    "columns": ("sts", "s.tsv", "a\tb\t1\nc\td\n", r"s.tsv: line 2: expected 3 tab-separated columns"),
    "empty": ("sts", "s.tsv", "\n", r"s.tsv: no usable rows \(empty split\)"),
    "header only": ("sts", "s.tsv", "sentence1\tsentence2\tscore\n", r"s.tsv: no usable rows"),
    "no positives": ("retrieval", "r.jsonl", '{"query": "a", "pos": [], "neg": ["c"]}\n',
                     r"r.jsonl: no usable queries"),
    "pair label": ("pair", "p.jsonl", '{"sentence1": "a", "sentence2": "b", "label": 2}\n',
                   r"p.jsonl: line 1: .*must be 0 or 1"),
    "one label": ("clustering", "c.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 1}\n',
                  r"c.jsonl: clustering needs at least 2 distinct labels"),
    "no test file": ("classification", "c.jsonl", '{"text": "a", "label": 1}\n', r"expected TRAIN,TEST"),
    "suffix": ("sts", "s.csv", "a,b,1\n", r"s.csv: unsupported file type '.csv'"),
    "utf8": ("sts", "s.tsv", b"a\tb\t1\n\xff\tb\t1\n", r"s.tsv: line 2: not valid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors_name_file_and_line(case, tmp_path, capsys):
  kind, name, content, message = ERRORS[case]
  (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
  with pytest.raises(ev.EvalError, match=message):
    ev.parse_task(f"{kind}:{tmp_path / name}")
  with pytest.raises(SystemExit) as e:  # The CLI checks data before loading the (here missing) model.
    ev.main([str(tmp_path / "no-model"), "--task", f"{kind}:{tmp_path / name}"])
  assert e.value.code == 2 and capsys.readouterr().err.startswith("error: ")


def test_spec_model_and_dim_errors(tmp_path, capsys):
  write_jsonl(tmp_path / "r.jsonl", [{"query": "a", "pos": ["b"]}])
  for spec, message in [("sts", r"expected \[NAME=\]KIND:PATH"),
                        (f"sts:{tmp_path / 'nope.tsv'}", "nope.tsv: no such file"),
                        (f"beir=retrieval:{tmp_path}", "needs qrels.tsv"),
                        (f"reranking:{tmp_path}", "a directory, expected a file")]:
    with pytest.raises(ev.EvalError, match=message):
      ev.parse_task(spec)
  with pytest.raises(ev.EvalError, match="dim 32 out of range: the embeddings have 16 dims"):
    ev.evaluate_tasks(HashEncoder(), [f"retrieval:{tmp_path / 'r.jsonl'}"], (8, 32))
  with pytest.raises(ev.EvalError, match="task names .* repeat"):
    ev.evaluate_tasks(HashEncoder(), [f"retrieval:{tmp_path / 'r.jsonl'}"] * 2)
  (tmp_path / "beir").mkdir()
  write_jsonl(tmp_path / "beir" / "corpus.jsonl", [{"_id": "d1", "text": "x"}])
  write_jsonl(tmp_path / "beir" / "queries.jsonl", [{"_id": "q1", "text": "y"}])
  (tmp_path / "beir" / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td7\t1\n")
  with pytest.raises(ev.EvalError, match=r"qrels.tsv: line 3: unknown corpus id 'd7'"):
    ev.parse_task(f"retrieval:{tmp_path / 'beir'}")
  with pytest.raises(SystemExit):
    ev.main([str(tmp_path), "--task", f"retrieval:{tmp_path / 'r.jsonl'}"])
  assert "not a piccolo_jax model dir" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    ev.main(["--help"])
  assert "clustering" in capsys.readouterr().out


def test_column_names_in_the_spec(data_dir, retrieval_case, tmp_path):
  rows = stsb_rows(data_dir)[:81]  # The real header (sentence1, sentence2, score among others) + 80 pairs.
  (tmp_path / "orig.tsv").write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
  (tmp_path / "renamed.tsv").write_text("label\ttext2\ttext1\n" + "".join(  # Other names, in another order.
      f"{r[5]}\t{r[7]}\t{r[6]}\n" for r in rows[1:]), encoding="utf-8")
  write_jsonl(tmp_path / "renamed.jsonl", [{"a": r[6], "b": r[7], "gold": float(r[5])} for r in rows[1:]])
  root, _, _ = retrieval_case
  triplets = [json.loads(line) for line in open(root / "triplets.jsonl", encoding="utf-8")]
  write_jsonl(tmp_path / "q.jsonl", [{"question": r["query"], "positive": r["pos"], "neg": r["neg"]} for r in triplets])
  clusters = [{"text": f"t {i}", "label": i % 3} for i in range(30)]
  write_jsonl(tmp_path / "clu.jsonl", clusters)
  write_jsonl(tmp_path / "clu-renamed.jsonl", [{"sentence": r["text"], "topic": r["label"]} for r in clusters])
  res = ev.evaluate_tasks(HashEncoder(), [
      f"sts:{tmp_path / 'orig.tsv'}", f"tsv=sts:{tmp_path / 'renamed.tsv'}?sentence1=text1&sentence2=text2&score=label",
      f"jsonl=sts:{tmp_path / 'renamed.jsonl'}?sentence1=a&sentence2=b&score=gold",
      f"retrieval:{root / 'triplets.jsonl'}", f"r=retrieval:{tmp_path / 'q.jsonl'}?query=question&pos=positive",
      f"clustering:{tmp_path / 'clu.jsonl'}", f"clustering:{tmp_path / 'clu-renamed.jsonl'}?text=sentence&label=topic"])
  for task, renamed in [("orig", "tsv"), ("orig", "jsonl"), ("triplets", "r"), ("clu", "clu-renamed")]:
    ours = {k.split("/", 1)[1]: v for k, v in res.items() if k.startswith(task + "/")}
    assert ours and ours == {k.split("/", 1)[1]: v for k, v in res.items() if k.startswith(renamed + "/")}
  assert 0 < res["orig/spearman@16"] < 100
  errors = {"sentence=a": "unknown column 'sentence' for sts, expected one of sentence1, sentence2, score",
            "score": "expected COLUMN=FIELD, got 'score'",
            "sentence1=a&sentence2=b": r"renamed.jsonl: line 1: missing field 'score' \(or \('label',\)\)",
            "sentence1=a&sentence2=b&score=label": "renamed.jsonl: line 1: missing field 'label'$"}
  for mapping, message in errors.items():
    with pytest.raises(ev.EvalError, match=message):
      ev.parse_task(f"sts:{tmp_path / 'renamed.jsonl'}?{mapping}")
  with pytest.raises(ev.EvalError, match="a BEIR directory takes no column names"):
    ev.parse_task(f"retrieval:{root / 'beir'}?query=text")


def test_cli_max_length(minilm_jax, data_dir, tmp_path):
  rows = stsb_rows(data_dir)[1:31]
  (tmp_path / "s.tsv").write_text("".join(f"{r[6]}\t{r[7]}\t{r[5]}\n" for r in rows), encoding="utf-8")
  spec = f"sts:{tmp_path / 's.tsv'}"
  ev.main([str(minilm_jax), "--task", spec, "--max-length", "6", "--output", str(tmp_path / "r.json")])
  cli = json.loads((tmp_path / "r.json").read_text())["metrics"]
  embedder = encode.Embedder.load(minilm_jax)
  assert cli == pytest.approx(ev.evaluate_tasks(embedder, [spec], max_length=6), abs=1e-9)
  assert abs(cli["s/spearman@384"] - ev.evaluate_tasks(embedder, [spec])["s/spearman@384"]) > 0.1


def test_mteb_adapter_protocol(minilm_jax):
  embedder = encode.Embedder.load(minilm_jax)
  model = MtebEncoder(embedder, dim=128, query_prefix="query: ", batch_size=8)
  texts = ["A man is playing a guitar.", "Un homme joue de la guitare.", "孩子在骑马。"]
  # mteb 1.x: a list of strings plus keyword arguments to ignore.
  q = model.encode(texts, task_name="LocalSTS", prompt_type="query", batch_size=4, show_progress_bar=False)
  np.testing.assert_allclose(q, embedder.encode([f"query: {t}" for t in texts], dim=128), atol=1e-6)
  # mteb 2.x: batches {"text": [...]} with task_metadata/hf_split/hf_subset.
  p = model.encode([{"text": texts[:2]}, {"text": texts[2:]}], task_metadata=None, hf_split="test",
                   hf_subset="default", prompt_type=None)
  np.testing.assert_allclose(p, embedder.encode(texts, dim=128), atol=1e-6)
  assert q.shape == p.shape == (3, 128) and q.dtype == np.float32
  np.testing.assert_allclose(model.similarity(p, p[:2]), p @ p[:2].T, atol=1e-6)
  np.testing.assert_allclose(model.similarity_pairwise(p, q), (p * q).sum(1), atol=1e-6)
  assert model.encode([]).shape == (0, 128)
  with pytest.raises(TypeError, match="list of strings"):
    model.encode([1, 2])


def test_official_mteb_on_local_tasks(retrieval_case):
  """Runs only where `mteb` is installed: mteb's STS and retrieval (pytrec_eval) scores equal ours."""
  mteb = pytest.importorskip("mteb")
  from datasets import Dataset, DatasetDict
  from mteb.abstasks.retrieval import AbsTaskRetrieval
  from mteb.abstasks.sts import AbsTaskSTS
  from mteb.abstasks.task_metadata import TaskMetadata
  root, docs, rel = retrieval_case
  meta = dict(description="local", reference=None, dataset={"path": "NA", "revision": "NA"},
              category="t2t", eval_splits=["test"], eval_langs=["eng-Latn"], date=None, dialect=[],
              domains=[], task_subtypes=[], license="cc-by-4.0", annotations_creators="derived",
              modalities=["text"], sample_creation="found", bibtex_citation="")
  pairs = [(f"a {i}", f"b {i}", float(i % 6)) for i in range(40)]

  class LocalSTS(AbsTaskSTS):
    metadata = TaskMetadata(type="STS", name="LocalSTS", main_score="cosine_spearman", **meta)
    min_score, max_score = 0, 5

    def load_data(self, **_):
      columns = dict(zip(("sentence1", "sentence2", "score"), zip(*pairs)))
      self.dataset = DatasetDict({"test": Dataset.from_dict(columns)})
      self.data_loaded = True

  class LocalRetrieval(AbsTaskRetrieval):
    metadata = TaskMetadata(type="Retrieval", name="LocalRetrieval", main_score="ndcg_at_10", **meta)

    def load_data(self, **_):
      corpus = [{"id": f"d{j}", "title": "", "text": t} for j, t in enumerate(docs)]
      split = {"corpus": Dataset.from_list(corpus),
               "queries": Dataset.from_list([{"id": f"q{i}", "text": f"query {i}"} for i in range(len(rel))]),
               "relevant_docs": {f"q{i}": {f"d{j}": 1 for j in r} for i, r in enumerate(rel)},
               "top_ranked": None}
      self.dataset = {"default": {"test": split}}
      self.data_loaded = True

  enc = HashEncoder()
  result = mteb.evaluate(MtebEncoder(enc, dim=8), [LocalSTS(), LocalRetrieval()], cache=None,
                         show_progress_bar=False)
  scores = {r.task_name: r.scores["test"][0] for r in result.task_results}
  (root / "sts.tsv").write_text("".join(f"{a}\t{b}\t{s}\n" for a, b, s in pairs))
  ours = ev.evaluate_tasks(enc, [f"sts:{root / 'sts.tsv'}", f"retrieval:{root / 'beir'}"], (8,))
  assert 100 * scores["LocalSTS"]["cosine_spearman"] == pytest.approx(ours["sts/spearman@8"], abs=1e-4)
  for m in ("ndcg_at_10", "mrr_at_10", "recall_at_1", "recall_at_10", "recall_at_100"):
    assert 100 * scores["LocalRetrieval"][m] == pytest.approx(ours[f"beir/{m}@8"], abs=1e-3), m
