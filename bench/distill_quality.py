"""Distillation quality: a pruned student distilled by piccolo_jax `--config=distill` vs sentence-transformers'
layer-reduction recipe (model_distillation_layer_reduction.py: MSELoss to the teacher's embeddings)."""
import datetime
import pathlib
import subprocess
import sys

import numpy as np

from bench import harness
from bench.stsb_compare import dev_spearman
from piccolo_jax import models
from piccolo_jax import sources
from piccolo_jax.configs import distill


def score(model) -> float:
  """STS-B dev Spearman x100 of a SentenceTransformer, as loaded (its own max_seq_length)."""
  return dev_spearman(lambda texts: model.encode(texts, batch_size=64))


def load(path, cap=0):
  import sentence_transformers as st
  model = st.SentenceTransformer(str(path), device="cpu")
  if cap:
    model.max_seq_length = cap
  return model


def pruned(c):
  """The student: c.model.init with only the encoder layers c.model.keep_layers, as the recipe builds it."""
  import torch
  model = load(models.resolve_init(c.model.init), c.tasks.distill.query_max_len)
  auto = model[0].auto_model
  auto.encoder.layer = torch.nn.ModuleList([auto.encoder.layer[i] for i in c.model.keep_layers])
  auto.config.num_hidden_layers = len(c.model.keep_layers)
  return model


def warmup_steps(c, steps) -> int:
  """The warmup steps as piccolo_jax counts them (the HF trainer would round warmup_ratio up)."""
  return c.optim.warmup_steps if c.optim.warmup_steps >= 0 else int(c.optim.warmup_ratio * steps)


def run_sentence_transformers(c, texts, teacher_emb, steps, out_dir, seed, lr):
  """The recipe's SentenceTransformerTrainer with MSELoss on the config's hyperparameters (lr: its own);
  the trained student."""
  import datasets
  import sentence_transformers as st
  from sentence_transformers.losses import MSELoss
  student = pruned(c)
  train = datasets.Dataset.from_dict({"sentence": texts, "label": teacher_emb.tolist()})
  args = st.SentenceTransformerTrainingArguments(
      output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=c.data.global_batch_size,
      learning_rate=lr, warmup_steps=warmup_steps(c, steps), lr_scheduler_type="linear",
      weight_decay=c.optim.weight_decay, max_grad_norm=c.optim.clip_norm or 1e9, seed=seed, save_strategy="no",
      report_to="none", logging_steps=50, use_cpu=True, dataloader_drop_last=True)
  st.SentenceTransformerTrainer(model=student, args=args, train_dataset=train, loss=MSELoss(student)).train()
  return student


def run_piccolo_jax(workdir, seed, steps):
  """`python -m piccolo_jax.train --config=distill`, no in-run eval, its own prepared dir: the teacher's
  embeddings are computed in every run, as the recipe's are."""
  subprocess.run([sys.executable, "-m", "piccolo_jax.train", "--config=distill", f"--workdir={workdir}",
                  f"--config.seed={seed}", f"--config.train.max_steps={steps}", "--config.eval.tasks=()",
                  f"--config.data.prepared_dir={workdir}-prepared"], cwd=harness.ROOT, check=True)


def row(seed, teacher, before, ours, theirs, t_ours, t_st) -> tuple:
  return (seed, f"{teacher:.2f}", f"{before:.2f}", f"{ours:.2f}", *(f"{x:.2f}" for x in theirs),
          f"{ours - max(theirs):+.2f}", f"{ours - teacher:+.2f}", f"{t_ours:.0f}", *(f"{t:.0f}" for t in t_st))


