"""Train-step time, MFU and memory: the JAX step (piccolo_jax.step, packed rows) against the PyTorch original
(padded), alternating, on the same texts; `--group NAME` runs a grid of configurations, each in a fresh process."""
import datetime
import os
import sys

import jax
import numpy as np

from bench import harness
from piccolo_jax import attention, batch as batch_lib, config, flops as flops_lib, packing, sharding, state as state_lib
from piccolo_jax import models
from piccolo_jax import step as step_lib, tasks


def of_texts(texts, extras, L, S=packing.SEGMENTS, multiple=1, groups=1) -> batch_lib.Batch:
  """A batch.Batch of texts given as token ids, {task: {field: [ids, ...]}}, with {task: extras}, packed into
  rows of L tokens (or of several lengths, L a tuple), each length's rows a multiple of `multiple`; each task
  `groups` loss groups."""
  fields = [(task, f, len(ids)) for task, by_field in texts.items() for f, ids in by_field.items()]
  flat = [np.asarray(t, np.int32) for by_field in texts.values() for ids in by_field.values() for t in ids]
  lens_N = np.array([len(t) for t in flat])
  placed, every = packing.Packed(lens_N, L, S), np.arange(len(lens_N))
  R_G = [packing.round_up(R, multiple) for R in placed.rows]
  rows, slots = placed.pack(np.concatenate(flat), every, [0] * len(R_G), R_G), {}
  for (task, f, _), s in zip(fields, np.split(placed.slots(every, R_G).astype(np.int32),
                                              np.cumsum([n for *_, n in fields])[:-1])):
    slots.setdefault(task, {})[f] = s
  return batch_lib.Batch(rows, slots, extras, tuple((t, groups) for t in texts))


def synthetic(task, B, Lq, Lp, K, vocab, seed=0) -> tuple:
  """(packed Batch, the same texts padded as {field}_ids/_mask + extras for torch): B rows of random tokens,
  queries (and STS texts) Lq long, passages Lp, K negatives a row."""
  spec, rng = tasks.TASKS[task], np.random.default_rng(seed)
  length = {"query": Lq, "pos": Lq if task == "sts" else Lp, "neg": Lp}
  texts = {f: rng.integers(1000, vocab, (B * K if slot == "neg" else B, length[slot]), dtype=np.int32)
           for f, slot in tasks.fields(spec, K)}
  extras = {"label": rng.integers(0, 6, B).astype(np.float32), "neg_valid": np.ones((B, K), bool)}
  extras = {k: extras[k] for k in spec.extras if k in extras and (k != "neg_valid" or K)}  # No teacher arrays.
  batch = of_texts({task: {f: list(x) for f, x in texts.items()}}, {task: extras}, max(length.values()),
                   multiple=jax.device_count())
  padded = {f"{f}_{k}": x if k == "ids" else np.ones_like(x) for f, x in texts.items() for k in ("ids", "mask")}
  return batch, padded | extras


def train_step(cfg, params, dims, seed=0, chunk_size=0, frozen=None):
  """(jitted step, state, rngs, mesh): the real train step, data-parallel, with the configs' AdamW and losses."""
  (tx, _), mesh = state_lib.make_optimizer(config.section("optim"), params, 1000), sharding.make_mesh(1)
  state, _, graphdef, rngs = state_lib.init_state(cfg, params, tx, mesh, seed, frozen)
  c = config.base()
  c.seed, c.loss.mrl_dims = seed, tuple(dims)
  step = step_lib.make_train_step(graphdef, tx, c, chunk_size)
  return step, state, rngs, mesh


