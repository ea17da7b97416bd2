"""Input pipeline: real bundled data, the MiniLM tokenizer and the TFDS fixture."""
import collections
import json
import os
import pickle
import pathlib
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from piccolo_jax import config
from piccolo_jax import data
from piccolo_jax import losses
from piccolo_jax import prepare
from piccolo_jax import sharding
from piccolo_jax import sources
from piccolo_jax import step as step_lib
from piccolo_jax import tasks

REPO = pathlib.Path(__file__).resolve().parent.parent
TFDS_DIR = REPO / "tests" / "fixtures" / "tfds"
G = 8  # global batch


@pytest.fixture(scope="module")
def tok(minilm_path):
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(str(minilm_path))


@pytest.fixture(scope="module")
def small(data_dir, tmp_path_factory):
  """Piccolo example (meta list, retrieval repeated twice) + the TFDS fixture."""
  meta = tmp_path_factory.mktemp("meta") / "piccolo-ft.txt"
  meta.write_text("cls.dataset 1\nretri.dataset 2\nsts.dataset 1\n")
  return config.section(
      "data", datasets=({"kind": "meta", "path": str(meta), "root": str(data_dir / "piccolo_example")},
                {"kind": "tfds", "name": "retrieval_zh_tiny", "data_dir": str(TFDS_DIR)}),
      global_batch_size=G, neg_num=2, seed=3, packing=False)


@pytest.fixture(scope="module")
def small_tables(small, tok):
  return data.load_tables(small, tok)


@pytest.fixture(scope="module")
def big(data_dir):
  """The shared jsonl/tsv data."""
  return config.section("data", datasets=(
      {"kind": "jsonl", "path": str(data_dir / "retrieval-zh/triplets.train.jsonl")},
      {"kind": "tsv", "path": str(data_dir / "sts-b-en/sts-b-en.train.tsv")},
      {"kind": "tsv", "path": str(data_dir / "sts-b-zh/sts-b-zh.train.tsv"), "repeat": 2}),
      global_batch_size=32, query_prefix="query: ", passage_prefix="passage: ", packing=False)


@pytest.fixture(scope="module")
def big_tables(big, tok):
  return data.load_tables(big, tok)


FIELDS = {"retrieval": {"query", "pos", "neg"}, "sts": {"text_a", "text_b"},
          "cls": {"query", "pos", "neg"}}


def _take(it, n):
  """n batches, arrays and meta merged into one dict each."""
  out = [a | m for a, m in (next(it) for _ in range(n))]
  it.close()
  return out


def _take_one(it):
  arrays, meta = next(it)
  return arrays | meta


def _batch(batcher, step):
  arrays, meta = batcher(step)
  return arrays | meta


def _rows(entry, c=None):
  """The validated rows of a dataset entry as (query, pos, neg, label) tuples."""
  return list(sources.read(entry, c))


def _texts(t, slot, ids, tok):
  return [tok.decode(t.tokens(slot, int(i)), skip_special_tokens=True) for i in ids]


