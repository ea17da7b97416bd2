"""Where the JAX train step spends its time: an XLA CPU per-thunk profile, then side-by-side ablations."""
import collections
import contextlib
import glob
import re
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import harness, step as bench_step
from piccolo_jax import model as model_lib

CATEGORIES = (  # (category, regexp on "thunk name | op_name | shape"), first match wins.
    ("matmul", r"^MATMUL"),
    ("exact GELU (erf)", r"erfc|/erf\b"),
    ("dropout RNG + mask", r"_bernoulli|_uniform|threefry|random_bits|^while|^copy[.\d]* .*u32\["),
    ("skip-non-finite select + AdamW", r"_where|adam|optax|sqrt|rsqrt.*\[(30522|\d+,\d+)\]"),
    ("layout copies / transposes", r"^(copy|transpose|copy_bitcast|transpose_copy|bitcast_copy)"),
    ("softmax / masks / reductions", r"reduce_max|reduce_sum|exp|logsumexp|select_n|softmax"),
    ("other elementwise", r"."))


def parse_hlo(text):
  """(instruction -> (shape, op_name, line), computation -> instruction names) of optimized HLO text."""
  inst, comps, cur = {}, {}, None
  for line in text.splitlines():
    if m := re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$", line):
      cur = comps.setdefault(m.group(1), [])
    elif m := re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) [\w\-]+\(", line):
      op = re.search(r'op_name="([^"]*)"', line)
      inst[m.group(1)] = (m.group(2).split("{")[0], op.group(1) if op else "", line)
      if cur is not None:
        cur.append(m.group(1))
  return inst, comps


def thunk_flops(name, inst, comps):
  """Matmul FLOPs of a thunk: 2 * output elements * contracted size of its dot (or its fusion's dots)."""
  ints = lambda s: [int(x) for x in s.split(",") if x]
  shape = lambda s: ints(re.match(r"\w+\[([\d,]*)\]", s).group(1))

  def dot(line):
    lhs = shape(inst[re.search(r"dot\(%([\w.\-]+)", line).group(1)][0])
    contract = ints(re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1))
    return 2 * int(np.prod(shape(line.split(" = ")[1].split(" ")[0]))) * int(np.prod([lhs[i] for i in contract]))

  line = inst[name][2] if name in inst else ""
  calls = re.search(r"calls=%([\w.\-]+)", line)
  body = [line] if " dot(" in line else [inst[i][2] for i in comps.get(calls.group(1), [])] if calls else []
  return sum(dot(x) for x in body if " dot(" in x)


def profile(run, hlo_text):
  """(rows (category, ms, %, GFLOP/s), top thunk groups, thunk ns, wall s) of one traced run()."""
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      _, wall = harness.timed(run)
    pd = jax.profiler.ProfileData.from_file(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0])
    totals = collections.Counter()
    for e in (e for p in pd.planes for line in p.lines if line.name.startswith("tf_XLA") for e in line.events):
      if not e.name.startswith(("ThreadpoolListener", "ThunkExecutor", "end: ", "SlinkyThreadPool")):
        totals[e.name] += e.duration_ns
  inst, comps = parse_hlo(hlo_text)
  cats, groups, flops = collections.Counter(), collections.Counter(), collections.Counter()
  for name, ns in totals.items():
    shape, op, _ = inst.get(name, ("?", "", ""))
    f, op, kind = thunk_flops(name, inst, comps), op.replace("jit(train_step)/", ""), re.sub(r"[.]\d+$", "", name)
    cat = next(c for c, rx in CATEGORIES if re.search(rx, f"{'MATMUL' if f else ''}{kind} {shape} {op}"))
    cats[cat] += ns
    flops[cat] += f
    groups[(cat, kind, shape, op[:70])] += ns
  total = sum(cats.values())
  rows = [(c, f"{cats[c] / 1e6:.0f}", f"{100 * cats[c] / total:.1f}",
           f"{flops[c] / cats[c]:.1f}" if flops[c] else "-") for c, _ in CATEGORIES if cats[c]]
  return rows, groups.most_common(10), total, wall