def jax_step(cfg, params, batch, dims, compiler_options=None, chunk_size=0):
  """(run() -> loss, info): the real jitted train step, compiled ahead of time for this batch."""
  step, state, rngs, mesh = train_step(cfg, params, dims, chunk_size=chunk_size)
  arrays = sharding.put_batch(batch, mesh)
  compiled, compile_s = harness.timed(lambda: step.lower(state, arrays, rngs).compile(compiler_options))
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
  p.add_argument("--task", choices=tasks.names(), default="cosent", help="cosent is sts (CoSENT)")
  p.add_argument("--batch", type=int, default=32, help="queries (retrieval, cls) or pairs (sts) per step")
  p.add_argument("--seq", type=int, default=64, help="query / STS text length in tokens")
  p.add_argument("--pseq", type=int, default=0, help="passage and negative length (default: --seq)")
  p.add_argument("--neg", type=int, default=None, help="negatives per query (default: retrieval 0, cls 10)")
  p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="torch: autocast")
  p.add_argument("--remat", action="store_true", help="JAX rematerialisation; torch gradient checkpointing")
  p.add_argument("--dropout", type=float, default=-1.0, help="hidden and attention dropout (-1: the model's)")
  p.add_argument("--attention", default="xla", help="model.attention (fused kernels: interpreted on CPU)")
  return p


