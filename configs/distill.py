"""Embedding distillation (Jasper/Stella losses): a 3-layer student of all-MiniLM-L6-v2 learns the 6-layer
model's embeddings of the bundled STS-B-en sentences. Minutes on a CPU; docs/distillation.md.

  python -m piccolo_jax.train --config=distill --workdir=runs/distill
"""
from piccolo_jax import config


def get_config():
  c = config.base()
  c.model.init = "minilm"  # The student: these layers of all-MiniLM-L6-v2.
  c.model.keep_layers = (0, 2, 4)
  c.data.datasets = ({"kind": "text", "path": "data/sts-b-en/sentences.train.txt", "task": "distill"},)
  c.data.global_batch_size = 64
  c.data.pack_length = 256
  c.tasks.distill.update(teacher="minilm", query_max_len=64)
  c.loss.mrl_dims = (384,)
  c.optim.lr = 2e-3  # STS-B dev after 200 steps: 78.3 at 1e-4, 81.9 at 5e-4, 83.2 at 2e-3 (BENCHMARKS.md).
  c.optim.warmup_ratio = 0.1
  c.optim.freeze = ()
  c.train.max_steps = 600  # ~3.6 epochs
  c.train.log_every = 20
  c.checkpoint.every = 200
  c.eval.tasks = ("sts:data/sts-b-en/sts-b-en.dev.tsv",)
  c.eval.dims = (384,)
  return c
