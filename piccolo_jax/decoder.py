"""Decoder-LLM embedders in Flax NNX: the Qwen3, Qwen2 and Llama/Mistral families, with LoRA adapters.

Pre-norm layers of RMSNorm, grouped-query attention with rotary positions (RoPE, `rope_theta`) and SwiGLU; Qwen3
adds RMSNorm on each query and key head, Qwen2 biases on the q/k/v projections. A model is a model.Encoder: packed
rows in (positions restart at 0 in each text), pooled float32 embeddings out, last-token or mean pooling. Attention
is causal (Qwen3-Embedding, gte-Qwen2) or bidirectional (GritLM, NV-Embed), by `causal`.

LoRA (lora_rank > 0): each Linear whose parameter path ("layers/3/attn/q", "layers/3/up") matches a `lora_targets` regexp adds
dropout(x) @ lora_a @ lora_b * lora_alpha / lora_rank to x @ kernel, as PEFT's LoRA; lora_b starts at 0, so a new
adapter leaves the model unchanged. The base weights then train not at all (state.py keeps them apart, in
model.lora's base dtype); `merged` folds the adapters into them, which export does.
"""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from piccolo_jax import attention
from piccolo_jax import model as model_lib

FAMILIES = ("qwen3", "qwen2", "llama")
POOLINGS = ("lasttoken", "mean")
LORA_TARGETS = (r"attn/(q|k|v|o)$", r"/(gate|up|down)$")  # Every projection (parameter paths, less /kernel).


@dataclasses.dataclass(frozen=True)
class Config(model_lib.Architecture):
  """Architecture of a decoder embedder (saved as model_config.json, its `family` one of FAMILIES)."""
  family: str = "qwen3"
  vocab_size: int = 151669
  hidden_size: int = 1024
  num_layers: int = 28
  num_heads: int = 16
  num_kv_heads: int = 8
  head_dim: int = 128
  intermediate_size: int = 3072
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1e6
  max_position: int = 32768
  qk_norm: bool = True  # Qwen3: RMSNorm on each query and key head.
  attention_bias: bool = False  # Biases on q, k, v (Qwen2; Llama's attention_bias).
  output_bias: bool = False  # A bias on o (Llama's attention_bias).
  mlp_bias: bool = False
  causal: bool = True  # False: bidirectional attention within each text.
  dropout: float = 0.0
  attention_dropout: float = 0.0
  pad_token_id: int = 0
  pooling: str = "lasttoken"
  dense_out: int | None = None
  dense_bias: bool = True
  dense_activation: str = "identity"
  normalize: bool = True
  max_seq_length: int = 8192
  distill_dim: int = 0
  dtype: str = "float32"
  remat: str = "none"
  attention: str = "auto"
  lora_rank: int = 0  # > 0: LoRA adapters of this rank on the lora_targets projections.
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: tuple = LORA_TARGETS  # Regexps searched in a projection's path: layers/I/attn/{q,k,v,o},
  # layers/I/{gate,up,down}.

  def __post_init__(self):
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # From JSON: a list.
    for field, value, allowed in (("family", self.family, FAMILIES), ("pooling", self.pooling, POOLINGS),
                                  ("remat", self.remat, model_lib.REMAT_POLICIES),
                                  ("attention", self.attention, attention.IMPLEMENTATIONS),
                                  ("dense_activation", self.dense_activation, tuple(model_lib.DENSE_ACTIVATIONS))):
      if value not in allowed:
        raise ValueError(f"{field} {value!r} unsupported; one of {', '.join(allowed)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} not a multiple of num_kv_heads {self.num_kv_heads}")
    for p in self.lora_targets:
      re.compile(p)

  module = property(lambda self: Decoder)

  @property
  def layer_weights(self) -> int:
    D, HE, KE = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    return 2 * D * HE + 2 * D * KE + 3 * D * self.intermediate_size

  attention_width = property(lambda self: self.num_heads * self.head_dim)

  def merged(self) -> "Config":
    """The config once merge_lora has folded the adapters in."""
    return self.replace(lora_rank=0)


