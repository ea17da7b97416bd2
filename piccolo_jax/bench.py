"""Benchmarks: the JAX train step against the PyTorch original side by side, and encoding speed.

  python -m piccolo_jax.bench step --model minilm --task cosent --batch 32 --seq 64 --compare torch
  python -m piccolo_jax.bench step --model stella-shape --task retrieval --batch 4 --seq 64 --pseq 128
  python -m piccolo_jax.bench encode --model minilm

`step` times the real training step (train.make_train_step on a synthetic batch) and the same step
as the original runs it (HF BertModel, mean pooling, the same losses, AdamW), alternating in one
process. Each turn first runs --settle untimed steps: the step right after the other framework ran
pays for that framework's memory churn (page faults, huge-page compaction; reported apart), which a
training run never sees. Each command prints a table and, as its last line, one JSON object;
--append FILE adds the table to FILE as a markdown section.
"""
import argparse
import csv
import ctypes
import datetime
import gc
import json
import os
import pathlib
import platform
import resource
import sys
import tempfile
import threading
import time

import jax
import ml_collections
import numpy as np

from piccolo_jax import checkpoint
from piccolo_jax import convert
from piccolo_jax import data as data_lib
from piccolo_jax import export
from piccolo_jax import losses
from piccolo_jax import model as model_lib
from piccolo_jax import sharding
from piccolo_jax import state as state_lib
from piccolo_jax import train

# stella-mrl-large-zh-v3.5-1792d: BERT-large (Chinese vocab) + mean pooling + Dense 1024 -> 1792.
STELLA = model_lib.Config(vocab_size=21128, hidden_size=1024, num_layers=24, num_heads=16,
                          intermediate_size=4096, dense_out=1792)
TASKS = {"retrieval": "retrieval", "sts": "sts", "cosent": "sts", "cls": "cls"}
LOSS = dict(retrieval=dict(temperature=0.01, weight=1.0), sts=dict(temperature=0.05, weight=0.04),
            cls=dict(temperature=0.05, weight=0.2))  # As configs/common.py.
OPTIM = dict(lr=1e-5, warmup_ratio=0.0, warmup_steps=-1, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
             clip_norm=1.0, grad_accum=1, freeze=("embeddings/position",))


def median(xs):
  return float(np.median(xs))


def alternate(runs, reps, settle=0) -> tuple[dict, dict, dict]:
  """({name: wall s per rep}, {name: cores busy per rep}, {name: wall s of the settle calls}).

  Calls each run in turn, reps times; with settle > 0, each turn first makes `settle` untimed calls
  (timed apart), so the timed call sees the run's own steady state, not the switch from another.
  """
  times, cores, settled = ({k: [] for k in runs} for _ in range(3))
  for _ in range(reps):  # Alternating: a change in machine load hits every run alike.
    for k, run in runs.items():
      for _ in range(settle):
        t = time.perf_counter()
        run()
        settled[k].append(time.perf_counter() - t)
      t, c = time.perf_counter(), time.process_time()
      run()
      times[k].append(time.perf_counter() - t)
      cores[k].append((time.process_time() - c) / times[k][-1])  # CPU s per wall s.
  return times, cores, settled


def rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb(fn, framework) -> tuple[float, float]:
  """(MB in use before, peak MB while fn() runs): device memory on GPU, else host RSS sampled by a thread."""
  if jax.devices()[0].platform == "gpu":
    if framework == "torch":
      import torch
      torch.cuda.reset_peak_memory_stats()
      rest = torch.cuda.memory_allocated()
      fn()
      return rest / 2**20, torch.cuda.max_memory_allocated() / 2**20
    stats = lambda: jax.devices()[0].memory_stats() or {}
    rest = stats().get("bytes_in_use", 0)
    fn()
    return rest / 2**20, stats().get("peak_bytes_in_use", 0) / 2**20  # Peak since start.
  gc.collect()
  time.sleep(1.0)  # Lets buffers freed asynchronously after the last step go.
  getattr(ctypes.CDLL(None), "malloc_trim", lambda _: 0)(0)  # Freed heap back to the OS: growth is real use.
  rest, peak, done = rss_mb(), [0.0], threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], rss_mb())
      time.sleep(0.001)

  thread = threading.Thread(target=sample)
  thread.start()
  fn()
  done.set()
  thread.join()
  return rest, max(peak[0], rss_mb())


