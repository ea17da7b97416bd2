"""Hard-negative mining against a brute-force numpy reference (1 and 8 devices), the false-negative filter,
and the CLI end to end on real rows with all-MiniLM-L6-v2."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import conftest
from piccolo_jax import config
from piccolo_jax import encode
from piccolo_jax import mine
from piccolo_jax import search
from piccolo_jax import sources

Q, C, D = 29, 150, 8
REPO = pathlib.Path(__file__).resolve().parent.parent


def mesh_of(n):
  return jax.make_mesh((n,), ("corpus",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


def reference(q_QD, c_CD, pos, drop, norm_C, opts):
  """(chosen ids, best positive's 1-based rank or 0) per query: the full score matrix, a stable sort, loops."""
  s_QC = q_QD @ c_CD.T
  out, ranks = [], []
  for r in range(len(q_QD)):
    order = np.argsort(-s_QC[r], kind="stable")[:opts.end]
    hits = [i for i, c in enumerate(order) if c in pos[r]]
    ranks.append(hits[0] + 1 if hits else 0)
    low = min(s_QC[r, p] for p in pos[r])
    limit = min(low - (opts.absolute_margin if opts.absolute_margin is not None else -np.inf),
                low * (1 - opts.relative_margin) if opts.relative_margin is not None else np.inf)
    cands = [c for c in order[opts.start:] if norm_C[c] not in drop[r] and s_QC[r, c] <= limit]
    if len(cands) > opts.num and opts.sampling == "random":
      rng = mine.row_rng((opts.seed,), 100 + r)
      cands = [cands[i] for i in sorted(rng.choice(len(cands), opts.num, replace=False))]
    out.append(cands[:opts.num])
  return out, ranks


@pytest.fixture(scope="module")
def problem():
  """Integer vectors (exact float32 dot products, many ties); ids 120.. share normal forms with 0..29."""
  rng = np.random.default_rng(0)
  q = rng.integers(-2, 3, size=(Q, D)).astype(np.float32)
  c = rng.integers(-2, 3, size=(C, D)).astype(np.float32)
  norm_C = np.where(np.arange(C) >= 120, np.arange(C) - 120, np.arange(C))
  pos = [rng.choice(C, rng.integers(1, 4), replace=False) for _ in range(Q)]
  drop = [np.unique(norm_C[p]) for p in pos]
  return q, c, pos, drop, norm_C


@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("opts", [
    mine.Options(start=2, end=60, num=6, sampling="random", relative_margin=0.05, absolute_margin=0.5, seed=3),
    mine.Options(start=0, end=200, num=4, sampling="top", relative_margin=None),
    mine.Options(start=5, end=40, num=50, sampling="random", relative_margin=-0.2)], ids=["random", "top", "short"])
def test_mined_negatives_equal_brute_force(problem, devices, opts):
  q, c, pos, drop, norm_C = problem
  corpus = search.place(c, mesh_of(devices), c_chunk=16)  # Several blocks per device, the last padded.
  stats = mine.Stats(opts)
  got = mine.mine_chunk(q, corpus, mine.padded(pos), drop, norm_C, opts, 100, stats, key=(opts.seed,), q_chunk=8)
  want, ranks = reference(q, c, pos, drop, norm_C, opts)
  assert [g.tolist() for g in got] == want
  for g, p in zip(got, drop):  # Never a positive's text.
    assert not np.isin(norm_C[g], p).any()
  counts = np.zeros(len(stats.ranks), int)
  for r in ranks:
    counts[np.searchsorted(stats.bins, r, "right") - 1 if r else -1] += 1
  np.testing.assert_array_equal(stats.ranks, counts)
  assert stats.counts["rows"] == Q and stats.counts["negatives"] == sum(map(len, want))
  assert stats.counts["rows_short"] == sum(len(w) < opts.num for w in want)


@pytest.mark.parametrize("devices", [1, 8])
def test_sharded_search_scores_ranks_and_positive_scores(problem, devices):
  q, c, pos, _, _ = problem
  pos_QP = mine.padded(pos)
  corpus = search.place(c, mesh_of(devices), c_chunk=16)
  parts = list(search.iter_top_k(q, corpus, 70, ids_QP=pos_QP, q_chunk=8))
  s_QT, i_QT, g_QP = (np.concatenate([p[j] for p in parts]) for j in (1, 2, 3))
  s_QC = q @ c.T
  ref_ids = np.argsort(-s_QC, axis=1, kind="stable")[:, :70]
  np.testing.assert_array_equal(i_QT, ref_ids)  # Ties too: lowest corpus id first, across devices.
  np.testing.assert_array_equal(s_QT, np.take_along_axis(s_QC, ref_ids, 1))
  np.testing.assert_array_equal(g_QP, np.where(pos_QP >= 0, np.take_along_axis(s_QC, np.maximum(pos_QP, 0), 1), 0))


def test_filter_drops_exactly_the_candidates_above_the_margin():
  s_T = np.array([1.0, 0.875, 0.75, 0.8125, 0.5, 0.7, 0.76, 0.625], np.float32)  # Exact in float32.
  ids_T, norm_C = np.arange(8), np.arange(8)
  for opts, kept in [(mine.Options(start=0, end=8, num=8, relative_margin=0.25), [2, 4, 5, 7]),  # <= 0.75
                     (mine.Options(start=0, end=8, num=8, relative_margin=None, absolute_margin=0.25), [2, 4, 5, 7]),
                     (mine.Options(start=0, end=8, num=8, relative_margin=0.25, absolute_margin=0.5), [4]),
                     (mine.Options(start=1, end=8, num=8, relative_margin=None), [1, 2, 3, 4, 5, 6, 7])]:
    chosen, counts = mine.select(ids_T, s_T, 1.0, np.array([0]), norm_C, opts, mine.row_rng((0,), 0))
    assert chosen.tolist() == kept, opts
    assert counts["filtered"] == len(ids_T[opts.start:]) - len(kept) - counts["same_text"]


def test_corpus_dedups_texts_and_normal_forms():
  corpus = mine.build_corpus([("q", ["a", "b"], ["c", "a"]), ("q2", ["B "], ["d"])], ["c", "e"])
  assert corpus.texts == ["a", "b", "c", "B ", "d", "e"]
  assert corpus.norm_C.tolist() == [0, 1, 2, 1, 3, 4]
  assert corpus.norm_ids(["b", "zz"]) == [1, -1]


def two_processes(args, output):
  """piccolo_jax.mine in 2 processes of 2 CPU devices each."""
  env = dict(os.environ, XLA_FLAGS=conftest.xla_flags(2), JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-m", "piccolo_jax.mine", *args, "--output", str(output),
                             "--coordinator-address", "127.0.0.1:12395", "--num-processes", "2", "--process-id", str(i)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in (0, 1)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs


def test_cli_on_real_rows_trains_directly(minilm_path, data_dir, tmp_path, capsys):
  base = [str(minilm_path), "--input", str(data_dir / "retrieval-zh/triplets.train.jsonl"), "--limit", "12",
          "--range", "1-40", "--negatives", "3"]
  args = base + ["--output", str(tmp_path / "out.jsonl"), "--cache", str(tmp_path)]
  report = mine.main(args)
  assert "rows with fewer than 3 negatives" in capsys.readouterr().out
  assert json.loads((tmp_path / "out.stats.json").read_text())["rows"] == report["rows"] == 12
  entry = {"kind": "jsonl", "path": str(tmp_path / "out.jsonl")}
  trainer = sources.read(entry)
  rows = list(trainer)  # Rows left without a negative are kept (in-batch negatives only).
  assert len(rows) == 12 and not trainer.skipped and sum(not n for _, _, n, *_ in rows) == report["rows_without"]
  given = [json.loads(line) for line in (data_dir / "retrieval-zh/triplets.train.jsonl").open().readlines()[:12]]
  assert [(q, p) for q, p, *_ in rows] == [(g["query"], g["pos"]) for g in given]
  assert all(not set(n) & set(p) for _, p, n, *_ in rows) and sum(len(n) for _, _, n, *_ in rows) == report["negatives"]
  cached = list(tmp_path.glob("corpus-*.npy"))
  assert len(cached) == 1
  mine.main(base + ["--output", str(tmp_path / "out.jsonl"), "--originals", "append", "--scores"])  # No cache.
  out = [json.loads(line) for line in (tmp_path / "out.jsonl").open()]
  for a, g in zip(out, given):
    assert a["neg"][:len(g["neg"])] == g["neg"] and not set(a["neg"][len(g["neg"]):]) & set(g["neg"] + g["pos"])
  teacher = encode.Embedder.load(minilm_path)  # --scores: the teacher's (here the model's) cosines, row by row.
  for a in out[:2]:
    q_D, t_ND = teacher.encode([a["query"]])[0], teacher.encode(a["pos"] + a["neg"])
    np.testing.assert_allclose(a["pos_scores"] + a["neg_scores"], t_ND @ q_D, atol=1e-4)
  scored = list(sources.read({"kind": "jsonl", "path": str(tmp_path / "out.jsonl")}))
  assert all(len(s[0]) == len(p) and len(s[1]) == len(n) for _, p, n, _, s in scored)
  two_processes(base + ["--cache", str(tmp_path / "two")], tmp_path / "two.jsonl")
  halves = sorted((tmp_path / "two").glob("corpus-*.npy"), key=lambda p: int(p.stem.split("-")[-2]))
  assert len(halves) == 2  # Each process embeds and caches the corpus rows of its devices.
  whole = np.concatenate([np.load(p) for p in halves])
  np.testing.assert_allclose(whole, np.load(cached[0]), atol=1e-5)  # Equal up to the packing's rounding.
  np.save(cached[0], whole)  # Given the same embeddings, 2 processes search and sample exactly as 1:
  mtime = cached[0].stat().st_mtime_ns
  mine.main(args)  # reads the cache.
  assert (tmp_path / "out.jsonl").read_text() == (tmp_path / "two.jsonl").read_text()
  assert cached[0].stat().st_mtime_ns == mtime


def test_cli_errors_are_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    mine.main(["minilm", "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o.jsonl")])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"error: {tmp_path / 'missing.jsonl'}: no such file or directory"]


def test_input_formats_meta_list_keeps_retrieval_datasets(data_dir, tmp_path):
  (tmp_path / "list.txt").write_text("retri.dataset 1\nsts.dataset 1\ncls.dataset 1\n")
  meta = mine.input_entries(repr({"kind": "meta", "path": str(tmp_path / "list.txt"),
                                  "root": str(data_dir / "piccolo_example")}))
  rows, skipped = mine.read_rows(meta)
  alone, _ = mine.read_rows(mine.input_entries(str(data_dir / "piccolo_example/retri.dataset")))
  assert rows == alone and len(rows) == 51
  assert skipped == {"retri.dataset": {}, "sts.dataset": {"task sts, not retrieval": "all"},
                     "cls.dataset": {"task cls, not retrieval": "all"}}
  jsonl, _ = mine.read_rows(mine.input_entries(str(data_dir / "retrieval-zh/triplets.train.jsonl")), limit=3)
  assert [len(r) for r in jsonl] == [3] * 3 and all(r[1] and r[2] for r in jsonl)

