"""The accelerator path, from this CPU and on a device.

  python -m bench.accel lower [--platforms tpu,cuda]   the real train step at the stella shape, built from
      ShapeDtypeStructs (no arrays) on a mesh of 8 CPU devices standing in for 8 chips, exported with jax.export
      for TPU (splash attention) and CUDA (pallas_gpu, and cudnn with its version checks stubbed): the custom
      calls in each module, any [.., L, L] attention tensor left, analytic FLOPs (real and computed tokens) and
      bytes per device per remat policy with the largest global batch per HBM size; then the analytic bytes
      against XLA's memory_analysis() of CPU compiles at a small shape.
  python -m bench.accel run [--dry-run] [--shape qwen3-0.6b-lora]   on the accelerator at hand: the packed step per
      attention implementation that runs there, retrieval at L = 512 and STS at L = 128 (step time, real tokens/s,
      MFU, peak memory), and the PyTorch original on the same texts (HF BertModel, SDPA, bf16 autocast, AdamW,
      padded to the longest); or the Qwen3-0.6B-shape LoRA step (causal) alone. --dry-run: its whole path at a
      tiny shape on CPU (kernels in interpret mode).

Texts are random tokens of synthetic lengths (`lengths`): queries as retrieval-zh's (median 14 tokens, capped at
64), passages a log-normal of median --passage-median tokens capped at 512. On a device machine without the
project's packages, carry ml_collections as a wheel (BENCHMARKS.md, "Accelerator path", says how).
"""
import os
import sys

if sys.argv[1:2] == ["lower"]:  # 8 CPU devices stand in for 8 chips; set before jax is imported. XLA:CPU's
  # default scheduler favours concurrency over memory: memory_analysis() is compared under the memory-minded one.
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                        "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import export  # noqa: E402
from flax import nnx  # noqa: E402

from bench import accel_bytes  # noqa: E402
from bench import step as bench_step  # noqa: E402
from piccolo_jax import attention, config, flops, sharding, state as state_lib, step as step_lib  # noqa: E402
from piccolo_jax import decoder  # noqa: E402
from piccolo_jax import model as model_lib  # noqa: E402
from piccolo_jax import models

TINY = model_lib.Config(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96,
                        dense_out=96, max_position=512)
QWEN3_06B_LORA = decoder.Config(**accel_bytes.QWEN3["0.6B"], lora_rank=16, lora_alpha=32.0)
SHAPES = {  # model, row length, {task: rows}, negatives a retrieval row, MRL dims.
    "stella": (models.STELLA, 512, {"retrieval": 256}, 7, config.MRL_DIMS),
    "qwen3-0.6b-lora": (QWEN3_06B_LORA, 512, {"retrieval": 64}, 7, (256, 512, 1024)),
    "decoder-tiny": (decoder.Config(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                    head_dim=16, intermediate_size=96, lora_rank=4), 256, {"retrieval": 16}, 3,
                     (32, 64)),
    "stella-mixed": (models.STELLA, 512, {"retrieval": 224, "sts": 16, "cls": 16}, 7, config.MRL_DIMS),
    "tiny": (TINY, 256, {"retrieval": 16, "sts": 8, "cls": 8}, 3, (32, 96)),
}
# The shape at which analytic bytes meet XLA's memory_analysis() of CPU compiles (float32: XLA:CPU computes
# bfloat16 through float32).
COMPARE = model_lib.Config(vocab_size=8000, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024,
                           dense_out=0, max_position=512, attention_dropout=0.0)
# The decoder's: a small Qwen3 (LoRA rank 16 and full), rows of 256.
DECODER_COMPARE = decoder.Config(vocab_size=8000, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                                 head_dim=64, intermediate_size=768, max_position=512)
EXPORTS = {"tpu": ("splash",), "cuda": ("pallas_gpu", "cudnn")}  # The fused kernel each platform exports with.
# jax.export refuses custom calls without a stability guarantee unless told; these are the kernels'.
UNSTABLE = ("__gpu$xla.gpu.triton", "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward",
            "__cudnn$fmhaSoftmaxDropout", "__cudnn$fmhaSoftmaxDropoutBackward")


