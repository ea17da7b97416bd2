"""The original Piccolo2 recipe as released (hjq133/piccolo-embedding, scripts/ft.sh on 32 GPUs).

Every loss is taken on each of 32 groups of 8 rows, as each GPU did, and averaged (DDP); every group
draws its own dataset, so one step mixes tasks; no gradient clipping (its DeepSpeed config has none),
no warmup, and no masking of duplicate positives among in-batch candidates. Everything else is
configs/finetune.py; README.md lists the differences.

  python -m piccolo_jax.train --config=piccolo2 --config.model.init=/path/to/stella \
      --config.data.datasets='({"kind": "meta", "path": "meta_lists/piccolo-ft.txt", "root": "data/"},)'
"""
from piccolo_jax.configs import finetune


def get_config():
  c = finetune.get_config()
  c.loss.groups = 32  # 32 GPUs x 8 rows.
  c.data.mix = "groups"
  c.optim.clip_norm = 0.0
  c.optim.warmup_ratio = 0.0
  c.tasks.retrieval.mask_duplicates = False  # The original counts a copy of a row's positive as its negative.
  return c
