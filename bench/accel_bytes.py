"""Analytic bytes per device of the train step (bench.accel lower), and their check against XLA's memory_analysis().

Per device, with P parameters, fsdp f, T = rows x L tokens on the device, compute dtype of b bytes:
- state: float32 parameters and Adam's two moments, 12 P / f (sharded over fsdp);
- step: float32 gradients 4 P / f, and the compute-dtype copies of the weights that the backward pass reads,
  b P (none where remat recomputes the casts);
- activations, per layer, what the backward pass keeps (`layer_bytes`): everything (none), the layer's input
  (full; plus one layer's everything while its backward runs), or the input and the outputs of the matmuls
  without batch dimensions (dots_with_no_batch_dims_saveable: q, k, v, the output projection, both FFN
  matmuls; plus one layer's rest), counted from the residuals JAX's autodiff keeps. Attention keeps float32 and compute-dtype probabilities [rows, H, L, L] on
  the xla path, and only its output and float32 log-sum-exp [rows, H, L] in a fused kernel.
"""
import jax
import numpy as np

from bench import harness
from piccolo_jax import flops, sharding

HBM_GB = {"H100 / H200 80 GB (of H200's 141)": 80, "TPU v5e 16 GB": 16, "TPU v4 32 GB": 32, "TPU v5p 95 GB": 95}
USABLE = 0.9  # Of a chip's HBM, what a program may plan on (the rest: runtime, fragmentation).
POLICIES = ("none", "full", "dots_with_no_batch_dims_saveable")


def param_count(cfg) -> int:
  D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  layer = 4 * (D * D + D) + 2 * D * F + F + D + 4 * D
  emb = (V + cfg.max_position + cfg.type_vocab_size) * D + 2 * D
  return cfg.num_layers * layer + emb + (cfg.dense_out or 0) * (D + 1)


def layer_bytes(cfg, rows, L, impl, policy, b) -> tuple[float, float]:
  """(bytes one layer keeps for the backward pass, bytes of one layer's backward working set) on `rows` rows."""
  D, F, H, T = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, rows * L
  fused = impl != "xla"
  attn = rows * H * L * 4 + T * D * b if fused else rows * H * L * L * (4 + b)  # lse + output, or probabilities.
  dropout = 2 * T * D * (cfg.dropout > 0)  # Two hidden dropout keep-masks, a byte each.
  # input, q, k, v, LN1 in/out, LN2 in and out; FFN in, erf(in), out (the exact GELU's derivative reads the erf).
  everything = 8 * T * D * b + 3 * T * F * b + attn + dropout
  if policy in ("none", "everything_saveable", "dots_saveable"):
    return everything, 0.0
  if policy in ("full", "nothing_saveable"):
    return T * D * b, everything
  return T * (6 * D + F) * b, everything  # dots_with_no_batch_dims_saveable: input + 6 matmul outputs.


def device_bytes(cfg, rows, L, S, impl, policy, fsdp=1) -> dict:
  """Analytic bytes per device of a step on `rows` packed rows of L tokens (S slots), by what holds them."""
  P, b = param_count(cfg), np.dtype(cfg.dtype).itemsize
  keep, work = layer_bytes(cfg, rows, L, impl, policy, b)
  weights = 0 if policy != "none" else b * (P - cfg.vocab_size * cfg.hidden_size)  # Casts kept for backward.
  out = {"parameters": 4 * P / fsdp, "optimizer": 8 * P / fsdp, "gradients": 4 * P / fsdp,
         "weight_casts": weights,
         "activations": cfg.num_layers * keep + work + rows * L * cfg.hidden_size * b + rows * S * cfg.hidden_size * 4}
  out["total"] = sum(out.values())
  return out


