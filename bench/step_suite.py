"""The train-step grid: `python -m piccolo_jax.bench step` per configuration, one table for BENCHMARKS.md.

  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/step_suite.py --group minilm \
      [--append BENCHMARKS.md]

Groups (each under ~10 minutes on a quiet 2-core CPU with --reps 3 for the large ones): minilm (the
acceptance shapes), minilm-more (hard negatives, cls, bf16), large and large-retrieval (stella shape:
BERT-large + Dense 1792 + MRL, fp32), large-remat, large-bf16 (bf16 + remat), gpu (the finetune
recipe's shapes; needs a GPU). Each configuration runs in a fresh process (clean memory figures)
that alternates JAX and PyTorch steps.
"""
import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from piccolo_jax import bench  # noqa: E402

MINILM = "--model minilm --batch 32 --seq 64"
LARGE = "--model stella-shape --batch 4 --seq 64"
GPU = "--model stella-shape --task retrieval --batch 64 --seq 64 --pseq 512 --neg 1 --dtype bfloat16"
GROUPS = {
    "minilm": [f"{MINILM} --task cosent", f"{MINILM} --task retrieval --pseq 128"],
    "minilm-more": [f"{MINILM} --task retrieval --pseq 128 --neg 1",
                    "--model minilm --task cls --batch 8 --seq 64 --neg 4", f"{MINILM} --task cosent --dtype bfloat16"],
    "large": [f"{LARGE} --task cosent"],
    "large-retrieval": [f"{LARGE} --task retrieval --pseq 128"],
    "large-remat": [f"{LARGE} --task retrieval --pseq 128 --remat"],
    "large-bf16": [f"{LARGE} --task retrieval --pseq 128 --dtype bfloat16 --remat"],
    "gpu": [f"{GPU} --remat", GPU],
}


def fmt(x, spec=".2f"):
  return "-" if x is None else format(x, spec)


def row(args, o):
  """One markdown table row from a bench step JSON line."""
  get = lambda k: o.get(k)
  tok = lambda k: o["tokens"] / o[k] if o.get(k) else None
  mem = lambda k: f"{get(f'{k}_mem_peak_mb') - get(f'{k}_mem_rest_mb'):.0f}" if get(f"{k}_mem_peak_mb") else "-"
  return [args, fmt(get("jax_compile_s"), ".0f"), fmt(get("jax_step_s"), ".3f"), fmt(get("torch_step_s"), ".3f"),
          f"**{fmt(get('ratio'))}**", fmt(tok("jax_step_s"), ".0f"), fmt(tok("torch_step_s"), ".0f"),
          f"{fmt(get('jax_mfu_pct'), '.0f')} / {fmt(get('torch_mfu_pct'), '.0f')}",
          f"{fmt(get('jax_cores'))} / {fmt(get('torch_cores'))}",
          f"{fmt(get('jax_switch_s'), '.3f')} / {fmt(get('torch_switch_s'), '.3f')}", fmt(get("jax_xla_temp_mb"), ".0f"),
          f"{mem('jax')} / {mem('torch')}", f"{get('jax_max_batch') or '-'} / {get('torch_max_batch') or '-'}"]


HEADER = ["`bench step` args", "JAX compile s", "JAX step s", "torch step s", "torch/JAX", "JAX tokens/s",
          "torch tokens/s", "MFU % JAX / torch", "cores busy JAX / torch", "step s after a switch JAX / torch",
          "XLA temp MB",
          "step memory MB JAX / torch", "max batch JAX / torch"]


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--group", choices=sorted(GROUPS), default="minilm")
  p.add_argument("--reps", type=int, default=5, help="timed steps per framework")
  p.add_argument("--budget-gb", type=float, default=16.0, help="memory budget for the largest-batch estimate")
  p.add_argument("--append", default=None, metavar="FILE")
  args = p.parse_args()
  env = dict(os.environ, HF_HUB_OFFLINE="1")
  rows, outs = [], []
  for cfg in GROUPS[args.group]:
    cmd = [sys.executable, "-m", "piccolo_jax.bench", "step", *cfg.split(), "--reps", str(args.reps), "--memory",
           "--budget-gb", str(args.budget_gb)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    print(r.stdout, flush=True)
    if r.returncode:
      sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    outs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    rows.append(row(cfg, outs[-1]))
  table = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)] + ["| " + " | ".join(r) + " |" for r in rows]
  print("\n".join(table))
  if args.append:
    o = outs[0]
    md = [f"\n### Train step, JAX vs PyTorch: group `{args.group}`\n",
          f"{datetime.date.today()}, {o['machine']} (at the first configuration); torch "
          f"{o.get('torch_threads')} threads, {o.get('torch_attn')} attention, fp32 unless stated. Command: "
          f"`{bench.env_prefix()}.venv/bin/python bench/step_suite.py --group {args.group} --reps {args.reps} "
          f"--budget-gb {args.budget_gb}` (each row: `python -m piccolo_jax.bench step ARGS --reps {args.reps} "
          f"--memory --budget-gb {args.budget_gb}` in its own process, JAX and PyTorch steps alternating).\n"] + table
    md.append("\nStep times are medians of the timed steps; each framework's turn first runs one untimed step, "
              "the one right after the other framework ran (its median is the 'after a switch' column). "
              "torch/JAX > 1 means the JAX step is faster. Load average at each row's "
              "end: " + ", ".join(o["machine"].split("load avg ")[1].split(";")[0] for o in outs) + ".")
    with open(args.append, "a", encoding="utf-8") as f:
      f.write("\n".join(md) + "\n")


if __name__ == "__main__":
  main()
