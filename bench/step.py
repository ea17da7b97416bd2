"""Train-step time, MFU and memory: the JAX step (piccolo_jax.step) against the PyTorch original, alternating."""
import os

import jax
import numpy as np

from bench import harness
from piccolo_jax import config, sharding, state as state_lib, step as step_lib, tasks


def synthetic_batch(task, B, Lq, Lp, K, vocab, seed=0) -> dict:
  """The trainer's layout from the task registry: {field}_ids/_mask int32 [B or B*K, Lq or Lp] + extras."""
  t, rng = tasks.TASKS[task], np.random.default_rng(seed)
  d = config.section("data", query_max_len=Lq, cls_query_max_len=Lq, sts_max_len=Lq, sts_pair_max_len=Lq,
                     passage_max_len=Lp, neg_num=K, cls_neg_num=K, buckets=(max(Lq, Lp),))
  batch = {}
  for f, L in tasks.fields(t, d):
    shape = (B * K if f.slot == "neg" else B, L)
    batch[f.name + "_ids"] = rng.integers(1000, vocab, shape, dtype=np.int32)
    batch[f.name + "_mask"] = np.ones(shape, np.int32)
  extras = {"label": lambda: rng.integers(0, 6, B).astype(np.float32), "neg_valid": lambda: np.ones((B, K), bool)}
  return batch | {k: extras[k]() for k in t.extras}


def model_flops(cfg, batch, remat=False) -> float:
  """Analytic training FLOPs: 3x the forward matmuls (4x with remat); embeddings and softmax left out."""
  D, F, fwd = cfg.hidden_size, cfg.intermediate_size, 0.0
  for N, L in (v.shape for k, v in batch.items() if k.endswith("_mask")):
    fwd += cfg.num_layers * N * L * 2 * (4 * D * D + 2 * D * F + 2 * L * D) + 2 * N * D * (cfg.dense_out or 0)
  return fwd * (4 if remat else 3)


def train_step(cfg, params, dims, seed=0, chunk_size=0):
  """(jitted step, state, rngs, mesh): the real train step, data-parallel, with the configs' AdamW and losses."""
  (tx, _), mesh = state_lib.make_optimizer(config.section("optim"), params, 1000), sharding.make_mesh(1)
  state, _, graphdef, rngs = state_lib.init_state(cfg, params, tx, mesh, seed)
  step = step_lib.make_train_step(graphdef, tx, config.section("loss", mrl_dims=tuple(dims)), seed, chunk_size)
  return step, state, rngs, mesh


def jax_step(cfg, params, batch, task, dims, compiler_options=None, chunk_size=0):
  """(run() -> loss, info): the real jitted train step, compiled ahead of time for this batch."""
  step, state, rngs, mesh = train_step(cfg, params, dims, chunk_size=chunk_size)
  arrays = sharding.put_batch(batch, mesh)
  compiled, compile_s = harness.timed(lambda: step.lower(state, arrays, rngs, mix=task).compile(compiler_options))
  cost, mem = compiled.cost_analysis(), compiled.memory_analysis()
  info = {"compile_s": compile_s, "compiled": compiled,
          "xla_flops": float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))}
  if mem:
    info |= {"xla_temp_mb": mem.temp_size_in_bytes / 2**20, "xla_args_mb": mem.argument_size_in_bytes / 2**20}
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], arrays, rngs)  # The state is donated, as in training.
    return float(jax.block_until_ready((holder[0], metrics))[1]["loss"])

  return run, info


def matmul_gflops(n, dtype, torch_device=None, reps=5) -> dict:
  """Best GFLOP/s of an n x n x n matmul, in JAX and (given torch_device) torch: the MFU denominator."""
  a, f = jax.random.normal(jax.random.key(0), (n, n), dtype), jax.jit(lambda x: x @ x)
  runs = {"jax": lambda: f(a).block_until_ready()}
  if torch_device:
    import torch
    x = torch.randn(n, n, dtype=getattr(torch, dtype), device=torch_device)
    runs["torch"] = lambda: (x @ x, torch_device == "cuda" and torch.cuda.synchronize())
  times, *_ = harness.alternate(runs, reps)
  return {k: 2 * n**3 / min(v) / 1e9 for k, v in times.items()}


def parser(doc, reps, threads=False):
  """The parser of bench.step and bench.profile_step: the model, the synthetic batch, --reps, --append."""
  p = harness.parser(doc, reps=reps, append=True, threads=threads)
  p.add_argument("--model", default="minilm", help="minilm, stella-shape (random init), a piccolo_jax, ST or HF dir")
  p.add_argument("--task", choices=sorted(tasks.ALIASES), default="cosent", help="cosent is sts (CoSENT)")
  p.add_argument("--batch", type=int, default=32, help="queries (retrieval, cls) or pairs (sts) per step")
  p.add_argument("--seq", type=int, default=64, help="query / STS text length in tokens")
  p.add_argument("--pseq", type=int, default=0, help="passage and negative length (default: --seq)")
  p.add_argument("--neg", type=int, default=None, help="negatives per query (default: retrieval 0, cls 10)")
  p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="torch: autocast")
  p.add_argument("--remat", action="store_true", help="JAX rematerialisation; torch gradient checkpointing")
  p.add_argument("--dropout", type=float, default=-1.0, help="hidden and attention dropout (-1: the model's)")
  return p


