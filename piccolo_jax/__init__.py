"""piccolo_jax: Piccolo2's multi-task embedding training in JAX / Flax NNX.

Map: config (schema) -> sources (formats -> rows) -> prepare (rows -> memory-mapped tokens, once)
-> data (plans, batches) -> sharding (host -> device) -> step (the jitted train step; task losses
from tasks + losses) -> train (loop, preemption, eval, export; CLI). Models: model, convert (PyTorch -> ours), modeldir
(model directories), export (-> sentence-transformers), encode, evaluate. state: init and optimizer;
checkpoint: the training CheckpointManager; gradcache: chunked exact gradients. How to add a task,
a data format, an eval kind or a config: docs/extending.md.

Shape suffixes (`q_BD`, `logits_BN`), everywhere:
  B batch rows (queries or pairs)   L tokens per text         D hidden / embedding width
  F MLP width                       H attention heads         E head dim (D = H * E)
  K negatives per query             M flat negatives (B * K)  N candidates per query (logits)
  Q queries, C corpus texts (eval)  T top-k hits              P positions, V vocabulary
  R packed rows (gradient caching: rows per chunk), S texts per packed row (gradient caching: chunks)
"""
