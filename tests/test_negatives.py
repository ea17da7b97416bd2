"""In-batch false-negative and duplicate masking (losses.candidate_mask), against float64 numpy loops."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_losses import _check_grad, np_cos, np_lse, rand, shard  # pylint: disable=unused-import  (fixture)
from piccolo_jax import config, losses as L, step as step_lib
from piccolo_jax import models


def ref_keep(q, p, n, n_mask, pos_id, neg_id, ps=None, ns=None, dup=True, judge="off", margin=0.0, relative=False):
  """bool [B, N] by the rule as the issue states it, one row and one candidate at a time."""
  B, K = len(q), (0 if n is None else n.shape[1])
  cands = [(p[j], pos_id[j], None, True) for j in range(B)]
  for i in range(B):
    for k in range(K):
      cands.append((n[i, k], neg_id[i, k], (i, k), n_mask is None or n_mask[i, k]))
  keep = np.ones((B, len(cands)), bool)
  for i in range(B):
    s_pos = np_cos(q[i], p[i])
    for c, (v, pid, own_neg, valid) in enumerate(cands):
      if c == i or not valid:
        continue
      if dup and pid == pos_id[i] and pid >= 0:
        keep[i, c] = False
        continue
      if judge == "off":
        continue
      s, pos = np_cos(q[i], v), s_pos
      if judge == "teacher" and own_neg and own_neg[0] == i and np.isfinite(ns[i, own_neg[1]]) and np.isfinite(ps[i]):
        s, pos = ns[i, own_neg[1]], ps[i]
      keep[i, c] = not s > (pos * (1 - margin) if relative else pos - margin)
  return keep


def ref_loss(q, p, n, keep, n_mask=None, t=0.05):
  """Mean InfoNCE over the kept candidates (padded negatives never are)."""
  cands = list(p) + ([] if n is None else list(n.reshape(-1, q.shape[-1])))
  valid = np.concatenate([np.ones(len(p), bool), np.ones(0 if n is None else n[..., 0].size, bool)
                          if n_mask is None else n_mask.reshape(-1)])
  rows = []
  for i in range(len(q)):
    logits = [np_cos(q[i], c) / t for c, k, v in zip(cands, keep[i], valid) if k and v]
    rows.append(np_lse(logits) - np_cos(q[i], p[i]) / t)
  return np.mean(rows)


def batch(seed, B=8, K=2, D=6):  # pylint: disable=invalid-name
  """Embeddings where some candidates are near copies of other rows' positives, with passage ids that repeat."""
  rng = np.random.default_rng(seed)
  q, p, n = rand(rng, B, D), rand(rng, B, D), rand(rng, B, K, D)
  p[3] = p[1] * 2.0 + 0.01 * rng.normal(size=D)  # Row 3's positive: nearly row 1's.
  n[0, 1] = q[0] * 0.5 + 0.1 * rng.normal(size=D)  # Row 0's second negative: closer than its positive.
  pos_id = np.array([10, 11, 12, 11, 14, 15, 16, 17], np.int32)  # Rows 1 and 3 share a positive passage.
  neg_id = rng.integers(20, 40, size=(B, K)).astype(np.int32)
  neg_id[5, 0], neg_id[2, 1] = 10, 16  # Row 0's and row 6's positives as other rows' negatives.
  n_mask = np.ones((B, K), bool)
  n_mask[7, 1] = False
  neg_id[7, 1] = -1
  ps, ns = rng.uniform(0.3, 0.6, B), rng.uniform(0.0, 0.5, (B, K))
  ns[4, 0], ps[2] = 0.9, np.nan  # Row 4: the teacher calls its first negative a false one; row 2 is unscored.
  return q, p, n, n_mask, pos_id, neg_id, ps, ns


