"""Where the JAX train step spends its time: an XLA CPU per-thunk profile, then side-by-side ablations.

  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/profile_step.py \
      [--model minilm --task cosent --batch 32 --seq 64] [--variants base,...] [--append BENCHMARKS.md]

1. Profile: the real step (piccolo_jax.bench.jax_step) compiled with xla_cpu_enable_xprof_traceme, one step
   traced by jax.profiler; thunk time is summed per category, read from the optimized HLO's op metadata.
   Thunks run concurrently (two on two cores), so a category's sum can exceed its share of the wall.
2. Ablations: variants of the same step, all compiled first, then timed alternately (median, ratio to base).
   Each of the first three undoes one change the model adopted after this profile:
   gelu_erfc: jax.nn.gelu (its erfc form) instead of model.py's erf form (the same function);
   heads_last: attention projected to [B, L, H, K], transposed for the score einsums, as before;
   dropout32: nnx.Dropout (a 32-bit threefry word per element) instead of model.Dropout's 16 bits;
   attn_drop0 / drop0: attention-prob / all dropout off (what dropout costs); remat: rematerialised
   layers; onednn, conc_sched, no_ynn: XLA:CPU compiler options (oneDNN matmuls, the
   concurrency-optimized scheduler, no YNNPACK fusions).
"""
import argparse
import collections
import contextlib
import glob
import os
import pathlib
import re
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from piccolo_jax import bench  # noqa: E402
from piccolo_jax import losses  # noqa: E402
from piccolo_jax import model as model_lib  # noqa: E402

CATEGORIES = (  # (category, regexp on "thunk name | op_name | shape"), first match wins.
    ("matmul", r"^MATMUL"),
    ("exact GELU (erf)", r"erfc|/erf\b"),
    ("dropout RNG + mask", r"_bernoulli|_uniform|threefry|random_bits|^while|^copy[.\d]* .*u32\["),
    ("skip-non-finite select + AdamW", r"_where|adam|optax|sqrt|rsqrt.*\[(30522|\d+,\d+)\]"),
    ("layout copies / transposes", r"^(copy|transpose|copy_bitcast|transpose_copy|bitcast_copy)"),
    ("softmax / masks / reductions", r"reduce_max|reduce_sum|exp|logsumexp|select_n|softmax"),
    ("other elementwise", r"."),
)


def parse_hlo(text):
  """(instruction -> (shape, op_name, line), computation -> instruction names) of optimized HLO text."""
  inst, comps, cur = {}, {}, None
  for line in text.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$", line)
    if m:
      cur = comps.setdefault(m.group(1), [])
      continue
    m = re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) [\w\-]+\(", line)
    if m:
      op = re.search(r'op_name="([^"]*)"', line)
      inst[m.group(1)] = (m.group(2).split("{")[0], op.group(1) if op else "", line)
      if cur is not None:
        cur.append(m.group(1))
  return inst, comps


def dot_flops(line, inst):
  """2 * output elements * contracted size of one HLO dot line."""
  shape = lambda s: [int(x) for x in re.match(r"\w+\[([\d,]*)\]", s).group(1).split(",") if x]
  out = shape(line.split(" = ")[1].split(" ")[0])
  lhs = shape(inst[re.search(r"dot\(%([\w.\-]+)", line).group(1)][0])
  contract = [int(x) for x in re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1).split(",") if x]
  return 2 * int(np.prod(out)) * int(np.prod([lhs[i] for i in contract]))


def thunk_flops(name, inst, comps):
  if name not in inst:
    return 0
  line = inst[name][2]
  if " dot(" in line:
    return dot_flops(line, inst)
  calls = re.search(r"calls=%([\w.\-]+)", line)
  body = comps.get(calls.group(1), []) if calls else []
  return sum(dot_flops(inst[i][2], inst) for i in body if " dot(" in inst[i][2])


