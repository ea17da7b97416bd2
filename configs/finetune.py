"""Piccolo2 fine-tuning of stella-mrl-large-zh-v3.5-1792d (BERT-large + Dense 1024->1792).

Our recipe: in-batch negatives over the whole global batch, one dataset a step, gradient clipping
1.0 and 5% warmup. configs/piccolo2.py is the original's step as released; README.md lists the
differences.

  python -m piccolo_jax.train --config=finetune --config.model.init=/path/to/stella \
      --config.data.datasets='({"kind": "meta", "path": "meta_lists/piccolo-ft.txt", "root": "data/"},)'
"""
from piccolo_jax import config


def get_config():
  c = config.base()
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.model.dense_out = 1792
  c.loss.mrl_dims = config.MRL_DIMS
  c.optim.lr = 1e-5
  c.optim.warmup_ratio = 0.05
  c.data.global_batch_size = 256
  c.tasks.retrieval.update(neg_num=1, query_max_len=64, passage_max_len=512)
  c.train.epochs = 3
  c.checkpoint.every = 1000
  return c
