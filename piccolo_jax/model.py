"""BERT sentence encoder in Flax NNX: embeddings, post-LN layers, pooling, scaling layer."""
import dataclasses
import json
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from piccolo_jax import attention

ACTIVATIONS = {
    # HF "gelu" is the exact erf form; written with erf, which XLA:CPU runs faster than jax.nn.gelu's erfc.
    "gelu": lambda x: 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476)),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
DENSE_ACTIVATIONS = {"identity": lambda x: x, "tanh": jnp.tanh}
POOLINGS = ("mean", "cls")
# model.remat: none, full (each layer's input saved, the rest recomputed) or a jax.checkpoint_policies policy that
# takes no arguments, e.g. dots_with_no_batch_dims_saveable (the projections' and FFN's matmul outputs saved).
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable",
                  "everything_saveable")


class Architecture:
  """What every model family's config (a frozen dataclass: this Config, decoder.Config) does alike."""

  @property
  def embed_dim(self) -> int:
    return self.dense_out or self.hidden_size

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)

  def portable(self):
    """The config a model dir keeps: float32 compute, no remat, attention chosen by the platform that loads it."""
    return self.replace(dtype="float32", remat="none", attention="auto")

  def save(self, path):
    pathlib.Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")


@dataclasses.dataclass(frozen=True)
class Config(Architecture):
  """Architecture of a BERT sentence encoder (saved as model_config.json)."""
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  dropout: float = 0.1
  attention_dropout: float = 0.1
  pad_token_id: int = 0
  pooling: str = "mean"
  dense_out: int | None = None  # Scaling layer hidden_size -> dense_out.
  dense_bias: bool = True
  dense_activation: str = "identity"
  normalize: bool = False
  max_seq_length: int = 512  # Truncation length used by encode/export.
  distill_dim: int = 0  # > 0: a trainable map embed_dim -> distill_dim to a teacher's dimension (training
  # only: embeddings and exports do not use it).
  dtype: str = "float32"  # Compute dtype; parameters stay float32.
  remat: str = "none"  # none | full | a jax.checkpoint_policies policy (REMAT_POLICIES), per encoder layer.
  attention: str = "auto"  # attention.IMPLEMENTATIONS.

  def __post_init__(self):
    if isinstance(self.remat, bool) or self.remat.lower() in ("true", "false"):  # Older configs: a bool.
      object.__setattr__(self, "remat", "full" if str(self.remat).lower() == "true" else "none")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat {self.remat!r} unknown; one of {', '.join(REMAT_POLICIES)}")
    if self.attention not in attention.IMPLEMENTATIONS:
      raise ValueError(f"attention {self.attention!r} unknown; one of {', '.join(attention.IMPLEMENTATIONS)}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} unsupported; one of {sorted(ACTIVATIONS)}")
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling {self.pooling!r} unsupported; one of {POOLINGS}")
    if self.dense_activation not in DENSE_ACTIVATIONS:
      raise ValueError(f"dense_activation {self.dense_activation!r} unsupported; "
                       f"one of {sorted(DENSE_ACTIVATIONS)}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")

  @property
  def layer_weights(self) -> int:
    """Matmul weights a token meets in one layer (Q, K, V, output, FFN): flops.py."""
    return 4 * self.hidden_size ** 2 + 2 * self.hidden_size * self.intermediate_size

  @property
  def attention_width(self) -> int:
    """Heads x head dim: a query-key pair's attention costs 4 x this in FLOPs (flops.py)."""
    return self.hidden_size


def _linear(cfg, d_in, d_out, rngs, use_bias=True):
  return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=jnp.dtype(cfg.dtype),
                    param_dtype=jnp.float32, rngs=rngs,
                    kernel_init=nnx.initializers.normal(0.02))


def _layer_norm(cfg, rngs):
  return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=jnp.dtype(cfg.dtype),
                       param_dtype=jnp.float32, rngs=rngs)