def _prepare(entry, tok, root, **c):
  return prepare.Prepared(prepare.prepare(entry, config.section("data", **c), tok, root))


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_sources_read_every_format(small, small_tables, big_tables, data_dir):
  got = {t.name: (t.task, len(t)) for t in small_tables + big_tables}
  assert got == {
      "cls.dataset": ("cls", 51), "retri.dataset": ("retrieval", 51),
      "sts.dataset": ("sts", 51), "tfds:retrieval_zh_tiny/train": ("retrieval", 40),
      str(data_dir / "retrieval-zh/triplets.train.jsonl"): ("retrieval", 2200),
      str(data_dir / "sts-b-en/sts-b-en.train.tsv"): ("sts", 5749),
      str(data_dir / "sts-b-zh/sts-b-zh.train.tsv"): ("sts", 5231)}
  with pa.OSFile(str(data_dir / "piccolo_example/cls.dataset/data-00000-of-00001.arrow")) as f:
    row = pa.ipc.open_stream(f).read_all().slice(7, 1).to_pylist()[0]
  entries = sources.expand(small.datasets)
  assert _rows(entries[0])[7] == (row["text"], [row["text_pos"]], row["text_neg"], 0.0)
  triplets = [json.loads(l) for l in open(data_dir / "retrieval-zh/triplets.train.jsonl")]
  tfds_rows = {q: n for q, _, n, _ in _rows(entries[3])}
  assert tfds_rows.keys() == {r["query"] for r in triplets[:40]}  # TFDS shuffled them
  assert tfds_rows[triplets[5]["query"]] == triplets[5]["neg"][:3]
  assert "tensorflow" not in sys.modules
  assert _rows({"kind": "tsv", "path": str(data_dir / "sts-b-en/sts-b-en.train.tsv")})[0] == (
      "A plane is taking off.", ["An air plane is taking off."], [], 5.0)