def test_duplicate_mask_on_a_hand_made_batch():
  """Four rows, one negative each: the masks written out by hand."""
  pos_id = np.array([0, 1, 0, 2], np.int32)
  neg_id = np.array([[1], [3], [-1], [0]], np.int32)
  n_mask = neg_id >= 0
  x = np.eye(4, dtype=np.float32)
  keep, shares = L.candidate_mask(x, x, x[:, None], n_mask=n_mask, pos_id=pos_id, neg_id=neg_id)
  #            positives 0 1 2 3   negatives of rows 0 1 2 3 (ids 1, 3, -, 0)
  want = np.array([[1, 1, 0, 1, 1, 1, 1, 0],  # row 0 (passage 0): row 2's positive and row 3's negative are it
                   [1, 1, 1, 1, 0, 1, 1, 1],  # row 1 (passage 1): row 0's negative is it
                   [0, 1, 1, 1, 1, 1, 1, 0],  # row 2 (passage 0): row 0's positive and row 3's negative
                   [1, 1, 1, 1, 1, 1, 1, 1]], bool)  # row 3 (passage 2): nowhere else
  np.testing.assert_array_equal(keep, want)
  # 5 of the 4 x 6 existing candidates other than each row's own positive (row 2's negative is padding).
  np.testing.assert_allclose(shares["masked_duplicates"], 5 / 24)
  assert float(shares["masked_false_negatives"]) == 0.0
  keep, shares = L.candidate_mask(x, x, x[:, None], n_mask=n_mask, pos_id=pos_id, neg_id=neg_id, duplicates=False)
  assert keep.all() and float(shares["masked_duplicates"]) == 0.0


@pytest.mark.parametrize("judge, margin, relative", [
    ("off", 0.0, False), ("model", 0.0, False), ("model", 0.1, False), ("model", -0.05, False),
    ("model", 0.05, True), ("teacher", 0.0, False)])
def test_mask_and_loss_against_reference(judge, margin, relative):
  q, p, n, n_mask, pos_id, neg_id, ps, ns = batch(0)
  kw = dict(n_mask=n_mask, pos_id=pos_id, neg_id=neg_id, pos_score=ps, neg_score=ns)
  keep, shares = L.candidate_mask(q, p, n, **kw, judge=judge, margin=margin, relative=relative)
  want = ref_keep(q, p, n, n_mask, pos_id, neg_id, ps, ns, judge=judge, margin=margin, relative=relative)
  np.testing.assert_array_equal(keep, want)
  others = 8 * (8 + 15) - 8
  dups = 4  # rows 1 and 3 (each other's positive), row 0 (row 5's negative), row 6 (row 2's)
  assert round(float(shares["masked_duplicates"]) * others) == dups
  assert round(float(shares["masked_false_negatives"]) * others) == (~want).sum() - dups
  if judge == "model" and margin == 0.0:
    assert not want[0, 8 + 1]  # Row 0's planted false negative.
  if judge == "teacher":
    assert not want[4, 8 + 8]  # Row 4's first negative, by its teacher score.
  loss = L.retrieval_infonce(q, p, n, temperature=0.05, n_mask=n_mask, keep=keep)
  np.testing.assert_allclose(loss, ref_loss(q, p, n, want, n_mask), rtol=1e-5)


def test_masked_loss_gradients():
  """The gradient through a masked denominator, against finite differences of the float64 reference."""
  q, p, n, n_mask, pos_id, neg_id, _, _ = batch(1)
  keep = ref_keep(q, p, n, n_mask, pos_id, neg_id, judge="model", margin=0.0)
  assert not keep.all()
  _check_grad(lambda q, p, n: L.retrieval_infonce(q, p, n, temperature=0.05, n_mask=n_mask, keep=keep),
              lambda q, p, n: ref_loss(q, p, n, keep, n_mask), [q, p, n], (0, 1, 2))


def _config(**retrieval):
  c = config.base()
  c.loss.mrl_dims = (3, 6)
  c.tasks.retrieval.update(temperature=0.05, **retrieval)
  return c


