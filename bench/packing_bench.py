"""Sequence packing vs the PyTorch original's pad-to-longest, over full epochs of real data: real (non-padding)
tokens per second of the MiniLM train step and the padding share; then the attention share of the packed
step at L = 512. (Length buckets, the third layout of earlier runs: BENCHMARKS.md, commit 35a04ec.)"""
import os

import numpy as np

from bench import harness, step as bench_step, torch_ref
from piccolo_jax import config, data, encode, flops, sharding
from piccolo_jax import models
from piccolo_jax.configs import demo

RETRIEVAL_ZH = {"kind": "jsonl", "path": "data/retrieval-zh/triplets.train.jsonl"}


def retrieval_zh():
  c = config.base()
  c.data.update(datasets=(RETRIEVAL_ZH,), global_batch_size=32)
  c.tasks.retrieval.update(query_max_len=64, passage_max_len=512, neg_num=1)
  return c


def retrieval_zh_512():
  c = retrieval_zh()
  c.data.pack_length = 512  # Every text in a 512-token row when rows have one length.
  return c


DATA = {"demo": demo.get_config, "retrieval-zh 64/512": retrieval_zh,  # The demo's, and the original's lengths.
        "retrieval-zh 64/512 pack_length=512": retrieval_zh_512}


def to_longest(b):
  """The batch's texts as the original feeds them: each field padded to its longest text, + extras."""
  (task, _), = b.mix
  out = {f"{f}_{k}": x for f in b.slots[task] for k, x in zip(("ids", "mask"), torch_ref.unpacked(b, task, f))}
  return out | b.extras[task]


def jax_runner(cfg, params, dims, frozen=None):
  """step(batch, task) -> loss of the real jitted train step on one device (state carried); frozen: parameters
  that do not train (state.split_frozen)."""
  step, state, rngs, mesh = bench_step.train_step(cfg, params, dims, frozen=frozen)
  holder = [state]

  def run(batch, task):
    holder[0], metrics = step(holder[0], sharding.put_batch(batch, mesh), rngs)
    return float(metrics["loss"])

  return run


def limited(c, limit):
  if limit:
    c = config.replace(c)
    c.data.datasets = tuple(dict(d, limit=limit) for d in c.data.datasets)
  return c


ONE = "packed, one row length"  # data.pack_lengths=1: the rows before issue 34.


def epoch(name, c, cfg, params, dims, tok, block, threads):
  """(table rows, figures) of one epoch of each run; the runs alternate in turns of `block` steps."""
  tables = data.open_tables(c.data, c.tasks, tok)
  (assemble, menus_s) = harness.timed(lambda: data.assembler(c.data, c.tasks, tables))
  one = data.assembler(config.replace(c.data, pack_lengths=1), c.tasks, tables)
  batches = {"packed": [assemble(s) for s in range(assemble.plan.steps_per_epoch)],
             ONE: [one(s) for s in range(one.plan.steps_per_epoch)]}
  batches["torch pad-to-longest"] = [(to_longest(b), m) for b, m in batches["packed"]]
  real = sum(m["tokens"] for _, m in batches["packed"])
  runs = {"packed": jax_runner(cfg, params, dims), ONE: jax_runner(cfg, params, dims),
          "torch pad-to-longest": torch_ref.torch_trainer(cfg, params, dims, threads=threads)[0]}
  shapes, compile_s = {}, {}
  for k in ("packed", ONE):
    shapes[k] = {(m["task"], m["shape"]): (b, m["task"]) for b, m in batches[k]}
    _, compile_s[k] = harness.timed(lambda: [runs[k](b, t) for b, t in shapes[k].values()])  # Untimed, apart.
  secs = dict.fromkeys(runs, 0.0)
  for first in range(0, len(batches["packed"]), block):
    for k, run in runs.items():
      run(batches[k][first][0], batches[k][first][1]["task"])  # Settles after the other run (untimed).
      for b, m in batches[k][first:first + block]:
        secs[k] += harness.timed(lambda: run(b, m["task"]))[1]
  padded = {k: sum(r.tokens.size for b, _ in batches[k] for r in b.rows) for k in ("packed", ONE)} | {
            "torch pad-to-longest": sum(x.size for b, _ in batches["torch pad-to-longest"]
                                        for k, x in b.items() if k.endswith("_mask"))}
  squares = {k: sum(R * L * L for _, m in batches[k] for R, L in m["shape"]) for k in ("packed", ONE)} | {
             "torch pad-to-longest": sum(x.shape[0] * x.shape[1] ** 2 for b, _ in batches["torch pad-to-longest"]
                                         for k, x in b.items() if k.endswith("_mask"))}
  attn = lambda k: flops.train_flops(cfg, flops.Tokens(0, squares[k], 0)) / real / 1e6  # Attention's alone.
  rows = [(name, k, f"{1 - real / padded[k]:.1%}", f"{secs[k]:.0f}", f"{real / secs[k]:.0f}",
           f"{secs['torch pad-to-longest'] / secs[k]:.2f}", f"{compile_s[k]:.0f}" if k in shapes else "-",
           str(len(shapes[k])) if k in shapes else "-", f"{attn(k):.1f}") for k in runs]
  return rows, {"steps": len(batches["packed"]), "real_tokens": real, "secs": secs, "padded": padded,
                "compile_s": compile_s, "menus": assemble.menus, "menus_s": menus_s, "squares": squares}


