"""Data at scale: prepare time, start-up to the first batch and host memory over a ladder of row counts.

Synthetic retrieval rows shaped like the Chinese training sets (query 15-30 characters, passages
150-400, 1 positive + 3 negatives, every passage distinct), characters drawn from the bundled
retrieval-zh text; caps 64/512 (the original's). Each measurement is a fresh process:
  prepare    piccolo_jax.prepare of the file: wall, CPU s per row, peak RSS
  tokenizer  the same texts through the same tokenizer's batch mode alone (the floor for prepare)
  start-up   load_tables + make_iterator + the first batch from prepared data, then 200 batches:
             wall, RSS (anonymous and file-backed) at the first batch and the peak, grain workers
             included; with --old=TREE also the same start-up on the code in TREE (a git worktree).
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

from bench import harness

CHILD = r"""
import json, os, resource, sys, time
t0 = time.perf_counter()
from transformers import AutoTokenizer
from piccolo_jax import config, data, prepare, state
from piccolo_jax.prepare import Encoders

def status(pid="self"):
  s = {l.split(":")[0]: int(l.split()[1]) / 1024 for l in open(f"/proc/{pid}/status") if l.split(":")[0] in
       ("VmRSS", "VmHWM", "RssAnon", "RssFile")}
  return s

def tree():  # RSS of this process and its descendants (grain workers), MB
  kids, out = {os.getpid()}, status()
  out = {k: out.get(k, 0) for k in ("VmRSS", "RssAnon", "RssFile")}
  for p in os.listdir("/proc"):
    if p.isdigit():
      try:
        if int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1]) in kids:
          s = status(p)
          out = {k: out[k] + s.get(k, 0) for k in out}
      except OSError:
        pass
  return out

what, path, cache, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(state.resolve_init("minilm"))
c = config.section("data", datasets=({"kind": "jsonl", "path": path},), global_batch_size=32, neg_num=3,
                   query_max_len=64, passage_max_len=512, worker_count=workers, prepared_dir=cache)
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
base, t1, c1 = status(), time.perf_counter(), cpu()
out = {"import_s": t1 - t0, "base_rss": base["VmRSS"], "base_anon": base["RssAnon"]}
if what == "prepare":
  prepare.open_all(c, tok)
  out |= {"wall": time.perf_counter() - t1, "cpu": cpu() - c1, "peak": status()["VmHWM"]}
elif what == "tokenizer":
  rows = [json.loads(l) for l in open(path)]
  enc = Encoders(tok, (64, 512))
  t1, c1 = time.perf_counter(), cpu()
  for s in range(0, len(rows), 4096):
    enc([r["query"] for r in rows[s:s + 4096]], 64)
    enc([p for r in rows[s:s + 4096] for p in r["pos"] + r["neg"]], 512)
  out |= {"wall": time.perf_counter() - t1, "cpu": cpu() - c1}
else:
  old = hasattr(data, "Indexed")
  tables = data.load_tables(c, tok)
  it = data.make_iterator(c, tok, tables=tables) if old else data.make_iterator(c, tables)
  next(it)
  first = tree()
  out |= {"first_batch_s": time.perf_counter() - t1, "from_start_s": time.perf_counter() - t0,
          "first": first}
  peak, t2 = first, time.perf_counter()
  for i in range(200):
    next(it)
    if i % 20 == 19:
      now = tree()
      peak = {k: max(peak[k], now[k]) for k in peak}
  out |= {"peak": peak, "hwm": status()["VmHWM"], "batch_ms": (time.perf_counter() - t2) * 5}