def lengths(n, cap, median, sigma, rng):
  """n text lengths: a log-normal of this median, in 2..cap tokens."""
  return np.clip(np.round(np.exp(rng.normal(np.log(median), sigma, n))), 2, cap).astype(int)


def texts(tasks, K, L, passage_median, vocab, seed=0, row_lengths=None):
  """(packed Batch of every device's rows, row multiple 8, {task: its padded batch for torch}): random tokens, in
  rows of L tokens or of row_lengths."""
  rng, packed, padded, extras = np.random.default_rng(seed), {}, {}, {}
  for task, B in tasks.items():
    q = lengths(B, 64, 14, 0.3, rng)  # retrieval-zh's queries (MiniLM tokenizer: median 14, log sd 0.30).
    p = lengths(B, L, passage_median, 0.6, rng) if task == "retrieval" else lengths(B, 64, 14, 0.3, rng)
    n = lengths(B * K, L, passage_median, 0.6, rng) if task != "sts" else None
    fields = {"sts": {"text_a": q, "text_b": p}}.get(task, {"query": q, "pos": p, "neg": n})
    packed[task] = {f: [rng.integers(min(1000, vocab // 2), vocab, m, dtype=np.int32) for m in ls] for f, ls in fields.items()}
    extras[task] = {"label": rng.integers(0, 6, B).astype(np.float32)} if task == "sts" else {
        "neg_valid": np.ones((B, K), bool)}
    if task == "retrieval":
      extras[task] |= {"pos_id": np.arange(B, dtype=np.int32), "neg_id": np.arange(B, B + B * K, dtype=np.int32)
                       .reshape(B, K)}
    padded[task] = {f"{f}_{k}": x for f, ids in packed[task].items()
                    for k, x in zip(("ids", "mask"), _pad(ids))} | extras[task]
  return bench_step.of_texts(packed, extras, row_lengths or L, multiple=8), padded


def _pad(ids):
  out, mask = np.zeros((len(ids), max(map(len, ids))), np.int32), np.zeros((len(ids), max(map(len, ids))), np.int32)
  for i, t in enumerate(ids):
    out[i, :len(t)], mask[i, :len(t)] = t, 1
  return out, mask


def real_tokens(batch) -> flops.Tokens:
  lens = np.concatenate([np.asarray(r.lengths).reshape(-1) for r in batch.rows])
  return flops.Tokens.of_texts(lens[lens > 0])


def loss_config(dims, seed=0):
  c = config.base()
  c.seed, c.loss.mrl_dims = seed, tuple(dims)
  return c


def abstract_state(cfg, mesh, seed=0):
  """(state ShapeDtypeStructs with their shardings, graphdef, rngs, tx): nothing allocated. A LoRA decoder's base
  is frozen in bfloat16 (state.split_frozen)."""
  model = model_lib.abstract_model(cfg)
  model.train()
  graphdef, params, rngs = nnx.split(model, nnx.Param, ...)
  params, rngs = nnx.to_pure_dict(params), nnx.to_pure_dict(rngs)
  params, frozen = state_lib.split_frozen(params, cfg)
  tx, _ = state_lib.make_optimizer(config.section("optim"), params, 1000)
  opt = jax.eval_shape(tx.init, params)
  shard = lambda tree: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                                    sharding.state_shardings(mesh, tree))
  state = {"params": shard(params), "frozen": shard(frozen), "opt": shard(opt),
           "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))}
  rngs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)), rngs)
  return state, graphdef, rngs, tx


def abstract_batch(batch, mesh):
  rows = sharding.batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows), batch.rows), \
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)),
                   (batch.slots, batch.extras))


