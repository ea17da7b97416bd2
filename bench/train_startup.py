"""Train CLI start-up at scale: seconds from process start to the first metrics row, and RSS then.

Usage: python -m bench.train_startup ROWS.jsonl PREPARED_DIR XLA_CACHE_DIR WORKDIR (rows from bench.data_scale).
"""
import json, os, pathlib, subprocess, sys, time
rows, cache, xla, wd = sys.argv[1], sys.argv[2], sys.argv[3], pathlib.Path(sys.argv[4])
cmd = [sys.executable, "-m", "piccolo_jax.train", "--config=demo", f"--workdir={wd}",
       f'--config.data.datasets=({{"kind": "jsonl", "path": "{rows}"}},)', "--config.data.query_max_len=64",
       "--config.data.passage_max_len=512", "--config.data.neg_num=1", "--config.data.global_batch_size=8", "--config.data.cls_query_max_len=512",
       "--config.data.sts_max_len=64", "--config.data.sts_pair_max_len=512", "--config.data.buckets=(32,64,128,256,512)",
       f"--config.data.prepared_dir={cache}", "--config.train.max_steps=2", "--config.train.log_every=1",
       "--config.eval.tasks=()", "--config.eval.every=0", "--config.checkpoint.every=100000"]
env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_COMPILATION_CACHE_DIR=xla, GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
t0 = time.perf_counter()
p = subprocess.Popen(cmd, cwd=pathlib.Path(__file__).resolve().parent.parent, env=env, stdout=subprocess.DEVNULL, stderr=open(wd.with_suffix(".log"), "w"))
out, peak = {}, 0
while p.poll() is None:
  st = {l.split(":")[0]: int(l.split()[1]) // 1024 for l in open(f"/proc/{p.pid}/status") if l.startswith(("VmRSS", "RssAnon"))}
  peak = max(peak, st.get("VmRSS", 0))
  m = wd / "metrics.jsonl"
  lines = m.read_text().splitlines() if m.exists() else []
  steps = [json.loads(l).get("step") for l in lines]
  if 1 in steps and "step1" not in out:
    out["step1"] = (time.perf_counter() - t0, st)
  if 2 in steps and "step2" not in out:
    out["step2"] = (time.perf_counter() - t0, st)
  time.sleep(0.2)
out["rc"], out["total"], out["peak_rss"] = p.returncode, time.perf_counter() - t0, peak
print(json.dumps(out))