print(json.dumps(out))
"""


def make_rows(path, n, seed=0):
  """n synthetic retrieval rows (jsonl), written once."""
  if path.is_file():
    return path
  chars = sorted({ch for line in open(harness.ROOT / "data/retrieval-zh/triplets.train.jsonl", encoding="utf-8")
                  for ch in line if "\u4e00" <= ch <= "\u9fff"})
  rng = np.random.default_rng(seed)
  buf = "".join(np.array(chars)[rng.integers(0, len(chars), 4_000_000)])
  text = lambda lo, hi: (lambda s, k: buf[s:s + k])(int(rng.integers(0, len(buf) - hi)), int(rng.integers(lo, hi + 1)))
  tmp = path.with_suffix(".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    for _ in range(n):
      f.write(json.dumps({"query": text(15, 30), "pos": [text(150, 400)], "neg": [text(150, 400) for _ in range(3)]},
                         ensure_ascii=False) + "\n")
  tmp.rename(path)
  return path


def child(what, path, cache, workers=0, tree=None):
  env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(tree or harness.ROOT))
  r = subprocess.run([sys.executable, "-c", CHILD, what, str(path), str(cache), str(workers)],
                     env=env, capture_output=True, text=True, cwd=tree or harness.ROOT)
  if r.returncode:
    raise RuntimeError(r.stderr[-3000:])
  return json.loads(r.stdout.strip().splitlines()[-1])


def main():
  p = harness.parser(__doc__)
  p.add_argument("--rows", default="10000,100000,1000000")
  p.add_argument("--tokenizer_rows", type=int, default=100000, help="largest ladder step timing the bare tokenizer")
  p.add_argument("--old", default="", help="a worktree of the code before prepared data, for side-by-side start-up")
  p.add_argument("--old_rows", type=int, default=100000, help="largest ladder step run on --old")
  p.add_argument("--dir", default="/tmp/piccolo_scale")
  p.add_argument("--out", default=str(harness.ROOT / "BENCHMARKS.md"))
  args = p.parse_args()
  root = pathlib.Path(args.dir)
  root.mkdir(parents=True, exist_ok=True)
  rows = [("rows", "prepare wall s", "prepare CPU ms/row", "tokenizer alone wall s", "prepare / tokenizer",
           "prepare peak RSS MB", "on-disk MB", "start-up s (to batch 1)",
           "RSS anon MB: after imports / batch 1 / peak",
           "RSS file-backed MB peak", "ms per batch (200, grain)", "same, 2 grain workers: s, anon MB peak",
           "old code: start-up s, peak RSS MB")]
  for n in map(int, args.rows.split(",")):
    path, cache = make_rows(root / f"rows-{n}.jsonl", n), root / f"cache-{n}"
    subprocess.run(["rm", "-rf", str(cache)], check=True)
    prep = child("prepare", path, cache)
    tok = child("tokenizer", path, cache) if n <= args.tokenizer_rows else None
    disk = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**20
    s0, s2 = child("start", path, cache), child("start", path, cache, workers=2)
    old = child("start", path, root / f"old-{n}", tree=args.old) if args.old and n <= args.old_rows else None
    rows.append((f"{n:,}", f"{prep['wall']:.1f}", f"{1000 * prep['cpu'] / n:.2f}",
                 f"{tok['wall']:.1f}" if tok else "-", f"{prep['wall'] / tok['wall']:.2f}" if tok else "-",
                 f"{prep['peak']:.0f}", f"{disk:.0f}", f"{s0['first_batch_s']:.2f}",
                 f"{s0['base_anon']:.0f} / {s0['first']['RssAnon']:.0f} / {s0['peak']['RssAnon']:.0f}",
                 f"{s0['peak']['RssFile']:.0f}", f"{s0['batch_ms']:.1f}",
                 f"{s2['first_batch_s']:.2f}, {s2['peak']['RssAnon']:.0f}",
                 f"{old['first_batch_s']:.1f}, {old['hwm']:.0f}" if old else "-"))
    print(rows[-1], json.dumps({"prepare": prep, "tokenizer": tok, "start": s0, "start_workers": s2, "old": old}),
          flush=True)
  harness.emit(["", "## Data at scale: prepare once, memory-map (python -m bench.data_scale)", "",
                f"Command: `{harness.command()}` on {harness.machine()}.", "", *harness.table_md(rows), ""], args.out)


if __name__ == "__main__":
  main()