class Linear(nnx.Module):
  """x @ kernel [+ bias], plus LoRA's dropout(x) @ lora_a @ lora_b * alpha / rank where `lora` (module doc)."""

  def __init__(self, cfg: Config, d_in, d_out, rngs, *, bias=False, lora=False):
    self.kernel = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (d_in, d_out), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((d_out,), jnp.float32)) if bias else None
    self.dtype, self.lora = jnp.dtype(cfg.dtype), lora
    if lora:  # PEFT's init: lora_a kaiming-uniform (a = sqrt(5)), lora_b zeros.
      bound = d_in ** -0.5
      self.lora_a = nnx.Param(jax.random.uniform(rngs.params(), (d_in, cfg.lora_rank), jnp.float32, -bound, bound))
      self.lora_b = nnx.Param(jnp.zeros((cfg.lora_rank, d_out), jnp.float32))
      self.scale = cfg.lora_alpha / cfg.lora_rank
      self.lora_dropout = model_lib.Dropout(cfg.lora_dropout, rngs=rngs)

  def __call__(self, x, heads=None, layout="blhk"):
    """x [..., d_in] @ kernel; heads: the output as (H, E) heads in `layout` (attention.LAYOUT's) from x [B, L, D]."""
    spec = f"bld,dhk->{layout}" if heads else "...d,dk->...k"
    shaped = lambda a: a.reshape(*a.shape[:-1], *heads) if heads else a
    y = jnp.einsum(spec, x, shaped(self.kernel[...].astype(self.dtype)))
    if self.bias is not None:
      b = shaped(self.bias[...].astype(self.dtype))
      y = y + (b[:, None] if heads and layout == "bhlk" else b)
    if self.lora:
      xa = self.lora_dropout(x) @ self.lora_a[...].astype(self.dtype)
      y = y + jnp.einsum(spec.replace("d,d", "r,r"), xa, shaped(self.lora_b[...].astype(self.dtype))) * self.scale
    return y

  def from_heads(self, o, layout):
    """o [B, H, L, E] or [B, L, H, E] (layout) @ kernel viewed as [H, E, d_out] -> [B, L, d_out]."""
    H, E = o.shape[layout.index("h")], o.shape[-1]
    spec = f"{layout},hkd->bld"
    y = jnp.einsum(spec, o, self.kernel[...].reshape(H, E, -1).astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora:
      oa = jnp.einsum(spec, self.lora_dropout(o), self.lora_a[...].reshape(H, E, -1).astype(self.dtype))
      y = y + (oa @ self.lora_b[...].astype(self.dtype)) * self.scale
    return y


class RMSNorm(nnx.Module):
  """x / rms(x) in float32, times the scale in the compute dtype (as HF's Qwen3RMSNorm / LlamaRMSNorm)."""

  def __init__(self, dim, eps, dtype):
    self.scale, self.eps, self.dtype = nnx.Param(jnp.ones((dim,), jnp.float32)), eps, jnp.dtype(dtype)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(self.dtype) * x32.astype(self.dtype)


def rope(pos_BL, head_dim, theta, dtype):
  """(cos, sin) [B, L, head_dim] of positions pos_BL: HF's rotate-half layout."""
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
  f_BLE = pos_BL.astype(jnp.float32)[..., None] * inv_freq
  f_BLE = jnp.concatenate([f_BLE, f_BLE], axis=-1)
  return jnp.cos(f_BLE).astype(dtype), jnp.sin(f_BLE).astype(dtype)


def _rotate(x, cos, sin):
  """x [.., E] rotated: x cos + rotate_half(x) sin."""
  half = x.shape[-1] // 2
  return x * cos + jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin


def _lora(cfg, path) -> bool:
  return cfg.lora_rank > 0 and any(re.search(p, path) for p in cfg.lora_targets)


class Attention(nnx.Module):
  """Grouped-query attention with RoPE (and Qwen3's q/k norms), straight to and from the implementation's head
  layout (attention.LAYOUT), as model.Attention."""

  def __init__(self, cfg: Config, rngs, index):
    D, H, K, E = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    at = f"layers/{index}/attn/"
    self.q = Linear(cfg, D, H * E, rngs, bias=cfg.attention_bias, lora=_lora(cfg, at + "q"))
    self.k = Linear(cfg, D, K * E, rngs, bias=cfg.attention_bias, lora=_lora(cfg, at + "k"))
    self.v = Linear(cfg, D, K * E, rngs, bias=cfg.attention_bias, lora=_lora(cfg, at + "v"))
    self.o = Linear(cfg, H * E, D, rngs, bias=cfg.output_bias, lora=_lora(cfg, at + "o"))
    if cfg.qk_norm:
      self.q_norm, self.k_norm = RMSNorm(E, cfg.rms_norm_eps, cfg.dtype), RMSNorm(E, cfg.rms_norm_eps, cfg.dtype)
    self.cfg, self.index = cfg, index
    self.attn_dropout = model_lib.Dropout(cfg.attention_dropout, rngs=rngs)

  def __call__(self, x_BLD, mask, rope_BLE):
    cfg = self.cfg
    H, K, E, impl = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, attention.resolve(cfg.attention)
    layout = attention.LAYOUT[impl]
    h = layout.index("h")  # The head axis.
    cos, sin = (jnp.expand_dims(r, h) for r in rope_BLE)
    x_BLD = x_BLD.astype(jnp.dtype(cfg.dtype))
    q, k, v = self.q(x_BLD, (H, E), layout), self.k(x_BLD, (K, E), layout), self.v(x_BLD, (K, E), layout)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = _rotate(q, cos, sin) * E ** -0.5, _rotate(k, cos, sin)
    k, v = jnp.repeat(k, H // K, axis=h), jnp.repeat(v, H // K, axis=h)  # Query head i reads kv head i // (H/K).
    if isinstance(mask, model_lib.Grouped):
      o = attention.grouped(cfg.attention, q, k, v, mask.masks, dropout=self.attn_dropout, seed=self.index,
                            causal=cfg.causal)
    else:
      o = attention.attend(cfg.attention, q, k, v, mask, dropout=self.attn_dropout, rate=self.attn_dropout.rate,
                           seed=self.index, causal=cfg.causal)
    return self.o.from_heads(o, layout)


class Layer(nnx.Module):
  """Pre-norm decoder layer: x += Attn(RMSNorm(x)); x += down(silu(gate(y)) * up(y)), y = RMSNorm(x)."""

  def __init__(self, cfg: Config, rngs, index):
    D, F, at = cfg.hidden_size, cfg.intermediate_size, f"layers/{index}/"
    self.attn_norm, self.mlp_norm = RMSNorm(D, cfg.rms_norm_eps, cfg.dtype), RMSNorm(D, cfg.rms_norm_eps, cfg.dtype)
    self.attn = Attention(cfg, rngs, index)
    self.gate = Linear(cfg, D, F, rngs, bias=cfg.mlp_bias, lora=_lora(cfg, at + "gate"))
    self.up = Linear(cfg, D, F, rngs, bias=cfg.mlp_bias, lora=_lora(cfg, at + "up"))
    self.down = Linear(cfg, F, D, rngs, bias=cfg.mlp_bias, lora=_lora(cfg, at + "down"))
    self.dropout = model_lib.Dropout(cfg.dropout, rngs=rngs)

  def __call__(self, x_BLD, mask, rope_BLE):
    x_BLD = x_BLD + self.dropout(self.attn(self.attn_norm(x_BLD), mask, rope_BLE))
    y_BLD = self.mlp_norm(x_BLD)
    return x_BLD + self.dropout(self.down(jax.nn.silu(self.gate(y_BLD)) * self.up(y_BLD)))


class Decoder(model_lib.Encoder):
  """Decoder layers + final RMSNorm, pooled (+ optional scaling layer, L2 norm) -> float32 embeddings."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    self.cfg, self.causal = cfg, cfg.causal
    self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=jnp.float32,
                           embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.layers = nnx.List([Layer(cfg, rngs, i) for i in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)
    if cfg.dense_out:
      self.dense = model_lib._linear(cfg, cfg.hidden_size, cfg.dense_out, rngs, use_bias=cfg.dense_bias)  # pylint: disable=protected-access
    if cfg.distill_dim:
      self.distill_map = model_lib._linear(cfg, cfg.embed_dim, cfg.distill_dim, rngs)  # pylint: disable=protected-access

  def states(self, ids_BL, pos_BL, mask):
    if pos_BL is None:
      pos_BL = jnp.broadcast_to(jnp.arange(ids_BL.shape[1]), ids_BL.shape)
    dtype = jnp.dtype(self.cfg.dtype)
    x_BLD = self.embed.embedding[...][ids_BL].astype(dtype)
    rope_BLE = rope(pos_BL, self.cfg.head_dim, self.cfg.rope_theta, dtype)
    for layer in self.layers:
      x_BLD = model_lib.remat(layer, self.cfg.remat)(x_BLD, mask, rope_BLE)
    return self.norm(x_BLD)

  def __call__(self, ids_BL, mask_BL):
    """Embeddings of one text a row, padded on either side: mask_BL is 1 on its tokens, whose positions count
    from 0 at the first, so left and right padding give the packed embedding."""
    pos_BL = jnp.maximum(jnp.cumsum(mask_BL, axis=1) - 1, 0)
    len_B1 = mask_BL.sum(1, keepdims=True)
    h_BLD = self.hidden_states(ids_BL, mask_BL, pos_BL, len_B1).astype(jnp.float32)
    return self.head(self._pool(h_BLD, mask_BL, pos_BL, len_B1)[:, 0])


def merge_lora(cfg, params: dict) -> tuple[object, dict]:
  """(config, float32 parameters) with each adapter folded in: kernel + lora_a @ lora_b * alpha / rank; a config
  without adapters (BERT's included) as it is."""
  if not getattr(cfg, "lora_rank", 0):
    return cfg, params
  scale = cfg.lora_alpha / cfg.lora_rank

  def fold(node):
    if not isinstance(node, dict):
      return node
    if "lora_a" in node:
      out = {k: v for k, v in node.items() if k not in ("lora_a", "lora_b")}
      a, b = (np.asarray(node[k], np.float32) for k in ("lora_a", "lora_b"))
      out["kernel"] = np.asarray(node["kernel"], np.float32) + (a @ b) * scale
      return out
    return {k: fold(v) for k, v in node.items()}

  return cfg.merged(), jax.tree.map(lambda x: np.asarray(x, np.float32), fold(params))


def add_lora(cfg: Config, params: dict, seed: int) -> dict:
  """params with new adapters (PEFT's init: lora_a uniform in +-1/sqrt(d_in), lora_b zeros) on each projection
  cfg.lora_targets names."""
  rng = np.random.default_rng(seed)

  def walk(node, path):
    if not isinstance(node, dict):
      return node
    if "kernel" in node and _lora(cfg, path):
      d_in, d_out = np.shape(node["kernel"])
      bound = d_in ** -0.5
      return {**node, "lora_a": rng.uniform(-bound, bound, (d_in, cfg.lora_rank)).astype(np.float32),
              "lora_b": np.zeros((cfg.lora_rank, d_out), np.float32)}
    return {k: walk(v, f"{path}/{k}" if path else str(k)) for k, v in node.items()}

  return walk(params, "")
