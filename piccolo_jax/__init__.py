"""piccolo_jax: Piccolo2's multi-task embedding training in JAX / Flax NNX.

Map (README.md "Layout"; docs/training.md): config (schema), cli, tasks (registry) -> sources (formats ->
rows) -> prepare (rows -> memory-mapped tokens, once) -> plan (which rows each step trains) -> batch (the
Batch contract, packed) -> data (grain loader) -> sharding (host -> device) -> step (the jitted step) ->
train (the loop). Models: model, convert, modeldir, export, encode, evaluate. How to extend: docs/extending.md.

Shape suffixes (`q_BD`, `logits_BN`), everywhere:
  B batch rows (queries or pairs)   L tokens per text         D hidden / embedding width
  F MLP width                       H attention heads         E head dim (D = H * E)
  K negatives per query             M flat negatives (B * K)  N candidates per query (logits)
  Q queries, C corpus texts (eval)  T top-k hits              P positions, V vocabulary
  R packed rows (gradient caching: rows per chunk), S texts per packed row (gradient caching: chunks)
"""