def machine() -> str:
  cpu = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")), "?")
  dev = jax.devices()[0]
  return (f"{platform.machine()} {cpu}, {os.cpu_count()} cores (shared with other jobs, noisy), load avg "
          f"{os.getloadavg()[0]:.1f}; jax {jax.__version__} on {dev.platform} ({dev.device_kind})")


def load(name) -> tuple[model_lib.Config, dict]:
  """(config, host params) of 'minilm', 'stella-shape' (random init), a model dir or a BERT dir."""
  if name == "stella-shape":
    return STELLA, state_lib.random_params(STELLA, 0)
  path = state_lib.resolve_init(name)
  if (pathlib.Path(path) / checkpoint.CONFIG_FILE).is_file():
    cfg = checkpoint.load_config(path)
    return cfg, jax.tree.map(np.asarray, checkpoint.load_params(path, cfg))
  cfg, weights = convert.read_source(path)
  return cfg, convert.to_params(cfg, weights, source=path)


def synthetic_batch(task, B, Lq, Lp, K, vocab, seed=0) -> dict:
  """The trainer's layout: {field}_ids/_mask int32 [N, L], sts label [B], cls neg_valid [B, K]."""
  rng = np.random.default_rng(seed)
  shapes = {"text_a": (B, Lq), "text_b": (B, Lq)} if task == "sts" else {"query": (B, Lq), "pos": (B, Lp)}
  if task == "cls" or (task == "retrieval" and K):
    shapes["neg"] = (B * K, Lp)
  batch = {f + "_ids": rng.integers(1000, vocab, s, dtype=np.int32) for f, s in shapes.items()}
  batch |= {f + "_mask": np.ones(s, np.int32) for f, s in shapes.items()}
  if task == "sts":
    batch["label"] = rng.integers(0, 6, B).astype(np.float32)
  if task == "cls":
    batch["neg_valid"] = np.ones((B, K), bool)
  return batch


def model_flops(cfg, batch, remat=False) -> float:
  """Analytic training FLOPs: 3x the forward matmuls (4x with remat); embeddings and softmax left out."""
  D, F, fwd = cfg.hidden_size, cfg.intermediate_size, 0.0
  for N, L in (v.shape for k, v in batch.items() if k.endswith("_mask")):
    fwd += cfg.num_layers * N * L * 2 * (4 * D * D + 2 * D * F + 2 * L * D) + 2 * N * D * (cfg.dense_out or 0)
  return fwd * (4 if remat else 3)


def jax_step(cfg, params, batch, task, mrl_dims, seed=0, compiler_options=None):
  """(run() -> loss, info): the real jitted train step, compiled ahead of time for this batch."""
  tx, _ = state_lib.make_optimizer(ml_collections.ConfigDict(OPTIM), params, 1000)
  mesh = sharding.make_mesh(1)
  state, _, graphdef, rngs = state_lib.init_state(cfg, params, tx, mesh, seed)
  loss_cfg = ml_collections.ConfigDict(dict(mrl_dims=mrl_dims, mrl_weights=None, **LOSS))
  step = train.make_train_step(graphdef, tx, loss_cfg, seed)
  arrays = data_lib.to_global(batch, mesh, sharding.BATCH_AXES)
  t = time.perf_counter()
  compiled = step.lower(state, arrays, rngs, task=task).compile(compiler_options=compiler_options)
  info = {"compile_s": time.perf_counter() - t, "compiled": compiled}
  cost = compiled.cost_analysis()
  info["xla_flops"] = float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))
  if mem := compiled.memory_analysis():
    info |= {"xla_temp_mb": mem.temp_size_in_bytes / 2**20, "xla_args_mb": mem.argument_size_in_bytes / 2**20}
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], arrays, rngs)  # The state is donated, as in training.
    return float(jax.block_until_ready((holder[0], metrics))[1]["loss"])

  return run, info


