"""Input-pipeline benchmark: batches/s vs the train step, and the padding share."""
import os

import jax
import numpy as np

from bench import harness, step as bench_step
from piccolo_jax import config, data, encode, model as model_lib, sharding, state as state_lib
from piccolo_jax.configs import demo

PADDING_DATA = (  # (name, datasets, epochs) of the padding table.
    ("piccolo example (retri+sts+cls)",
     tuple({"kind": "piccolo", "path": f"data/piccolo_example/{n}.dataset"} for n in ("retri", "sts", "cls")), 30),
    ("retrieval-zh (neg_num=1)", ({"kind": "jsonl", "path": "data/retrieval-zh/triplets.train.jsonl"},), 3))
FINE = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def rate(batches, n, warmup=0, step=lambda b: b):
  """Batches/s of n batches of an iterable after `warmup`, each fed to `step` (waited on at the end)."""
  it = iter(batches)
  for _ in range(warmup):
    next(it)
  _, s = harness.timed(lambda: jax.block_until_ready([step(next(it)) for _ in range(n)][-1]))
  getattr(it, "close", lambda: None)()
  return n / s


def padding(c, tables, epochs):
  """Padding share: (length buckets, longest per field per batch) over `epochs` epochs."""
  batcher, real, bucketed, longest = data.Batcher(c, tables), 0, 0, 0
  for step in range(epochs * batcher.steps_per_epoch):
    d, sel = batcher.select(step)
    lens = batcher.lengths(tables[d], sel)
    for _, slot, _, length in batcher.fields(tables[d].task, batcher.bucket(lens)):
      valid = sel["neg_valid"] if slot == "neg" else np.ones(lens[slot].shape, bool)
      real += lens[slot][valid].sum()
      bucketed += lens[slot].size * length
      longest += valid.sum() * lens[slot][valid].max()
  return 1 - real / bucketed, 1 - real / longest


def main():
  p = harness.parser(__doc__)
  p.add_argument("--batches", type=int, default=300)
  p.add_argument("--train_batches", type=int, default=30)
  p.add_argument("--out", default=str(harness.ROOT / "BENCHMARKS.md"))
  args = p.parse_args()
  tok = encode.load_tokenizer(state_lib.resolve_init("minilm"))
  os.chdir(harness.ROOT)  # The data configs' paths are relative.
  c = demo.get_config().data
  tables, startup = harness.timed(lambda: data.load_tables(c, tok))
  batcher = data.Batcher(c, tables)
  rows = [("pipeline: direct calls, 1 thread", rate(map(batcher, range(10**9)), args.batches, 10))]
  for threads, workers in ((2, 0), (1, 2), (2, 2)):
    it = data.make_iterator(config.replace(c, worker_threads=threads, worker_count=workers), tables)
    rows.append((f"pipeline: grain, {threads} read thread(s), {workers} worker processes", rate(it, args.batches, 10)))
  epoch = [batcher(s) for s in range(batcher.steps_per_epoch)]
  cfg = model_lib.Config()
  step, state, rngs, mesh = bench_step.train_step(cfg, state_lib.random_params(cfg, 0), (cfg.embed_dim,))
  holder, shapes = [state], {(b[1]["task"], b[1]["bucket"], b[1]["rows"]): b for b in epoch}

  def train_step(batch):  # The real jitted MiniLM-L6 train step (random weights), any task and bucket.
    holder[0], metrics = step(holder[0], sharding.put_batch(batch[0], mesh), rngs, mix=batch[1]["mix"])
    return metrics["loss"]

  _, compile_s = harness.timed(lambda: [train_step(b).block_until_ready() for b in shapes.values()])  # Each shape.
  n = min(args.train_batches, len(epoch))
  rows.append((f"train step alone: MiniLM-L6 fwd+bwd+adamw, jit ({len(shapes)} shapes compiled first in "
               f"{compile_s:.0f} s)", rate(epoch, n, step=train_step)))
  rows.append(("train step fed by the pipeline (grain, 2 threads)",
               rate(data.make_iterator(c, tables), n, step=train_step)))
  pads = [("data", "buckets (32..512)", f"buckets {FINE}", "pad to longest per field per batch (original)")]
  for name, ds, epochs in PADDING_DATA:
    pc = config.section("data", datasets=ds, global_batch_size=32)
    ts = data.load_tables(pc, tok)
    (bucketed, longest), (fine, _) = (padding(x, ts, epochs) for x in (pc, config.replace(pc, buckets=FINE)))
    pads.append((name, f"{bucketed:.1%}", f"{fine:.1%}", f"{longest:.1%}"))
  harness.emit([
      "## Input pipeline (python -m bench.data_bench)", "",
      f"Command: `{harness.command()}` on {harness.machine()}. configs/demo.py data: MiniLM tokenizer, "
      f"global batch {c.global_batch_size}, buckets {c.buckets}, {len(tables)} datasets, "
      f"{batcher.steps_per_epoch} steps/epoch. Start-up (open the prepared datasets, preparing them if missing): {startup:.1f} s.", "",
      *harness.table_md([("what", "batches/s")] + [(w, f"{r:.1f}" if w.startswith("pipeline") else f"{r:.2f}")
                                                   for w, r in rows]),
      "", "Padding share (padding tokens / all tokens; cls padding negatives count as padding), one global batch "
      "of 32, the original's max lengths (64/512):", "", *harness.table_md(pads), ""], args.out)


if __name__ == "__main__":
  main()
