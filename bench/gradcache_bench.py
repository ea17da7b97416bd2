"""Gradient caching vs the plain train step: peak memory and step time at growing global batches.

  .venv/bin/python bench/gradcache_bench.py --seq 64 --budget-gb 6

A MiniLM-shaped BERT (384 wide, 6 layers, random init, dropout 0.1), the retrieval task (query,
pos and one hard negative per query, every token real), MRL dims (64, 128, 256, 384), adamw:
train.make_train_step with chunk_size 0 (plain) and --chunk (cached). For each global batch the
two variants alternate, each in a fresh process (so its RSS is its own): compile, read XLA's
memory analysis, then, if the estimated peak fits --budget-gb and the batch is at most
--max-run (a time cap: on a 2-core CPU a large step takes minutes), run the step. A variant
stops at the first batch over the budget. Prints a table and appends it to BENCHMARKS.md.
"""
import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GB = 2 ** 30


def rss_bytes():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(a):
  """One (variant, batch) in this process -> a dict of figures."""
  import jax
  import numpy as np
  from configs import common
  from piccolo_jax import model as model_lib, sharding, state as state_lib, train
  cfg = model_lib.Config(dropout=0.1, attention_dropout=0.1)
  params = state_lib.random_params(cfg, 0)
  loss_cfg = common.base().loss
  loss_cfg.mrl_dims = (64, 128, 256, 384)
  tx, _ = state_lib.make_optimizer(common.base().optim, params, 1000)
  mesh = sharding.make_mesh(1)
  st, _, graphdef, rngs = state_lib.init_state(cfg, params, tx, mesh, 0)
  rng = np.random.default_rng(0)
  batch = {}
  for f in ("query", "pos", "neg"):
    batch[f + "_ids"] = rng.integers(1000, 30000, (a.batch, a.seq)).astype(np.int32)
    batch[f + "_mask"] = np.ones((a.batch, a.seq), np.int32)
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  chunk = a.chunk if a.variant == "cached" else 0
  t = time.perf_counter()
  step = train.make_train_step(graphdef, tx, loss_cfg, 0, chunk).lower(st, batch, rngs, task="retrieval").compile()
  ma = step.memory_analysis()
  out = {"variant": a.variant, "batch": a.batch, "compile_s": time.perf_counter() - t,
         "temp_gb": ma.temp_size_in_bytes / GB,
         "peak_gb": (ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
                     - ma.alias_size_in_bytes) / GB}
  out["fits"] = out["peak_gb"] <= a.budget_gb
  if not out["fits"] or a.batch > a.max_run:
    return out
  peak, done = [rss_bytes()], threading.Event()
  base = peak[0]

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], rss_bytes())
      time.sleep(0.002)

  sampler = threading.Thread(target=sample)
  sampler.start()
  times = []
  for _ in range(a.repeats):
    t = time.perf_counter()
    st, m = step(st, batch, rngs)
    jax.block_until_ready((st, m))
    times.append(time.perf_counter() - t)
  done.set()
  sampler.join()
  return out | {"step_s": min(times), "rss_gb": (peak[0] - base) / GB, "loss": float(m["loss"])}


def report(a, rows, minutes):
  """The BENCHMARKS.md section: set-up, table, largest batch per variant."""
  import jax
  table = ["| variant | global batch (texts) | XLA temp GiB | XLA peak GiB | host RSS delta GiB | step s | compile s |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    head = f"| {r['variant']} | {r['batch']} ({3 * r['batch']}) |"
    if "error" in r:
      table.append(f"{head} error: {r['error']} | | | | |")
      continue
    run = (f"{r['rss_gb']:.2f} | {r['step_s']:.1f}" if "step_s" in r else
           "fits; not run (time cap) | -" if r["fits"] else "over budget; not run | -")
    table.append(f"{head} {r['temp_gb']:.2f} | {r['peak_gb']:.2f} | {run} | {r['compile_s']:.0f} |")
  largest = {v: max([r["batch"] for r in rows if r["variant"] == v and r.get("fits")], default=0)
             for v in ("plain", "cached")}
  return "\n".join([
      f"\n## Gradient caching (bench/gradcache_bench.py), seq {a.seq}\n",
      f"Command: `{' '.join(['.venv/bin/python bench/gradcache_bench.py', *sys.argv[1:]])}` on a "
      f"{os.cpu_count()}-core CPU ({platform.machine()}, shared with other jobs: times are noisy), jax "
      f"{jax.__version__}, 1 device, float32. MiniLM-shaped BERT (384 wide, 6 layers, random init, dropout 0.1), "
      f"retrieval task: query + pos + 1 hard negative per query, all {a.seq} tokens real, MRL dims (64, 128, "
      f"256, 384), adamw; the whole train.make_train_step, plain (chunk_size 0) vs cached (chunk_size "
      f"{a.chunk}). XLA temp/peak: the compiled step's memory_analysis() (peak = temp + arguments + outputs - "
      f"donated aliases). Host RSS delta: peak RSS while stepping minus RSS before, one fresh process per row. "
      f"Step s: fastest of {a.repeats} after compiling. A variant stops at the first batch whose XLA peak "
      f"exceeds {a.budget_gb} GiB; batches above {a.max_run} are compiled (memory) but not stepped, to keep "
      f"the run near 10 minutes ({minutes:.1f} min).\n",
      *table, "",
      f"Largest global batch (queries) whose XLA peak fits {a.budget_gb} GiB: plain {largest['plain']}, "
      f"cached {largest['cached']} (largest tried: {a.sizes.split(',')[-1]}).\n"])


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
  rows, live, t0 = [], {"plain", "cached"}, time.time()
  for n in map(int, a.sizes.split(",")):
    for variant in ("plain", "cached"):
      if variant not in live:
        continue
      cmd = [sys.executable, __file__, f"--variant={variant}", f"--batch={n}", f"--seq={a.seq}",
             f"--chunk={a.chunk}", f"--budget-gb={a.budget_gb}", f"--max-run={a.max_run}",
             f"--repeats={a.repeats}"]
      proc = subprocess.run(cmd, capture_output=True, text=True)
      if proc.returncode:
        rows.append({"variant": variant, "batch": n, "error": proc.stderr.strip().splitlines()[-1]})
        live.discard(variant)
      else:
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        if not rows[-1]["fits"]:
          live.discard(variant)
      print(rows[-1], flush=True)
  print(section := report(a, rows, (time.time() - t0) / 60))
  if not a.no_append:
    with open(ROOT / "BENCHMARKS.md", "a") as f:
      f.write(section)


if __name__ == "__main__":
  main()
