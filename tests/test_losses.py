"""Tests for piccolo_jax.losses against independent float64 numpy references."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from piccolo_jax import config
from piccolo_jax import losses as L
from piccolo_jax import tasks

EPS = 1e-8


# ---------------------------------------------------------------------------
# float64 numpy references, written from the issue text with plain loops.


def np_lse(x):
  x = np.asarray(x, np.float64)
  m = x.max()
  return m + np.log(np.sum(np.exp(x - m)))


def np_cos(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return a @ b / (max(np.linalg.norm(a), EPS) * max(np.linalg.norm(b), EPS))


def ref_retrieval_rows(q, p, n=None, t=0.01, n_mask=None):
  cands = list(p)
  if n is not None:
    n = np.asarray(n).reshape(-1, q.shape[-1])
    keep = np.ones(len(n), bool) if n_mask is None else np.ravel(n_mask)
    cands += [v for v, k in zip(n, keep) if k]
  rows = []
  for i in range(len(q)):
    logits = [np_cos(q[i], c) / t for c in cands]
    rows.append(np_lse(logits) - logits[i])
  return np.array(rows)


def ref_retrieval(q, p, n=None, t=0.01, n_mask=None):
  return ref_retrieval_rows(q, p, n, t, n_mask).mean()


def ref_cosent(a, b, labels, t=0.05, w=0.04):
  s = [np_cos(a[i], b[i]) / t for i in range(len(a))]
  terms = [0.0]  # The "1 +" inside the log.
  for i in range(len(a)):
    for j in range(len(a)):
      if labels[j] > labels[i]:
        terms.append(s[i] - s[j])
  return w * np_lse(terms)


def ref_cls_rows(q, p, n, t=0.05, w=0.2, n_mask=None):
  rows = []
  for i in range(len(q)):
    keep = np.ones(n.shape[1], bool) if n_mask is None else n_mask[i]
    logits = [np_cos(q[i], p[i]) / t]
    logits += [np_cos(q[i], n[i, k]) / t for k in range(n.shape[1]) if keep[k]]
    rows.append(w * (np_lse(logits) - logits[0]))
  return np.array(rows)


def ref_cls(q, p, n, t=0.05, w=0.2, n_mask=None):
  return ref_cls_rows(q, p, n, t, w, n_mask).mean()


def rand(rng, *shape):
  """Raw embeddings with very different norms per vector."""
  x = rng.normal(size=shape)
  return x * rng.uniform(0.1, 10.0, size=shape[:-1] + (1,))


def fd_grads(f, xs, h=1e-6):
  """Central finite differences of a float64 numpy function."""
  grads = []
  for k, x in enumerate(xs):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
      hi = [y.copy() for y in xs]
      lo = [y.copy() for y in xs]
      hi[k][idx] += h
      lo[k][idx] -= h
      g[idx] = (f(*hi) - f(*lo)) / (2 * h)
    grads.append(g)
  return grads


@pytest.fixture(scope="module")
def shard():
  assert jax.device_count() == 8, "conftest should give 8 fake CPU devices"
  mesh = jax.make_mesh((8,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P("data"))
  def put(*xs):
    out = [jax.device_put(np.asarray(x, np.float32), sharding) for x in xs]
    for x in out:
      assert len(x.sharding.device_set) == 8 and not x.is_fully_replicated
    return out
  return put


# ---------------------------------------------------------------------------
# Hand-computed closed forms.


def test_retrieval_closed_form():
  q = np.array([[3.0, 0.0], [0.0, 0.5]])  # Unnormalised on purpose.
  p = np.array([[2.0, 0.0], [0.0, 7.0]])
  got = L.retrieval_infonce(q, p, temperature=1.0)
  np.testing.assert_allclose(got, np.log1p(np.exp(-1.0)), rtol=1e-6)
  n = np.array([[-4.0, 0.0]])
  row0 = np.log(np.e + 1 + np.exp(-1)) - 1
  row1 = np.log(1 + np.e + 1) - 1
  got = L.retrieval_infonce(q, p, n, temperature=1.0)
  np.testing.assert_allclose(got, (row0 + row1) / 2, rtol=1e-6)


def test_cosent_closed_form():
  a = np.array([[1.0, 0.0], [2.0, 0.0]])
  b = np.array([[5.0, 0.0], [0.0, 1.0]])  # s = [1/T, 0] = [20, 0].
  got = L.cosent(a, b, np.array([0, 1]))  # Pair (0, 1): exp(20 - 0).
  np.testing.assert_allclose(got, 0.04 * np.log1p(np.exp(20.0)), rtol=1e-6)
  got = L.cosent(a, b, np.array([1, 0]))  # Pair (1, 0): exp(0 - 20).
  np.testing.assert_allclose(got, 0.04 * np.log1p(np.exp(-20.0)), atol=1e-9)
  got = L.cosent(a, b, np.array([1, 0]), temperature=1.0, weight=1.0)
  np.testing.assert_allclose(got, np.log1p(np.exp(-1.0)), rtol=1e-6)
  assert float(L.cosent(a, b, np.array([3, 3]))) == 0.0  # Tie: nothing.


def test_cls_closed_form():
  q = np.array([[1.0, 0.0]])
  p = np.array([[0.0, 2.0]])  # cos 0.
  n = np.array([[[3.0, 0.0], [-1.0, 0.0]]])  # cos 1, -1.
  want = 0.2 * np.log(1 + np.exp(20.0) + np.exp(-20.0))  # T = 0.05.
  np.testing.assert_allclose(L.cls_contrast(q, p, n), want, rtol=1e-6)
  p = np.array([[1.0, 1.0]])  # cos 1/sqrt2.
  c = 1 / np.sqrt(2)
  want = np.log(np.exp(c) + np.e + np.exp(-1.0)) - c
  got = L.cls_contrast(q, p, n, temperature=1.0, weight=1.0)
  np.testing.assert_allclose(got, want, rtol=1e-6)


# ---------------------------------------------------------------------------
# Random cases against the references (defaults = the original's).


@pytest.mark.parametrize("neg", ["none", "MD", "BKD"])
def test_retrieval_reference(neg):
  rng = np.random.default_rng(0)
  q, p = rand(rng, 4, 6), rand(rng, 4, 6)
  n = {"none": None, "MD": rand(rng, 5, 6), "BKD": rand(rng, 4, 3, 6)}[neg]
  got = L.retrieval_infonce(q, p, n)
  assert got.shape == () and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref_retrieval(q, p, n), rtol=1e-5, atol=1e-4)
  got2 = L.retrieval_infonce(q, p, n, temperature=0.1, weight=0.5)
  np.testing.assert_allclose(got2, 0.5 * ref_retrieval(q, p, n, 0.1),
                             rtol=1e-5, atol=1e-5)
  if neg == "BKD":  # Every query sees all B*K negatives, not only its own.
    flat = L.retrieval_infonce(q, p, n.reshape(-1, 6))
    np.testing.assert_allclose(got, flat, rtol=1e-6)


def test_retrieval_n_mask():
  rng = np.random.default_rng(1)
  q, p, n = rand(rng, 3, 5), rand(rng, 3, 5), rand(rng, 3, 2, 5)
  mask = np.array([[1, 0], [0, 0], [1, 1]], bool)
  got = L.retrieval_infonce(q, p, n, n_mask=mask)
  np.testing.assert_allclose(got, ref_retrieval(q, p, n, n_mask=mask),
                             rtol=1e-5, atol=1e-4)
  g = jax.grad(L.retrieval_infonce, argnums=2)(q, p, n, n_mask=mask)
  assert np.all(np.asarray(g)[~mask] == 0) and np.all(np.isfinite(g))


@pytest.mark.parametrize("labels", [
    [0, 1, 2, 1, 0, 2],  # Ints with ties.
    [0.1, 3.5, 3.5, 2.0, 0.1, 4.9],  # Floats with ties.
    [1, 0, 1, 0, 1, 0],  # Pair classification.
])
def test_cosent_reference(labels):
  rng = np.random.default_rng(2)
  a, b = rand(rng, 6, 4), rand(rng, 6, 4)
  got = L.cosent(a, b, np.array(labels))
  assert got.shape == () and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref_cosent(a, b, labels), rtol=1e-5)
  ties_only = [labels[0]] * 6
  assert float(L.cosent(a, b, np.array(ties_only))) == 0.0


def test_cosent_ties_add_nothing():
  rng = np.random.default_rng(3)
  a, b = rand(rng, 3, 4), rand(rng, 3, 4)
  # Rows 1 and 2 tie: only pairs with row 0 count, whatever their scores.
  want = ref_cosent(a, b, [0, 1, 1])
  s = [np_cos(a[i], b[i]) / 0.05 for i in range(3)]
  by_hand = 0.04 * np.log(1 + np.exp(s[0] - s[1]) + np.exp(s[0] - s[2]))
  np.testing.assert_allclose(want, by_hand, rtol=1e-12)
  np.testing.assert_allclose(L.cosent(a, b, np.array([0, 1, 1])), by_hand,
                             rtol=1e-5)


def test_cls_reference_and_flat_negatives():
  rng = np.random.default_rng(4)
  q, p, n = rand(rng, 4, 6), rand(rng, 4, 6), rand(rng, 4, 3, 6)
  got = L.cls_contrast(q, p, n)
  assert got.shape == () and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref_cls(q, p, n), rtol=1e-5)
  flat = L.cls_contrast(q, p, n.reshape(12, 6))  # The original's layout.
  np.testing.assert_allclose(flat, got, rtol=1e-6)
  got = L.cls_contrast(q, p, n, temperature=0.1, weight=1.0)
  np.testing.assert_allclose(got, ref_cls(q, p, n, 0.1, 1.0), rtol=1e-5)


def test_cls_n_mask_contributes_nothing():
  rng = np.random.default_rng(5)
  q, p, n = rand(rng, 3, 5), rand(rng, 3, 5), rand(rng, 3, 4, 5)
  mask = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]], bool)
  got = L.cls_contrast(q, p, n, n_mask=mask)
  np.testing.assert_allclose(got, ref_cls(q, p, n, n_mask=mask), rtol=1e-5)
  junk = n.copy()
  junk[~mask] = 1e3 * rng.normal(size=junk[~mask].shape)
  junk[2, 0] = 0.0  # A zero (padding) vector too.
  assert float(L.cls_contrast(q, p, junk, n_mask=mask)) == float(got)
  g = jax.grad(L.cls_contrast, argnums=(0, 1, 2))(q, p, junk, n_mask=mask)
  assert all(np.all(np.isfinite(x)) for x in g)
  assert np.all(np.asarray(g[2])[~mask] == 0)
  np.testing.assert_allclose(np.asarray(g[0])[2], 0, atol=1e-6)  # Row 2: p only.
  all_masked = L.cls_contrast(q, p, n, n_mask=np.zeros((3, 4), bool))
  np.testing.assert_allclose(all_masked, 0.0, atol=1e-7)


# ---------------------------------------------------------------------------
# Sharding: 8 fake CPU devices, batch on the "data" axis, jitted losses.


@pytest.mark.parametrize("with_neg", [True, False])
def test_retrieval_sharded_is_global(shard, with_neg):
  rng = np.random.default_rng(6)
  q, p, n = rand(rng, 16, 8), rand(rng, 16, 8), rand(rng, 16, 2, 8)
  n = n if with_neg else None
  args = shard(q, p) + (shard(n) if with_neg else [None])
  got = jax.jit(L.retrieval_infonce)(*args)
  single = L.retrieval_infonce(q, p, n)
  want = ref_retrieval(q, p, n)
  np.testing.assert_allclose(got, single, rtol=1e-5)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  per_shard = np.mean([
      ref_retrieval(q[s:s + 2], p[s:s + 2], None if n is None else n[s:s + 2])
      for s in range(0, 16, 2)])
  assert abs(float(got) - per_shard) > 0.5, (float(got), per_shard)


def test_cosent_and_mrl_sharded_are_global(shard):
  rng = np.random.default_rng(7)
  a, b = rand(rng, 16, 8), rand(rng, 16, 8)
  labels = rng.integers(0, 5, size=16)
  got = jax.jit(L.cosent)(*shard(a, b), jnp.asarray(labels))
  np.testing.assert_allclose(got, ref_cosent(a, b, labels), rtol=1e-5)
  q, p, n = rand(rng, 16, 8), rand(rng, 16, 8), rand(rng, 16, 2, 8)
  mrl = L.matryoshka(L.retrieval_infonce, (4, 8))
  got = jax.jit(mrl)(*shard(q, p, n))
  want = np.mean([ref_retrieval(q[:, :d], p[:, :d], n[..., :d])
                  for d in (4, 8)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def _grads_before_after(fn, shard, q, p, n, j):
  grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))
  v0, g0 = grad(*shard(q, p, n))
  rng = np.random.default_rng(8)
  q1, p1, n1 = q.copy(), p.copy(), n.copy()
  q1[j] += rng.normal(size=q[j].shape)
  p1[j] += rng.normal(size=p[j].shape)
  n1[j] += rng.normal(size=n[j].shape)
  v1, g1 = grad(*shard(q1, p1, n1))
  others = np.arange(len(q)) != j
  diff = [np.abs(np.asarray(a) - np.asarray(b)) for a, b in zip(g0, g1)]
  delta = max(d[others].max() for d in diff)
  assert min(d[j].max() for d in diff) > 1e-4  # Row j's own grads do move.
  return (q1, p1, n1), (float(v0), float(v1)), delta


def test_cls_row_independent_of_other_rows(shard):
  rng = np.random.default_rng(9)
  q, p, n = rand(rng, 16, 8), rand(rng, 16, 8), rand(rng, 16, 3, 8)
  j = 5  # Shares a device with row 4, not with the rest.
  cls = functools.partial(L.cls_contrast, temperature=0.5)  # Not saturated.
  (q1, p1, n1), (v0, v1), delta = _grads_before_after(cls, shard, q, p, n, j)
  assert delta < 1e-7  # d loss / d row i unchanged for every i != j.
  rows0, rows1 = ref_cls_rows(q, p, n, 0.5), ref_cls_rows(q1, p1, n1, 0.5)
  np.testing.assert_allclose(rows1[~(np.arange(16) == j)],
                             rows0[~(np.arange(16) == j)], rtol=1e-12)
  np.testing.assert_allclose(v1 - v0, (rows1[j] - rows0[j]) / 16,
                             rtol=1e-2, atol=1e-6)
  # Control: retrieval has in-batch negatives, so the same probe must move.
  retrieval = functools.partial(L.retrieval_infonce, temperature=0.5)
  _, _, delta = _grads_before_after(retrieval, shard, q, p, n, j)
  assert delta > 1e-5  # vs < 1e-7 above.


# ---------------------------------------------------------------------------
# Gradients vs float64 finite differences of the numpy references.


def _check_grad(fn, ref, xs, argnums, **kw):
  with jax.enable_x64(True):
    xs64 = [jnp.asarray(x, jnp.float64) for x in xs]
    value, got = jax.jit(jax.value_and_grad(fn, argnums))(*xs64, **kw)
    assert value.dtype == jnp.float64
    np.testing.assert_allclose(value, ref(*xs), rtol=1e-10)
  fd_xs = [xs[i] for i in argnums]
  def f(*ys):
    zs = list(xs)
    for i, y in zip(argnums, ys):
      zs[i] = y
    return ref(*zs)
  want = fd_grads(f, fd_xs)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_grad_retrieval():
  rng = np.random.default_rng(10)
  xs = [rand(rng, 3, 4), rand(rng, 3, 4), rand(rng, 3, 2, 4)]
  _check_grad(L.retrieval_infonce, ref_retrieval, xs, (0, 1, 2))


def test_grad_cosent():
  rng = np.random.default_rng(11)
  labels = np.array([0.0, 2.0, 1.0, 2.0])
  xs = [rand(rng, 4, 3), rand(rng, 4, 3)]
  _check_grad(lambda a, b: L.cosent(a, b, labels),
              lambda a, b: ref_cosent(a, b, labels), xs, (0, 1))


def test_grad_cls():
  rng = np.random.default_rng(12)
  mask = np.array([[1, 1, 0], [1, 1, 1], [0, 1, 0]], bool)
  xs = [rand(rng, 3, 4), rand(rng, 3, 4), rand(rng, 3, 3, 4)]
  _check_grad(lambda q, p, n: L.cls_contrast(q, p, n, n_mask=mask),
              lambda q, p, n: ref_cls(q, p, n, n_mask=mask), xs, (0, 1, 2))


def test_grad_matryoshka():
  rng = np.random.default_rng(13)
  xs = [rand(rng, 3, 6), rand(rng, 3, 6), rand(rng, 3, 2, 6)]
  mrl = L.matryoshka(L.cls_contrast, (2, 4, 6), weights=(1.0, 2.0, 3.0))
  def ref(q, p, n):
    return sum(w * ref_cls(q[:, :d], p[:, :d], n[..., :d])
               for w, d in zip((1, 2, 3), (2, 4, 6))) / 6
  _check_grad(mrl, ref, xs, (0, 1, 2))


# ---------------------------------------------------------------------------
# Matryoshka wrapper.


def test_matryoshka_is_mean_over_prefixes():
  rng = np.random.default_rng(14)
  dims = (4, 8, 12)  # Full size 16 is not among them.
  q, p, n = rand(rng, 4, 16), rand(rng, 4, 16), rand(rng, 4, 3, 16)
  labels = np.array([0.5, 0.1, 0.9, 0.5])  # Length 4 == dims[0]: not sliced.
  mask = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], bool)
  cases = [
      (L.retrieval_infonce, (q, p, n), {},
       lambda d: ref_retrieval(q[:, :d], p[:, :d], n[..., :d])),
      (L.retrieval_infonce, (q, p), {},
       lambda d: ref_retrieval(q[:, :d], p[:, :d])),
      (L.cosent, (q, p, labels), {},
       lambda d: ref_cosent(q[:, :d], p[:, :d], labels)),
      (L.cls_contrast, (q, p, n), {"n_mask": mask},
       lambda d: ref_cls(q[:, :d], p[:, :d], n[..., :d], n_mask=mask)),
  ]
  for fn, args, kw, ref in cases:
    per_dim = np.array([ref(d) for d in dims])
    got = L.matryoshka(fn, dims)(*args, **kw)
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(got, per_dim.mean(), rtol=1e-5, atol=1e-5)
    # Equals the mean of the wrapped loss itself at each prefix.
    direct = [fn(*[x[..., :d] if x.ndim >= 2 else x for x in args], **kw)
              for d in dims]
    np.testing.assert_allclose(got, np.mean(direct), rtol=1e-6)
    total, losses = L.matryoshka(fn, dims, (1.0, 0.0, 3.0),
                                 return_per_dim=True)(*args, **kw)
    assert losses.shape == (3,)
    np.testing.assert_allclose(losses, per_dim, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(total, (per_dim[0] + 3 * per_dim[2]) / 4,
                               rtol=1e-5, atol=1e-5)


def test_matryoshka_defaults_and_validation():
  rng = np.random.default_rng(15)
  q, p = rand(rng, 2, 1792), rand(rng, 2, 1792)
  assert config.MRL_DIMS == (256, 512, 768, 1024, 1280, 1536, 1792)
  got = L.matryoshka(L.retrieval_infonce)(q, p)
  want = np.mean([ref_retrieval(q[:, :d], p[:, :d]) for d in config.MRL_DIMS])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="dim 1280 exceeds the embedding size "
                     "1024"):
    L.matryoshka(L.retrieval_infonce)(q[:, :1024], p[:, :1024])
  with pytest.raises(ValueError, match="increasing"):
    L.matryoshka(L.cosent, (8, 4))
  with pytest.raises(ValueError, match="dim 0 must be positive"):
    L.matryoshka(L.cosent, (0, 4))
  with pytest.raises(ValueError, match="2 Matryoshka weights for 3 dims"):
    L.matryoshka(L.cosent, (2, 4, 8), weights=(1.0, 1.0))
  with pytest.raises(ValueError, match="disagree"):
    L.matryoshka(L.cosent, (2,))(q, p[:, :8], np.zeros(2))


# ---------------------------------------------------------------------------
# Numerics: degenerate inputs, large logits, bf16.


def _finite_everywhere(fn, *args, **kw):
  emb = tuple(i for i, x in enumerate(args) if np.ndim(x) >= 2)
  value, grads = _jit_vg(fn, emb)(*args, **kw)
  assert np.isfinite(value), value
  assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)
  return float(value)


_CACHE = {}
MRL_CLS = L.matryoshka(L.cls_contrast, (4, 8))


def _jit_vg(fn, argnums):
  """One compiled value_and_grad per (fn, argnums); temperature is traced."""
  key = (fn, argnums)
  if key not in _CACHE:
    _CACHE[key] = jax.jit(jax.value_and_grad(fn, argnums=argnums))
  return _CACHE[key]


def test_no_nan_or_inf():
  rng = np.random.default_rng(16)
  z, zn = np.zeros((4, 8), np.float32), np.zeros((4, 3, 8), np.float32)
  same = np.tile(rng.normal(size=(1, 8)), (4, 1)).astype(np.float32)
  same_n = np.tile(same[:, None], (1, 3, 1))
  big = (1e4 * rand(rng, 4, 8)).astype(np.float32)
  big_n = (1e4 * rand(rng, 4, 3, 8)).astype(np.float32)
  labels = np.array([0, 1, 2, 3])
  for q, p, n in [(z, z, zn), (same, same, same_n), (big, big, big_n),
                  (big, z, big_n)]:
    for t in (0.01, 0.001):
      _finite_everywhere(L.retrieval_infonce, q, p, n, temperature=t)
      _finite_everywhere(L.retrieval_infonce, q, p, temperature=t)
      _finite_everywhere(L.cosent, q, p, labels, temperature=t)
      _finite_everywhere(L.cls_contrast, q, p, n, temperature=t)
      _finite_everywhere(MRL_CLS, q, p, n, temperature=t)
  # Zero vectors: every cosine is 0, so logits tie.
  np.testing.assert_allclose(L.retrieval_infonce(z, z, zn), np.log(16),
                             rtol=1e-6)
  np.testing.assert_allclose(L.cls_contrast(z, z, zn), 0.2 * np.log(4),
                             rtol=1e-6)
  # All-equal labels: no pair, loss is exactly w * log(1) = 0.
  assert _finite_everywhere(L.cosent, big, big_n[:, 0], np.ones(4)) == 0.0
  # Large logits (cos / 0.001 up to 1000) still match the reference.
  q, p = rand(rng, 4, 8), rand(rng, 4, 8)
  np.testing.assert_allclose(L.retrieval_infonce(q, p, temperature=1e-3),
                             ref_retrieval(q, p, t=1e-3), rtol=1e-4, atol=1e-2)


def test_bfloat16_inputs_compute_in_float32():
  rng = np.random.default_rng(17)
  q, p, n = rand(rng, 4, 8), rand(rng, 4, 8), rand(rng, 4, 2, 8)
  bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, p, n)]
  f32 = [np.asarray(x, np.float32) for x in bf]  # Same values, upcast.
  assert L.normalize(bf[0]).dtype == jnp.float32
  for fn, extra in [(L.retrieval_infonce, ()), (L.cls_contrast, ())]:
    got = fn(*bf, *extra)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, fn(*f32, *extra), rtol=1e-6)
  got = L.cosent(bf[0], bf[1], np.array([0, 1, 2, 1]))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref_cosent(f32[0], f32[1], [0, 1, 2, 1]),
                             rtol=1e-5)


def test_normalize_and_task_table():
  x = np.array([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(L.normalize(x), [[0.6, 0.8], [0.0, 0.0]],
                             rtol=1e-6)
  assert {n: t.loss for n, t in tasks.TASKS.items()} == {
      "retrieval": L.retrieval, "sts": L.cosent, "cls": L.cls_contrast, "distill": L.embedding_distill}