def test_prepared_tokens_are_the_tokenizers(small, small_tables, big, big_tables, tok):
  """Every stored token sequence is the tokenizer's output for prefix + text at the field's cap."""
  caps = tasks.caps(small)
  for c, tables in ((small, small_tables), (big, big_tables)):
    for entry, t in zip(sources.expand(c.datasets), tables):
      reader = sources.read(entry, c)
      rows = list(reader)
      assert len(rows) == len(t) and t.skipped == reader.skipped and t.task == reader.task.name
      enc = lambda text, slot: tok(text, truncation=True, max_length=caps[t.task, slot])["input_ids"]
      qp, pp = reader.prefix("query_prefix"), reader.prefix("passage_prefix")
      classes = list(dict.fromkeys(p[0] for _, p, _, _ in rows))
      for i in range(0, len(rows), max(1, len(rows) // 50)):
        q, pos, neg, label = rows[i]
        if reader.label_layout:  # cls label rows: the other classes, in order of appearance
          neg = [m for m in classes if m != pos[0]]
        assert list(t.tokens("query", i)) == enc(qp + q, "query")
        for texts, off, ids in ((pos, t.pos_off, t.pos_ids), (neg, t.neg_off, t.neg_ids)):
          assert [list(t.tokens("pos", j)) for j in ids[off[i]:off[i + 1]]] == [enc(pp + x, "pos") for x in texts]
        assert t.labels[i] == np.float32(label)


def test_batches_equal_tokenising_the_selected_texts(big, big_tables, small, small_tables, tok):
  """Today's batches, rebuilt independently: the tokenizer on the selected texts, padded to the width."""
  for c, tables in ((big, big_tables), (config.replace(small, cls_neg_num=130), small_tables)):
    batcher, readers, text = data.Batcher(c, tables), [], []
    for entry, t in zip(sources.expand(c.datasets), tables):
      readers.append(sources.read(entry, c))
      rows, names = list(readers[-1]), {}
      classes = list(dict.fromkeys(p[0] for _, p, _, _ in rows))
      for i, (_, pos, neg, _) in enumerate(rows):
        neg = [m for m in classes if m != pos[0]] if readers[-1].label_layout else neg
        names.update(zip(t.pos_ids[t.pos_off[i]:t.pos_off[i + 1]], pos))
        names.update(zip(t.neg_ids[t.neg_off[i]:t.neg_off[i + 1]], neg))
      text.append(([q for q, *_ in rows], names))
    for step in range(0, 3 * batcher.steps_per_epoch, 11):
      (d, sel), (arrays, meta) = batcher.select(step), batcher(step)
      r, (queries, names) = readers[d], text[d]
      for field, slot, cap, length in batcher.fields(meta["task"], meta["bucket"]):
        ids = sel[slot].reshape(-1)
        texts = ([r.prefix("query_prefix") + queries[i] for i in ids] if slot == "query" else
                 [r.prefix("passage_prefix") + names[i] if i >= 0 else "" for i in ids])
        want = np.zeros((len(texts), length), np.int32)
        for row, seq in enumerate(tok(texts, truncation=True, max_length=cap)["input_ids"]):
          want[row, :len(seq)] = seq
        np.testing.assert_array_equal(arrays[f"{field}_ids"], want, err_msg=f"step {step} {field}")
        np.testing.assert_array_equal(arrays[f"{field}_mask"], want != 0, err_msg=f"step {step} {field}")


def test_prepared_cache_is_keyed_by_source_tokenizer_and_caps(tmp_path, tok, monkeypatch, minilm_path):
  src = tmp_path / "r.jsonl"
  src.write_text("".join(json.dumps({"query": f"q{i}", "pos": [f"p{i}"], "neg": ["n"]}) + "\n" for i in range(8)))
  entry, root = {"kind": "jsonl", "path": str(src)}, tmp_path / "cache"
  first = _prepare(entry, tok, root)
  tok(["a long text"], truncation=True, max_length=2, padding="max_length")  # leaves state on the backend
  assert _prepare({**entry, "repeat": 3}, tok, root).path == first.path  # repeat applies when read
  assert pickle.loads(pickle.dumps(first)).path == first.path and len(pickle.dumps(first)) < 1000
  monkeypatch.setattr(prepare, "_write", lambda *a: pytest.fail("a prepared dataset was rebuilt"))
  assert _prepare(entry, tok, root).path == first.path
  monkeypatch.undo()
  other_tok = type(tok).from_pretrained(str(minilm_path))  # a deepcopy would share the Rust backend
  other_tok.add_tokens(["q1"])
  changed = {"tokenizer": _prepare(entry, other_tok, root),
             "caps": _prepare(entry, tok, root, query_max_len=3),
             "prefix": _prepare(entry, tok, root, query_prefix="query: ")}
  src.write_text(src.read_text() + json.dumps({"query": "new", "pos": ["p"], "neg": ["n"]}) + "\n")
  changed["source"] = _prepare(entry, tok, root)
  assert len({t.path for t in changed.values()} | {first.path}) == 5
  assert len(changed["source"]) == 9 and len(changed["caps"].tokens("query", 0)) == 3
  assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []  # no temporaries left


def test_epoch_counts_homogeneity_and_fields(small, small_tables, tok):
  n = data.steps_per_epoch(small, small_tables)
  assert n == 6 + 2 * 6 + 6 + 5
  decode = lambda ids: tok.decode(ids, skip_special_tokens=True)
  own = {t.name: (t, set(_texts(t, "query", range(len(t)), tok))) for t in small_tables}
  counts = collections.Counter()
  for step, b in enumerate(_take(data.make_iterator(small, small_tables), 2 * n)):
    t, queries = own[b["dataset"]]
    assert b["task"] == t.task and b["step"] == step
    assert {k[:-4] for k in b if k.endswith("_ids")} == FIELDS[t.task]
    first = b["query_ids" if "query_ids" in b else "text_a_ids"]
    assert {decode(ids) for ids in first} <= queries  # every row from the named dataset
    counts[step // n, b["dataset"]] += 1
  for epoch in (0, 1):
    assert {k: v for (e, k), v in counts.items() if e == epoch} == {
        t.name: t.repeat * (len(t) // G) for t in small_tables}


def test_epochs_reshuffle_rows_once_per_copy(small, small_tables, tok):
  batcher = data.Batcher(small, small_tables)
  (ds0, rows0), (ds1, _) = batcher.plan(0), batcher.plan(1)
  assert not np.array_equal(ds0, ds1)
  for d, t in enumerate(small_tables):
    batches = rows0[ds0[:, 0] == d]
    assert all(len(set(r)) == G for r in batches)
    assert max(collections.Counter(batches.ravel()).values()) <= t.repeat


def test_same_seed_same_batches(big, big_tables, tok):
  a = _take(data.make_iterator(big, big_tables), 6)
  b = _take(data.make_iterator(big, big_tables), 6)
  for x, y in zip(a, b):
    _same(x, y)
  other = config.replace(big, seed=1)
  c = _take(data.make_iterator(other, big_tables), 6)
  assert [x["dataset"] for x in a] != [x["dataset"] for x in c] or any(
      not np.array_equal(x[k], y[k]) for x, y in zip(a, c) for k in x if k.endswith("_ids"))


def test_two_processes_concatenate_to_global_batch(big, big_tables, small, small_tables, tok):
  for cfg, tables in ((big, big_tables), (small, small_tables)):
    whole, p0, p1 = (data.Batcher(cfg, tables, i, n) for i, n in ((0, 1), (0, 2), (1, 2)))
    tasks = set()
    for step in range(0, 60, 3):
      (g, gm), (a, am), (b, bm) = whole(step), p0(step), p1(step)
      tasks.add(gm["task"])
      assert am["bucket"] == bm["bucket"] == gm["bucket"]
      assert g.keys() == a.keys() == b.keys()
      for k, v in g.items():
        np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), v, err_msg=k)
    assert len(tasks) >= 2


def test_restore_from_state_continues_exactly(small, small_tables, tok):
  n = data.steps_per_epoch(small, small_tables)
  ref = _take(data.make_iterator(small, small_tables), n + 6)
  it = data.make_iterator(small, small_tables)
  for _ in range(n - 3):  # stop shortly before the epoch boundary
    next(it)
  state = it.get_state()
  it.close()
  resumed = data.make_iterator(small, small_tables)
  resumed.set_state(state)
  for x, y in zip(ref[n - 3:], _take(resumed, 9)):
    _same(x, y)


def test_restore_with_worker_processes(big, big_tables, tok):
  cfg = config.replace(big, worker_count=1)
  ref = _take(data.make_iterator(big, big_tables), 8)
  it = data.make_iterator(cfg, big_tables)
  for x in ref[:4]:
    _same(x, _take_one(it))
  state = it.get_state()
  it.close()
  it = data.make_iterator(cfg, big_tables)
  it.set_state(state)
  for x in ref[4:]:
    _same(x, _take_one(it))
  it.close()


def test_sampling_prefixes_and_lengths(big, big_tables, tok):
  batcher = data.Batcher(big, big_tables)
  t = big_tables[0]
  step = next(s for s in range(100) if batcher.select(s)[0] == 0)
  _, sel = batcher.select(step)
  for i, row in enumerate(sel["query"]):
    assert sel["pos"][i] in t.pos_ids[t.pos_off[row]:t.pos_off[row + 1]]
    assert sel["neg"][i, 0] in t.neg_ids[t.neg_off[row]:t.neg_off[row + 1]]
  b = _batch(batcher, step)
  width = {f: n for f, _, _, n in batcher.fields("retrieval", b["bucket"])}
  assert width["query"] == 64 and width["pos"] == width["neg"] <= b["bucket"]
  assert {f: b[f + "_ids"].shape for f in width} == {f: (32, n) for f, n in width.items()}
  assert (b["query_mask"].sum(1) == t.q_len(sel["query"])).all()  # the length index is exact
  assert (b["neg_mask"].sum(1) == t.p_len(sel["neg"][:, 0])).all()
  prefix = tok("passage: ", add_special_tokens=False)["input_ids"]
  assert list(b["pos_ids"][0, 1:1 + len(prefix)]) == prefix
  assert b["pad_frac"] == pytest.approx(1 - sum(b[k].sum() for k in b if k.endswith("_mask"))
                                        / sum(b[k].size for k in b if k.endswith("_mask")))
  shapes = collections.defaultdict(set)
  for s in range(0, 400, 4):
    arrays, meta = batcher(s)
    shapes[meta["task"]].add(tuple(arrays[k].shape for k in sorted(arrays) if k.endswith("_ids")))
  assert all(len(v) <= len(big.buckets) for v in shapes.values())


def test_negatives_fixed_k_and_cls_padding(small, small_tables, tok):
  cfg = config.replace(small, neg_num=3, cls_neg_num=130)
  batcher = data.Batcher(cfg, small_tables)
  for step in range(batcher.steps_per_epoch):
    b, (d, sel) = _batch(batcher, step), batcher.select(step)
    t = small_tables[d]
    if t.task == "retrieval":
      assert b["neg_ids"].shape[0] == 3 * G
    if t.name == "retri.dataset":  # 1 negative per row: padded to K=3 and masked, as the original
      assert (sel["neg"][:, 0] >= 0).all() and (sel["neg"][:, 1:] == -1).all()
      assert b["neg_valid"].tolist() == [[True, False, False]] * G
    if t.name.startswith("tfds"):  # 3 negatives per row: all, without replacement
      assert all(sorted(r) == sorted(t.neg_ids[t.neg_off[q]:t.neg_off[q + 1]])
                 for q, r in zip(sel["query"], sel["neg"]))
    if t.task == "cls":  # 118 label negatives each, without replacement, padded to 130
      assert b["neg_valid"].shape == (G, 130) and b["neg_valid"].sum(1).tolist() == [118] * G
      assert all(len(set(r[:118])) == 118 for r in sel["neg"])
      assert (b["neg_mask"].reshape(G, 130, -1)[:, 118:].sum(-1) == 2).all()  # "" -> CLS SEP
      assert b["neg_ids"].shape[1] <= 32 < b["query_ids"].shape[1]  # short label fields
  (d0, s0), (d1, s1) = batcher.select(0), batcher.select(batcher.steps_per_epoch)
  assert d0 != d1 or not np.array_equal(s0["query"], s1["query"])


def test_put_batch(big, big_tables, tok):
  mesh = sharding.make_mesh(2)
  b, _ = data.Batcher(big, big_tables)(0)
  g = sharding.put_batch(b, mesh)
  assert g.keys() == b.keys()
  for k, v in b.items():
    assert g[k].shape == v.shape and len(g[k].sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(g[k]), v)


def test_jsonl_pairs_and_label_triplets(tmp_path, tok):
  cls = tmp_path / "cls.jsonl"
  cls.write_text("".join(json.dumps({"text": f"t{i}", "label": ["a", "b", "c"][i % 3]}) + "\n"
                         for i in range(12)))
  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text("".join(json.dumps({"sentence1": f"x{i}", "sentence2": f"y{i}",
                                       "label": i % 2}) + "\n" for i in range(8)))
  cfg = config.section("data", datasets=({"kind": "jsonl", "path": str(cls)},
                                         {"kind": "jsonl", "path": str(pairs)}), global_batch_size=4)
  t_cls, t_pairs = data.load_tables(cfg, tok)
  assert (t_cls.task, t_pairs.task) == ("cls", "sts")
  row = lambda off, ids, i: _texts(t_cls, "pos", ids[off[i]:off[i + 1]], tok)
  assert _texts(t_cls, "query", [4], tok) == ["t4"] and row(t_cls.pos_off, t_cls.pos_ids, 4) == ["b"]
  assert row(t_cls.neg_off, t_cls.neg_ids, 4) == ["a", "c"] and row(t_cls.neg_off, t_cls.neg_ids, 0) == ["b", "c"]
  assert t_pairs.labels[3] == 1.0
  b, _ = data.Batcher(cfg, [t_cls])(0)
  assert b["neg_valid"].shape == (4, 10) and b["neg_valid"].sum() == 8
  assert len(_rows({"kind": "jsonl", "path": str(cls), "limit": 5})) == 5


def _save_to_disk(path, rows):
  path.mkdir()
  table = pa.Table.from_pylist(rows)
  with pa.OSFile(str(path / "data-00000-of-00001.arrow"), "wb") as f:
    with pa.ipc.new_stream(f, table.schema) as writer:
      writer.write_table(table)
  (path / "state.json").write_text(json.dumps(
      {"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
  return {"kind": "piccolo", "path": str(path)}


RETRI = {"text": "q", "text_pos": "p", "text_neg": ["n"], "type": "retri_contrast"}
STS = {"text": "a", "text_pair": "b", "label": "high", "type": "cosent"}


@pytest.mark.parametrize("rows,match", [
    ([RETRI] * 3 + [{**RETRI, "text_neg": None}],
     "bad.dataset: row 3: field 'text_neg': expected a list of strings, got NoneType"),
    ([RETRI] * 3 + [{**RETRI, "type": "contrast"}],
     "bad.dataset: row 3: field 'type': unknown task type 'contrast'"),
    ([RETRI] * 3 + [{**RETRI, "type": "cosent"}],
     "bad.dataset: row 3: field 'type': 'cosent' differs"),
    ([STS], "bad.dataset: row 0: field 'label': expected a finite number, got 'high'"),
    ([{**STS, "label": float("nan")}], "bad.dataset: row 0: field 'label': expected a finite number, got nan"),
])
def test_bad_piccolo_rows(tmp_path, rows, match, tok):
  with pytest.raises(data.DataError, match=match):  # raised while preparing, nothing left behind
    _prepare(_save_to_disk(tmp_path / "bad.dataset", rows), tok, tmp_path / "cache")
  assert list((tmp_path / "cache").iterdir()) == []


def test_bad_input_errors(tmp_path, tok):
  def table(name, lines, **entry):
    path = tmp_path / name
    path.write_bytes(b"".join(l if isinstance(l, bytes) else json.dumps(l).encode() + b"\n"
                              for l in lines))
    return _rows({"kind": name.split(".")[-1], "path": str(path), **entry})

  entry = _save_to_disk(tmp_path / "nocol.dataset", [{"text": "q", "text_pos": "p",
                                                      "type": "retri_contrast"}])
  with pytest.raises(data.DataError, match="nocol.dataset: row 0: missing field 'text_neg'"):
    _rows(entry)
  pair = {"sentence1": "a", "sentence2": "b", "score": 1}
  with pytest.raises(data.DataError, match=r"p\.jsonl: line 2: missing field 'score'"):
    table("p.jsonl", [pair, {"sentence1": "a", "sentence2": "b"}])
  with pytest.raises(data.DataError, match="line 2: field 'score': expected a finite number, got 'x'"):
    table("q.jsonl", [pair, {**pair, "score": "x"}])
  with pytest.raises(data.DataError, match="line 2: field 'score': expected a finite number, got 'inf'"):
    table("i.tsv", [b"a\tb\t1\n", b"c\td\tinf\n"])
  with pytest.raises(data.DataError, match=r"r\.tsv: line 3: field 'score': .*'high'"):
    table("r.tsv", [b"a\tb\t1\n", b"c\td\t2\n", b"e\tf\thigh\n"])
  with pytest.raises(data.DataError, match=r"u\.jsonl: line 2: not valid UTF-8"):
    table("u.jsonl", [pair, b'{"sentence1": "\xff\xfe", "sentence2": "b", "score": 1}\n'])
  with pytest.raises(data.DataError, match="line 1: field 'neg': expected a list"):
    table("n.jsonl", [{"query": "q", "pos": ["p"], "neg": "n"}])
  with pytest.raises(data.DataError, match="field 'task': unknown task type 'qa'"):
    table("t.jsonl", [pair], task="qa")


def test_skipped_rows_counted_strict_and_too_small(tmp_path, tok, caplog):
  path = tmp_path / "s.jsonl"
  rows = ([{"query": f"q{i}", "pos": [f"p{i}"], "neg": ["n"]} for i in range(8)]
          + [{"query": "  ", "pos": ["p"], "neg": ["n"]}, {"query": "q", "pos": [], "neg": []},
             {"query": "q", "pos": ["\t"], "neg": ["n"]}, {"query": "q", "pos": None, "neg": ["n"]},
             {"query": "q", "pos": "p", "neg": []}])
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  cfg = config.section("data", datasets=({"kind": "jsonl", "path": str(path)},), global_batch_size=8)
  with caplog.at_level("INFO", logger="piccolo_jax.data"):
    (t,) = data.load_tables(cfg, tok)
  assert len(t) == 9 and t.skipped == {"empty text": 1, "no positive": 3}  # no negative: kept
  assert "s.jsonl: skipped rows {'empty text': 1, 'no positive': 3" in caplog.text
  with pytest.raises(data.DataError, match=r"s\.jsonl: line 9: field 'query': empty text"):
    data.load_tables(config.replace(cfg, strict=True), tok)
  with pytest.raises(data.DataError, match="9 usable rows, fewer than one global batch of 16"):
    data.load_tables(config.replace(cfg, global_batch_size=16), tok)


def test_a_new_task_is_one_registry_entry(tmp_path, tok, monkeypatch):
  """A question/answer task with in-batch negatives only: one Task, read, batched and scored."""
  qa = tasks.Task("qa", aliases=("question_answer",), layouts=({"query": "question", "pos": "answer"},),
                  fields=(tasks.Field("query", "query", "query_max_len"),
                          tasks.Field("pos", "pos", "passage_max_len")),
                  loss=losses.retrieval_infonce, loss_args=lambda e, b: ((e["query"], e["pos"]), {}))
  monkeypatch.setitem(tasks.TASKS, "qa", qa)
  monkeypatch.setitem(tasks.ALIASES, "question_answer", "qa")
  path = tmp_path / "qa.jsonl"
  path.write_text("".join(json.dumps({"question": f"q{i}?", "answer": f"a{i}"}) + "\n" for i in range(8)))
  cfg = config.section("data", datasets=({"kind": "jsonl", "path": str(path)},), global_batch_size=4, packing=False)
  loss_cfg = config.section("loss", mrl_dims=(8, 16), qa=dict(temperature=0.05))
  (t,) = data.load_tables(cfg, tok)
  assert t.task == "qa" and _texts(t, "query", [3], tok) == ["q3?"] and _texts(t, "pos", t.pos_ids[3:4], tok) == ["a3"]
  arrays, meta = data.Batcher(cfg, [t])(0)
  assert set(arrays) == {"query_ids", "query_mask", "pos_ids", "pos_mask"} and meta["task"] == "qa"
  emb = {f: np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32) for f in ("query", "pos")}
  loss, per_dim = step_lib.task_loss("qa", emb, arrays, loss_cfg)
  want = np.mean([losses.retrieval_infonce(emb["query"][:, :d], emb["pos"][:, :d], temperature=0.05)
                  for d in (8, 16)])
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  assert per_dim.shape == (2,)


def test_prepare_cli_shards_are_what_training_opens(tmp_path, tok, monkeypatch):
  import tiny_config  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, PICCOLO_JAX_CACHE=str(tmp_path))
  for shard in (0, 1):
    out = subprocess.run([sys.executable, "-m", "piccolo_jax.prepare", "--config=tests/tiny_config.py",
                          f"--shard={shard}", "--num_shards=2"], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert all(" rows, " in line for line in out.stdout.splitlines())
  assert len(list(tmp_path.iterdir())) == 3  # every dataset once, over the two shards
  monkeypatch.setenv("PICCOLO_JAX_CACHE", str(tmp_path))
  monkeypatch.setattr(prepare, "_write", lambda *a: pytest.fail("training prepared a dataset again"))
  tables = data.load_tables(tiny_config.get_config().data, tok)
  assert [t.task for t in tables] == ["retrieval", "sts", "cls"] and all(len(t) == 32 for t in tables)
