"""Piccolo2 multi-task hybrid loss (retrieval InfoNCE, CoSENT, cls contrast, MRL) and distillation losses.

Pure functions of raw (unnormalised) embeddings. Every similarity is a cosine,
computed in float32 (bf16 inputs are upcast). Under `jit` with the batch sharded
on a mesh axis, the jnp ops below act on the global arrays, so the retrieval
in-batch negatives span all devices (XLA inserts the all-gather).

Shape suffixes as in the package legend (piccolo_jax/__init__.py); here L counts
Matryoshka dims.
"""
import functools

import jax
import jax.numpy as jnp

MRL_DIMS = (256, 512, 768, 1024, 1280, 1536, 1792)  # stella-v3.5's Matryoshka dims.
EPS = 1e-8  # Norm floor, as torch.cosine_similarity: x / max(||x||, eps).


def normalize(x):
  """L2-normalises the last axis in >= float32; zero vectors map to zero."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, EPS * EPS))  # NaN-free grad at 0.


def _dot(x_BD, y_ND):
  return jnp.einsum("bd,nd->bn", x_BD, y_ND, precision="highest")


def _xent(pos_B, logits_BN):
  """Mean cross-entropy where the target logit pos_B is one of logits_BN."""
  return jnp.mean(jax.nn.logsumexp(logits_BN, axis=-1) - pos_B)


def _candidates(p, n=None):
  """The in-batch candidates [N, D] of retrieval: the B positives, then the hard negatives flattened."""
  p_BD = normalize(p)
  return p_BD if n is None else jnp.concatenate([p_BD, normalize(n).reshape(-1, p_BD.shape[-1])])


def _valid(B, n=None, n_mask=None):
  """bool [N]: the candidates that exist (padded negatives, n_mask False, do not)."""
  if n is None or n_mask is None:
    return jnp.ones(B + (0 if n is None else n.size // n.shape[-1]), bool)
  return jnp.concatenate([jnp.ones(B, bool), jnp.asarray(n_mask, bool).reshape(-1)])


def retrieval_infonce(q, p, n=None, *, temperature=0.01, weight=1.0,
                      n_mask=None, keep=None):
  """InfoNCE of each query over all positives and all hard negatives in batch.

  Args:
    q: queries, B x D.
    p: positives, B x D; p[i] is the target of q[i].
    n: hard negatives, M x D or B x K x D (flattened); shared by every query.
    temperature: logits are cosines / temperature.
    weight: loss multiplier (the original has none, i.e. 1).
    n_mask: optional bool, shape n.shape[:-1]; False drops a padded negative.
    keep: optional bool B x N over the N candidates (positives, then negatives): False leaves candidate j
      out of row i's denominator (candidate_mask); a row's own positive must be kept.
  """
  q_BD = normalize(q)
  c_ND = _candidates(p, n)
  logits_BN = _dot(q_BD, c_ND) / temperature
  keep_BN = _valid(q_BD.shape[0], n, n_mask)[None, :]  # Positives stay finite.
  if keep is not None:
    keep_BN = keep_BN & keep
  logits_BN = jnp.where(keep_BN, logits_BN, -jnp.inf)
  pos_B = jnp.sum(q_BD * c_ND[:q_BD.shape[0]], axis=-1) / temperature
  return weight * _xent(pos_B, logits_BN)


def candidate_mask(q, p, n=None, *, n_mask=None, pos_id=None, neg_id=None, pos_score=None, neg_score=None,
                   duplicates=True, judge="off", margin=0.0, relative=False):
  """(keep [B, N], {"masked_duplicates": share, "masked_false_negatives": share}): which of retrieval's N
  in-batch candidates (the B positives, then the negatives flattened) stay in each row's denominator.

  Row i leaves out (a) with `duplicates`, every candidate that is its own positive passage again (pos_id [B] and
  neg_id [B, K] are passage ids, -1 none; other rows' copies of it), (b) with judge "model" or "teacher", every
  other candidate scoring above its positive's score - margin (relative: x (1 - margin)): GISTEmbed's rule.
  judge "model" scores by the cosines of these (full-dimension) embeddings; "teacher" scores the row's own
  negatives by its teacher scores (pos_score [B], neg_score [B, K]; NaN: by the model) and every other
  candidate, which no teacher scored, by the model. Its own positive is always kept. Shares are of the
  existing candidates other than the own positive, over the whole batch. Booleans: no gradient flows.
  """
  B = q.shape[0]
  valid_N = _valid(B, n, n_mask)
  own_BN = jnp.arange(valid_N.shape[0])[None, :] == jnp.arange(B)[:, None]
  other_BN = valid_N[None, :] & ~own_BN
  dup_BN = jnp.zeros(other_BN.shape, bool)
  if duplicates and pos_id is not None:
    ids_N = pos_id if n is None else jnp.concatenate([pos_id, jnp.asarray(neg_id).reshape(-1)])
    dup_BN = other_BN & (ids_N[None, :] == pos_id[:, None]) & (pos_id[:, None] >= 0)
  fn_BN = jnp.zeros(other_BN.shape, bool)
  if judge != "off":
    s_BN = _dot(normalize(q), _candidates(p, n))
    pos_BN = jnp.broadcast_to(jnp.diagonal(s_BN)[:, None], s_BN.shape)
    if judge == "teacher" and n is not None and pos_score is not None:
      K = neg_score.shape[-1]
      col_N = jnp.arange(s_BN.shape[1])
      mine_BN = (col_N[None, :] >= B) & ((col_N[None, :] - B) // K == jnp.arange(B)[:, None])
      t_N = jnp.concatenate([jnp.zeros(B, s_BN.dtype), jnp.asarray(neg_score, s_BN.dtype).reshape(-1)])
      tpos_B = jnp.asarray(pos_score, s_BN.dtype)
      by_teacher_BN = mine_BN & jnp.isfinite(t_N)[None, :] & jnp.isfinite(tpos_B)[:, None]
      s_BN = jnp.where(by_teacher_BN, t_N[None, :], s_BN)
      pos_BN = jnp.where(by_teacher_BN, tpos_B[:, None], pos_BN)
    bar_BN = pos_BN * (1 - margin) if relative else pos_BN - margin
    fn_BN = other_BN & ~dup_BN & (s_BN > bar_BN)
  total = jnp.maximum(jnp.sum(other_BN), 1)
  shares = {"masked_duplicates": jnp.sum(dup_BN) / total, "masked_false_negatives": jnp.sum(fn_BN) / total}
  return ~dup_BN & ~fn_BN, shares


def cosent(a, b, labels, *, temperature=0.05, weight=0.04):
  """weight * log(1 + sum_{label_j > label_i} exp(s_i - s_j)), s = cos / T."""
  s_B = jnp.sum(normalize(a) * normalize(b), axis=-1) / temperature
  labels_B = jnp.asarray(labels)
  diff_BB = s_B[:, None] - s_B[None, :]  # [i, j] = s_i - s_j.
  keep_BB = labels_B[None, :] > labels_B[:, None]  # Strict: ties add nothing.
  diff_BB = jnp.where(keep_BB, diff_BB, -jnp.inf)
  return weight * jax.nn.logsumexp(jnp.append(diff_BB.reshape(-1), 0.0))


def cls_contrast(q, p, n, *, temperature=0.05, weight=0.2, n_mask=None):
  """weight * InfoNCE of q[i] over p[i] and its own K negatives only.

  Args:
    q: queries, B x D.
    p: positives, B x D.
    n: label negatives, B x K x D (the original's flat (B*K) x D, grouped per
      query, is also accepted). No in-batch negatives: row i sees only row i.
    temperature: logits are cosines / temperature.
    weight: loss multiplier.
    n_mask: optional bool B x K; False marks a padded negative, which then
      contributes exactly nothing (value or gradient).
  """
  q_BD, p_BD = normalize(q), normalize(p)
  n_BKD = normalize(n).reshape(q_BD.shape[0], -1, q_BD.shape[-1])
  pos_B = jnp.sum(q_BD * p_BD, axis=-1) / temperature
  neg_BK = jnp.einsum("bd,bkd->bk", q_BD, n_BKD, precision="highest")
  neg_BK = neg_BK / temperature
  if n_mask is not None:
    neg_BK = jnp.where(jnp.asarray(n_mask, bool), neg_BK, -jnp.inf)
  logits_BN = jnp.concatenate([pos_B[:, None], neg_BK], axis=1)
  return weight * _xent(pos_B, logits_BN)


def score_kl(q, p, n, *, pos_score, neg_score, temperature=0.02, teacher_temperature=1.0, weight=1.0,
             n_mask=None):
  """weight * KL(teacher || student) over each query's own candidates, its positive and its K negatives.

  The teacher's distribution is softmax(scores / teacher_temperature) of pos_score [B] and neg_score
  [B, K]; the student's is softmax(cos / temperature). Candidates where n_mask is False are left out;
  a row whose kept scores are not all finite (NaN: no teacher scores) adds nothing, and the mean is
  over the rows that have them (0 if none). FlagEmbedding's distillation loss is this plus the
  teacher's entropy, a constant: the same gradient.
  """
  q_BD, p_BD = normalize(q), normalize(p)
  n_BKD = normalize(n).reshape(q_BD.shape[0], -1, q_BD.shape[-1])
  s_BC = jnp.concatenate([jnp.sum(q_BD * p_BD, axis=-1)[:, None],
                          jnp.einsum("bd,bkd->bk", q_BD, n_BKD, precision="highest")], axis=1) / temperature
  t_BC = jnp.concatenate([jnp.asarray(pos_score, s_BC.dtype)[:, None], jnp.asarray(neg_score, s_BC.dtype)],
                         axis=1) / teacher_temperature
  keep_BC = jnp.ones(s_BC.shape, bool)
  if n_mask is not None:
    keep_BC = keep_BC.at[:, 1:].set(jnp.asarray(n_mask, bool).reshape(s_BC.shape[0], -1))
  has_B = jnp.all(jnp.isfinite(t_BC) | ~keep_BC, axis=1)
  logt_BC = jax.nn.log_softmax(jnp.where(keep_BC, jnp.where(has_B[:, None], t_BC, 0.0), -jnp.inf), axis=-1)
  logs_BC = jax.nn.log_softmax(jnp.where(keep_BC, s_BC, -jnp.inf), axis=-1)
  kl_BC = jnp.where(keep_BC, jnp.exp(logt_BC) * (logt_BC - jnp.where(keep_BC, logs_BC, 0.0)), 0.0)
  kl_B = jnp.where(has_B, jnp.sum(kl_BC, axis=1), 0.0)
  return weight * jnp.sum(kl_B) / jnp.maximum(jnp.sum(has_B), 1)


def retrieval(q, p, n=None, *, temperature=0.01, weight=1.0, n_mask=None, keep=None, pos_score=None,
              neg_score=None, kl_weight=0.0, kl_temperature=0.0, teacher_temperature=1.0):
  """The retrieval task's loss: weight * (retrieval_infonce + kl_weight * score_kl), the KL term
  (student temperature kl_temperature, 0: temperature) only where kl_weight > 0 and there are negatives."""
  loss = retrieval_infonce(q, p, n, temperature=temperature, n_mask=n_mask, keep=keep)
  if kl_weight and n is not None and pos_score is not None:
    loss += kl_weight * score_kl(q, p, n, pos_score=pos_score, neg_score=neg_score, n_mask=n_mask,
                                 temperature=kl_temperature or temperature, teacher_temperature=teacher_temperature)
  return weight * loss


def cosine_distill(s, t):
  """Mean 1 - cos(s_i, t_i): the student's embeddings s [B, D] against the teacher's t [B, D]."""
  return jnp.mean(1.0 - jnp.sum(normalize(s) * normalize(t), axis=-1))


def similarity_distill(s, t):
  """Mean squared difference of the in-batch cosine matrices [B, B] of the student and the teacher."""
  s_BD, t_BD = normalize(s), normalize(t)
  return jnp.mean((_dot(s_BD, s_BD) - _dot(t_BD, t_BD)) ** 2)


def relative_distill(s, t, margin=0.015):
  """Jasper's relative-similarity loss, anchor-wise: for each anchor i and others j != k where the
  teacher ranks j above k (t_ij > t_ik), relu(s_ik - s_ij + margin), averaged over those triples
  (memory B^3, not Jasper's B^4 over all pairs of pairs)."""
  s_BD, t_BD = normalize(s), normalize(t)
  s_BB, t_BB = _dot(s_BD, s_BD), _dot(t_BD, t_BD)
  eye = jnp.eye(s_BB.shape[0], dtype=bool)
  other_BBB = ~eye[:, :, None] & ~eye[:, None, :] & ~eye[None, :, :]  # i, j, k distinct
  above_BBB = other_BBB & (t_BB[:, :, None] > t_BB[:, None, :])
  hinge_BBB = jax.nn.relu(s_BB[:, None, :] - s_BB[:, :, None] + margin)
  return jnp.sum(jnp.where(above_BBB, hinge_BBB, 0.0)) / jnp.maximum(jnp.sum(above_BBB), 1)


def embedding_distill(s, t, *, cosine=1.0, similarity=1.0, relative=1.0, margin=0.015, weight=1.0):
  """weight * (cosine * cosine_distill + similarity * similarity_distill + relative * relative_distill):
  the student's embeddings s (mapped to the teacher's dimension) against the teacher's t, each [B, D]."""
  terms = ((cosine, lambda: cosine_distill(s, t)), (similarity, lambda: similarity_distill(s, t)),
           (relative, lambda: relative_distill(s, t, margin)))
  return weight * sum(w * f() for w, f in terms if w)


def _check_dims(dims, weights):
  dims = tuple(int(d) for d in dims)
  problem = ("must be non-empty" if not dims else f"dim {min(dims)} must be positive" if min(dims) <= 0 else
             "must be strictly increasing" if list(dims) != sorted(set(dims)) else "")
  if problem:
    raise ValueError(f"Matryoshka dims {dims}: {problem}.")
  if weights is not None and len(weights) != len(dims):
    raise ValueError(f"Got {len(weights)} Matryoshka weights for {len(dims)} dims {dims}.")
  return dims


def matryoshka(loss_fn, dims=MRL_DIMS, weights=None, *, return_per_dim=False):
  """Wraps loss_fn to average it over nested embedding prefixes.

  Contract: positional array arguments with ndim >= 2 are embeddings and get
  their last axis cut to each dim (each loss re-normalises the prefix). All
  else passes through unchanged: 1-D positionals (cosent's labels), None, and
  every keyword argument (n_mask, temperature, ...). So pass embeddings
  positionally, e.g. `mrl(q, p, n, n_mask=m)` or `mrl(a, b, labels)`.

  Args:
    loss_fn: one of the losses above (or any fn with that contract).
    dims: increasing prefix sizes; a dim above the embedding size raises.
    weights: optional per-dim weights; the total is sum(w * l) / sum(w). None
      gives the plain mean, as the original.
    return_per_dim: if True, return (total, losses_L) with losses_L in dims
      order, for per-dim logging.
  """
  dims = _check_dims(dims, weights)
  weights = [1.0] * len(dims) if weights is None else weights

  @functools.wraps(loss_fn)
  def wrapped(*args, **kwargs):
    is_emb = [hasattr(x, "ndim") and x.ndim >= 2 for x in args]
    sizes = {x.shape[-1] for x, e in zip(args, is_emb) if e}
    if not sizes:
      raise ValueError("matryoshka: no positional embedding (ndim >= 2) given.")
    if len(sizes) > 1:
      raise ValueError(f"matryoshka: embeddings disagree on size: {sizes}.")
    size = sizes.pop()
    for d in dims:
      if d > size:
        raise ValueError(f"Matryoshka dim {d} exceeds the embedding size "
                         f"{size} (dims {dims}).")
    losses_L = jnp.stack([
        loss_fn(*[x[..., :d] if e else x for x, e in zip(args, is_emb)],
                **kwargs)
        for d in dims])
    w_L = jnp.asarray(weights, losses_L.dtype)
    total = jnp.sum(w_L * losses_L) / jnp.sum(w_L)
    return (total, losses_L) if return_per_dim else total

  return wrapped
