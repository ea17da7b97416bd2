"""What merging buys on held-out data (piccolo_jax.merge): the demo recipe trained with 4 seeds, and their mean,
against each seed alone; a retrieval-only and an STS-only run, and their merges (mean, slerp, TIES over the
init, LM-Cocktail's --auto weights), against each run on both tasks. Held out as bench.recipe_compare's:
STS-B-zh valid and retrieval-zh rows 1200..1599."""
import datetime
import json
import pathlib
import subprocess
import sys

from bench import harness, recipe_compare
from piccolo_jax import encode, evaluate, merge
from piccolo_jax import models

DATA = {"retrieval": '({"kind": "jsonl", "path": "data/retrieval-zh/triplets.train.jsonl", "task": "retrieval", '
                     '"limit": 1024},)',
        "sts": '({"kind": "tsv", "path": "data/sts-b-zh/sts-b-zh.train.tsv", "task": "sts", "limit": 1024},)'}
AUTO = ["retrieval=jsonl:data/retrieval-zh/triplets.train.jsonl", "sts=tsv:data/sts-b-zh/sts-b-zh.train.tsv"]


def train(workdir, seed, *overrides):
  """A run of --config=demo (skipped when workdir holds a finished one)."""
  if not (workdir / "model").is_dir():
    subprocess.run([sys.executable, "-m", "piccolo_jax.train", "--config=demo", f"--workdir={workdir}",
                    f"--config.seed={seed}", "--config.eval.tasks=()", *overrides], cwd=harness.ROOT, check=True)
  return workdir / "model"


def merged(out, models, *args):
  if not (out / "model").is_dir():
    merge.main([str(out), *map(str, models), *args])
  return out / "model"


def score(model, tasks) -> dict:
  s = evaluate.evaluate_tasks(encode.Embedder.load(model), tasks, dims=(384,))
  return {"sts": s["sts-b-zh/spearman@384"], "ndcg": s["retrieval-heldout/ndcg_at_10@384"]}


def main():
  p = harness.parser(__doc__)
  p.add_argument("--workdir", default="runs/merge_quality")
  p.add_argument("--seeds", default="0,1,2,3")
  args = p.parse_args()
  root = pathlib.Path(args.workdir).absolute()
  tasks, seeds = recipe_compare.held_out(root), [int(s) for s in args.seeds.split(",")]
  rows, results = [("model", "STS-B-zh valid Spearman@384", "held-out retrieval nDCG@10@384")], {}

  def add(name, model):
    results[name] = score(model, tasks)
    rows.append((name, f"{results[name]['sts']:.2f}", f"{results[name]['ndcg']:.2f}"))
    print(harness.table_md(rows)[-1], flush=True)

  add("all-MiniLM-L6-v2 (the init)", models.resolve_init("minilm"))
  runs = [train(root / f"demo-seed{s}", s) for s in seeds]
  for s, m in zip(seeds, runs):
    add(f"demo, seed {s}", m)
  mean = lambda k: sum(results[f"demo, seed {s}"][k] for s in seeds) / len(seeds)
  rows.append(("demo, mean of the seeds' scores", f"{mean('sts'):.2f}", f"{mean('ndcg'):.2f}"))
  add(f"merge: mean of the {len(seeds)} seeds' parameters", merged(root / "merge-seeds", runs))
  steps = ["--config.train.max_steps=64", "--config.train.epochs=2"]
  single = {t: train(root / f"{t}-only", 0, f"--config.data.datasets={d}", *steps) for t, d in DATA.items()}
  for t, m in single.items():
    add(f"{t} only", m)
  pair = [single["retrieval"], single["sts"]]
  add("merge: mean 0.5 / 0.5", merged(root / "merge-mean", pair))
  add("merge: slerp t = 0.5", merged(root / "merge-slerp", pair, "--method", "slerp"))
  add("merge: TIES over the init (density 0.2)", merged(root / "merge-ties", pair, "--method", "ties", "--base",
                                                       "minilm", "--density", "0.2"))
  add("merge: task arithmetic over the init (1 + 1)", merged(root / "merge-task", pair, "--method", "task",
                                                             "--base", "minilm"))
  add("merge: --auto (8 rows of each training set)", merged(root / "merge-auto", pair, "--auto", *AUTO))
  auto_card = (root / "merge-auto" / "export" / "README.md").read_text()
  (root / "results.json").write_text(json.dumps(results, indent=1))
  harness.emit([f"\n{datetime.date.today()}, {harness.machine()}: `{harness.command()}`\n", *harness.table_md(rows),
                "", "--auto's sources, weights and example losses:", "",
                *[l for l in auto_card.splitlines() if l.startswith("|")]])


if __name__ == "__main__":
  main()
