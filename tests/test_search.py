"""Chunked exact top-k against a stable numpy sort: chunk sizes, ties, padding, k > C, memmaps, cosine."""
import jax
import numpy as np
import pytest

from piccolo_jax import search


def reference(q_QD, c_CD, k):
  """(scores, ids) [Q, min(k, C)] of a full stable sort: equal scores in corpus order."""
  s_QC = q_QD @ c_CD.T
  ids_QT = np.argsort(-s_QC, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(s_QC, ids_QT, 1), ids_QT


@pytest.fixture(scope="module")
def tied():
  """Small integer vectors: every dot product is exact in float32, and most scores tie."""
  rng = np.random.default_rng(0)
  return rng.integers(-2, 3, size=(37, 8)).astype(np.float32), rng.integers(-2, 3, size=(101, 8)).astype(np.float32)


@pytest.mark.parametrize("q_chunk,c_chunk,k", [(37, 101, 10), (5, 7, 10), (8, 13, 3), (64, 1000, 1), (1, 1, 100),
                                               (6, 33, 200)])
def test_top_k_equals_stable_sort(tied, q_chunk, c_chunk, k):
  q, c = tied
  scores, ids = search.top_k(q, c, k, q_chunk=q_chunk, c_chunk=c_chunk)
  ref_scores, ref_ids = reference(q, c, k)
  assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (37, min(k, 101))
  np.testing.assert_array_equal(ids, ref_ids)  # Ties too: lowest corpus id first, across chunks.
  np.testing.assert_array_equal(scores, ref_scores)


def test_padding_is_never_returned_and_one_program_per_call():
  rng = np.random.default_rng(1)
  q = rng.uniform(0.5, 1, size=(10, 4)).astype(np.float32)
  c = -rng.uniform(0.5, 1, size=(10, 4)).astype(np.float32)  # Every real score < 0, a zero padding row's 0.
  before = search._step._cache_size()
  scores, ids = search.top_k(q, c, 3, q_chunk=4, c_chunk=4)  # 3 x 3 chunks, the last ones padded.
  assert search._step._cache_size() == before + 1
  np.testing.assert_array_equal(ids, reference(q, c, 3)[1])
  assert (scores < 0).all() and ids.max() < 10


def test_memmap_inputs_dim_and_cosine(tmp_path):
  rng = np.random.default_rng(2)
  q = np.lib.format.open_memmap(tmp_path / "q.npy", mode="w+", dtype=np.float32, shape=(23, 16))
  c = np.lib.format.open_memmap(tmp_path / "c.npy", mode="w+", dtype=np.float32, shape=(150, 16))
  q[:], c[:] = rng.normal(size=q.shape), rng.normal(size=c.shape) * rng.uniform(0.1, 10, size=(150, 1))
  q.flush(), c.flush()
  q, c = np.load(tmp_path / "q.npy", mmap_mode="r"), np.load(tmp_path / "c.npy", mmap_mode="r")
  scores, ids = search.top_k(q, c, 20, q_chunk=7, c_chunk=32)
  ref_scores, ref_ids = reference(np.asarray(q), np.asarray(c), 20)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  scores, ids = search.top_k(q, c, 20, dim=8, normalize=True, q_chunk=7, c_chunk=32)
  ref_scores, ref_ids = reference(unit(q[:, :8]), unit(c[:, :8]), 20)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_allclose(scores, ref_scores, atol=1e-6)


def test_merge_keeps_the_first_set_on_ties():
  s, i = search.merge(np.array([[3., 1.]]), np.array([[7, 2]]), np.array([[3., 2.]]), np.array([[9, 4]]), 3)
  np.testing.assert_array_equal(s, [[3, 3, 2]])
  np.testing.assert_array_equal(i, [[7, 9, 4]])


@pytest.mark.parametrize("devices,c_chunk,k,approx", [(1, 7, 10, False), (8, 5, 100, False), (8, 101, 3, True)])
def test_resident_corpus_on_a_mesh_equals_stable_sort(tied, devices, c_chunk, k, approx):
  """top_k(mesh=): the corpus sharded over the devices, each device's blocks scanned, the top-k merged."""
  q, c = tied
  mesh = jax.make_mesh((devices,), ("corpus",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:devices])
  scores, ids = search.top_k(q, c, k, q_chunk=8, c_chunk=c_chunk, mesh=mesh, approx=approx)  # approx: exact on CPU.
  ref_scores, ref_ids = reference(q, c, k)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(scores, ref_scores)
  assert search.process_rows(len(c), mesh, c_chunk) == (0, len(c))
