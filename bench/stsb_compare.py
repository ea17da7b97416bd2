"""STS-B quality: piccolo_jax `--config=stsb` vs the sentence-transformers trainer, same recipe."""
import datetime
import pathlib
import subprocess
import sys

from bench import harness
from piccolo_jax import encode, evaluate
from piccolo_jax import models


def dev_spearman(encoder) -> float:
  """STS-B dev Spearman x100 of an Embedder or a function texts -> embeddings."""
  scores = evaluate.evaluate_tasks(encoder, ["sts:" + str(harness.ROOT / harness.STSB_DEV)])
  return next(v for k, v in scores.items() if k.startswith("sts-b-en/spearman@"))


def run_sentence_transformers(out_dir, seed):
  """The sentence-transformers trainer with the stsb recipe; returns the dev Spearman."""
  import datasets
  import sentence_transformers as st
  from sentence_transformers.losses import CoSENTLoss
  a, b, score = harness.read_stsb("data/sts-b-en/sts-b-en.train.tsv")
  train = datasets.Dataset.from_dict({"sentence1": a, "sentence2": b, "score": list(score / 5.0)})
  model = st.SentenceTransformer(models.resolve_init("minilm"), device="cpu")
  args = st.SentenceTransformerTrainingArguments(
      output_dir=str(out_dir), num_train_epochs=1, per_device_train_batch_size=16, learning_rate=2e-5,
      warmup_ratio=0.1, lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0, seed=seed,
      save_strategy="no", report_to="none", logging_steps=50, use_cpu=True)
  st.SentenceTransformerTrainer(model=model, args=args, train_dataset=train, loss=CoSENTLoss(model)).train()
  return dev_spearman(lambda texts: model.encode(texts, batch_size=64))


def run_piccolo_jax(workdir, seed):
  """`python -m piccolo_jax.train --config=stsb`; returns the dev Spearman of the exported model."""
  subprocess.run([sys.executable, "-m", "piccolo_jax.train", "--config=stsb", f"--workdir={workdir}",
                  f"--config.seed={seed}", "--config.eval.tasks=()"],  # The ST trainer evaluates nothing.
                 cwd=harness.ROOT, check=True)
  return dev_spearman(encode.Embedder.load(pathlib.Path(workdir) / "export"))


def main():
  p = harness.parser(__doc__)
  p.add_argument("--workdir", default="runs/stsb_compare")
  p.add_argument("--seeds", default="0", help="comma-separated seeds, each run by both trainers")
  args = p.parse_args()
  root = pathlib.Path(args.workdir).absolute() / f"{datetime.datetime.now():%Y%m%d-%H%M%S}"
  rows = [("seed", "piccolo_jax `--config=stsb`", "sentence-transformers trainer", "difference", "piccolo_jax s",
           "sentence-transformers s", "wall-clock ratio (ST / ours)")]
  for seed in map(int, args.seeds.split(",")):
    ours, t_ours = harness.timed(lambda: run_piccolo_jax(root / f"jax-seed{seed}", seed))
    theirs, t_theirs = harness.timed(lambda: run_sentence_transformers(root / f"st-seed{seed}", seed))
    rows.append((seed, f"{ours:.2f}", f"{theirs:.2f}", f"{ours - theirs:+.2f}", f"{t_ours:.0f}", f"{t_theirs:.0f}",
                 f"{t_theirs / t_ours:.2f}"))
    print(harness.table_md(rows)[-1], flush=True)
  harness.emit([
      "\n## STS-B fine-tuning quality: `--config=stsb` vs the sentence-transformers trainer\n",
      f"{datetime.date.today()}, {harness.machine()}, each seed run one trainer after the other: "
      f"`{harness.command()}`. Both start from all-MiniLM-L6-v2 (STS-B dev Spearman 86.72 before training) with "
      f"the same recipe (CoSENT scale 20, batch 16, 1 epoch, lr 2e-5, 10% warmup + linear decay, no weight decay, "
      f"clip 1.0, dropout 0.1) and are scored the same way (piccolo_jax.evaluate: Spearman of cosine on STS-B "
      f"dev, x100). Wall-clock includes start-up, compilation and export.\n", *harness.table_md(rows)],
      harness.ROOT / "BENCHMARKS.md")


if __name__ == "__main__":
  main()