def torch_losses(task, emb, batch, mrl_dims):
  """The Piccolo2 losses in torch (the math of the original's piccolo/criteria.py), averaged over MRL dims."""
  import torch
  import torch.nn.functional as F
  norm = lambda x: F.normalize(x.float(), dim=-1, eps=losses.EPS)
  c = LOSS[task]

  def one(d):
    e = {f: x[..., :d] for f, x in emb.items()}
    if task == "sts":
      s = (norm(e["text_a"]) * norm(e["text_b"])).sum(-1) / c["temperature"]
      y = batch["label"]
      diff = (s[:, None] - s[None, :])[y[None, :] > y[:, None]]  # s_i - s_j where label_j > label_i.
      return c["weight"] * torch.logsumexp(torch.cat([diff, diff.new_zeros(1)]), 0)
    q, p = norm(e["query"]), norm(e["pos"])
    if task == "retrieval":  # Every query against all positives and all hard negatives.
      logits = q @ (torch.cat([p, norm(e["neg"])]) if "neg" in e else p).T / c["temperature"]
      return c["weight"] * F.cross_entropy(logits, torch.arange(len(q), device=q.device))
    n = norm(e["neg"]).reshape(len(q), -1, q.shape[-1])  # cls: each query against its own negatives.
    logits = torch.cat([(q * p).sum(-1, keepdim=True), torch.einsum("bd,bkd->bk", q, n)], 1) / c["temperature"]
    keep = torch.cat([torch.ones_like(batch["neg_valid"][:, :1]), batch["neg_valid"]], 1)
    logits = logits.masked_fill(~keep, float("-inf"))
    return c["weight"] * F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))

  return sum(one(d) for d in mrl_dims) / len(mrl_dims)


def torch_step(cfg, params, batch, task, mrl_dims, device="cpu", amp=None, remat=False, seed=0):
  """(run() -> loss, info): HF BertModel + mean pooling (+ Dense) + the losses + AdamW, as the original."""
  import torch
  import transformers
  torch.manual_seed(seed)
  enc = transformers.BertModel(transformers.BertConfig.from_dict(export.hf_config(cfg)), add_pooling_layer=False)
  w = {k: torch.tensor(v) for k, v in export.to_weights(cfg, params).items()}
  dense = torch.nn.Linear(cfg.hidden_size, cfg.dense_out, bias=cfg.dense_bias) if cfg.dense_out else None
  if dense:
    dense.load_state_dict({k.removeprefix("2_Dense.linear."): w.pop(k) for k in list(w) if k.startswith("2_Dense.")})
  enc.load_state_dict(w, strict=True)
  if remat:
    enc.gradient_checkpointing_enable({"use_reentrant": False})
  enc.embeddings.position_embeddings.weight.requires_grad = False  # Frozen, as in the original.
  mods = torch.nn.ModuleList([enc] + ([dense] if dense else [])).to(device).train()
  trainable = [p for p in mods.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=OPTIM["lr"], betas=(OPTIM["b1"], OPTIM["b2"]), eps=OPTIM["eps"],
                          weight_decay=OPTIM["weight_decay"])
  tb = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
  dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(amp)

  def embed(f):
    mask = tb[f + "_mask"]
    h = enc(input_ids=tb[f + "_ids"].long(), attention_mask=mask).last_hidden_state
    m = mask[..., None].to(h.dtype)
    e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return (dense(e) if dense else e).float()

  def run():
    with torch.autocast(device.split(":")[0], dtype=dtype or torch.float32, enabled=dtype is not None):
      emb = {f: embed(f) for f in train.text_fields(batch)}
    loss = torch_losses(task, emb, tb, mrl_dims)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, OPTIM["clip_norm"])
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()  # Waits for the step (CUDA too).

  info = {"threads": torch.get_num_threads(), "attn": enc.config._attn_implementation,
          "state_mb": 16 * sum(p.numel() for p in trainable) / 2**20}  # f32 params, grads, 2 moments.
  return run, info


