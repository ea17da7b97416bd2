"""The train-step grid: `python -m bench.step` per configuration (GROUPS), each in a fresh process, one table."""
import datetime
import sys

from bench import harness

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


def main():
  p = harness.parser(__doc__, reps=5, append=True)
  p.add_argument("--group", choices=sorted(GROUPS), default="minilm")
  p.add_argument("--budget-gb", type=float, default=16.0, help="memory budget for the largest-batch estimate")
  args = p.parse_args()
  step_args = f"--reps {args.reps} --memory --budget-gb {args.budget_gb}"
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


if __name__ == "__main__":
  main()
