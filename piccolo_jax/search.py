"""Exact top-k search by dot product, in fixed-shape query x corpus chunks: retrieval scoring, mining.

Memory is one [q_chunk, c_chunk] score block and one chunk each of queries and corpus on the device,
whatever Q and C: the inputs may be np.memmap arrays larger than RAM (only chunks are read).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

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


def _rows(x_ND, start, n, dim, normalize) -> np.ndarray:
  """float32 [n, dim]: rows start.. of x (zeros past its end), first dim coordinates, optionally L2-normalised."""
  out_ND = np.zeros((n, dim), np.float32)
  rows = x_ND[start:start + n, :dim]
  out_ND[:len(rows)] = rows
  if normalize:  # As evaluate.normalize, row by row: the same bits.
    out_ND /= np.maximum(np.linalg.norm(out_ND, axis=1, keepdims=True), 1e-12)
  return out_ND


def _even(n, chunk) -> int:
  """The size of ceil(n / chunk) equal chunks covering n: the least padding for as many chunks."""
  return -(-n // -(-n // chunk))


def top_k(q_QD, c_CD, k, *, dim=None, normalize=False, q_chunk=Q_CHUNK, c_chunk=C_CHUNK):
  """(scores float32 [Q, T], corpus ids int64 [Q, T]) of the T = min(k, C) highest dot products per query.

  Exact; best first, equal scores in corpus order (lowest id first), as a stable numpy argsort of the
  same scores. Scores come from float32 chunk matmuls, so they may differ from another computation's in
  the last bits, and only exact ties are ordered by id. dim: score the first dim coordinates; normalize:
  L2-normalise those first (cosine). Chunks are evened out and the last padded: one program per call.
  """
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