@pytest.mark.parametrize("groups", [1, 2])
def test_task_loss_sharded_with_groups_and_mrl_equals_reference(shard, groups):
  """The retrieval task's loss on an 8-device mesh: the mask is judged once per loss group at the full dimension,
  then every Matryoshka prefix's InfoNCE leaves those candidates out; equal to the numpy loops, and its gradient
  to the one-device gradient."""
  B = 16
  q, p, n, n_mask, pos_id, neg_id, ps, ns = _big()
  c = _config(false_negatives="model", fn_margin=0.02)
  extras = {"neg_valid": n_mask, "pos_id": pos_id, "neg_id": neg_id, "pos_score": ps, "neg_score": ns}
  emb = {"query": q, "pos": p, "neg": n.reshape(-1, n.shape[-1])}
  fn = lambda emb, extras: step_lib.task_loss("retrieval", emb, extras, c, groups)
  qs, ps_, ns_ = shard(q, p, n.reshape(-1, n.shape[-1]))
  (got, per_dim, stats) = jax.jit(fn)({"query": qs, "pos": ps_, "neg": ns_}, extras)
  want_L, masked = [], []
  for g in range(groups):
    r = slice(g * B // groups, (g + 1) * B // groups)
    keep = ref_keep(q[r], p[r], n[r], n_mask[r], pos_id[r], neg_id[r], judge="model", margin=0.02)
    masked.append((~keep).sum())
    want_L.append([ref_loss(q[r, :d], p[r, :d], n[r, :, :d], keep, n_mask[r]) for d in (3, 6)])
  np.testing.assert_allclose(per_dim, np.mean(want_L, 0), rtol=1e-5)
  np.testing.assert_allclose(got, np.mean(want_L), rtol=1e-5)
  assert sum(masked) > groups  # Something was masked in every group.
  grad = lambda e: jax.grad(lambda e: fn(e, extras)[0])(e)
  g8, g1 = jax.jit(grad)({"query": qs, "pos": ps_, "neg": ns_}), grad(emb)
  for k in emb:
    np.testing.assert_allclose(g8[k], g1[k], rtol=1e-4, atol=1e-7)


def _big():
  """Two copies of batch() stacked: ids kept apart per copy."""
  a, b = batch(3), batch(4)
  out = [np.concatenate([x, y]) for x, y in zip(a, b)]
  out[4][8:] += 100  # pos_id
  out[5][8:] = np.where(out[5][8:] >= 0, out[5][8:] + 100, -1)
  return out


def test_no_masking_is_the_plain_loss():
  """Off (the default judge) and without passage ids the loss is retrieval_infonce's, to the bit."""
  q, p, n, n_mask, *_ = batch(5)
  keep, _ = L.candidate_mask(q, p, n, n_mask=n_mask)
  assert jnp.all(keep)
  np.testing.assert_array_equal(L.retrieval_infonce(q, p, n, n_mask=n_mask, keep=keep),
                                L.retrieval_infonce(q, p, n, n_mask=n_mask))


def test_prepared_passage_ids_mark_duplicates(tmp_path):
  """Through prepare and the plan: rows sharing a positive text get one passage id, so a batch's masks follow
  the texts (4 rows: two share positive A, which is also the fourth row's negative; B is a positive and a
  negative)."""
  # pylint: disable-next=g-import-not-at-top
  from piccolo_jax import batch as batch_lib, data, encode, plan as plan_lib
  pos, neg = ["A", "B", "A", "E"], ["B", "C", "D", "A"]
  path = tmp_path / "r.jsonl"
  path.write_text("".join(json.dumps({"query": f"q{i}", "pos": [f"passage {p}"], "neg": [f"passage {n}"]}) + "\n"
                          for i, (p, n) in enumerate(zip(pos, neg))))
  c = config.base()
  c.data.update(datasets=({"kind": "jsonl", "path": str(path), "task": "retrieval"},), global_batch_size=4,
                prepared_dir=str(tmp_path / "prepared"))
  (t,) = data.open_tables(c.data, c.tasks, encode.load_tokenizer(models.resolve_init("minilm")))
  ((_, sel),) = plan_lib.Plan(c.data, c.tasks, [t]).units(0)
  ex = batch_lib.extra_arrays(t, sel)
  rows = sel["query"]
  cands = [pos[r] for r in rows] + [neg[r] for r in rows]
  want = np.array([[not (cand == pos[r] and j != i) for j, cand in enumerate(cands)] for i, r in enumerate(rows)])
  x = np.eye(8, dtype=np.float32)[:4]
  keep, shares = L.candidate_mask(x, x, x[:, None], n_mask=ex["neg_valid"], pos_id=ex["pos_id"], neg_id=ex["neg_id"])
  np.testing.assert_array_equal(keep, want)
  assert (~want).sum() == 5 and round(float(shares["masked_duplicates"]) * 4 * 7) == 5