def matmul_gflops(n, dtype, torch_device=None, reps=5) -> dict:
  """Best GFLOP/s of an n x n x n matmul, in JAX and (given torch_device) torch: the MFU denominator."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  runs = {"jax": lambda: f(a).block_until_ready()}
  if torch_device:
    import torch
    x = torch.randn(n, n, dtype=getattr(torch, dtype), device=torch_device)
    runs["torch"] = lambda: (x @ x, torch_device == "cuda" and torch.cuda.synchronize())
  for run in runs.values():
    run()
  times, *_ = alternate(runs, reps)
  return {k: 2 * n**3 / min(v) / 1e9 for k, v in times.items()}


def cmd_step(args):
  base_mb, gpu = rss_mb(), jax.devices()[0].platform == "gpu"
  cfg, params = load(args.model)
  cfg = cfg.replace(dtype=args.dtype, remat=args.remat)
  if args.dropout >= 0:
    cfg = cfg.replace(dropout=args.dropout, attention_dropout=args.dropout)
  task, E = TASKS[args.task], cfg.embed_dim
  dims = tuple(int(d) for d in args.mrl_dims.split(",")) if args.mrl_dims else (
      losses.MRL_DIMS if E == losses.MRL_DIMS[-1] else (E // 3, 2 * E // 3, E))
  K = args.neg if args.neg is not None else {"cls": 10}.get(task, 0)
  batch = synthetic_batch(task, args.batch, args.seq, args.pseq or args.seq, K, cfg.vocab_size)
  runs, info = {}, {}
  runs["jax"], info["jax"] = jax_step(cfg, params, batch, task, dims)
  if args.compare == "torch":
    import torch
    torch.set_num_threads(args.threads or os.cpu_count())
    amp = None if args.dtype == "float32" else args.dtype
    runs["torch"], info["torch"] = torch_step(cfg, params, batch, task, dims, "cuda" if gpu else "cpu", amp,
                                              args.remat)
  del params
  first = {}
  for k, run in runs.items():  # Warm-up: first-call allocation, torch's optimizer state.
    t = time.perf_counter()
    first[k] = (run(), time.perf_counter() - t)
  times, cores, settled = alternate(runs, args.reps, args.settle)
  mem = {k: peak_mb(run, k) for k, run in runs.items()} if args.memory else {}
  peak = matmul_gflops(8192 if gpu else 2048, "bfloat16" if gpu else "float32",
                       ("cuda" if gpu else "cpu") if "torch" in runs else None)
  flops, n_tok = info["jax"]["xla_flops"], sum(v.size for k, v in batch.items() if k.endswith("_mask"))
  out = {"model": args.model, "task": task, "batch": args.batch, "seq": args.seq, "pseq": args.pseq or args.seq,
         "neg": K, "dtype": args.dtype, "remat": args.remat, "dropout": cfg.dropout, "mrl_dims": list(dims),
         "tokens": n_tok, "model_flops": model_flops(cfg, batch, args.remat), "peak_gflops": peak}
  rows = [("", "compile s", "first step s", "step s (median)", "examples/s", "tokens/s", "MFU %", "cores busy",
           "step memory MB (rest -> peak)")]
  for k in runs:
    s, m = median(times[k]), mem.get(k)
    out |= {f"{k}_step_s": s, f"{k}_steps_s": times[k], f"{k}_loss0": first[k][0], f"{k}_first_s": first[k][1],
            f"{k}_mfu_pct": 100 * flops / s / (max(peak.values()) * 1e9), f"{k}_cores": median(cores[k])}
    out |= {f"{k}_{n}": v for n, v in info[k].items() if n != "compiled"}
    if m:
      own = m[0] if gpu else base_mb + info[k].get("xla_args_mb", info[k].get("state_mb", 0))
      out |= {f"{k}_mem_rest_mb": m[0], f"{k}_mem_peak_mb": m[1]}
      if args.budget_gb:  # Resident state + (step growth, linear in the batch) <= budget.
        out[f"{k}_max_batch"] = int(args.batch * (args.budget_gb * 1024 - own) / max(m[1] - m[0], 1))
    rows.append((k, f"{out[f'{k}_compile_s']:.1f}" if k == "jax" else "-", f"{first[k][1]:.2f}", f"{s:.3f}",
                 f"{args.batch / s:.1f}", f"{n_tok / s:.0f}", f"{out[f'{k}_mfu_pct']:.1f}", f"{median(cores[k]):.2f}",
                 f"{m[0]:.0f} -> {m[1]:.0f}" if m else "-"))
  notes = [f"XLA flops/step {flops / 1e9:.1f} G (analytic model {out['model_flops'] / 1e9:.1f} G); peak matmul "
           f"GFLOP/s {', '.join(f'{k} {v:.0f}' for k, v in peak.items())}; {args.reps} alternating reps"]
  if args.settle and len(runs) > 1:
    out |= {f"{k}_switch_s": median(v) for k, v in settled.items()}
    notes.append(f"each turn: {args.settle} untimed step(s) first, the first right after the other framework "
                 f"ran (median " + ", ".join(f"{k} {median(v):.3f} s" for k, v in settled.items()) +
                 "), then the timed step")
  if "torch" in runs:
    out["ratio"] = out["torch_step_s"] / out["jax_step_s"]
    notes.append(f"ratio torch/jax step time: {out['ratio']:.2f} (torch {out['torch_threads']} threads, "
                 f"{out['torch_attn']} attention; XLA: its own thread pool)")
  if args.budget_gb and mem:
    notes.append(f"largest batch under {args.budget_gb:.1f} GB (step memory linear in batch): " +
                 ", ".join(f"{k} {out[f'{k}_max_batch']}" for k in mem))
  out |= {"rss_base_mb": base_mb, "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "machine": machine()}
  title = (f"step: {args.model}, {task}, batch {args.batch}, seq {args.seq}/{out['pseq']}, neg {K}, {args.dtype}, "
           f"remat {args.remat}")
  report(title, rows, notes, out, args.append)


def read_stsb(path) -> list[str]:
  with open(path, encoding="utf-8", newline="") as f:
    rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  return [r["sentence1"] for r in rows] + [r["sentence2"] for r in rows]


def padded_tokens(embedder, texts, batch) -> dict:
  """Tokens encoded incl. padding: our length buckets vs sentence-transformers' longest-in-batch."""
  from piccolo_jax import encode
  n = [len(x) for x in embedder.tokenize(texts, embedder.model.cfg.max_seq_length)]
  by_tok, by_chars = sorted(n, reverse=True), [n[i] for i in np.argsort([-len(t) for t in texts], kind="stable")]
  chunks = lambda xs: [xs[i:i + batch] for i in range(0, len(xs), batch)]
  ours = sum(batch * encode.bucket_length(c[0], embedder.buckets, embedder.model.cfg.max_seq_length)
             for c in chunks(by_tok))
  return {"jax": ours, "st": sum(len(c) * max(c) for c in chunks(by_chars)), "real": sum(n)}


