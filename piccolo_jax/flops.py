"""Analytic FLOPs of a train step, and model FLOP utilisation (MFU) against the chip's bf16 peak.

Two counts per step, from the same formula:
- computed: what the encoder runs on its packed rows, padding and the masked attention blocks included
  (R rows of L tokens). It agrees with XLA's cost_analysis() of the xla-attention step on CPU within 5%
  (tests/test_kernels.py); a fused kernel skips no block either, except cuDNN's packed layout.
- real: the same formula on the texts alone, each attending over its own n tokens: MFU uses it, so packing
  and padding cannot inflate it.
Per layer and token the forward pass multiplies 2 x the layer's matmul weights (Config.layer_weights: BERT's
4 D^2 + 2 D F for Q, K, V, output and FFN; a decoder's grouped-query projections and SwiGLU), and attention
4 n H E over the n keys it sees (a causal decoder's fused kernel may skip half; counted whole); then mean pooling (a [L, S] x [L, D] product per row, in the
computed count) and the dense head, 2 D D' per text. Training is 3x the forward (backward = 2x), plus the
forward again for what the remat policy recomputes. Left out, under 1% at BERT scale: embeddings, LayerNorm,
softmax and other elementwise work, the loss's similarity matrices and the optimizer.
"""
import dataclasses

import numpy as np

# Dense bf16 peak FLOP/s of one chip by jax device_kind, most specific first (vendor data sheets).
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
             ("A100", 312e12), ("A800", 312e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
             ("TPU v5p", 459e12), ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12))
# The recomputed forward share (matmuls, attention) in the backward pass per model.remat policy.
RECOMPUTED = {"none": (0, 0), "full": (1, 1), "nothing_saveable": (1, 1), "dots_with_no_batch_dims_saveable": (0, 1),
              "dots_saveable": (0, 0), "everything_saveable": (0, 0)}


def peak(device_kind: str) -> float | None:
  """The chip's dense bf16 peak FLOP/s, or None for a kind not in PEAK_BF16 (a CPU among them)."""
  return next((v for k, v in PEAK_BF16 if k.lower() in device_kind.lower()), None)


@dataclasses.dataclass(frozen=True)
class Tokens:
  """What the formula needs of a step's texts: tokens, the sum of each text's tokens squared (attention), texts,
  and pooled slots [R * S] times row length (the pooling product; 0 for texts alone)."""
  tokens: float
  squares: float
  texts: float
  pooled: float = 0.0

  @classmethod
  def of_texts(cls, lens_N) -> "Tokens":
    lens_N = np.asarray(lens_N, np.float64)
    return cls(lens_N.sum(), (lens_N ** 2).sum(), len(lens_N))

  @classmethod
  def of_rows(cls, shape, S) -> "Tokens":
    """Groups of R packed rows of L tokens (shape: ((R, L), ...)) and min(S, L) slots, as computed: every row a
    text of L tokens, every slot pooled."""
    slots = [(R, L, min(S, L)) for R, L in shape]
    return cls(sum(R * L for R, L, _ in slots), sum(R * L * L for R, L, _ in slots), sum(R * s for R, _, s in slots),
               sum(R * s * L for R, L, s in slots))


def train_flops(cfg, t: Tokens, remat="none") -> float:
  """Training FLOPs (forward + backward + remat recompute) of a model.Config on tokens t."""
  D, layers = cfg.hidden_size, cfg.num_layers
  matmul = 2 * t.tokens * cfg.layer_weights * layers + 2 * t.texts * D * (cfg.dense_out or 0)
  matmul += 2 * t.pooled * D
  attn = 4 * t.squares * cfg.attention_width * layers
  again_matmul, again_attn = RECOMPUTED[remat]
  return (3 + again_matmul) * matmul + (3 + again_attn) * attn


def step_flops(cfg, info) -> tuple[float, float]:
  """(computed, real) training FLOPs of a global step from its assembly info (batch.Assembler: shape, slots,
  tokens, squares, texts of the whole global batch)."""
  rows = Tokens.of_rows(info["shape"], info["slots"])
  real = Tokens(info["tokens"], info["squares"], info["texts"])
  return train_flops(cfg, rows, cfg.remat), train_flops(cfg, real, "none")