def profile(run, compiled):
  """{thunk name: (total ns, count)} of one traced run()."""
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    t = time.perf_counter()
    run()
    wall = time.perf_counter() - t
    jax.profiler.stop_trace()
    pd = jax.profiler.ProfileData.from_file(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0])
    totals = collections.defaultdict(lambda: [0, 0])
    for plane in pd.planes:
      for line in plane.lines:
        if not line.name.startswith("tf_XLA"):
          continue
        for e in line.events:
          if not e.name.startswith(("ThreadpoolListener", "ThunkExecutor", "end: ", "SlinkyThreadPool")):
            totals[e.name][0] += e.duration_ns
            totals[e.name][1] += 1
  return totals, wall


def categorise(totals, hlo_text):
  """Rows (category, ms, share, GFLOP/s) and the top thunk groups (name kind, shape, op_name)."""
  inst, comps = parse_hlo(hlo_text)
  cats, groups, flops = collections.Counter(), collections.Counter(), collections.Counter()
  for name, (ns, _) in totals.items():
    shape, op, _ = inst.get(name, ("?", "", ""))
    f = thunk_flops(name, inst, comps)
    op = op.replace("jit(train_step)/", "")
    kind = re.sub(r"[.]\d+$", "", name)
    key = f"{'MATMUL' if f else ''}{kind} {shape} {op}"
    cat = next(c for c, rx in CATEGORIES if re.search(rx, key))
    cats[cat] += ns
    flops[cat] += f
    groups[(cat, kind, shape, op[:70])] += ns
  total = sum(cats.values())
  rows = [(c, f"{cats[c] / 1e6:.0f}", f"{100 * cats[c] / total:.1f}",
           f"{flops[c] / cats[c]:.1f}" if flops[c] else "-") for c, _ in CATEGORIES if cats[c]]
  return rows, groups.most_common(15), total