def cmd_encode(args):
  import torch
  from sentence_transformers import SentenceTransformer
  from piccolo_jax import encode
  torch.set_num_threads(args.threads or os.cpu_count())
  texts, src = read_stsb(args.data)[:args.limit or None], state_lib.resolve_init(args.model)
  with tempfile.TemporaryDirectory() as tmp:
    if (pathlib.Path(src) / checkpoint.CONFIG_FILE).is_file():
      jax_dir, st_dir = src, pathlib.Path(tmp) / "st"
      export.export(src, st_dir)
    else:
      jax_dir, st_dir = pathlib.Path(tmp) / "jax", src
      convert.convert(src, jax_dir)
    buckets = tuple(int(b) for b in args.buckets.split(",")) if args.buckets else encode.DEFAULT_BUCKETS
    embedder, st = encode.Embedder.load(jax_dir, buckets=buckets), SentenceTransformer(str(st_dir), device="cpu")
  runs = {"jax": lambda: embedder.encode(texts, batch_size=args.batch),
          "sentence-transformers": lambda: st.encode(texts, batch_size=args.batch, normalize_embeddings=True)}
  t = time.perf_counter()
  emb_jax = runs["jax"]()  # Compiles one program per length bucket.
  warm, emb_st = time.perf_counter() - t, runs["sentence-transformers"]()
  times, *_ = alternate(runs, args.reps)
  cos, pad = float(np.min(np.sum(emb_jax * emb_st, axis=1))), padded_tokens(embedder, texts, args.batch)
  rows = [("", "s per pass (median)", "sentences/s")]
  rows += [(k, f"{median(v):.2f}", f"{len(texts) / median(v):.0f}") for k, v in times.items()]
  out = {"jax_s": median(times["jax"]), "st_s": median(times["sentence-transformers"]), "jax_runs_s": times["jax"],
         "st_runs_s": times["sentence-transformers"], "jax_first_s": warm, "sentences": len(texts),
         "batch": args.batch, "min_cosine": cos, "model": args.model, "torch_threads": torch.get_num_threads(),
         "padded_tokens": pad, "machine": machine()}
  out["ratio"] = out["st_s"] / out["jax_s"]
  notes = [f"ratio sentence-transformers/jax time: {out['ratio']:.2f}; first JAX pass (compiles) {warm:.1f} s; "
           f"min cosine between the two embeddings {cos:.6f}; torch threads {out['torch_threads']}; "
           f"{args.reps} alternating reps",
           f"tokens incl. padding: jax {pad['jax']} (length buckets {embedder.buckets}, last batch padded), "
           f"sentence-transformers {pad['st']} (each batch padded to its longest); {pad['real']} real tokens"]
  report(f"encode: {args.model}, {len(texts)} STS-B dev sentences, batch {args.batch}", rows, notes, out,
         args.append)


