"""Exact top-k search by dot product, in fixed-shape query x corpus chunks: retrieval scoring, mining.

Two modes, the same results. Streamed (`top_k`): the corpus stays on the host and is read one chunk at a
time; memory is one [q_chunk, c_chunk] score block and one chunk each of queries and corpus on the device,
whatever Q and C: the inputs may be np.memmap arrays larger than RAM. Resident (`place` then `iter_top_k`,
or `top_k(..., mesh=)`): the corpus is sharded over every device of a mesh (contiguous row blocks, device
order = corpus order) for many searches; each device scans its shard in [q_chunk, block] score blocks, then
the devices' top-k are gathered and merged. Device memory: C x D / devices + q_chunk x block.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

Q_CHUNK, C_CHUNK = 1024, 16384  # A [1024, 16384] float32 score block: 64 MB.


def merge(s_BT, i_BT, s_BN, i_BN, k):
  """The k best of two candidate sets per row, best first; equal scores keep the first set's order, then
  the second's (callers put lower corpus ids first)."""
  s_BT, pos_BT = jax.lax.top_k(jnp.concatenate([s_BT, s_BN], 1), k)  # Stable: ties -> lower position.
  return s_BT, jnp.take_along_axis(jnp.concatenate([i_BT, i_BN], 1), pos_BT, 1)


@functools.partial(jax.jit, static_argnames="k", donate_argnums=(0, 1))
def _step(s_BT, i_BT, q_BD, c_ND, start, n_valid, k):
  """The running top-k of a query chunk merged with a corpus chunk's (rows >= n_valid are padding)."""
  s_BN = jnp.matmul(q_BD, c_ND.T, precision="highest")
  s_BN = jnp.where(jnp.arange(c_ND.shape[0]) < n_valid, s_BN, -jnp.inf)
  top_BT, pos_BT = jax.lax.top_k(s_BN, k)
  return merge(s_BT, i_BT, top_BT, start + pos_BT, k)


def normalize(x_ND) -> np.ndarray:
  """Rows L2-normalised on the host (zero rows stay zero); losses.normalize is the one in JAX."""
  return x_ND / np.maximum(np.linalg.norm(x_ND, axis=1, keepdims=True), 1e-12)


def _rows(x_ND, start, n, dim, unit) -> np.ndarray:
  """float32 [n, dim]: rows start.. of x (zeros past its end), first dim coordinates, optionally L2-normalised."""
  out_ND = np.zeros((n, dim), np.float32)
  rows = x_ND[start:start + n, :dim]
  out_ND[:len(rows)] = rows
  return normalize(out_ND) if unit else out_ND


def _even(n, chunk) -> int:
  """The size of ceil(n / chunk) equal chunks covering n: the least padding for as many chunks."""
  return -(-n // -(-n // chunk))


def top_k(q_QD, c_CD, k, *, dim=None, normalize=False, q_chunk=Q_CHUNK, c_chunk=C_CHUNK, mesh=None, approx=False):
  """(scores float32 [Q, T], corpus ids int64 [Q, T]) of the T = min(k, C) highest dot products per query.

  Exact; best first, equal scores in corpus order (lowest id first), as a stable numpy argsort of the
  same scores. Scores come from float32 chunk matmuls, so they may differ from another computation's in
  the last bits, and only exact ties are ordered by id. dim: score the first dim coordinates; normalize:
  L2-normalise those first (cosine). Chunks are evened out and the last padded: one program per call.
  mesh: place the corpus on the mesh's devices first and search it there (see iter_top_k; approx too).
  """
  if mesh is not None:
    corpus = place(c_CD, mesh, dim=dim, normalize=normalize, c_chunk=c_chunk)
    parts = list(iter_top_k(q_QD, corpus, k, dim=dim, normalize=normalize, q_chunk=q_chunk, approx=approx))
    return np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]).astype(np.int64)
  Q, C = len(q_QD), len(c_CD)
  k = min(k, C)
  dim = dim or q_QD.shape[1]
  q_chunk, c_chunk = _even(Q, q_chunk), max(_even(C, c_chunk), k)
  scores_QT, ids_QT = np.empty((Q, k), np.float32), np.empty((Q, k), np.int64)
  for qs in range(0, Q, q_chunk):
    q_BD = jnp.asarray(_rows(q_QD, qs, q_chunk, dim, normalize))
    s_BT, i_BT = jnp.full((q_chunk, k), -jnp.inf, jnp.float32), jnp.zeros((q_chunk, k), jnp.int32)
    for cs in range(0, C, c_chunk):
      c_ND = jnp.asarray(_rows(c_CD, cs, c_chunk, dim, normalize))  # While the previous step runs.
      s_BT.block_until_ready()  # One step in flight: dispatching ahead would queue up corpus copies.
      s_BT, i_BT = _step(s_BT, i_BT, q_BD, c_ND, cs, min(c_chunk, C - cs), k)
    n = min(q_chunk, Q - qs)
    scores_QT[qs:qs + n], ids_QT[qs:qs + n] = np.asarray(s_BT)[:n], np.asarray(i_BT)[:n]
  return scores_QT, ids_QT


