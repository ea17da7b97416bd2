"""BERT sentence encoder in Flax NNX: embeddings, post-LN layers, pooling, scaling layer."""
import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form.
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
DENSE_ACTIVATIONS = {"identity": lambda x: x, "tanh": jnp.tanh}
POOLINGS = ("mean", "cls")


@dataclasses.dataclass(frozen=True)
class Config:
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
  dtype: str = "float32"  # Compute dtype; parameters stay float32.
  remat: bool = False

  def __post_init__(self):
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
  def embed_dim(self) -> int:
    return self.dense_out or self.hidden_size

  def replace(self, **kw) -> "Config":
    return dataclasses.replace(self, **kw)

  def save(self, path):
    pathlib.Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

  @classmethod
  def load(cls, path) -> "Config":
    return cls(**json.loads(pathlib.Path(path).read_text()))


def _linear(cfg, d_in, d_out, rngs, use_bias=True):
  return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=jnp.dtype(cfg.dtype),
                    param_dtype=jnp.float32, rngs=rngs,
                    kernel_init=nnx.initializers.normal(0.02))


def _layer_norm(cfg, rngs):
  return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=jnp.dtype(cfg.dtype),
                       param_dtype=jnp.float32, rngs=rngs)


class Embeddings(nnx.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    init, f32 = nnx.initializers.normal(0.02), jnp.float32
    self.word = nnx.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=f32, embedding_init=init, rngs=rngs)
    self.position = nnx.Embed(cfg.max_position, cfg.hidden_size, param_dtype=f32, embedding_init=init, rngs=rngs)
    self.token_type = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, param_dtype=f32, embedding_init=init, rngs=rngs)
    self.ln = _layer_norm(cfg, rngs)
    self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

  def __call__(self, ids_BL):
    L = ids_BL.shape[1]
    x_BLD = self.word(ids_BL) + self.position.embedding[:L][None] + self.token_type.embedding[0]
    return self.dropout(self.ln(x_BLD))


class Attention(nnx.Module):
  """Multi-head self-attention through jax.nn.dot_product_attention."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    D = cfg.hidden_size
    self.num_heads = cfg.num_heads
    self.query, self.key, self.value, self.out = (_linear(cfg, D, D, rngs) for _ in range(4))
    self.dropout_rate = cfg.attention_dropout
    self.attn_dropout = nnx.Dropout(cfg.attention_dropout, rngs=rngs)

  def __call__(self, x_BLD, mask_BL):
    B, L, D = x_BLD.shape
    H = self.num_heads
    q_BLHK, k_BLHK, v_BLHK = (f(x_BLD).reshape(B, L, H, D // H) for f in (self.query, self.key, self.value))
    mask_B11L = mask_BL[:, None, None, :].astype(bool)
    if self.attn_dropout.deterministic or self.dropout_rate == 0.0:
      o_BLHK = jax.nn.dot_product_attention(q_BLHK, k_BLHK, v_BLHK, mask=mask_B11L)
    else:  # Attention-prob dropout (as HF BERT trains) needs the explicit form.
      logits_BHLL = jnp.einsum("bqhk,bshk->bhqs", q_BLHK, k_BLHK) / jnp.sqrt(D // H).astype(q_BLHK.dtype)
      logits_BHLL = jnp.where(mask_B11L, logits_BHLL, jnp.finfo(logits_BHLL.dtype).min)
      probs_BHLL = self.attn_dropout(jax.nn.softmax(logits_BHLL.astype(jnp.float32), axis=-1))
      o_BLHK = jnp.einsum("bhqs,bshk->bqhk", probs_BHLL.astype(v_BLHK.dtype), v_BLHK)
    return self.out(o_BLHK.reshape(B, L, D))


class Layer(nnx.Module):
  """Post-LN transformer layer: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.attn = Attention(cfg, rngs)
    self.attn_ln = _layer_norm(cfg, rngs)
    self.ffn_in = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, rngs)
    self.ffn_out = _linear(cfg, cfg.intermediate_size, cfg.hidden_size, rngs)
    self.ffn_ln = _layer_norm(cfg, rngs)
    self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
    self.act = ACTIVATIONS[cfg.hidden_act]

  def __call__(self, x_BLD, mask_BL):
    x_BLD = self.attn_ln(x_BLD + self.dropout(self.attn(x_BLD, mask_BL)))
    h_BLF = self.act(self.ffn_in(x_BLD))
    return self.ffn_ln(x_BLD + self.dropout(self.ffn_out(h_BLF)))


class Bert(nnx.Module):
  """BERT encoder + pooling (+ optional scaling layer, L2 norm) -> float32 embeddings."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embeddings = Embeddings(cfg, rngs)
    self.layers = nnx.List([Layer(cfg, rngs) for _ in range(cfg.num_layers)])
    if cfg.dense_out:
      self.dense = _linear(cfg, cfg.hidden_size, cfg.dense_out, rngs, use_bias=cfg.dense_bias)

  def hidden_states(self, ids_BL, mask_BL):
    """Last-layer token states [B, L, hidden]."""
    x_BLD = self.embeddings(ids_BL)
    for layer in self.layers:
      x_BLD = (nnx.remat(layer) if self.cfg.remat else layer)(x_BLD, mask_BL)
    return x_BLD

  def __call__(self, ids_BL, mask_BL):
    h_BLD = self.hidden_states(ids_BL, mask_BL).astype(jnp.float32)
    if self.cfg.pooling == "cls":
      e_BD = h_BLD[:, 0]
    else:
      m_BL1 = mask_BL[..., None].astype(jnp.float32)
      e_BD = (h_BLD * m_BL1).sum(1) / jnp.maximum(m_BL1.sum(1), 1e-9)
    if self.cfg.dense_out:
      e_BD = DENSE_ACTIVATIONS[self.cfg.dense_activation](self.dense(e_BD)).astype(jnp.float32)
    if self.cfg.normalize:
      e_BD = l2_normalize(e_BD)
    return e_BD


def l2_normalize(x, eps=1e-12):
  """x / max(||x||, eps) along the last axis, as torch.nn.functional.normalize."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def abstract_model(cfg: Config) -> Bert:
  """A Bert whose arrays are ShapeDtypeStructs (no memory, no init compute)."""
  return nnx.eval_shape(lambda: Bert(cfg, rngs=nnx.Rngs(0)))