def command() -> str:
  """This process's command line, as typed from the repository root."""
  prog = sys.argv[0]
  prog = "-m piccolo_jax.bench" if prog.endswith(os.path.join("piccolo_jax", "bench.py")) else os.path.relpath(prog)
  return " ".join([env_prefix() + ".venv/bin/python", prog] + sys.argv[1:])


def env_prefix() -> str:
  """The environment settings that change speed, as a command prefix."""
  keys = ("GLIBC_TUNABLES", "XLA_FLAGS", "OMP_NUM_THREADS")
  return "".join(f"{k}={os.environ[k]} " for k in keys if os.environ.get(k)) + "HF_HUB_OFFLINE=1 "


def report(title, rows, notes, out, append=None):
  """Prints the table, the notes and (last) the JSON line; appends a markdown section to `append`."""
  widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
  print("\n".join([title] + ["  ".join(str(c).rjust(w) for c, w in zip(r, widths)) for r in rows] + notes))
  if append:
    md = [f"\n### {title}\n", f"{datetime.date.today()}, {out['machine']}.", f"Command: `{command()}`\n",
          "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]] + [""] + [f"- {n}" for n in notes]
    with open(append, "a", encoding="utf-8") as f:
      f.write("\n".join(md) + "\n")
  print(json.dumps(out))


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m piccolo_jax.bench", description=__doc__.split("\n")[0],
                              epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  s = sub.add_parser("step", help="train-step time, MFU and memory: JAX vs PyTorch, alternating")
  s.add_argument("--model", default="minilm", help="'minilm', 'stella-shape' (BERT-large + Dense 1024->1792, "
                 "random init), a piccolo_jax model dir, or a sentence-transformers / HF BERT dir")
  s.add_argument("--task", choices=sorted(TASKS), default="cosent", help="cosent is sts (CoSENT)")
  s.add_argument("--batch", type=int, default=32, help="queries (retrieval, cls) or pairs (sts) per step")
  s.add_argument("--seq", type=int, default=64, help="query / STS text length in tokens")
  s.add_argument("--pseq", type=int, default=0, help="passage and negative length (default: --seq)")
  s.add_argument("--neg", type=int, default=None, help="negatives per query (default: retrieval 0, cls 10)")
  s.add_argument("--mrl-dims", default="", help="comma list (default: 256..1792 for 1792-d, else E/3,2E/3,E)")
  s.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                 help="JAX compute dtype; torch autocasts to it unless float32")
  s.add_argument("--remat", action="store_true", help="JAX rematerialisation; torch gradient checkpointing")
  s.add_argument("--dropout", type=float, default=-1.0, help="hidden and attention dropout (-1: the model's)")
  s.add_argument("--compare", choices=("none", "torch"), default="torch")
  s.add_argument("--reps", type=int, default=5, help="timed steps per framework (after one warm-up step)")
  s.add_argument("--settle", type=int, default=1, help="untimed steps per turn before the timed one: the "
                 "first step after the other framework ran pays for its memory churn (BENCHMARKS.md)")
  s.add_argument("--memory", action="store_true", help="one more step each, recording its peak memory")
  s.add_argument("--budget-gb", type=float, default=0.0, help="with --memory: the largest batch under this")
  s.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores, as XLA uses)")
  e = sub.add_parser("encode", help="encoding time: JAX Embedder vs sentence-transformers, alternating")
  e.add_argument("--model", default="minilm", help="'minilm', a piccolo_jax model dir or a sentence-transformers dir")
  e.add_argument("--data", default="data/sts-b-en/sts-b-en.dev.tsv", help="STS-B tsv (sentence1, sentence2)")
  e.add_argument("--batch", type=int, default=32)
  e.add_argument("--limit", type=int, default=0, help="the first N sentences only (0: all)")
  e.add_argument("--reps", type=int, default=3, help="timed passes per encoder (after one warm-up pass)")
  e.add_argument("--buckets", default="", help="Embedder length buckets, comma list (default: its own)")
  e.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
  for q in (s, e):
    q.add_argument("--append", default=None, metavar="FILE", help="append the table to FILE (markdown)")
  args = p.parse_args(argv)
  {"step": cmd_step, "encode": cmd_encode}[args.cmd](args)


if __name__ == "__main__":
  main()
