"""A 2-layer, 32-wide random BERT on small slices of the bundled data, all three tasks."""
import pathlib

from piccolo_jax import config
from piccolo_jax import models

DATA = pathlib.Path(__file__).resolve().parent.parent / "data"


def get_config():
  c = config.base()
  c.model.init = ""
  c.model.tokenizer = models.resolve_init("minilm")
  c.model.arch = dict(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
  c.model.dropout = 0.1
  c.data.datasets = (
      {"kind": "jsonl", "path": str(DATA / "retrieval-zh/triplets.train.jsonl"), "task": "retrieval", "limit": 32},
      {"kind": "tsv", "path": str(DATA / "sts-b-en/sts-b-en.train.tsv"), "task": "sts", "limit": 32},
      {"kind": "piccolo", "path": str(DATA / "piccolo_example/cls.dataset"), "limit": 32},
  )
  c.data.global_batch_size = 16
  c.tasks.retrieval.update(query_max_len=32, passage_max_len=64)
  c.tasks.sts.update(query_max_len=32, passage_max_len=32)
  c.tasks.cls.update(query_max_len=64, passage_max_len=64, neg_num=4)
  c.loss.mrl_dims = (16, 32)
  c.optim.update(lr=3e-3, warmup_steps=0)
  c.train.update(epochs=4, log_every=1)
  c.checkpoint.every = 1000
  return c
