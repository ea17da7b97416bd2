"""Quality of hard negatives: configs/demo.py restricted to retrieval-zh, trained with (a) its given negatives,
(b) negatives mined by piccolo_jax.mine from the base model, (c) the mined ones re-mined during training
(refresh.every), each (d) with in-batch false-negative masking (tasks.retrieval.false_negatives=
model), (e) the mined ones plus the KL to the base model's scores of them (`mine --scores`,
tasks.retrieval.kl_weight=1), (f) none (neg_num=0); each scored by piccolo_jax.evaluate on retrieval-zh rows held
out from training (their queries, positives and given negatives)."""
import datetime
import json
import pathlib
import subprocess
import sys

import numpy as np

from bench import harness
from piccolo_jax import models

DATA = harness.ROOT / "data/retrieval-zh/triplets.train.jsonl"
REFRESH, FN = ("--config.refresh.every=20",), ("--config.tasks.retrieval.false_negatives=model",)
VARIANTS = {"given": ("train.jsonl", 1, ()), "mined": ("mined.jsonl", 1, ()), "refreshed": ("mined.jsonl", 1, REFRESH),
            "given+fn": ("train.jsonl", 1, FN), "mined+fn": ("mined.jsonl", 1, FN),
            "refreshed+fn": ("mined.jsonl", 1, REFRESH + FN),
            "mined+kl": ("mined.jsonl", 1, ("--config.tasks.retrieval.kl_weight=1.0",)), "none": ("train.jsonl", 0, ())}
DEFAULT = "given,mined,refreshed,given+fn,mined+fn,refreshed+fn"
METRICS = ("ndcg_at_10", "mrr_at_10", "recall_at_10")


def run(args, log):
  """`python ARGS` from the repository root, output to log; raises on failure."""
  with open(log, "w", encoding="utf-8") as f:
    subprocess.run([sys.executable, *args], cwd=harness.ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)


def split(root, train_rows):
  """root/train.jsonl (the first train_rows rows) and root/heldout.jsonl (the rest)."""
  lines = DATA.read_text(encoding="utf-8").splitlines(keepends=True)
  (root / "train.jsonl").write_text("".join(lines[:train_rows]), encoding="utf-8")
  (root / "heldout.jsonl").write_text("".join(lines[train_rows:]), encoding="utf-8")
  return len(lines) - train_rows


def overlap(root) -> str:
  """How much of the held-out rows' text also occurs in the training rows (the data repeats sentences)."""
  rows = {f: [json.loads(x) for x in (root / f"{f}.jsonl").open(encoding="utf-8")] for f in ("train", "heldout")}
  queries = {r["query"] for r in rows["train"]}
  texts = {t for r in rows["train"] for t in (r["query"], *r["pos"], *r["neg"])}
  held = {t for r in rows["heldout"] for t in (*r["pos"], *r["neg"])}
  return (f"{sum(r['query'] in queries for r in rows['heldout'])} held-out queries are also training queries and "
          f"{sum(r['query'] in texts for r in rows['heldout'])} occur among the training rows' texts; "
          f"{len(held & texts)} of the {len(held)} held-out corpus texts do")


def evaluate(model, root, name, dims) -> dict:
  """Held-out retrieval metrics of a model dir."""
  out = root / f"eval-{name}.json"
  run(["-m", "piccolo_jax.evaluate", str(model), "--task", f"heldout=retrieval:{root / 'heldout.jsonl'}",
       "--dims", dims, "--output", str(out)], root / f"eval-{name}.log")
  return json.loads(out.read_text())["metrics"]


def train(root, variant, seed) -> pathlib.Path:
  data, neg_num, flags = VARIANTS[variant]
  workdir = root / f"{variant}-seed{seed}"
  entry = {"kind": "jsonl", "path": str(root / data), "task": "retrieval"}
  run(["-m", "piccolo_jax.train", "--config=demo", f"--workdir={workdir}", f"--config.seed={seed}",
       f"--config.data.datasets=({entry!r},)", f"--config.tasks.retrieval.neg_num={neg_num}", "--config.eval.tasks=()",
       "--config.eval.best_metric=", *flags], root / f"train-{variant}-seed{seed}.log")
  return workdir / "export"