# Resident corpus, sharded over a mesh.

@dataclasses.dataclass(frozen=True)
class Sharded:
  """A corpus on a mesh: c_XD [devices x rows per device, D] in contiguous row blocks over all the mesh's
  devices (row i is corpus id i); rows >= size are zero padding. Each device scans its rows `block` at a time."""
  c_XD: jax.Array
  size: int
  block: int
  mesh: jax.sharding.Mesh

  @property
  def sharding(self) -> NamedSharding:
    return corpus_sharding(self.mesh)


def corpus_sharding(mesh) -> NamedSharding:
  """Rows split over every device of the mesh (all its axes), in device order."""
  return NamedSharding(mesh, P(mesh.axis_names))


def layout(C, n_devices, c_chunk=C_CHUNK) -> tuple[int, int]:
  """(rows per device: ceil(C / n_devices), block: the size of the fewest equal blocks of at most c_chunk rows
  that cover them). A device scans its whole blocks, then the rows left (fewer than a block)."""
  per = max(-(-C // n_devices), 1)
  return per, _even(per, c_chunk)


def process_rows(C, mesh, c_chunk=C_CHUNK) -> tuple[int, int]:
  """[lo, hi): the corpus ids whose rows live on this process's devices (all of them with one process)."""
  per, _ = layout(C, mesh.size, c_chunk)
  index = corpus_sharding(mesh).addressable_devices_indices_map((per * mesh.size, 1))
  spans = [i[0].indices(per * mesh.size)[:2] for i in index.values()]
  return min(min(lo for lo, _ in spans), C), min(max(hi for _, hi in spans), C)


def place(c_CD, mesh, *, size=None, start=0, dim=None, normalize=False, c_chunk=C_CHUNK) -> Sharded:
  """Puts a corpus of `size` rows (default len(c_CD)) on the mesh; c_CD holds rows start.. (with several
  processes, at least this process's process_rows). dim / normalize as top_k, row by row."""
  size = len(c_CD) + start if size is None else size
  dim = dim or c_CD.shape[1]
  per, block = layout(size, mesh.size, c_chunk)

  def rows(index):
    lo, hi, _ = index[0].indices(per * mesh.size)
    if hi <= size and not normalize and dim == c_CD.shape[1] and c_CD.dtype == np.float32:
      return np.asarray(c_CD[lo - start:hi - start])  # As they are: no host copy beyond the device's.
    return _rows(c_CD, lo - start, hi - lo, dim, normalize) if lo < size else np.zeros((hi - lo, dim), np.float32)
  c_XD = jax.make_array_from_callback((per * mesh.size, dim), corpus_sharding(mesh), rows)
  return Sharded(c_XD, size, block, mesh)


@functools.lru_cache(maxsize=None)
def _sharded_step(mesh, k, block, approx):
  """jit(shard_map) of (q_BD, c_XD, size, ids_BP) -> (top-k scores, ids [B, k]; scores of ids_BP, 0 where < 0)."""
  axes = mesh.axis_names
  select = functools.partial(jax.lax.approx_max_k, recall_target=0.95) if approx else jax.lax.top_k

  def local(q_BD, c_XD, size, ids_BP):
    X, B = c_XD.shape[0], q_BD.shape[0]
    base = jax.lax.axis_index(axes) * X

    def scan_block(carry, c_ND, first):
      ids_N = first + jnp.arange(c_ND.shape[0])
      s_BN = jnp.where(ids_N < size, jnp.matmul(q_BD, c_ND.T, precision="highest"), -jnp.inf)
      top_BT, pos_BT = select(s_BN, min(k, c_ND.shape[0]))
      return merge(*carry, top_BT, ids_N[pos_BT], k)
    carry, n = (jnp.full((B, k), -jnp.inf, jnp.float32), jnp.zeros((B, k), jnp.int32)), X // block
    if n:  # Blocks are sliced inside the loop: a slice of c_XD taken outside it would be a copy of the shard.
      one = lambda c, j: (scan_block(c, jax.lax.dynamic_slice_in_dim(c_XD, j * block, block), base + j * block), None)
      carry = jax.lax.scan(one, carry, jnp.arange(n))[0]
    if X % block:
      carry = scan_block(carry, c_XD[n * block:], base + n * block)
    s_BT, i_BT = carry
    s_BN, i_BN = (jax.lax.all_gather(x, axes, axis=1, tiled=True) for x in (s_BT, i_BT))  # Device order = id order.
    s_BT, pos_BT = jax.lax.top_k(s_BN, k)
    mine_BP = (ids_BP >= base) & (ids_BP < base + X)
    rows_BPD = c_XD[jnp.clip(ids_BP - base, 0, X - 1)]
    g_BP = jnp.where(mine_BP, jnp.einsum("bd,bpd->bp", q_BD, rows_BPD, precision="highest"), 0.0)
    return s_BT, jnp.take_along_axis(i_BN, pos_BT, 1), jax.lax.psum(g_BP, axes)
  # Outputs are replicated: every device merges the same gathered candidates (not inferred through all_gather).
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axes), P(), P()), out_specs=(P(), P(), P()),
                               check_vma=False))