def heads_last_attention(self, x_BLD, mask_BQK):
  """The attention this model had before: [B, L, H, E] projections, head transposes around the einsums."""
  (B, L, D), H = x_BLD.shape, self.num_heads
  q_BLHE, k_BLHE, v_BLHE = (f(x_BLD).reshape(B, L, H, D // H) for f in (self.query, self.key, self.value))
  logits_BHLL = jnp.einsum("bqhe,bshe->bhqs", q_BLHE, k_BLHE) / jnp.sqrt(D // H).astype(q_BLHE.dtype)
  logits_BHLL = jnp.where(mask_BQK[:, None], logits_BHLL, jnp.finfo(logits_BHLL.dtype).min)
  probs_BHLL = self.attn_dropout(jax.nn.softmax(logits_BHLL.astype(jnp.float32), axis=-1))
  return self.out(jnp.einsum("bhqs,bshe->bqhe", probs_BHLL.astype(v_BLHE.dtype), v_BLHE).reshape(B, L, D))


VARIANTS = {  # name -> (config overrides, XLA options); gelu_erfc, heads_last, dropout32 undo what the profile led to.
    "base": ({}, None), "gelu_erfc": ({}, None), "heads_last": ({}, None), "dropout32": ({}, None),
    "attn_drop0": ({"attention_dropout": 0.0}, None), "drop0": ({"dropout": 0.0, "attention_dropout": 0.0}, None),
    "remat": ({"remat": True}, None), "onednn": ({}, {"xla_cpu_use_onednn": True}),
    "conc_sched": ({}, {"xla_cpu_enable_concurrency_optimized_scheduler": True}),
    "no_ynn": ({}, {"xla_cpu_experimental_ynn_fusion_type": ""})}
PATCHES = {  # The model code a variant swaps in while it is built and traced.
    "gelu_erfc": lambda: mock.patch.dict(model_lib.ACTIVATIONS, gelu=lambda x: jax.nn.gelu(x, approximate=False)),
    "heads_last": lambda: mock.patch.object(model_lib.Attention, "__call__", heads_last_attention),
    "dropout32": lambda: mock.patch.object(model_lib.Dropout, "__call__", nnx.Dropout.__call__)}


def main():
  p = bench_step.parser(__doc__, reps=4)
  p.add_argument("--variants", default="base,gelu_erfc,heads_last,dropout32,drop0",
                 help=f"comma list, the first is the base; of {','.join(VARIANTS)}")
  args = p.parse_args()
  cfg, params, task, _, dims, batch = bench_step.setup(args)
  title = f"profile: {args.model}, {task}, batch {args.batch}, seq {args.seq}/{args.pseq}, {args.dtype}"
  run, info = bench_step.jax_step(cfg, params, batch, task, dims, {"xla_cpu_enable_xprof_traceme": True})
  run()
  rows, top, total, wall = profile(run, info["compiled"].as_text())
  notes = [f"one traced step: {wall:.2f} s wall, {total / 1e9:.2f} s of thunk time (summed over threads)",
           "top thunk groups (ms, kind, shape, op): " + "; ".join(
               f"{ns / 1e6:.0f} {name} {shape} {op}" for (_, name, shape, op), ns in top)]
  harness.report(title + " (thunk time by category)", [("category", "ms", "%", "GFLOP/s")] + rows, notes,
                 {"thunk_ms": total / 1e6, "wall_s": wall}, args.append)
  names, runs = args.variants.split(","), {}
  for name in names:
    overrides, options = VARIANTS[name]
    with PATCHES.get(name, contextlib.nullcontext)():
      runs[name], _ = bench_step.jax_step(cfg.replace(**overrides), params, batch, task, dims, options)
  times, _, _, first = harness.alternate(runs, args.reps)
  med = {k: harness.median(v) for k, v in times.items()}
  rows = [("variant", "step s (median)", f"vs {names[0]}", "first loss")]
  rows += [(k, f"{med[k]:.3f}", f"{med[k] / med[names[0]]:.3f}", f"{first[k][0]:.5f}") for k in runs]
  grid = np.linspace(-8, 8, 100001, dtype=np.float32)
  gelu_err = float(np.max(np.abs(jax.nn.gelu(grid, approximate=False) - model_lib.ACTIVATIONS["gelu"](grid))))
  notes = [f"alternating, {args.reps} reps each; max |model gelu - jax.nn.gelu| on [-8, 8]: {gelu_err:.1e}"]
  harness.report(title + " (ablations, alternating)", rows, notes,
                 {"median_s": med, "loss0": {k: v[0] for k, v in first.items()}}, args.append)


if __name__ == "__main__":
  main()
