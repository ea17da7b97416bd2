"""Sequence packing vs length buckets vs the PyTorch original's pad-to-longest, over full epochs of real
data: real (non-padding) tokens per second of the MiniLM train step and the padding share; then the
attention share of the packed step at L = 512."""
import os

import jax
import numpy as np

from bench import harness, step as bench_step, torch_ref
from piccolo_jax import config, data, encode, sharding, state as state_lib
from piccolo_jax.configs import demo

RETRIEVAL_ZH = {"kind": "jsonl", "path": "data/retrieval-zh/triplets.train.jsonl"}
DATA = {  # name -> data config: the demo's, and retrieval-zh at the original's lengths (64/512).
    "demo": lambda: demo.get_config().data,
    "retrieval-zh 64/512": lambda: config.section("data", datasets=(RETRIEVAL_ZH,), global_batch_size=32,
                                                  query_max_len=64, passage_max_len=512, neg_num=1)}


def to_longest(batch):
  """A padded batch with each field cut to its longest text: the original's pad-to-longest per forward."""
  out = dict(batch)
  for k in [k for k in batch if k.endswith("_mask")]:
    n = int(batch[k].sum(1).max())
    out[k], out[k[:-5] + "_ids"] = batch[k][:, :n], batch[k[:-5] + "_ids"][:, :n]
  return out


def tokens(batch):
  return sum(int(v.size) for k, v in batch.items() if k.endswith("_mask")) or batch["pack_tok"].size


def jax_runner(cfg, params, dims):
  """step(batch, task) -> loss of the real jitted train step on one device (state carried)."""
  step, state, rngs, mesh = bench_step.train_step(cfg, params, dims)
  holder = [state]

  def run(batch, task):
    holder[0], metrics = step(holder[0], sharding.put_batch(batch, mesh), rngs, mix=task)
    return float(metrics["loss"])

  return run


def limited(c, limit):
  return config.replace(c, datasets=tuple(dict(d, limit=limit) for d in c.datasets)) if limit else c


def epoch(name, c, cfg, params, dims, tok, block, threads):
  """(table rows, figures) of one epoch of each run; the runs alternate in turns of `block` steps."""
  tables = data.load_tables(c, tok)
  batchers = {"packed": data.Batcher(c, tables), "buckets": data.Batcher(config.replace(c, packing=False), tables)}
  steps = range(batchers["packed"].steps_per_epoch)
  batches = {k: [b(s) for s in steps] for k, b in batchers.items()}
  batches["torch pad-to-longest"] = [(to_longest(a), m) for a, m in batches["buckets"]]
  real = sum(m["tokens"] for _, m in batches["packed"])
  runs = {"packed": jax_runner(cfg, params, dims), "buckets": jax_runner(cfg, params, dims),
          "torch pad-to-longest": torch_ref.torch_trainer(cfg, params, dims, threads=threads)[0]}
  compile_s = {}
  for k in ("packed", "buckets"):  # Every shape once, untimed: compile time is reported apart.
    shapes = {tuple(sorted((n, v.shape) for n, v in a.items())): (a, m["task"]) for a, m in batches[k]}
    _, compile_s[k] = harness.timed(lambda: [runs[k](a, t) for a, t in shapes.values()])
  secs = dict.fromkeys(runs, 0.0)
  for first in range(0, len(steps), block):
    for k, run in runs.items():
      run(*(lambda a, m: (a, m["task"]))(*batches[k][first]))  # Settles after the other runs (untimed).
      for a, m in batches[k][first:first + block]:
        secs[k] += harness.timed(lambda: run(a, m["task"]))[1]
  padded = {k: sum(tokens(a) for a, _ in b) for k, b in batches.items()}
  rows = [(name, k, f"{1 - real / padded[k]:.1%}", f"{secs[k]:.0f}", f"{real / secs[k]:.0f}",
           f"{secs['torch pad-to-longest'] / secs[k]:.2f}", f"{compile_s.get(k, 0):.0f}" if k in compile_s else "-",
           str(len({(m["task"], m["bucket"], m["rows"]) for _, m in batches[k]})) if k in compile_s else "-")
          for k in runs]
  return rows, {"steps": len(steps), "real_tokens": real, "secs": secs, "padded": padded, "compile_s": compile_s}


