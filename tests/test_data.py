"""Input pipeline: real bundled data, the MiniLM tokenizer and the TFDS fixture."""
import collections
import json
import os
import pickle
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pyarrow as pa
import pytest

from bench import torch_ref
from piccolo_jax import config
from piccolo_jax import data
from piccolo_jax import losses
from piccolo_jax import plan as plan_lib
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


def _config(datasets, **data_fields):
  c = config.base()
  c.data.update(datasets=datasets, **data_fields)
  return c


@pytest.fixture(scope="module")
def small(data_dir, tmp_path_factory):
  """Piccolo example (meta list, retrieval repeated twice) + the TFDS fixture; 2 retrieval negatives."""
  meta = tmp_path_factory.mktemp("meta") / "piccolo-ft.txt"
  meta.write_text("cls.dataset 1\nretri.dataset 2\nsts.dataset 1\n")
  c = _config(({"kind": "meta", "path": str(meta), "root": str(data_dir / "piccolo_example")},
               {"kind": "tfds", "name": "retrieval_zh_tiny", "data_dir": str(TFDS_DIR)}), global_batch_size=G, seed=3)
  c.tasks.retrieval.neg_num = 2
  return c


@pytest.fixture(scope="module")
def small_tables(small, tok):
  return data.open_tables(small.data, small.tasks, tok)


@pytest.fixture(scope="module")
def big(data_dir):
  """The shared jsonl/tsv data, with prefixes."""
  c = _config(({"kind": "jsonl", "path": str(data_dir / "retrieval-zh/triplets.train.jsonl")},
               {"kind": "tsv", "path": str(data_dir / "sts-b-en/sts-b-en.train.tsv")},
               {"kind": "tsv", "path": str(data_dir / "sts-b-zh/sts-b-zh.train.tsv"), "repeat": 2}),
              global_batch_size=32)
  for task in ("retrieval", "sts"):
    c.tasks[task].update(query_prefix="query: ", passage_prefix="passage: ")
  return c


@pytest.fixture(scope="module")
def big_tables(big, tok):
  return data.open_tables(big.data, big.tasks, tok)


def assembler(c, tables, p=0, P=1, **kw):
  return data.assembler(c.data, c.tasks, tables, p, P, **kw)


FIELDS = {"retrieval": {"query", "pos", "neg"}, "sts": {"text_a", "text_b"}, "cls": {"query", "pos", "neg"}}


def _take(it, n):
  out = [next(it) for _ in range(n)]
  it.close()
  return out


def _rows(entry, c=None):
  """The validated rows of a dataset entry as (query, pos, neg, label) tuples (no teacher scores)."""
  rows = list(sources.read(entry, c))
  assert all(r[4] is None for r in rows)
  return [r[:4] for r in rows]


def _texts(t, slot, ids, tok):
  return [tok.decode(t.tokens(slot, int(i)), skip_special_tokens=True) for i in ids]


def _prepare(entry, tok, root, tasks_cfg=None):
  return prepare.Prepared(prepare.prepare(entry, config.section("data"), tasks_cfg or config.section("tasks"), tok, root))


def _same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


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
  entries = sources.expand(small.data.datasets)
  assert _rows(entries[0])[7] == (row["text"], [row["text_pos"]], row["text_neg"], 0.0)
  triplets = [json.loads(l) for l in open(data_dir / "retrieval-zh/triplets.train.jsonl")]
  tfds_rows = {q: n for q, _, n, *_ in _rows(entries[3])}
  assert tfds_rows.keys() == {r["query"] for r in triplets[:40]}  # TFDS shuffled them
  assert tfds_rows[triplets[5]["query"]] == triplets[5]["neg"][:3]
  assert "tensorflow" not in sys.modules
  assert _rows({"kind": "tsv", "path": str(data_dir / "sts-b-en/sts-b-en.train.tsv")})[0] == (
      "A plane is taking off.", ["An air plane is taking off."], [], 5.0)


def _classes(rows):
  return list(dict.fromkeys(p[0] for _, p, *_ in rows))