def attention_share(cfg, params, dims, tok, reps, limit):
  """Packed retrieval-zh batches at L = 512 and L = 128, alternating: t = a * R * L + b * R * L^2 per batch
  gives the attention's (the L^2 term's) share of the step at L = 512."""
  c = limited(DATA["retrieval-zh 64/512"](), limit)
  tables = data.open_tables(c.data, c.tasks, tok)
  batch = {L: data.assembler(config.replace(c.data, pack_length=L, pack_lengths=1), c.tasks, tables)(0)[0]
           for L in (512, 128)}
  runs = {L: (lambda r=jax_runner(cfg, params, dims), b=b: r(b, "retrieval")) for L, b in batch.items()}
  times, *_ = harness.alternate(runs, reps)
  t = {L: harness.median(v) for L, v in times.items()}
  RL = {L: b.rows[0].tokens.size for L, b in batch.items()}
  a, b = np.linalg.solve([[RL[L], RL[L] * L] for L in (512, 128)], [t[L] for L in (512, 128)])
  return t, RL, b * RL[512] * 512 / t[512]


def planning(tok):
  """Start-up (the epoch plan and the menus, from the prepared token lengths) and ms per packed batch, by
  global batch, single-dataset steps and 32 groups; retrieval-zh repeated 8x at 64/512, 8 devices' rows."""
  rows = [("global batch, neg_num", "texts per batch", "start-up s", "per batch ms", "32 groups: start-up s",
           "32 groups: per batch ms")]
  for G, K in ((256, 1), (256, 7), (1024, 7)):
    c = retrieval_zh()
    c.data.update(datasets=(dict(RETRIEVAL_ZH, repeat=8),), global_batch_size=G)
    c.tasks.retrieval.neg_num = K
    tables, row = data.open_tables(c.data, c.tasks, tok), [f"{G}, {K}", str(G * (2 + K))]
    for d, groups in ((c.data, 1), (config.replace(c.data, mix="groups"), 32)):
      assemble, start = harness.timed(lambda: data.assembler(d, c.tasks, tables, row_multiple=8, groups=groups))
      row += [f"{start:.2f}", f"{harness.timed(lambda: [assemble(s) for s in range(20)])[1] / 20 * 1e3:.1f}"]
    rows.append(tuple(row))
  return rows


def main():
  p = harness.parser(__doc__, reps=5, threads=True)  # --reps: of the attention-share steps (0: skip it)
  p.add_argument("--data", default=",".join(list(DATA)[:2]), help=f"comma list of {', '.join(DATA)}")
  p.add_argument("--block", type=int, default=8, help="steps per turn when alternating the runs")
  p.add_argument("--model", default="minilm", help="minilm, or a piccolo_jax / sentence-transformers dir")
  p.add_argument("--limit", type=int, default=0, help="rows per dataset (0: all)")
  p.add_argument("--plan", action="store_true", help="only the planning cost: start-up and ms per batch")
  p.add_argument("--out", default=str(harness.ROOT / "BENCHMARKS.md"))
  args = p.parse_args()
  os.chdir(harness.ROOT)  # Data paths are relative.
  cfg, params, tok_dir = models.load_init(args.model)
  E = cfg.embed_dim
  tok, dims = encode.load_tokenizer(tok_dir), (E // 3, 2 * E // 3, E)
  load0 = os.getloadavg()[0]
  if args.plan:
    harness.report("Packing: planning cost (python -m bench.packing_bench --plan)", planning(tok),
                   [f"20 batches after start-up; load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end"],
                   {}, args.out)
    return
  rows, out = [("data", "run", "padding", "epoch s", "real tokens/s", "vs torch", "compile s", "programs",
                "attention MFLOP per real token")], {}
  for name in args.data.split(","):
    c = limited(DATA[name](), args.limit)
    r, out[name] = epoch(name, c, cfg, params, dims, tok, args.block, args.threads or os.cpu_count())
    rows += r
  t, RL, share = attention_share(cfg, params, dims, tok, args.reps, args.limit) if args.reps else ({}, {}, None)
  steps = ", ".join(f"{k}: {v['steps']} steps" for k, v in out.items())
  notes = [f"one epoch each ({steps}), global batch 32, "
           f"{args.model} fp32 with its dropout, MRL dims {dims}; the runs train the same batches (same rows and "
           f"negatives), alternating in turns of {args.block} steps, each turn after one untimed step",
           f"packed: data.pack_lengths={c.data.pack_lengths} row lengths a step (menus: "
           f"{'; '.join(f'{k}: {v}' for d in out.values() for k, v in d['menus'].items())}); "
           f"{ONE}: data.pack_lengths=1, the rows before issue 34; attention MFLOP per real token: the training "
           "FLOPs of the attention products computed (every row's L x L, padding and masked blocks included; "
           "piccolo_jax/flops.py) over the real tokens",
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