def step_args(cfg, batch, dims, mesh):
  """(jitted train step, its arguments as ShapeDtypeStructs) of the real trainer's step."""
  state, graphdef, rngs, tx = abstract_state(cfg, mesh)
  rows, (slots, extras) = abstract_batch(batch, mesh)
  b = type(batch)(rows, slots, extras, batch.mix)
  return step_lib.make_train_step(graphdef, tx, loss_config(dims), 0, mesh), (state, b, rngs)


@contextlib.contextmanager
def stub_cudnn():
  """Within the block, cuDNN's version and compute-capability checks answer as a Hopper GPU with cuDNN 9.10
  would: there is none here, and the cudnn lowering asks them."""
  from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=g-import-not-at-top
  names = ("check_cudnn_version", "check_compute_capability", "is_cuda_compute_capability_equal")
  old = {n: getattr(fa, n) for n in names}
  fa.check_cudnn_version, fa.check_compute_capability = lambda: 91000, lambda capability: True
  fa.is_cuda_compute_capability_equal = lambda capability: False
  try:
    yield
  finally:
    for n, f in old.items():
      setattr(fa, n, f)


def lower_one(cfg, batch, dims, mesh, platform, impl) -> dict:
  """Exports the step for `platform` with attention `impl`; what its module holds."""
  step, args = step_args(cfg.replace(attention=impl), batch, dims, mesh)
  checks = [export.DisabledSafetyCheck.custom_call(t) for t in UNSTABLE]
  t = time.perf_counter()
  with attention.target(platform), stub_cudnn() if impl == "cudnn" else contextlib.nullcontext():
    exp = export.export(step, platforms=[platform], disabled_checks=checks)(*args)
  secs, text = time.perf_counter() - t, exp.mlir_module()
  square = sorted({t for L in {r.tokens.shape[1] for r in batch.rows}
                   for t in re.findall(rf"tensor<((?:\d+x)*{L}x{L}x(?:f32|bf16|f16))>", text)})
  calls = sorted(set(re.findall(r"custom_call @([\w$.]+)", text)))
  return {"platform": platform, "attention": impl, "seconds": round(secs, 2), "devices": exp.nr_devices,
          "custom_calls": calls, "LxL_tensors": square, "module_mb": round(len(text) / 2**20, 1)}


