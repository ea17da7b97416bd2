"""Gradient caching vs the plain train step: peak memory and step time at growing global batches."""
import argparse
import json
import time

from bench import harness, step as bench_step
from piccolo_jax import model as model_lib, state as state_lib

DIMS = (64, 128, 256, 384)


def measure(a):
  """One (variant, batch) in this process -> a dict of figures."""
  cfg = model_lib.Config(dropout=0.1, attention_dropout=0.1)
  batch = bench_step.synthetic_batch("retrieval", a.batch, a.seq, a.seq, 1, cfg.vocab_size)
  run, info = bench_step.jax_step(cfg, state_lib.random_params(cfg, 0), batch, "retrieval", DIMS,
                                  chunk_size=a.chunk if a.variant == "cached" else 0)
  ma = info["compiled"].memory_analysis()
  peak = ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
  out = {"variant": a.variant, "batch": a.batch, "compile_s": info["compile_s"],
         "temp_gb": ma.temp_size_in_bytes / 2**30, "peak_gb": peak / 2**30, "fits": peak / 2**30 <= a.budget_gb}
  if not out["fits"] or a.batch > a.max_run:
    return out
  result = []  # The steps: the first (its loss kept), then repeats - 1 more.
  rest_mb, peak_mb = harness.peak_mb(lambda: result.extend(harness.alternate({"step": run}, a.repeats - 1)))
  times, _, _, first = result
  (loss, first_s), steps_s = first["step"], times["step"]
  return out | {"step_s": min([first_s, *steps_s]), "rss_gb": (peak_mb - rest_mb) / 1024, "loss": loss}


def main():
  p = harness.parser(__doc__)
  p.add_argument("--sizes", default="32,64,128,512", help="global batches (queries; x3 texts)")
  p.add_argument("--seq", type=int, default=64)
  p.add_argument("--chunk", type=int, default=16, help="texts per chunk in the cached step")
  p.add_argument("--budget-gb", type=float, default=6.0)
  p.add_argument("--max-run", type=int, default=512, help="larger batches: memory analysis only")
  p.add_argument("--repeats", type=int, default=1, help="timed steps; the fastest is reported")
  p.add_argument("--no-append", action="store_true", help="print only; leave BENCHMARKS.md alone")
  p.add_argument("--variant", help=argparse.SUPPRESS)
  p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.variant:
    print(json.dumps(measure(a)))
    return
  rows, live, t0 = [], ["plain", "cached"], time.time()
  shared = [f"--{k}={getattr(a, k.replace('-', '_'))}" for k in ("seq", "chunk", "budget-gb", "max-run", "repeats")]
  for n in map(int, a.sizes.split(",")):
    for variant in list(live):
      rows.append(harness.run_json(["-m", "bench.gradcache_bench", f"--variant={variant}", f"--batch={n}", *shared])
                  | {"variant": variant, "batch": n})
      if not rows[-1].get("fits"):  # Over the budget, or failed.
        live.remove(variant)
  table = [("variant", "global batch (texts)", "XLA temp GiB", "XLA peak GiB", "host RSS delta GiB", "step s",
            "compile s")]
  for r in rows:
    head = (r["variant"], f"{r['batch']} ({3 * r['batch']})")
    run = ((f"{r['rss_gb']:.2f}", f"{r['step_s']:.1f}") if "step_s" in r else
           ("fits; not run (time cap)" if r.get("fits") else "over budget; not run", "-"))
    table.append((*head, f"error: {r['error']}", "", "", "", "") if "error" in r else
                 (*head, f"{r['temp_gb']:.2f}", f"{r['peak_gb']:.2f}", *run, f"{r['compile_s']:.0f}"))
  largest = {v: max([r["batch"] for r in rows if r["variant"] == v and r.get("fits")], default=0)
             for v in ("plain", "cached")}
  harness.emit([
      f"\n## Gradient caching (python -m bench.gradcache_bench), seq {a.seq}\n",
      f"Command: `{harness.command()}` on {harness.machine()}, 1 device, float32. MiniLM-shaped BERT (384 wide, "
      f"6 layers, random init, dropout 0.1), retrieval task: query + pos + 1 hard negative per query, all {a.seq} "
      f"tokens real, MRL dims {DIMS}, adamw; the whole step.make_train_step, plain (chunk_size 0) vs cached "
      f"(chunk_size {a.chunk}). XLA temp/peak: the compiled step's memory_analysis() (peak = temp + arguments + "
      f"outputs - donated aliases). Host RSS delta: peak RSS while stepping minus RSS before, one fresh process per "
      f"row. Step s: fastest of {a.repeats} after compiling. A variant stops at the first batch whose XLA peak "
      f"exceeds {a.budget_gb} GiB; batches above {a.max_run} are compiled (memory) but not stepped, to keep "
      f"the run near 10 minutes ({(time.time() - t0) / 60:.1f} min).\n",
      *harness.table_md(table), "",
      f"Largest global batch (queries) whose XLA peak fits {a.budget_gb} GiB: plain {largest['plain']}, "
      f"cached {largest['cached']} (largest tried: {a.sizes.split(',')[-1]}).\n"],
      None if a.no_append else harness.ROOT / "BENCHMARKS.md")


if __name__ == "__main__":
  main()