def setup(args) -> tuple:
  """(model config, host params, task, K, MRL dims (E/3, 2E/3, E or stella's), (Batch, padded)) of the options;
  sets pseq."""
  cfg, params, _ = models.load_init(args.model)
  drop = {"dropout": args.dropout, "attention_dropout": args.dropout} if args.dropout >= 0 else {}
  cfg = cfg.replace(dtype=args.dtype, remat=args.remat, attention=args.attention, **drop)
  cfg = cfg.replace(attention_dropout=attention.check_dropout(cfg.attention, cfg.attention_dropout, args.dropout > 0))
  task, args.pseq, E = tasks.lookup(args.task).name, args.pseq or args.seq, cfg.embed_dim
  K = args.neg if args.neg is not None else {"cls": 10}.get(task, 0)
  dims = config.MRL_DIMS if E == config.MRL_DIMS[-1] else (E // 3, 2 * E // 3, E)
  return cfg, params, task, K, dims, synthetic(task, args.batch, args.seq, args.pseq, K, cfg.vocab_size)


MINILM = "--model minilm --batch 32 --seq 64"
LARGE = "--model stella-shape --batch 4 --seq 64"
GPU = "--model stella-shape --task retrieval --batch 64 --seq 64 --pseq 512 --neg 1 --dtype bfloat16"
GROUPS = {  # Each under ~10 minutes on a quiet 2-core CPU (--reps 3 for the large ones); gpu: the finetune recipe.
    "minilm": [f"{MINILM} --task cosent", f"{MINILM} --task retrieval --pseq 128"],
    "minilm-more": [f"{MINILM} --task retrieval --pseq 128 --neg 1",
                    "--model minilm --task cls --batch 8 --seq 64 --neg 4", f"{MINILM} --task cosent --dtype bfloat16"],
    "large": [f"{LARGE} --task cosent"],
    "large-retrieval": [f"{LARGE} --task retrieval --pseq 128"],
    "large-remat": [f"{LARGE} --task retrieval --pseq 128 --remat"],
    "large-bf16": [f"{LARGE} --task retrieval --pseq 128 --dtype bfloat16 --remat"],
    "gpu": [f"{GPU} --remat", GPU]}
HEADER = ["`bench.step` args", "JAX compile s", "JAX step s", "torch step s", "torch/JAX", "JAX tokens/s",
          "torch tokens/s", "MFU % JAX / torch", "cores busy JAX / torch", "step s after a switch JAX / torch",
          "XLA temp MB", "step memory MB JAX / torch", "max batch JAX / torch"]


def row(args, o):
  """One markdown table row from a bench.step JSON line."""
  fmt = lambda k, spec=".2f": "-" if o.get(k) is None else format(o[k], spec)
  tok = lambda k: f"{o['tokens'] / o[k]:.0f}" if o.get(k) else "-"
  mem = lambda k: f"{o[f'{k}_mem_peak_mb'] - o[f'{k}_mem_rest_mb']:.0f}" if o.get(f"{k}_mem_peak_mb") else "-"
  both = lambda k, spec=".2f": f"{fmt(f'jax_{k}', spec)} / {fmt(f'torch_{k}', spec)}"
  return [args, fmt("jax_compile_s", ".0f"), fmt("jax_step_s", ".3f"), fmt("torch_step_s", ".3f"),
          f"**{fmt('ratio')}**", tok("jax_step_s"), tok("torch_step_s"), both("mfu_pct", ".0f"), both("cores"),
          both("switch_s", ".3f"), fmt("jax_xla_temp_mb", ".0f"), f"{mem('jax')} / {mem('torch')}",
          f"{o.get('jax_max_batch') or '-'} / {o.get('torch_max_batch') or '-'}"]


def suite(args):
  """The grid `args.group`: bench.step per configuration, each in its own process, one table."""
  step_args = f"--reps {args.reps} --memory --budget-gb {args.budget_gb or 16.0}"
  rows, outs = [HEADER], []
  for cfg in GROUPS[args.group]:
    outs.append(harness.run_json(["-m", "bench.step", *cfg.split(), *step_args.split()]))
    if "error" in outs[-1]:
      sys.exit(f"failed: bench.step {cfg} {step_args}\n{outs[-1]['stderr']}")
    rows.append(row(cfg, outs[-1]))
  o, loads = outs[0], ", ".join(x["machine"].split("load avg ")[1].split(";")[0] for x in outs)
  harness.emit([
      f"\n### Train step, JAX vs PyTorch: group `{args.group}`\n",
      f"{datetime.date.today()}, {o['machine']} (at the first configuration); torch {o.get('torch_threads')} "
      f"threads, {o.get('torch_attn')} attention, fp32 unless stated. Command: `{harness.command()}` (each row: "
      f"`python -m bench.step ARGS {step_args}` in its own process, JAX and PyTorch steps alternating).\n",
      *harness.table_md(rows),
      "\nStep times are medians of the timed steps; each framework's turn first runs one untimed step, the one "
      "right after the other framework ran (its median is the 'after a switch' column). torch/JAX > 1 means the "
      f"JAX step is faster. Load average at each row's end: {loads}."], args.append)


def main(argv=None):
  p = parser(__doc__, reps=5, threads=True)
  p.add_argument("--group", choices=sorted(GROUPS), default=None, help="run this grid of configurations instead")
  p.add_argument("--compare", choices=("none", "torch"), default="torch")
  p.add_argument("--settle", type=int, default=1, help="untimed steps before each timed one (reported apart)")
  p.add_argument("--memory", action="store_true", help="one more step each, recording its peak memory")
  p.add_argument("--budget-gb", type=float, default=0.0, help="with --memory: the largest batch under this")
  args = p.parse_args(argv)
  if args.group:
    return suite(args)
  base_mb, dev = harness.rss_mb(), "cuda" if jax.devices()[0].platform == "gpu" else "cpu"
  cfg, params, task, K, dims, (batch, padded) = setup(args)
  runs, info = {}, {}
  runs["jax"], info["jax"] = jax_step(cfg, params, batch, dims)
  if args.compare == "torch":
    from bench import torch_ref
    runs["torch"], info["torch"] = torch_ref.torch_step(cfg, params, padded, task, dims, dev, args.dtype, args.remat,
                                                        args.threads or os.cpu_count())
  del params
  times, cores, settled, first = harness.alternate(runs, args.reps, args.settle)
  mem = {k: harness.peak_mb(run, k) for k, run in runs.items()} if args.memory else {}
  peak = matmul_gflops(*((8192, "bfloat16") if dev == "cuda" else (2048, "float32")), dev if "torch" in runs else None)
  lens = [m.sum() for k, v in padded.items() if k.endswith("_mask") for m in v]
  flops, n_tok = flops_lib.train_flops(cfg, flops_lib.Tokens.of_texts(lens)), int(sum(lens))
  out = {k: getattr(args, k) for k in ("model", "batch", "seq", "pseq", "dtype", "remat")} | {
      "task": task, "neg": K, "dropout": cfg.dropout, "mrl_dims": list(dims), "tokens": n_tok,
      "model_flops": flops, "xla_flops": info["jax"]["xla_flops"], "packed_rows": list(batch.rows[0].tokens.shape),
      "peak_gflops": peak, "rss_base_mb": base_mb}
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
  notes = [f"MFU: analytic FLOPs of the real tokens (piccolo_jax/flops.py, without remat's recompute) {flops / 1e9:.1f} G/step (XLA counts {out['xla_flops'] / 1e9:.1f} G "
           f"on {batch.rows[0].tokens.shape[0]} packed rows of {batch.rows[0].tokens.shape[1]}); peak matmul "
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