def _replicated(x, mesh) -> jax.Array:
  """The same host array on every device of the mesh (every process passes the same values)."""
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P()), lambda index: x[index])


def _host(x) -> np.ndarray:
  """A replicated array's value, from this process's first device."""
  return np.asarray(x.addressable_data(0))


def iter_top_k(q_QD, corpus: Sharded, k, *, ids_QP=None, dim=None, normalize=False, q_chunk=Q_CHUNK, approx=False):
  """Yields (first query, scores float32 [n, T], ids int32 [n, T], scores of ids_QP float32 [n, P]) per chunk
  of n queries: top_k's results against a placed corpus, computed on all of its mesh's devices.

  ids_QP: int corpus ids per query (-1: none) whose scores to return too (a row's positives). approx: each
  block's candidates from jax.lax.approx_max_k (recall target 0.95; exact on CPU), not exact top_k. Every
  process must call this with the same queries (the search is collective).
  """
  Q, k = len(q_QD), min(k, corpus.size)
  dim, q_chunk = dim or q_QD.shape[1], _even(Q, q_chunk)
  ids_QP = np.full((Q, 1), -1, np.int32) if ids_QP is None else np.asarray(ids_QP, np.int32)
  step = _sharded_step(corpus.mesh, k, corpus.block, approx)
  size = _replicated(np.int32(corpus.size), corpus.mesh)
  for qs in range(0, Q, q_chunk):
    n = min(q_chunk, Q - qs)
    ids_BP = np.full((q_chunk, ids_QP.shape[1]), -1, np.int32)
    ids_BP[:n] = ids_QP[qs:qs + n]
    q_BD = _replicated(_rows(q_QD, qs, q_chunk, dim, normalize), corpus.mesh)
    s_BT, i_BT, g_BP = step(q_BD, corpus.c_XD, size, _replicated(ids_BP, corpus.mesh))
    yield qs, _host(s_BT)[:n], _host(i_BT)[:n], _host(g_BP)[:n]