def lower(args):
  cfg, L, tasks, K, dims = SHAPES[args.shape]
  cfg = cfg.replace(dtype="bfloat16", remat=args.remat, attention_dropout=0.0)
  mesh = sharding.make_mesh(args.fsdp)
  lengths = tuple(int(x) for x in args.row_lengths.split(",")) if args.row_lengths else None
  batch, _ = texts(tasks, K, L, args.passage_median, cfg.vocab_size, row_lengths=lengths)
  shape, S = tuple(r.tokens.shape for r in batch.rows), batch.rows[0].lengths.shape[1]
  (R, L), = shape if len(shape) == 1 else ((sum(R for R, _ in shape), None),)
  out = {"shape": args.shape, "rows": R, "row_length": L, "row_shapes": shape,
         "texts": int(sum((r.lengths > 0).sum() for r in batch.rows)),
         "queries": sum(tasks.values()), "mesh": dict(mesh.shape), "exports": []}
  for platform in args.platforms.split(","):
    for impl in EXPORTS[platform] + (("xla",) if args.with_xla else ()):
      out["exports"].append(lower_one(cfg, batch, dims, mesh, platform, impl))
      print(json.dumps(out["exports"][-1]), flush=True)
  real, rows = real_tokens(batch), flops.Tokens.of_rows(shape, S)
  out["flops"] = {"real": flops.train_flops(cfg, real), "computed": flops.train_flops(cfg, rows, cfg.remat),
                  "real_tokens": real.tokens, "computed_tokens": rows.tokens, "real_squares": real.squares,
                  "computed_squares": rows.squares}
  if isinstance(cfg, decoder.Config):  # Bytes per device: accel_bytes.decoder_bytes, at every size.
    out["param_counts"] = dict(zip(("parameters", "adapters"), accel_bytes.decoder_params(cfg)))
    lines = accel_bytes.markdown(out, bytes_table=False) + [""] + accel_bytes.decoder_markdown()
    if args.compare:
      small = DECODER_COMPARE
      b, _ = texts({"retrieval": 32}, 3, 256, 60, small.vocab_size)
      out["xla_memory"] = accel_bytes.decoder_compare(small, b, (128, 256))
      lines += ["", "| LoRA rank | remat (CPU compile, float32, xla attention) | analytic state MB | XLA arguments "
                "less the batch MB | ratio | analytic step MB | XLA temporaries MB | ratio |", "|---" * 8 + "|"]
      lines += [f"| {r['rank']} | {r['policy']} | {r['analytic_state_mb']:.1f} | {r['xla_arguments_mb']:.1f} | "
                f"{r['xla_arguments_mb'] / r['analytic_state_mb']:.3f} | {r['analytic_step_mb']:.0f} | "
                f"{r['xla_temp_mb']:.0f} | {r['xla_temp_mb'] / r['analytic_step_mb']:.2f} |" for r in out["xla_memory"]]
    print("\n".join(lines))
    print(json.dumps(out))
    return
  if len(shape) > 1:  # accel_bytes models rows of one length.
    print(json.dumps(out))
    return
  out["bytes"] = accel_bytes.table(cfg, batch, mesh, tasks)
  if args.compare:
    small, (Ls, Rs) = COMPARE, (256, 32)
    b, _ = texts({"retrieval": Rs}, 3, Ls, 60, small.vocab_size)
    out["xla_memory"] = accel_bytes.compare(small, b, (128, 256))
    out["xla_memory_shape"] = {"hidden": small.hidden_size, "layers": small.num_layers, "rows": b.rows[0].tokens.shape[0],
                               "row_length": Ls, "dtype": small.dtype}
  print("\n".join(accel_bytes.markdown(out)))
  print(json.dumps(out))


def run(args):
  """Measures the packed step per attention implementation (and the torch original) on this machine."""
  from bench import accel_run  # pylint: disable=g-import-not-at-top  (torch: only here)
  accel_run.main(args)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m bench.accel", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="cmd", required=True)
  lo = sub.add_parser("lower", help="export the stella-shape (or --shape) step for TPU and CUDA from this CPU")
  lo.add_argument("--platforms", default="tpu,cuda")
  lo.add_argument("--shape", choices=sorted(SHAPES), default="stella")
  lo.add_argument("--remat", default="full", choices=model_lib.REMAT_POLICIES)
  lo.add_argument("--fsdp", type=int, default=1, help="devices of the 8 that shard parameters and optimizer")
  lo.add_argument("--passage-median", type=float, default=150, help="median passage length in tokens")
  lo.add_argument("--row-lengths", default="", help="rows of these lengths (e.g. 512,128; multiples of the fused "
                  "kernels' 128), not of the shape's one; the bytes per device are then left out")
  lo.add_argument("--with-xla", action="store_true", help="also export the written-out attention")
  lo.add_argument("--no-compare", dest="compare", action="store_false",
                  help="skip the analytic bytes against CPU compiles at a small shape")
  ru = sub.add_parser("run", help="measure on the accelerator at hand")
  ru.add_argument("--dry-run", action="store_true", help="the whole path at a tiny shape on CPU")
  ru.add_argument("--shape", choices=("stella", "qwen3-0.6b-lora"), default="stella",
                  help="stella: BERT-large against the PyTorch original; qwen3-0.6b-lora: the LoRA decoder step alone")
  ru.add_argument("--reps", type=int, default=5)
  ru.add_argument("--passage-median", type=float, default=150)
  ru.add_argument("--out", default="", help="also write the JSON result here")
  args = p.parse_args(argv)
  {"lower": lower, "run": run}[args.cmd](args)


if __name__ == "__main__":
  main()