def heads_last_attention(self, x_BLD, mask_BL):
  """The attention this model had before: [B, L, H, K] projections, head transposes around the einsums."""
  B, L, D = x_BLD.shape
  H = self.num_heads
  q_BLHK, k_BLHK, v_BLHK = (f(x_BLD).reshape(B, L, H, D // H) for f in (self.query, self.key, self.value))
  logits_BHLL = jnp.einsum("bqhk,bshk->bhqs", q_BLHK, k_BLHK) / jnp.sqrt(D // H).astype(q_BLHK.dtype)
  logits_BHLL = jnp.where(mask_BL[:, None, None, :].astype(bool), logits_BHLL, jnp.finfo(logits_BHLL.dtype).min)
  probs_BHLL = self.attn_dropout(jax.nn.softmax(logits_BHLL.astype(jnp.float32), axis=-1))
  o_BLHK = jnp.einsum("bhqs,bshk->bqhk", probs_BHLL.astype(v_BLHK.dtype), v_BLHK)
  return self.out(o_BLHK.reshape(B, L, D))


@contextlib.contextmanager
def patched(gelu=None, attention=None, dropout=None):
  """Temporarily swaps the model's GELU, attention and dropout (read when a variant is traced)."""
  old = model_lib.ACTIVATIONS["gelu"], model_lib.Attention.__call__, model_lib.Dropout.__call__
  model_lib.ACTIVATIONS["gelu"] = gelu or old[0]
  model_lib.Attention.__call__ = attention or old[1]
  model_lib.Dropout.__call__ = dropout or old[2]
  try:
    yield
  finally:
    model_lib.ACTIVATIONS["gelu"], model_lib.Attention.__call__, model_lib.Dropout.__call__ = old


def variants(cfg):
  """name -> (model config, patches, XLA compiler options)."""
  gelu_erfc = lambda x: jax.nn.gelu(x, approximate=False)  # noqa: E731
  return {"base": (cfg, {}, None), "gelu_erfc": (cfg, {"gelu": gelu_erfc}, None),
          "heads_last": (cfg, {"attention": heads_last_attention}, None),
          "dropout32": (cfg, {"dropout": nnx.Dropout.__call__}, None),
          "attn_drop0": (cfg.replace(attention_dropout=0.0), {}, None),
          "drop0": (cfg.replace(dropout=0.0, attention_dropout=0.0), {}, None),
          "remat": (cfg.replace(remat=True), {}, None),
          "onednn": (cfg, {}, {"xla_cpu_use_onednn": True}),
          "conc_sched": (cfg, {}, {"xla_cpu_enable_concurrency_optimized_scheduler": True}),
          "no_ynn": (cfg, {}, {"xla_cpu_experimental_ynn_fusion_type": ""})}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="minilm")
  p.add_argument("--task", default="cosent", choices=sorted(bench.TASKS))
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=64)
  p.add_argument("--pseq", type=int, default=0)
  p.add_argument("--neg", type=int, default=0)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
  p.add_argument("--variants", default="base,gelu_erfc,heads_last,dropout32,drop0",
                 help=f"comma list, the first is the base; of {','.join(variants(bench.STELLA))}")
  p.add_argument("--reps", type=int, default=4)
  p.add_argument("--append", default=None, metavar="FILE")
  args = p.parse_args()
  task = bench.TASKS[args.task]
  cfg, params = bench.load(args.model)
  cfg = cfg.replace(dtype=args.dtype)
  batch = bench.synthetic_batch(task, args.batch, args.seq, args.pseq or args.seq, args.neg, cfg.vocab_size)
  E = cfg.embed_dim
  dims = losses.MRL_DIMS if E == 1792 else (E // 3, 2 * E // 3, E)
  title = f"profile: {args.model}, {task}, batch {args.batch}, seq {args.seq}/{args.pseq or args.seq}, {args.dtype}"

  run, info = bench.jax_step(cfg, params, batch, task, dims, compiler_options={"xla_cpu_enable_xprof_traceme": True})
  run()
  totals, wall = profile(run, info["compiled"])
  rows, top, total = categorise(totals, info["compiled"].as_text())
  notes = [f"one traced step: {wall:.2f} s wall, {total / 1e9:.2f} s of thunk time (summed over threads)",
           "top thunk groups (ms, kind, shape, op): " + "; ".join(
               f"{ns / 1e6:.0f} {name} {shape} {op}" for (_, name, shape, op), ns in top[:10])]
  bench.report(title + " (thunk time by category)", [("category", "ms", "%", "GFLOP/s")] + rows, notes,
               {"thunk_ms": total / 1e6, "wall_s": wall, "machine": bench.machine()}, args.append)

  names = args.variants.split(",")
  runs, losses0 = {}, {}
  for name in names:
    vcfg, patch, options = variants(cfg)[name]
    with patched(**patch):
      runs[name], _ = bench.jax_step(vcfg, params, batch, task, dims, compiler_options=options)
    losses0[name] = runs[name]()
  times, *_ = bench.alternate(runs, args.reps)
  base = bench.median(times[names[0]])
  rows = [("variant", "step s (median)", f"vs {names[0]}", "first loss")]
  rows += [(k, f"{bench.median(times[k]):.3f}", f"{bench.median(times[k]) / base:.3f}", f"{losses0[k]:.5f}")
           for k in runs]
  grid = np.linspace(-8, 8, 100001, dtype=np.float32)
  gelu_err = float(np.max(np.abs(jax.nn.gelu(grid, approximate=False) - model_lib.ACTIVATIONS["gelu"](grid))))
  notes = [f"alternating, {args.reps} reps each; max |model gelu - jax.nn.gelu| on [-8, 8]: {gelu_err:.1e}"]
  bench.report(title + " (ablations, alternating)", rows, notes,
               {"median_s": {k: bench.median(v) for k, v in times.items()}, "loss0": losses0,
                "machine": bench.machine()}, args.append)


if __name__ == "__main__":
  main()