def main():
  p = harness.parser(__doc__)
  p.add_argument("--workdir", default="runs/distill_quality")
  p.add_argument("--seeds", default="0,1", help="comma-separated seeds, each run by both trainers")
  p.add_argument("--steps", type=int, default=0, help="training steps of both (default: the config's)")
  p.add_argument("--st-lrs", default="", help="comma-separated learning rates of sentence-transformers' runs, "
                 "each a column (default: the config's lr)")
  args = p.parse_args()
  c = distill.get_config()
  cap, batch = c.tasks.distill.query_max_len, c.data.global_batch_size
  texts = [t for _, t in sources.lines(harness.ROOT / c.data.datasets[0]["path"])]
  steps = args.steps or c.train.max_steps or c.train.epochs * (len(texts) // batch)
  root = pathlib.Path(args.workdir).absolute() / f"{datetime.datetime.now():%Y%m%d-%H%M%S}"
  teacher = load(models.resolve_init(c.tasks.distill.teacher))
  teacher_score, before = score(teacher), score(pruned(c))
  teacher.max_seq_length = cap
  teacher_emb, t_emb = harness.timed(lambda: teacher.encode(texts, batch_size=64, convert_to_numpy=True))
  print(f"teacher {teacher_score:.2f}, pruned student {before:.2f}; teacher embeddings {t_emb:.0f} s", flush=True)
  lrs = [float(x) for x in args.st_lrs.split(",")] if args.st_lrs else [c.optim.lr]
  st_cols = [f"ST after (lr {lr:g})" for lr in lrs]
  rows, results = [("seed", "teacher", "student before", "ours after", *st_cols, "ours - best ST",
                    "ours - teacher", "ours s", *(f"ST s (lr {lr:g})" for lr in lrs))], []
  for seed in map(int, args.seeds.split(",")):
    _, t_ours = harness.timed(lambda: run_piccolo_jax(root / f"jax-seed{seed}", seed, steps))
    ours, theirs, t_st = score(load(root / f"jax-seed{seed}" / "export")), [], []
    for lr in lrs:
      student, t = harness.timed(lambda: run_sentence_transformers(  # pylint: disable=cell-var-from-loop
          c, texts, teacher_emb, steps, root / f"st-seed{seed}-lr{lr:g}", seed, lr))
      theirs.append(score(student))
      t_st.append(t + t_emb)
    results.append([ours, *theirs, t_ours, *t_st])
    rows.append(row(seed, teacher_score, before, ours, theirs, t_ours, t_st))
    print(harness.table_md(rows)[-1], flush=True)
  mean = np.mean(results, axis=0)
  n = len(lrs)
  rows.append(row("mean", teacher_score, before, mean[0], mean[1:1 + n], mean[1 + n], mean[2 + n:]))
  keep = ", ".join(map(str, c.model.keep_layers))
  harness.emit([
      "\n## Distillation quality: `--config=distill` vs sentence-transformers' layer-reduction recipe\n",
      f"{datetime.date.today()}, {harness.machine()}, each seed run one trainer after the other: "
      f"`{harness.command()}`. Teacher {c.tasks.distill.teacher}; student {c.model.init} keeping encoder layers "
      f"({keep}), trained on the teacher's embeddings of the {len(texts)} sentences of "
      f"{c.data.datasets[0]['path']}: {steps} steps of batch {batch}, lr {c.optim.lr} (ST: as its columns say), "
      f"{warmup_steps(c, steps)} "
      f"warmup steps + linear decay, weight decay {c.optim.weight_decay}, clip {c.optim.clip_norm or 'off'}, "
      f"{cap} tokens. Losses: ours `tasks.distill` (cosine {c.tasks.distill.cosine}, similarity matrix "
      f"{c.tasks.distill.similarity}, relative {c.tasks.distill.relative}), theirs MSELoss. Scores: STS-B dev "
      f"Spearman of cosine x100 (piccolo_jax.evaluate), every model loaded as a sentence-transformers model on "
      f"CPU. Seconds: wall-clock of training, both including the teacher's embeddings of the training sentences "
      f"(ST: {t_emb:.0f} s, computed once and added to each seed); ours also start-up, compilation and export.\n",
      *harness.table_md(rows)],
      harness.ROOT / "BENCHMARKS.md")


if __name__ == "__main__":
  main()