def largest_batch(cfg, L, S, impl, policy, devices, fsdp, queries_per_row) -> dict:
  """{HBM: the largest global batch (queries, over `devices` chips) whose step fits USABLE of each chip's HBM},
  activations linear in the rows."""
  fixed = device_bytes(cfg, 0, L, S, impl, policy, fsdp)
  per_row = device_bytes(cfg, 1, L, S, impl, policy, fsdp)["total"] - fixed["total"]
  return {name: int(max(0, (gb * 2**30 * USABLE - fixed["total"]) // per_row) * devices * queries_per_row)
          for name, gb in HBM_GB.items()}


def table(cfg, batch, mesh, tasks) -> dict:
  """Bytes per device of the step on `batch` (every device's rows), per remat policy, with the largest batch."""
  (R, L), S = batch.rows[0].tokens.shape, batch.rows[0].lengths.shape[1]
  devices, fsdp, queries = mesh.size, mesh.shape["fsdp"], sum(tasks.values())
  out = {}
  for policy in POLICIES:
    for impl in ("xla", "fused"):
      gb = {k: v / 2**30 for k, v in device_bytes(cfg, R // devices, L, S, impl, policy, fsdp).items()}
      out[f"{policy}/{impl}"] = gb | {"largest_batch": largest_batch(cfg, L, S, impl, policy, devices, fsdp,
                                                                     queries / R)}
  return out


def compare(cfg, batch, dims, policies=POLICIES) -> list:
  """Analytic bytes and FLOPs against XLA's analyses of the xla-attention step compiled on one CPU device, per
  policy: [{policy, analytic state (parameters + optimizer) and XLA's arguments, analytic step (gradients, casts,
  activations) and XLA's temporaries, in MB; computed FLOPs and XLA's count, compiled and as lowered}]."""
  from bench import accel  # pylint: disable=g-import-not-at-top
  mesh, rows = sharding.make_mesh(1, jax.devices()[:1]), []
  (R, L), S = batch.rows[0].tokens.shape, batch.rows[0].lengths.shape[1]
  for policy in policies:
    c = cfg.replace(remat=policy, attention="xla", attention_dropout=0.0)
    step, args = accel.step_args(c, batch, dims, mesh)
    lowered = step.lower(*args)
    compiled, secs = harness.timed(lowered.compile)
    mem, mine = compiled.memory_analysis(), device_bytes(c, R, L, S, "xla", policy)
    count = lambda cost: float((cost[0] if isinstance(cost, list) else cost).get("flops", 0))
    rows.append({"policy": policy, "analytic_state_mb": (mine["parameters"] + mine["optimizer"]) / 2**20,
                 "xla_arguments_mb": mem.argument_size_in_bytes / 2**20,
                 "analytic_step_mb": (mine["total"] - mine["parameters"] - mine["optimizer"]) / 2**20,
                 "xla_temp_mb": mem.temp_size_in_bytes / 2**20, "compile_s": secs,
                 "computed_flops": flops.train_flops(c, flops.Tokens.of_rows(((R, L),), S), policy),
                 "xla_flops": count(compiled.cost_analysis()), "lowered_flops": count(lowered.cost_analysis())})
  return rows


def markdown(out, bytes_table=True) -> list[str]:
  """BENCHMARKS.md tables of a `bench.accel lower` result."""
  gb = lambda x: f"{x:.2f}"
  lines = ["", "| platform | attention | lowered in s | custom calls | [.., L, L] tensors left |", "|---|---|---|---|---|"]
  lines += [f"| {e['platform']} | {e['attention']} | {e['seconds']} | {', '.join(e['custom_calls']) or '-'} | "
            f"{', '.join(e['LxL_tensors']) or 'none'} |" for e in out["exports"]]
  f = out["flops"]
  lines += ["", "| FLOPs per step | tokens | sum of squared lengths | TFLOP |", "|---|---|---|---|",
            f"| real (texts alone) | {f['real_tokens']:.0f} | {f['real_squares']:.3g} | {f['real'] / 1e12:.1f} |",
            f"| computed (rows, padding included) | {f['computed_tokens']:.0f} | {f['computed_squares']:.3g} | "
            f"{f['computed'] / 1e12:.1f} |"]
  if not bytes_table:
    return lines
  names = list(HBM_GB)
  lines += ["", "| remat / attention | parameters GB | optimizer GB | gradients GB | weight casts GB | activations GB "
            "| total GB | " + " | ".join(f"largest global batch, 8 x {n}" for n in names) + " |", "|---" * (7 + len(names)) + "|"]
  for k, v in out["bytes"].items():
    lines.append(f"| {k} | " + " | ".join(gb(v[x]) for x in ("parameters", "optimizer", "gradients", "weight_casts",
                                                              "activations", "total")) + " | " +
                 " | ".join(str(v["largest_batch"][n]) for n in names) + " |")
  if "xla_memory" in out:
    lines += ["", "| remat (CPU compile) | analytic state MB | XLA arguments MB | ratio | analytic step MB | "
              "XLA temporaries MB | ratio | computed GFLOP | XLA GFLOP compiled | ratio | XLA GFLOP as lowered | ratio |",
              "|---" * 12 + "|"]
    for r in out["xla_memory"]:
      lines.append(f"| {r['policy']} | {r['analytic_state_mb']:.0f} | {r['xla_arguments_mb']:.0f} | "
                   f"{r['xla_arguments_mb'] / r['analytic_state_mb']:.2f} | {r['analytic_step_mb']:.0f} | "
                   f"{r['xla_temp_mb']:.0f} | {r['xla_temp_mb'] / r['analytic_step_mb']:.2f} | "
                   f"{r['computed_flops'] / 1e9:.1f} | {r['xla_flops'] / 1e9:.1f} | "
                   f"{r['xla_flops'] / r['computed_flops']:.3f} | {r['lowered_flops'] / 1e9:.1f} | "
                   f"{r['lowered_flops'] / r['computed_flops']:.3f} |")
  return lines


# Decoders (decoder.py): Qwen3-Embedding's three sizes, from their Hugging Face configs.
QWEN3 = {"0.6B": dict(hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, intermediate_size=3072,
                      vocab_size=151669),
         "4B": dict(hidden_size=2560, num_layers=36, num_heads=32, num_kv_heads=8, intermediate_size=9728,
                    vocab_size=151665),
         "8B": dict(hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8, intermediate_size=12288,
                    vocab_size=151665)}


def decoder_params(cfg) -> tuple[int, int]:
  """(parameters, LoRA adapter parameters) of a decoder.Config: its embeddings, layers and final norm; an adapter
  on a [d_in, d_out] projection has rank x (d_in + d_out)."""
  D, F, HE, KE = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  shapes = {"q": (D, HE), "k": (D, KE), "v": (D, KE), "o": (HE, D), "gate": (D, F), "up": (D, F), "down": (F, D)}
  layer = sum(a * b for a, b in shapes.values()) + 2 * D + (2 * cfg.head_dim if cfg.qk_norm else 0)
  layer += (HE + 2 * KE) * cfg.attention_bias + D * cfg.output_bias + (2 * F + D) * cfg.mlp_bias
  from piccolo_jax import decoder  # pylint: disable=g-import-not-at-top
  adapters = sum(cfg.lora_rank * (a + b) for name, (a, b) in shapes.items()
                 if decoder._lora(cfg, f"layers/0/attn/{name}" if name in "qkvo" else f"layers/0/{name}"))  # pylint: disable=protected-access
  return cfg.vocab_size * D + cfg.num_layers * layer + D, cfg.num_layers * adapters


def decoder_bytes(cfg, tokens, fsdp, L=None, policy="full") -> dict:
  """Analytic bytes per device of a decoder's train step on `tokens` tokens a device (cfg.dtype compute), parameters
  over `fsdp` devices. Full fine-tuning keeps float32 parameters, Adam's two moments and gradients (16 bytes a
  parameter); LoRA the base in bfloat16 (2 bytes) and those 16 bytes for each adapter parameter. A layer's backward
  working set: RMSNorm in and out, q, k, v and k, v repeated to every head, the attention output and its float32
  log-sum-exp (a fused kernel; L given: xla's probabilities [rows, H, L, L], float32 and compute dtype), SwiGLU's
  three [T, F]. Kept for the backward pass: every layer's input plus one layer's working set (policy full), or
  every layer's working set (none); plus one layer's weights gathered in the compute dtype for fsdp."""
  P, A = decoder_params(cfg)
  D, F, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads
  HE, KE, b = H * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, np.dtype(cfg.dtype).itemsize
  state = {"base_bf16": 2 * P / fsdp, "trained_fp32_adam_grads": 16 * A / fsdp} if cfg.lora_rank else \
      {"base_bf16": 0.0, "trained_fp32_adam_grads": 16 * P / fsdp}
  attn = tokens * 4 * H if L is None else tokens * H * L * (4 + b)
  everything = tokens * b * (4 * D + 5 * HE + 3 * KE + 3 * F) + attn  # q, q roped, output, k and v repeated; k,
  # k roped, v.
  kept = cfg.num_layers * (tokens * D * b if policy == "full" else everything) + everything * (policy == "full")
  out = state | {"gathered_layer": b * (P - cfg.vocab_size * D) / cfg.num_layers, "activations": kept + tokens * D * 4}
  return out | {"total": sum(out.values())}


def decoder_compare(cfg, batch, dims, ranks=(0, 16), policies=("none", "full")) -> list:
  """decoder_bytes against XLA's memory_analysis() of the step compiled on one CPU device (xla attention, float32
  compute, rows of one length), full and LoRA, remat none and full: [{rank, policy, analytic state MB (base, float32
  parameters and Adam's moments: 12 of the 16 bytes, gradients being temporaries), XLA's arguments less the batch
  MB, analytic step MB (gradients, activations), XLA's temporaries MB}]."""
  from bench import accel  # pylint: disable=g-import-not-at-top
  mesh, rows = sharding.make_mesh(1, jax.devices()[:1]), []
  (_, L), tokens = batch.rows[0].tokens.shape, sum(r.tokens.size for r in batch.rows)
  for r, policy in ((r, p) for r in ranks for p in policies):
    c = cfg.replace(lora_rank=r, remat=policy, attention="xla", dtype="float32")
    step, (state, b, rngs) = accel.step_args(c, batch, dims, mesh)
    mem = step.lower(state, b, rngs).compile().memory_analysis()
    inputs = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((b.rows, b.slots, b.extras, rngs)))
    mine = decoder_bytes(c, tokens, 1, L, policy)
    state_mb = (mine["base_bf16"] + 0.75 * mine["trained_fp32_adam_grads"]) / 2**20
    rows.append({"rank": r, "policy": policy, "analytic_state_mb": state_mb,
                 "xla_arguments_mb": (mem.argument_size_in_bytes - inputs) / 2**20,
                 "analytic_step_mb": (mine["total"] - state_mb * 2**20) / 2**20,
                 "xla_temp_mb": mem.temp_size_in_bytes / 2**20})
  return rows


def decoder_markdown(tokens=4096, fsdp=8, rank=16) -> list[str]:
  """BENCHMARKS.md's and README's table: GB per device of Qwen3-Embedding's sizes, full versus LoRA."""
  from piccolo_jax import decoder  # pylint: disable=g-import-not-at-top
  lines = [f"| model | parameters | fine-tuning | frozen base GB | trained + Adam + grads GB | gathered layer GB | "
           f"activations GB ({tokens} tokens) | total GB per device (fsdp {fsdp}) | total GB, 1 device |",
           "|---" * 9 + "|"]
  for name, shape in QWEN3.items():
    for r in (0, rank):
      cfg = decoder.Config(**shape, lora_rank=r, dtype="bfloat16")
      gb, one = decoder_bytes(cfg, tokens, fsdp), decoder_bytes(cfg, tokens, 1)
      lines.append(f"| Qwen3-Embedding-{name} | {decoder_params(cfg)[0] / 1e9:.2f} B | "
                   f"{f'LoRA r={r} ({decoder_params(cfg)[1] / 1e6:.1f} M)' if r else 'full'} | " +
                   " | ".join(f"{gb[k] / 2**30:.2f}" for k in ("base_bf16", "trained_fp32_adam_grads", "gathered_layer",
                                                                "activations", "total")) +
                   f" | {one['total'] / 2**30:.1f} |")
  return lines
