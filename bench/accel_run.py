"""python -m bench.accel run: the packed step per attention implementation and the PyTorch original, measured on
the accelerator at hand (bench/accel.py's docstring). Each JAX step is compiled ahead of time, warmed up once and
timed over --reps steps; torch likewise. Memory: XLA's planned peak of the compiled step (memory_analysis: its
arguments and temporaries) and torch's max_memory_allocated."""
import json
import time

import jax
import numpy as np

from bench import accel, harness
from piccolo_jax import config, flops, sharding, state as state_lib, step as step_lib
from piccolo_jax import models

RUNS = {"cpu": ("xla", "splash", "pallas_gpu"), "gpu": ("xla", "pallas_gpu", "cudnn"), "tpu": ("xla", "splash")}
# (task, rows of the global batch, negatives a row, row length L): retrieval as configs/finetune.py trains it at
# L = 512 (64 queries: the original's padded step has to fit one GPU too), STS pairs at L = 128.
WORK = {"stella": (("retrieval", 64, 7, 512), ("sts", 256, 0, 128)),
        "qwen3-0.6b-lora": (("retrieval", 32, 7, 512),),  # No torch run: torch_ref is BERT's.
        "tiny": (("retrieval", 4, 1, 128),),  # --dry-run: one small task (the same loop runs the second).
        "decoder-tiny": (("retrieval", 4, 1, 128),)}


def runnable(impl, dev) -> str:
  """Why impl cannot run on dev ("" if it can)."""
  if impl == "cudnn" and float(getattr(dev, "compute_capability", 0) or 0) < 9:
    return "needs a GPU of compute capability 9.0 or later (Hopper) and cuDNN: the packed layout"
  return ""


def jax_run(cfg, batch, dims, reps, warm=True) -> dict:
  """Step time, planned memory and loss of the real train step on batch."""
  mesh = sharding.make_mesh(1, jax.devices()[:1])
  params, frozen = state_lib.split_frozen(models.random_params(cfg, 0), cfg)  # A LoRA decoder's base: bf16.
  tx, _ = state_lib.make_optimizer(config.section("optim"), params, 1000)
  state, _, graphdef, rngs = state_lib.init_state(cfg, params, tx, mesh, 0, frozen)
  del params, frozen
  step = step_lib.make_train_step(graphdef, tx, accel.loss_config(dims), 0, mesh)
  arrays = sharding.put_batch(batch, mesh)
  compiled, compile_s = harness.timed(lambda: step.lower(state, arrays, rngs).compile())
  mem = compiled.memory_analysis()
  if warm:
    state, m = compiled(state, arrays, rngs)  # Warm-up.
    jax.block_until_ready(state)
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    state, m = compiled(state, arrays, rngs)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t)
  planned = (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**30 if mem else None
  return {"step_s": harness.median(times), "compile_s": compile_s, "memory_gb": planned, "loss": float(m["loss"])}


def torch_run(cfg, padded, task, dims, reps, device) -> dict:
  from bench import torch_ref  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  params = models.random_params(cfg, 0)
  step, info = torch_ref.torch_trainer(cfg, params, dims, device, "bfloat16", cfg.remat != "none")
  del params
  cuda = device == "cuda"
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  loss = step(padded, task)  # Warm-up.
  times = [harness.timed(lambda: step(padded, task))[1] for _ in range(reps)]
  return {"step_s": harness.median(times), "loss": loss, "attn": info["attn"],
          "memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def main(args):
  dev = jax.devices()[0]
  decoder = args.shape != "stella"
  shape = ("decoder-tiny" if decoder else "tiny") if args.dry_run else args.shape
  if not args.dry_run and dev.platform == "cpu":
    raise SystemExit("bench.accel run: no accelerator here (jax sees a CPU); --dry-run runs the path at a tiny shape")
  base, _, _, _, dims = accel.SHAPES[shape]
  # --dry-run: no remat and no warm-up step, so that the path costs the suite less.
  base = base.replace(dtype="bfloat16", remat="none" if args.dry_run else "full", attention_dropout=0.0)
  peak = flops.peak(dev.device_kind)
  rows, out = [], {"device": dev.device_kind, "platform": dev.platform, "shape": shape, "runs": []}
  for task, B, K, L in WORK[shape]:
    batch, padded = accel.texts({task: B}, K, L, args.passage_median, base.vocab_size)
    real = accel.real_tokens(batch)
    real_flops = flops.train_flops(base, real)
    for impl in RUNS[dev.platform] + (() if decoder else ("torch",)):
      why = "" if impl == "torch" else runnable(impl, dev)
      r = {"task": task, "L": L, "queries": B, "negatives": K, "attention": impl, "real_tokens": real.tokens}
      if why:
        r["skipped"] = why
      elif impl == "torch":
        r |= torch_run(base, padded[task], task, dims, args.reps, "cuda" if dev.platform == "gpu" else "cpu")
      else:
        r |= jax_run(base.replace(attention=impl), batch, dims, args.reps, warm=not args.dry_run)
      if "step_s" in r:
        r |= {"real_tokens_per_s": real.tokens / r["step_s"], "tflops_per_s": real_flops / r["step_s"] / 1e12,
              "mfu": real_flops / r["step_s"] / peak if peak else None}
      out["runs"].append(r)
      print(json.dumps(r), flush=True)
  for r in out["runs"]:
    torch_s = next((x["step_s"] for x in out["runs"] if x["task"] == r["task"] and x["attention"] == "torch"
                    and "step_s" in x), None)
    fmt = lambda k, spec: "-" if r.get(k) is None else format(r[k], spec)
    rows.append((r["task"], r["L"], r["attention"], fmt("step_s", ".3f"), fmt("real_tokens_per_s", ".0f"),
                 fmt("tflops_per_s", ".1f"), "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}",
                 fmt("memory_gb", ".1f"), f"{torch_s / r['step_s']:.2f}" if torch_s and "step_s" in r else "-",
                 r.get("skipped", "")))
  print("\n".join(harness.table_md([("task", "L", "attention", "step s", "real tokens/s", "TFLOP/s", "MFU %",
                                     "memory GB", "vs torch", "note")] + rows)))
  print(json.dumps(out))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)