def test_prepared_tokens_are_the_tokenizers(small, small_tables, big, big_tables, tok):
  """Every stored token sequence is the tokenizer's output for prefix + text at the slot's cap."""
  for c, tables in ((small, small_tables), (big, big_tables)):
    caps = tasks.caps(c.tasks)
    for entry, t in zip(sources.expand(c.data.datasets), tables):
      reader = sources.read(entry, c.tasks)
      rows = list(reader)
      assert len(rows) == len(t) and t.skipped == reader.skipped and t.task == reader.task.name
      enc = lambda text, slot: tok(text, truncation=True, max_length=caps[t.task, slot])["input_ids"]
      qp, pp = reader.prefix("query_prefix"), reader.prefix("passage_prefix")
      for i in range(0, len(rows), max(1, len(rows) // 50)):
        q, pos, neg, label, _ = rows[i]
        if reader.label_layout:  # cls label rows: the other classes, in order of appearance
          neg = [m for m in _classes(rows) if m != pos[0]]
        assert list(t.tokens("query", i)) == enc(qp + q, "query")
        for texts, off, ids in ((pos, t.pos_off, t.pos_ids), (neg, t.neg_off, t.neg_ids)):
          assert [list(t.tokens("pos", j)) for j in ids[off[i]:off[i + 1]]] == [enc(pp + x, "pos") for x in texts]
        assert t.labels[i] == np.float32(label)


def _field_texts(b, task, field):
  """Token ids of each text of a field, read back from the packed rows through its slots."""
  ids, mask = torch_ref.unpacked(b, task, field)
  return [list(i[m == 1]) for i, m in zip(ids, mask)]


def test_batches_hold_the_tokenized_selected_texts(big, big_tables, small, small_tables, tok):
  """Each batch, read back from its packed rows, is the tokenizer on the texts its plan selected."""
  c = config.replace(small)
  c.tasks.cls.neg_num = 130
  for c, tables in ((big, big_tables), (c, small_tables)):
    assemble, readers, text = assembler(c, tables), [], []
    for entry, t in zip(sources.expand(c.data.datasets), tables):
      readers.append(sources.read(entry, c.tasks))
      rows, names = list(readers[-1]), {}
      for i, (_, pos, neg, *_) in enumerate(rows):
        neg = [m for m in _classes(rows) if m != pos[0]] if readers[-1].label_layout else neg
        names.update(zip(t.pos_ids[t.pos_off[i]:t.pos_off[i + 1]], pos))
        names.update(zip(t.neg_ids[t.neg_off[i]:t.neg_off[i + 1]], neg))
      text.append(([q for q, *_ in rows], names))
    caps = tasks.caps(c.tasks)
    for step in range(0, 3 * assemble.plan.steps_per_epoch, 11):
      ((d, sel),), (b, info) = assemble.plan.units(step), assemble(step)
      r, (queries, names), task = readers[d], text[d], tables[d].task
      assert b.mix == ((task, 1),) and info["task"] == task and info["dataset"] == tables[d].name
      for field, slot in tasks.fields(tasks.TASKS[task], assemble.plan.k[task]):
        ids = sel[slot].reshape(-1)
        keep = sel["neg_valid"].reshape(-1) if slot == "neg" else np.ones(len(ids), bool)
        texts = ([r.prefix("query_prefix") + queries[i] for i in ids] if slot == "query" else
                 [r.prefix("passage_prefix") + names[i] for i in ids[keep]])
        want = tok(texts, truncation=True, max_length=caps[task, "query" if slot == "query" else "pos"])["input_ids"]
        assert [t for t, k in zip(_field_texts(b, task, field), keep) if k] == want, (step, field)
      computed = sum(r.segments.size for r in b.rows)
      assert info["tokens"] == sum((r.segments > 0).sum() for r in b.rows)
      assert info["pad_frac"] == pytest.approx(1 - info["tokens"] / computed)


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
  short, prefixed = config.section("tasks"), config.section("tasks")
  short.retrieval.query_max_len, prefixed.retrieval.query_prefix = 3, "query: "
  changed = {"tokenizer": _prepare(entry, other_tok, root), "caps": _prepare(entry, tok, root, short),
             "prefix": _prepare(entry, tok, root, prefixed)}
  src.write_text(src.read_text() + json.dumps({"query": "new", "pos": ["p"], "neg": ["n"]}) + "\n")
  changed["source"] = _prepare(entry, tok, root)
  assert len({t.path for t in changed.values()} | {first.path}) == 5
  assert len(changed["source"]) == 9 and len(changed["caps"].tokens("query", 0)) == 3
  assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []  # no temporaries left


def test_epoch_counts_homogeneity_and_restore(small, small_tables, tok):
  """Every step one dataset, each dataset's batches once an epoch per copy, epochs reshuffled; restoring
  the iterator's state replays the same batches."""
  n = plan_lib.steps_per_epoch(small.data, small_tables)
  assert n == 6 + 2 * 6 + 6 + 5
  own = {t.name: (t, set(_texts(t, "query", range(len(t)), tok))) for t in small_tables}
  counts, it = collections.Counter(), data.make_iterator(assembler(small, small_tables), small.data)
  ref = _take(it, 2 * n)
  for step, (b, info) in enumerate(ref):
    t, queries = own[info["dataset"]]
    assert info["task"] == t.task and info["step"] == step and set(b.slots[t.task]) == FIELDS[t.task]
    first = "query" if "query" in b.slots[t.task] else "text_a"
    assert {tok.decode(x, skip_special_tokens=True) for x in _field_texts(b, t.task, first)} <= queries
    counts[step // n, info["dataset"]] += 1
  for epoch in (0, 1):
    assert {k: v for (e, k), v in counts.items() if e == epoch} == {t.name: t.repeat * (len(t) // G) for t in small_tables}
  plan = plan_lib.Plan(small.data, small.tasks, small_tables)
  (ds0, rows0), (ds1, _) = plan.epoch(0), plan.epoch(1)
  assert not np.array_equal(ds0, ds1)
  for d, t in enumerate(small_tables):
    batches = rows0[ds0[:, 0] == d]
    assert all(len(set(r)) == G for r in batches) and max(collections.Counter(batches.ravel()).values()) <= t.repeat
  it = data.make_iterator(assembler(small, small_tables), small.data)
  for _ in range(n - 3):  # stop shortly before the epoch boundary
    next(it)
  state = it.get_state()
  it.close()
  resumed = data.make_iterator(assembler(small, small_tables), small.data)
  resumed.set_state(state)
  for x, y in zip(ref[n - 3:], _take(resumed, 9)):
    _same(x, y)


def test_seeds_and_worker_processes(big, big_tables, tok):
  """Same seed, same batches (with a grain worker process too, restored mid-way); another seed, others."""
  ref = _take(data.make_iterator(assembler(big, big_tables), big.data), 8)
  workers = config.replace(big.data, worker_count=1)
  it = data.make_iterator(assembler(big, big_tables), workers)
  for x in ref[:4]:
    _same(x, next(it))
  state = it.get_state()
  it.close()
  it = data.make_iterator(assembler(big, big_tables), workers)
  it.set_state(state)
  for x in ref[4:]:
    _same(x, next(it))
  it.close()
  other = config.replace(big)
  other.data.seed = 1
  c = _take(data.make_iterator(assembler(other, big_tables), other.data), 6)
  assert [i["dataset"] for _, i in ref[:6]] != [i["dataset"] for _, i in c] or any(
      jax.tree.structure(x.rows) != jax.tree.structure(y.rows) or not all(
          np.array_equal(p, q) for p, q in zip(jax.tree.leaves(x.rows), jax.tree.leaves(y.rows)))
      for (x, _), (y, _) in zip(ref, c))


def test_sampling_prefixes_and_negatives(big, big_tables, small, small_tables, tok):
  plan = plan_lib.Plan(big.data, big.tasks, big_tables)
  t = big_tables[0]
  step = next(s for s in range(100) if plan.units(s)[0][0] == 0)
  ((_, sel),) = plan.units(step)
  for i, row in enumerate(sel["query"]):
    assert sel["pos"][i] in t.pos_ids[t.pos_off[row]:t.pos_off[row + 1]]
    assert sel["neg"][i, 0] in t.neg_ids[t.neg_off[row]:t.neg_off[row + 1]]
  b, _ = assembler(big, big_tables)(step)
  prefix = tok("passage: ", add_special_tokens=False)["input_ids"]
  assert _field_texts(b, "retrieval", "pos")[0][1:1 + len(prefix)] == prefix
  assert [len(x) for x in _field_texts(b, "retrieval", "query")] == list(t.q_len(sel["query"]))
  c = config.replace(small)
  c.tasks.retrieval.neg_num, c.tasks.cls.neg_num = 3, 130
  plan, assemble = plan_lib.Plan(c.data, c.tasks, small_tables), assembler(c, small_tables)
  for step in range(plan.steps_per_epoch):
    ((d, sel),), (b, _) = plan.units(step), assemble(step)
    t = small_tables[d]
    if t.task == "retrieval":
      assert b.slots["retrieval"]["neg"].shape == (3 * G,) and b.extras["retrieval"]["neg_valid"].shape == (G, 3)
    if t.name == "retri.dataset":  # 1 negative per row: padded to K=3 and masked, as the original
      assert (sel["neg"][:, 0] >= 0).all() and (sel["neg"][:, 1:] == -1).all()
      assert b.extras["retrieval"]["neg_valid"].tolist() == [[True, False, False]] * G
    if t.name.startswith("tfds"):  # 3 negatives per row: all, without replacement
      assert all(sorted(r) == sorted(t.neg_ids[t.neg_off[q]:t.neg_off[q + 1]]) for q, r in zip(sel["query"], sel["neg"]))
    if t.task == "cls":  # 118 label negatives each, without replacement, padded to 130 (not packed)
      assert b.extras["cls"]["neg_valid"].shape == (G, 130) and b.extras["cls"]["neg_valid"].sum(1).tolist() == [118] * G
      assert all(len(set(r[:118])) == 118 for r in sel["neg"])
      assert sum((r.lengths > 0).sum() for r in b.rows) == G * (2 + 118)


def test_put_batch(big, big_tables, tok):
  mesh = sharding.make_mesh(2)
  b, _ = assembler(big, big_tables, row_multiple=8)(0)
  g = sharding.put_batch(b, mesh)
  assert g.mix == b.mix
  for x, y in zip(jax.tree.leaves(g.rows), jax.tree.leaves(b.rows)):
    assert x.shape == y.shape and x.sharding.spec == sharding.batch_sharding(mesh).spec
    np.testing.assert_array_equal(np.asarray(x), y)
  for x, y in zip(jax.tree.leaves((g.slots, g.extras)), jax.tree.leaves((b.slots, b.extras))):
    assert x.sharding.is_fully_replicated and len(x.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(x), y)


def test_jsonl_pairs_and_label_triplets(tmp_path, tok):
  cls = tmp_path / "cls.jsonl"
  cls.write_text("".join(json.dumps({"text": f"t{i}", "label": ["a", "b", "c"][i % 3]}) + "\n" for i in range(12)))
  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text("".join(json.dumps({"sentence1": f"x{i}", "sentence2": f"y{i}", "label": i % 2}) + "\n"
                           for i in range(8)))
  c = _config(({"kind": "jsonl", "path": str(cls)}, {"kind": "jsonl", "path": str(pairs)}), global_batch_size=4)
  t_cls, t_pairs = data.open_tables(c.data, c.tasks, tok)
  assert (t_cls.task, t_pairs.task) == ("cls", "sts")
  row = lambda off, ids, i: _texts(t_cls, "pos", ids[off[i]:off[i + 1]], tok)
  assert _texts(t_cls, "query", [4], tok) == ["t4"] and row(t_cls.pos_off, t_cls.pos_ids, 4) == ["b"]
  assert row(t_cls.neg_off, t_cls.neg_ids, 4) == ["a", "c"] and row(t_cls.neg_off, t_cls.neg_ids, 0) == ["b", "c"]
  assert t_pairs.labels[3] == 1.0
  b, _ = assembler(c, [t_cls])(0)
  assert b.extras["cls"]["neg_valid"].shape == (4, 10) and b.extras["cls"]["neg_valid"].sum() == 8
  assert len(_rows({"kind": "jsonl", "path": str(cls), "limit": 5})) == 5


def _save_to_disk(path, rows):
  path.mkdir()
  table = pa.Table.from_pylist(rows)
  with pa.OSFile(str(path / "data-00000-of-00001.arrow"), "wb") as f:
    with pa.ipc.new_stream(f, table.schema) as writer:
      writer.write_table(table)
  (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
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


def test_bad_input_errors(tmp_path, tok, data_dir):
  def table(name, lines, **entry):
    path = tmp_path / name
    path.write_bytes(b"".join(l if isinstance(l, bytes) else json.dumps(l).encode() + b"\n" for l in lines))
    return _rows({"kind": name.split(".")[-1], "path": str(path), **entry})

  entry = _save_to_disk(tmp_path / "nocol.dataset", [{"text": "q", "text_pos": "p", "type": "retri_contrast"}])
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
  meta = tmp_path / "meta.txt"
  meta.write_text("cls.dataset 1\nnowhere.dataset 2\n")
  with pytest.raises(data.DataError, match=r"meta\.txt: line 2: dataset 'nowhere.dataset': no directory"):
    sources.expand([{"kind": "meta", "path": str(meta), "root": str(data_dir / "piccolo_example")}])


def test_skipped_rows_counted_strict_and_too_small(tmp_path, tok, caplog):
  path = tmp_path / "s.jsonl"
  rows = ([{"query": f"q{i}", "pos": [f"p{i}"], "neg": ["n"]} for i in range(8)]
          + [{"query": "  ", "pos": ["p"], "neg": ["n"]}, {"query": "q", "pos": [], "neg": []},
             {"query": "q", "pos": ["\t"], "neg": ["n"]}, {"query": "q", "pos": None, "neg": ["n"]},
             {"query": "q", "pos": "p", "neg": []}])
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  c = _config(({"kind": "jsonl", "path": str(path)},), global_batch_size=8)
  with caplog.at_level("INFO", logger="piccolo_jax.data"):
    (t,) = data.open_tables(c.data, c.tasks, tok)
  assert len(t) == 9 and t.skipped == {"empty text": 1, "no positive": 3}  # no negative: kept
  assert "s.jsonl: skipped rows {'empty text': 1, 'no positive': 3" in caplog.text
  with pytest.raises(data.DataError, match=r"s\.jsonl: line 9: field 'query': empty text"):
    data.open_tables(config.replace(c.data, strict=True), c.tasks, tok)
  with pytest.raises(data.DataError, match="9 usable rows, fewer than one global batch of 16"):
    data.open_tables(config.replace(c.data, global_batch_size=16), c.tasks, tok)


def test_a_new_task_is_one_registry_entry(tmp_path, tok, monkeypatch):
  """A question/answer task with in-batch negatives only: one Task, read, batched and scored."""
  qa = tasks.Task("qa", aliases=("question_answer",), layouts=({"query": "question", "pos": "answer"},),
                  fields=(("query", "query"), ("pos", "pos")), loss=losses.retrieval_infonce,
                  loss_args=lambda e, b, s: tasks.LossArgs((e["query"], e["pos"]),
                                                           tasks.settings(s, "temperature", "weight")),
                  defaults=dict(query_max_len=32, passage_max_len=32, temperature=0.05, weight=1.0))
  monkeypatch.setitem(tasks.TASKS, "qa", qa)
  path = tmp_path / "qa.jsonl"
  path.write_text("".join(json.dumps({"question": f"q{i}?", "answer": f"a{i}", "type": "question_answer"}) + "\n"
                          for i in range(8)))
  c = _config(({"kind": "jsonl", "path": str(path)},), global_batch_size=4)
  c.loss.mrl_dims = (8, 16)
  (t,) = data.open_tables(c.data, c.tasks, tok)
  assert t.task == "qa" and _texts(t, "query", [3], tok) == ["q3?"] and _texts(t, "pos", t.pos_ids[3:4], tok) == ["a3"]
  b, info = assembler(c, [t])(0)
  assert set(b.slots["qa"]) == {"query", "pos"} and b.extras["qa"] == {} and info["task"] == "qa"
  emb_ND = np.random.default_rng(0).normal(size=(sum(r.lengths.size for r in b.rows), 16)).astype(np.float32)
  loss, (per_dim, by_task, _) = step_lib.step_loss(emb_ND, b, c)
  emb = {f: emb_ND[s] for f, s in b.slots["qa"].items()}
  want = np.mean([losses.retrieval_infonce(emb["query"][:, :d], emb["pos"][:, :d], temperature=0.05) for d in (8, 16)])
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  assert per_dim.shape == (2,) and set(by_task) == {"qa"}


def test_prepare_cli_shards_are_what_training_opens(tmp_path, tok, monkeypatch):
  import tiny_config  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, PICCOLO_JAX_CACHE=str(tmp_path))
  shards = [subprocess.Popen([sys.executable, "-m", "piccolo_jax.prepare", "--config=tests/tiny_config.py",
                              f"--shard={shard}", "--num_shards=2"], cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for shard in (0, 1)]
  for proc in shards:
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert all(" rows, " in line for line in out.splitlines())
  assert len(list(tmp_path.iterdir())) == 3  # every dataset once, over the two shards
  monkeypatch.setenv("PICCOLO_JAX_CACHE", str(tmp_path))
  monkeypatch.setattr(prepare, "_write", lambda *a: pytest.fail("training prepared a dataset again"))
  c = tiny_config.get_config()
  tables = data.open_tables(c.data, c.tasks, tok)
  assert [t.task for t in tables] == ["retrieval", "sts", "cls"] and all(len(t) == 32 for t in tables)


def test_a_table_without_negatives_samples_none(big, big_tables, tmp_path):
  """Negatives refreshed by a model that kept none (a random one scores every candidate within the margin): every
  row's negatives are empty slots, not an index error."""
  t = big_tables[0]
  np.zeros(len(t) + 1, np.int64).tofile(tmp_path / "neg_off.bin")
  for k in ("neg_ids", "neg_score"):
    (tmp_path / f"{k}.bin").write_bytes(b"")
  plan = plan_lib.Plan(big.data, big.tasks, [t.with_negatives(tmp_path), *big_tables[1:]])
  step = next(s for s in range(100) if plan.units(s)[0][0] == 0)
  ((_, sel),) = plan.units(step)
  assert len(plan.tables[0].neg_ids) == 0 and sel["neg"].shape[1] > 0
  assert (sel["neg"] == -1).all() and not sel["neg_valid"].any() and np.isnan(sel["neg_score"]).all()