def setup(args) -> tuple:
  """(model config, host params, task, K, MRL dims (E/3, 2E/3, E or stella's), batch) of the options; sets pseq."""
  cfg, params, _ = state_lib.load_init(args.model)
  drop = {"dropout": args.dropout, "attention_dropout": args.dropout} if args.dropout >= 0 else {}
  cfg = cfg.replace(dtype=args.dtype, remat=args.remat, **drop)
  task, args.pseq, E = tasks.ALIASES[args.task], args.pseq or args.seq, cfg.embed_dim
  K = args.neg if args.neg is not None else tasks.negatives(tasks.TASKS[task], config.section("data", neg_num=0))
  dims = config.MRL_DIMS if E == config.MRL_DIMS[-1] else (E // 3, 2 * E // 3, E)
  return cfg, params, task, K, dims, synthetic_batch(task, args.batch, args.seq, args.pseq, K, cfg.vocab_size)


def main(argv=None):
  p = parser(__doc__, reps=5, threads=True)
  p.add_argument("--compare", choices=("none", "torch"), default="torch")
  p.add_argument("--settle", type=int, default=1, help="untimed steps before each timed one (reported apart)")
  p.add_argument("--memory", action="store_true", help="one more step each, recording its peak memory")
  p.add_argument("--budget-gb", type=float, default=0.0, help="with --memory: the largest batch under this")
  args = p.parse_args(argv)
  base_mb, dev = harness.rss_mb(), "cuda" if jax.devices()[0].platform == "gpu" else "cpu"
  cfg, params, task, K, dims, batch = setup(args)
  runs, info = {}, {}
  runs["jax"], info["jax"] = jax_step(cfg, params, batch, task, dims)
  if args.compare == "torch":
    from bench import torch_ref
    runs["torch"], info["torch"] = torch_ref.torch_step(cfg, params, batch, task, dims, dev, args.dtype, args.remat,
                                                        args.threads or os.cpu_count())
  del params
  times, cores, settled, first = harness.alternate(runs, args.reps, args.settle)
  mem = {k: harness.peak_mb(run, k) for k, run in runs.items()} if args.memory else {}
  peak = matmul_gflops(*((8192, "bfloat16") if dev == "cuda" else (2048, "float32")), dev if "torch" in runs else None)
  flops, n_tok = info["jax"]["xla_flops"], sum(v.size for k, v in batch.items() if k.endswith("_mask"))
  out = {k: getattr(args, k) for k in ("model", "batch", "seq", "pseq", "dtype", "remat")} | {
      "task": task, "neg": K, "dropout": cfg.dropout, "mrl_dims": list(dims), "tokens": n_tok,
      "model_flops": model_flops(cfg, batch, args.remat), "peak_gflops": peak, "rss_base_mb": base_mb}
  rows = [("", "compile s", "first step s", "step s (median)", "examples/s", "tokens/s", "MFU %", "cores busy",
           "step memory MB (rest -> peak)")]
  for k in runs:
    s, m = harness.median(times[k]), mem.get(k)
    out |= {f"{k}_step_s": s, f"{k}_steps_s": times[k], f"{k}_loss0": first[k][0], f"{k}_first_s": first[k][1],
            f"{k}_mfu_pct": 100 * flops / s / (max(peak.values()) * 1e9), f"{k}_cores": harness.median(cores[k])}
    out |= {f"{k}_{n}": v for n, v in info[k].items() if n != "compiled"}
    if m:
      own = m[0] if dev == "cuda" else base_mb + info[k].get("xla_args_mb", info[k].get("state_mb", 0))
      out |= {f"{k}_mem_rest_mb": m[0], f"{k}_mem_peak_mb": m[1]}
      if args.budget_gb:  # Resident state + (step growth, linear in the batch) <= budget.
        out[f"{k}_max_batch"] = int(args.batch * (args.budget_gb * 1024 - own) / max(m[1] - m[0], 1))
    rows.append((k, f"{out[f'{k}_compile_s']:.1f}" if k == "jax" else "-", f"{first[k][1]:.2f}", f"{s:.3f}",
                 f"{args.batch / s:.1f}", f"{n_tok / s:.0f}", f"{out[f'{k}_mfu_pct']:.1f}",
                 f"{out[f'{k}_cores']:.2f}", f"{m[0]:.0f} -> {m[1]:.0f}" if m else "-"))
  notes = [f"XLA flops/step {flops / 1e9:.1f} G (analytic model {out['model_flops'] / 1e9:.1f} G); peak matmul "
           f"GFLOP/s {', '.join(f'{k} {v:.0f}' for k, v in peak.items())}; {args.reps} alternating reps"]
  if args.settle and len(runs) > 1:
    out |= {f"{k}_switch_s": harness.median(v) for k, v in settled.items()}
    switch = ", ".join(f"{k} {out[f'{k}_switch_s']:.3f} s" for k in runs)
    notes.append(f"each turn: {args.settle} untimed step(s) first, the first right after the other framework "
                 f"ran (median {switch}), then the timed step")
  if "torch" in runs:
    out["ratio"] = out["torch_step_s"] / out["jax_step_s"]
    notes.append(f"ratio torch/jax step time: {out['ratio']:.2f} (torch {out['torch_threads']} threads, "
                 f"{out['torch_attn']} attention; XLA: its own thread pool)")
  if args.budget_gb and mem:
    notes.append(f"largest batch under {args.budget_gb:.1f} GB (step memory linear in batch): " +
                 ", ".join(f"{k} {out[f'{k}_max_batch']}" for k in mem))
  title = (f"step: {args.model}, {task}, batch {args.batch}, seq {args.seq}/{args.pseq}, neg {K}, {args.dtype}, "
           f"remat {args.remat}")
  harness.report(title, rows, notes, out, args.append)


if __name__ == "__main__":
  main()
