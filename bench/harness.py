"""The benchmark harness: alternating timing, memory sampling, the machine, markdown and JSON reports."""
import argparse
import ctypes
import datetime
import gc
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import jax
import numpy as np

from piccolo_jax import sources

ROOT = pathlib.Path(__file__).resolve().parent.parent  # The repository root: scripts' paths are relative to it.
STSB_DEV = "data/sts-b-en/sts-b-en.dev.tsv"
MAIN = pathlib.Path(sys.argv[0]).resolve()  # The script run: `-m bench.NAME` from the repository root, or a path.
PROG = "-m " + ".".join(MAIN.relative_to(ROOT).with_suffix("").parts) if MAIN.is_relative_to(ROOT) else str(MAIN)


def median(xs) -> float:
  return float(np.median(xs))


def timed(fn) -> tuple:
  """(fn(), the wall seconds it took)."""
  t = time.perf_counter()
  return fn(), time.perf_counter() - t


def alternate(runs, reps, settle=0) -> tuple[dict, dict, dict, dict]:
  """{name: wall s per rep}, {name: cores busy}, {name: s of untimed calls}, {name: (first result, s)}."""
  times, cores, settled = ({k: [] for k in runs} for _ in range(3))
  first = {k: timed(run) for k, run in runs.items()}  # A warm-up call each: first-call allocation, optimizer state.
  for _ in range(reps):  # Then alternating: a change in machine load hits every run alike.
    for k, run in runs.items():
      for _ in range(settle):  # The timed call then sees the run's own steady state, not the switch.
        settled[k].append(timed(run)[1])
      t, c = time.perf_counter(), time.process_time()
      run()
      times[k].append(time.perf_counter() - t)
      cores[k].append((time.process_time() - c) / times[k][-1])  # CPU s per wall s.
  return times, cores, settled, first


def rss_mb(key="VmRSS") -> float:
  """This process's resident memory (VmRSS) or its peak since the last reset (VmHWM), in MB."""
  status = pathlib.Path("/proc/self/status").read_text().splitlines()
  return next(int(x.split()[1]) for x in status if x.startswith(key + ":")) / 1024


def peak_mb(fn, framework="jax") -> tuple[float, float]:
  """(MB in use before, peak MB while fn() runs): device memory on GPU, else the host's resident memory."""
  if jax.devices()[0].platform == "gpu":
    if framework == "torch":
      import torch
      c = torch.cuda
      c.reset_peak_memory_stats()
      stats = lambda: {"bytes_in_use": c.memory_allocated(), "peak_bytes_in_use": c.max_memory_allocated()}
    else:
      stats = lambda: jax.devices()[0].memory_stats() or {}
    rest = stats().get("bytes_in_use", 0)
    fn()
    return rest / 2**20, stats().get("peak_bytes_in_use", 0) / 2**20  # Peak since start.
  gc.collect()
  time.sleep(1.0)  # Lets buffers freed asynchronously after the last step go.
  getattr(ctypes.CDLL(None), "malloc_trim", lambda _: 0)(0)  # Freed heap back to the OS: growth is real use.
  pathlib.Path("/proc/self/clear_refs").write_text("5")  # Resets the peak (VmHWM) to the current resident memory.
  rest = rss_mb()
  fn()
  return rest, rss_mb("VmHWM")


def machine() -> str:
  cpu = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")), "?")
  dev = jax.devices()[0]
  return (f"{platform.machine()} {cpu}, {os.cpu_count()} cores (shared with other jobs, noisy), load avg "
          f"{os.getloadavg()[0]:.1f}; jax {jax.__version__} on {dev.platform} ({dev.device_kind})")


def command() -> str:
  """This process's command line as typed from the repository root, with the settings that change speed."""
  env = "".join(f"{k}={os.environ[k]} " for k in ("GLIBC_TUNABLES", "XLA_FLAGS", "OMP_NUM_THREADS") if os.getenv(k))
  return " ".join([env + "HF_HUB_OFFLINE=1 .venv/bin/python", PROG] + sys.argv[1:])


def parser(doc, reps=0, append=False, threads=False) -> argparse.ArgumentParser:
  """A script's parser, its docstring as description, with the shared options asked for."""
  p = argparse.ArgumentParser(prog="python " + PROG, description=doc)
  if reps:
    p.add_argument("--reps", type=int, default=reps, help="timed runs of each, alternating (after a warm-up)")
  if append:
    p.add_argument("--append", default=None, metavar="FILE", help="append the table to FILE (markdown)")
  if threads:
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores, as XLA uses)")
  return p


def run_json(args) -> dict:
  """The last stdout line, as JSON, of `python ARGS` run from the repository root (echoed); else {'error': ...}."""
  r = subprocess.run([sys.executable, *args], cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                     capture_output=True, text=True)
  print(r.stdout, flush=True)
  if r.returncode:
    return {"error": r.stderr.strip().splitlines()[-1], "stderr": r.stderr[-3000:]}
  return json.loads(r.stdout.strip().splitlines()[-1])


def table_md(rows) -> list[str]:
  """A markdown table; rows[0] is the header."""
  line = lambda r: "| " + " | ".join(map(str, r)) + " |"
  return [line(rows[0]), "|" + "---|" * len(rows[0])] + [line(r) for r in rows[1:]]


def emit(lines, path=None):
  """Prints the lines and, given a path, appends them to that markdown file."""
  print("\n".join(lines), flush=True)
  if path:
    with open(path, "a", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")


def report(title, rows, notes, out, append=None):
  """Prints (and appends to `append`) a markdown section: title, machine, command, table, notes; then JSON out."""
  out = out | {"machine": machine()}
  emit([f"\n### {title}\n", f"{datetime.date.today()}, {out['machine']}.", f"Command: `{command()}`\n",
        *table_md(rows), "", *[f"- {n}" for n in notes]], append)
  print(json.dumps(out))


def read_stsb(path) -> tuple[list[str], list[str], np.ndarray]:
  """(sentence1s, sentence2s, scores) of an STS-B tsv (header naming sentence1, sentence2, score)."""
  rows = [r for _, r in sources.tsv_rows(ROOT / path, ("sentence1", "sentence2", "score"))]
  return [r["sentence1"] for r in rows], [r["sentence2"] for r in rows], np.array([float(r["score"]) for r in rows])