def attention_share(cfg, params, dims, tok, reps, limit):
  """Packed retrieval-zh batches at L = 512 and L = 128, alternating: t = a * R * L + b * R * L^2 per batch
  gives the attention's (the L^2 term's) share of the step at L = 512."""
  c = limited(DATA["retrieval-zh 64/512"](), limit)
  tables = data.load_tables(c, tok)
  batch = {L: data.Batcher(config.replace(c, pack_length=L), tables)(0)[0] for L in (512, 128)}
  runs = {L: (lambda r=jax_runner(cfg, params, dims), b=b: r(b, "retrieval")) for L, b in batch.items()}
  times, *_ = harness.alternate(runs, reps)
  t = {L: harness.median(v) for L, v in times.items()}
  RL = {L: b["pack_tok"].size for L, b in batch.items()}
  a, b = np.linalg.solve([[RL[L], RL[L] * L] for L in (512, 128)], [t[L] for L in (512, 128)])
  return t, RL, b * RL[512] * 512 / t[512]


def main():
  p = harness.parser(__doc__, reps=5, threads=True)  # --reps: of the attention-share steps (0: skip it)
  p.add_argument("--data", default=",".join(DATA), help=f"comma list of {', '.join(DATA)}")
  p.add_argument("--block", type=int, default=8, help="steps per turn when alternating the runs")
  p.add_argument("--model", default="minilm", help="minilm, or a piccolo_jax / sentence-transformers dir")
  p.add_argument("--limit", type=int, default=0, help="rows per dataset (0: all)")
  p.add_argument("--out", default=str(harness.ROOT / "BENCHMARKS.md"))
  args = p.parse_args()
  os.chdir(harness.ROOT)  # Data paths are relative.
  cfg, params, tok_dir = state_lib.load_init(args.model)
  E = cfg.embed_dim
  tok, dims = encode.load_tokenizer(tok_dir), (E // 3, 2 * E // 3, E)
  load0 = os.getloadavg()[0]
  rows, out = [("data", "run", "padding", "epoch s", "real tokens/s", "vs torch", "compile s", "programs")], {}
  for name in args.data.split(","):
    c = limited(DATA[name](), args.limit)
    r, out[name] = epoch(name, c, cfg, params, dims, tok, args.block, args.threads or os.cpu_count())
    rows += r
  t, RL, share = attention_share(cfg, params, dims, tok, args.reps, args.limit) if args.reps else ({}, {}, None)
  steps = ", ".join(f"{k}: {v['steps']} steps" for k, v in out.items())
  notes = [f"one epoch each ({steps}), global batch 32, "
           f"{args.model} fp32 with its dropout, MRL dims {dims}; the three runs train the same batches (same rows and "
           f"negatives), alternating in turns of {args.block} steps, each turn after one untimed step",
           "real tokens: the texts' own tokens (cls padding negatives excluded), the same count for every run; "
           "padding: the share of the tokens computed that are not real; compile time and programs apart",
           f"attention share of the packed retrieval-zh step at L = 512: {share:.1%} (step {t[512]:.2f} s for "
           f"{RL[512]} row tokens at L = 512, {t[128]:.2f} s for {RL[128]} at L = 128; t = a RL + b RL L, "
           f"medians of {args.reps} alternating reps)" if share else "attention share: not measured (--reps 0)",
           f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end"]
  harness.report("Sequence packing: real tokens/s over an epoch (python -m bench.packing_bench)", rows, notes,
                 {"epochs": out, "attention_share_512": share}, args.out)


if __name__ == "__main__":
  main()