def main():
  p = harness.parser(__doc__, append=True)
  p.add_argument("--workdir", default="runs/mine_quality")
  p.add_argument("--seeds", default="0,1,2,3")
  p.add_argument("--train-rows", type=int, default=1800, help="first rows trained on; the rest are held out")
  p.add_argument("--dims", default="128,384")
  p.add_argument("--mine-args", default="", help="extra piccolo_jax.mine flags, space-separated")
  p.add_argument("--variants", default=DEFAULT, help=f"training variants run, comma list of {', '.join(VARIANTS)}")
  args = p.parse_args()
  root = pathlib.Path(args.workdir).absolute() / f"{datetime.datetime.now():%Y%m%d-%H%M%S}"
  root.mkdir(parents=True)
  held = split(root, args.train_rows)
  (_, mine_s) = harness.timed(lambda: run(["-m", "piccolo_jax.mine", "minilm", "--input", str(root / "train.jsonl"),
                                           "--output", str(root / "mined.jsonl"), "--scores",
                                           *args.mine_args.split()],
                                          root / "mine.log"))
  stats = json.loads((root / "mined.stats.json").read_text())
  results = {("base model", "-"): evaluate(_minilm(), root, "base", args.dims)}  # Not trained.
  for seed in map(int, args.seeds.split(",")):
    for variant in args.variants.split(","):
      model, s = harness.timed(lambda: train(root, variant, seed))
      results[variant, seed] = evaluate(model, root, f"{variant}-seed{seed}", args.dims) | {"train_s": s} | \
          run_facts(model.parent)
      print(variant, seed, {k: round(v, 2) for k, v in results[variant, seed].items()}, flush=True)
  report(args, root, held, stats, mine_s, results)


def run_facts(workdir) -> dict:
  """Means over a run's steps of the in-batch candidates masked (%), and its refreshes' seconds in all."""
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
  steps = [r for r in rows if "task" in r]
  mean = lambda k: 100 * sum(r.get(k, 0.0) for r in steps) / max(len(steps), 1)
  return {"dup_pct": mean("retrieval/masked_duplicates"), "fn_pct": mean("retrieval/masked_false_negatives"),
          "refresh_s": sum(r.get("refresh/seconds", 0.0) for r in rows)}


def _minilm() -> str:
  return models.resolve_init("minilm")


def report(args, root, held, stats, mine_s, results):
  dims = args.dims.split(",")
  keys = [f"heldout/{m}@{d}" for d in dims for m in METRICS]
  head = ["training negatives", "seed"] + [k.split("/")[1] for k in keys] + ["dup %", "fn %", "refresh s", "train s"]
  facts = lambda r: [f"{r['dup_pct']:.2f}", f"{r['fn_pct']:.1f}", f"{r['refresh_s']:.0f}", f"{r['train_s']:.0f}"]
  rows = [head]
  for (variant, seed), r in results.items():
    rows.append([variant, seed] + [f"{r[k]:.2f}" for k in keys] + (facts(r) if "train_s" in r else [""] * 4))
  seeds = sorted({s for _, s in results if s != "-"})
  for variant in args.variants.split(","):
    vals = lambda key: np.array([results[variant, s][key] for s in seeds])  # pylint: disable=cell-var-from-loop
    spread = lambda x: f" ± {x.std(ddof=1):.2f}" if len(x) > 1 else ""
    rows.append([f"**{variant}, mean ± sd**", ",".join(map(str, seeds))] +
                [f"{vals(k).mean():.2f}{spread(vals(k))}" for k in keys] +
                [f"{vals(k).mean():.{n}f}"
                 for k, n in (("dup_pct", 2), ("fn_pct", 1), ("refresh_s", 0), ("train_s", 0))])
  harness.emit([
      "\n### Hard negatives: held-out retrieval after training (python -m bench.mine_quality)\n",
      f"{datetime.date.today()}, {harness.machine()}. Command: `{harness.command()}` (outputs in {root}).\n",
      f"configs/demo.py with only retrieval-zh's first {args.train_rows} rows as data (neg_num 1, or 0 for 'none'; "
      f"1 epoch, batch 32, all-MiniLM-L6-v2 init), scored on the other {held} rows (corpus: their positives and given "
      f"negatives; {overlap(root)}). Mined: `python -m piccolo_jax.mine minilm --scores {args.mine_args}` on the "
      f"training rows only (corpus {stats['corpus']} texts: their positives and given negatives), {mine_s:.0f} s; "
      f"{stats['negatives'] / stats['rows']:.1f} negatives per row, {stats['rows_without']} rows left without any "
      f"(they train on in-batch negatives), {stats['filtered']} candidates removed by the filter; best positive's rank "
      f"{stats['positive_rank']}. 'dup %' and 'fn %': the in-batch candidates masked as a copy of the row's "
      "positive and as false negatives, mean over the run's steps; 'refresh s': its refreshes' time in all.\n",
      *harness.table_md(rows)], args.append)


if __name__ == "__main__":
  main()