class Dropout(nnx.Dropout):
  """nnx.Dropout whose keep-mask takes 16 random bits per element, two from each threefry word.

  Half the random bits, for a drop rate within 2^-17 of `rate` (the kept values are scaled by the
  exact keep probability). Bits are drawn per row (last axis), so the mask is the same under any
  batch sharding.
  """

  def __call__(self, x):
    if self.deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:  # As nnx.Dropout: no 0 / 0 in the scale below.
      return jnp.zeros_like(x)
    n = x.shape[-1]
    bits = jax.random.bits(self.rngs(), (*x.shape[:-1], (n + 1) // 2), jnp.uint32)
    u16 = jnp.concatenate([bits & 0xFFFF, bits >> 16], axis=-1)[..., :n]
    drop = round(self.rate * 2**16)
    return jnp.where(u16 >= drop, x * (2**16 / (2**16 - drop)), 0)


class Embeddings(nnx.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    init, f32 = nnx.initializers.normal(0.02), jnp.float32
    self.word = nnx.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=f32, embedding_init=init, rngs=rngs)
    self.position = nnx.Embed(cfg.max_position, cfg.hidden_size, param_dtype=f32, embedding_init=init, rngs=rngs)
    self.token_type = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, param_dtype=f32, embedding_init=init, rngs=rngs)
    self.ln = _layer_norm(cfg, rngs)
    self.dropout = Dropout(cfg.dropout, rngs=rngs)

  def __call__(self, ids_BL, pos_BL=None):
    """pos_BL: position ids (default 0..L-1 in every row)."""
    p_BLD = self.position.embedding[:ids_BL.shape[1]][None] if pos_BL is None else self.position.embedding[pos_BL]
    x_BLD = self.word(ids_BL) + p_BLD + self.token_type.embedding[0]
    return self.dropout(self.ln(x_BLD))


class Attention(nnx.Module):
  """Multi-head self-attention, projecting straight to and from the head layout its implementation takes
  (attention.LAYOUT: [B, H, L, E] for xla and splash, [B, L, H, E] for the GPU kernels).

  Einsums against the [D, D] kernels viewed as [D, H, E] leave XLA fewer head transposes to copy
  (the old [B, L, H, E] form took 1.15x the xla step on CPU: BENCHMARKS.md, "Train step on CPU").
  """

  def __init__(self, cfg: Config, rngs: nnx.Rngs, index=0):
    D = cfg.hidden_size
    self.num_heads, self.dtype, self.impl, self.index = cfg.num_heads, jnp.dtype(cfg.dtype), cfg.attention, index
    self.query, self.key, self.value, self.out = (_linear(cfg, D, D, rngs) for _ in range(4))
    self.attn_dropout = Dropout(cfg.attention_dropout, rngs=rngs)

  # Einsum letter k is the head dim E: renaming letters reorders XLA's dot dimensions and changes the
  # float results (1.6e-7 in embeddings), so they stay as the measured, released ones.
  def _heads(self, lin, x_BLD, layout):
    D, H = x_BLD.shape[-1], self.num_heads
    w_DHE = lin.kernel[...].reshape(D, H, D // H).astype(self.dtype)
    b = lin.bias[...].reshape(H, 1, D // H) if layout == "bhlk" else lin.bias[...].reshape(H, D // H)
    return jnp.einsum(f"bld,dhk->{layout}", x_BLD, w_DHE) + b.astype(self.dtype)

  def __call__(self, x_BLD, mask):
    """mask: attention.mask's, for this implementation; or Grouped, x being groups' rows joined (embed_rows)."""
    if isinstance(mask, Grouped):
      return self._grouped(x_BLD, mask.masks)
    D, H, layout = x_BLD.shape[-1], self.num_heads, attention.LAYOUT[attention.resolve(self.impl)]
    x_BLD = x_BLD.astype(self.dtype)
    q, k, v = (self._heads(lin, x_BLD, layout) for lin in (self.query, self.key, self.value))
    o = attention.attend(self.impl, q * (D // H) ** -0.5, k, v, mask, dropout=self.attn_dropout,
                         rate=self.attn_dropout.rate, seed=self.index)
    w_HED = self.out.kernel[...].reshape(H, D // H, D).astype(self.dtype)
    return jnp.einsum(f"{layout},hkd->bld", o, w_HED) + self.out.bias[...].astype(self.dtype)

  def _grouped(self, x_nTD, masks):
    """Attention within each group of rows, the projections once on all of them (attention.grouped)."""
    D, H = x_nTD.shape[-1], self.num_heads
    layout = attention.LAYOUT[attention.resolve(self.impl)]
    q, k, v = (self._heads(lin, x_nTD.astype(self.dtype), layout) for lin in (self.query, self.key, self.value))
    o = attention.grouped(self.impl, q * (D // H) ** -0.5, k, v, masks, dropout=self.attn_dropout, seed=self.index)
    w_HED = self.out.kernel[...].reshape(H, D // H, D).astype(self.dtype)
    return jnp.einsum(f"{layout},hkd->bld", o, w_HED) + self.out.bias[...].astype(self.dtype)


class Layer(nnx.Module):
  """Post-LN transformer layer: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs, index=0):
    self.attn = Attention(cfg, rngs, index)
    self.attn_ln = _layer_norm(cfg, rngs)
    self.ffn_in = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, rngs)
    self.ffn_out = _linear(cfg, cfg.intermediate_size, cfg.hidden_size, rngs)
    self.ffn_ln = _layer_norm(cfg, rngs)
    self.dropout = Dropout(cfg.dropout, rngs=rngs)
    self.act = ACTIVATIONS[cfg.hidden_act]

  def __call__(self, x_BLD, mask):
    x_BLD = self.attn_ln(x_BLD + self.dropout(self.attn(x_BLD, mask)))
    h_BLF = self.act(self.ffn_in(x_BLD))
    return self.ffn_ln(x_BLD + self.dropout(self.ffn_out(h_BLF)))


class Encoder(nnx.Module):
  """What every model family shares: packed rows in, pooled (+ head) float32 embeddings out. A family (Bert here,
  decoder.Decoder) has `cfg` (embed_dim, pooling, dense_out, normalize, distill_dim, attention, remat), `causal`,
  and `states(ids, pos, mask)`: the last-layer token states of rows, or of groups' rows joined, under `mask`."""
  causal = False

  def mask(self, seg_BL, len_BS):
    return attention.mask(self.cfg.attention, seg_BL, len_BS, self.causal)

  def hidden_states(self, ids_BL, seg_BL, pos_BL=None, len_BS=None):
    """Last-layer token states [B, L, hidden]: token l attends to the tokens of its own segment seg_BL[l] (a text;
    padding is segment 0), at positions pos_BL (default 0..L-1), len_BS the texts' lengths (cudnn's layout)."""
    return self.states(ids_BL, pos_BL, self.mask(seg_BL, len_BS))

  def embed_rows(self, rows):
    """Embeddings [sum_g R_g * S_g, D] of groups of packed rows (packing.Rows, ...), in slot order (packing.py).
    The layers run once on all groups' tokens (join), attention within each group."""
    if len(rows) == 1:
      return self.packed(*rows[0]).reshape(-1, self.cfg.embed_dim)
    n = attention.shards()
    n = n if all(r.tokens.shape[0] % n == 0 for r in rows) else 1
    masks = Grouped(tuple(self.mask(r.segments, r.lengths) for r in rows))
    x_nTD = self.states(join([r.tokens for r in rows], n), join([r.positions for r in rows], n), masks)
    h = split(x_nTD.astype(jnp.float32), [r.tokens.shape for r in rows])
    pooled = [self._pool(h_RLD, r.segments, r.positions, r.lengths) for h_RLD, r in zip(h, rows)]
    return self.head(jnp.concatenate([p.reshape(-1, p.shape[-1]) for p in pooled]))

  def packed(self, ids_RL, seg_RL, pos_RL, len_RS):
    """Embeddings [R, S, D] of texts packed into rows (piccolo_jax.packing): text s of row r is the
    len_RS[r, s] tokens with seg_RL == s + 1, at positions pos_RL from 0. Attention stays within a
    text and pooling is per text, so each equals its unpacked embedding up to float rounding; an
    empty slot comes out as head(0)."""
    h_RLD = self.hidden_states(ids_RL, seg_RL, pos_RL, len_RS).astype(jnp.float32)
    return self.head(self._pool(h_RLD, seg_RL, pos_RL, len_RS))

  def _pool(self, h_RLD, seg_RL, pos_RL, len_RS):
    """Pooled [R, S, hidden] of each row's texts (packed): their mean, first (cls) or last (lasttoken) token."""
    in_RLS = seg_RL[..., None] == jnp.arange(1, len_RS.shape[1] + 1)
    n_RS = len_RS
    if self.cfg.pooling in ("cls", "lasttoken"):
      at_RLS = pos_RL[..., None] == (0 if self.cfg.pooling == "cls" else len_RS[:, None, :] - 1)
      in_RLS, n_RS = in_RLS & at_RLS, jnp.minimum(len_RS, 1)
    sum_RSD = jnp.einsum("rls,rld->rsd", in_RLS.astype(jnp.float32), h_RLD, precision="highest")
    return sum_RSD / jnp.maximum(n_RS[..., None].astype(jnp.float32), 1e-9)

  def head(self, e_BD):
    """Pooled [..., hidden] -> embeddings: the scaling layer and L2 norm where the model has them."""
    if self.cfg.dense_out:
      e_BD = DENSE_ACTIVATIONS[self.cfg.dense_activation](self.dense(e_BD)).astype(jnp.float32)
    if self.cfg.normalize:
      e_BD = l2_normalize(e_BD)
    return e_BD

  def project(self, e_ND):
    """Embeddings mapped to the teacher's dimension (cfg.distill_dim; unchanged without a map)."""
    return self.distill_map(e_ND).astype(jnp.float32) if self.cfg.distill_dim else e_ND


class Bert(Encoder):
  """BERT encoder + pooling (+ optional scaling layer, L2 norm) -> float32 embeddings."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embeddings = Embeddings(cfg, rngs)
    self.layers = nnx.List([Layer(cfg, rngs, i) for i in range(cfg.num_layers)])
    if cfg.dense_out:
      self.dense = _linear(cfg, cfg.hidden_size, cfg.dense_out, rngs, use_bias=cfg.dense_bias)
    if cfg.distill_dim:
      self.distill_map = _linear(cfg, cfg.embed_dim, cfg.distill_dim, rngs)

  def states(self, ids_BL, pos_BL, mask):
    x_BLD = self.embeddings(ids_BL, pos_BL)
    for layer in self.layers:
      x_BLD = remat(layer, self.cfg.remat)(x_BLD, mask)
    return x_BLD

  def __call__(self, ids_BL, mask_BL):
    """Embeddings of one text a row, padded: mask_BL is 1 on its tokens."""
    h_BLD = self.hidden_states(ids_BL, mask_BL, None, mask_BL.sum(1, keepdims=True)).astype(jnp.float32)
    if self.cfg.pooling == "cls":
      e_BD = h_BLD[:, 0]
    else:
      m_BL1 = mask_BL[..., None].astype(jnp.float32)
      e_BD = (h_BLD * m_BL1).sum(1) / jnp.maximum(m_BL1.sum(1), 1e-9)
    return self.head(e_BD)


class Grouped(NamedTuple):
  """The attention masks of groups of packed rows whose tokens the layers see joined (embed_rows)."""
  masks: tuple


def join(xs, n):
  """Groups' rows [R_g, L_g, ...] as one [n, sum_g R_g L_g / n, ...]: each group's rows in n blocks (the batch
  shards), a block's tokens after the same block of the groups before, so no row changes device."""
  return jnp.concatenate([x.reshape(n, -1, *x.shape[2:]) for x in xs], axis=1)


def split(x, shapes):
  """The inverse of join: [n, T, ...] -> [[R_g, L_g, ...]] for shapes ((R_g, L_g), ...)."""
  out, at = [], 0
  for R, L in shapes:
    width = R // x.shape[0] * L
    out.append(x[:, at:at + width].reshape(R, L, *x.shape[2:]))
    at += width
  return out


def l2_normalize(x, eps=1e-12):
  """x / max(||x||, eps) along the last axis, as torch.nn.functional.normalize; the gradient at x = 0 is
  0, not NaN (packed batches' empty slots are zero vectors)."""
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def remat(layer, policy: str):
  """The layer, rematerialised under `policy` (Config.remat) in the backward pass."""
  if policy == "none":
    return layer
  # The layer passed as an argument, so that its dropout RNG counts go in and out of the remat trace.
  run = nnx.remat(lambda layer, *xs: layer(*xs),
                  policy=None if policy == "full" else getattr(jax.checkpoint_policies, policy))
  return lambda *xs: run(layer, *xs)


def build(cfg, rngs) -> Encoder:
  """The model of a config: Bert, or a decoder.Decoder for a decoder.Config."""
  return Bert(cfg, rngs=rngs) if isinstance(cfg, Config) else cfg.module(cfg, rngs=rngs)


def abstract_model(cfg) -> Encoder:
  """The model whose arrays are ShapeDtypeStructs (no memory, no init compute)."""
  return nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0)))


def load_config(path):
  """The model config saved at path: a Bert Config, or a decoder.Config where its `family` names one."""
  d = json.loads(pathlib.Path(path).read_text())
  if d.get("family", "bert") == "bert":
    return Config(**d)
  from piccolo_jax import decoder  # pylint: disable=g-import-not-at-top  (decoder builds on this module)
  return decoder.Config(**d)
