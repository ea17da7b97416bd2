"""Defaults shared by every config; each config file edits a copy."""
import ml_collections

MRL_DIMS = (256, 512, 768, 1024, 1280, 1536, 1792)


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Initialisation, dropout and data order (data.seed follows it).
  c.model = dict(
      init="",  # sentence-transformers/HF BERT dir or piccolo_jax model dir ("" = random init).
      tokenizer="",  # tokenizer dir for random init (default: the init dir).
      arch=ml_collections.ConfigDict(dict(  # Random init only.
          vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536)),
      dtype="float32",  # Compute dtype; parameters and optimizer state stay float32.
      remat=False,
      dropout=-1.0,  # -1 keeps the checkpoint's; 0 turns dropout off.
      dense_out=0,  # Scaling layer output dim; 0 keeps the checkpoint's (new ones start random).
      max_position=0,  # > checkpoint's 512 extends position embeddings.
      position_extension="tile",  # tile | hierarchical
  )
  c.data = dict(
      datasets=(), global_batch_size=32, neg_num=1, cls_neg_num=10, query_prefix="",
      passage_prefix="", query_max_len=64, passage_max_len=512, cls_query_max_len=512,
      sts_max_len=64, sts_pair_max_len=512, buckets=(32, 64, 128, 256, 512), strict=False,
      worker_count=0, worker_threads=2, prefetch=4, seed=c.get_ref("seed"))
  c.loss = dict(
      mrl_dims=MRL_DIMS, mrl_weights=None,
      retrieval=dict(temperature=0.01, weight=1.0),
      sts=dict(temperature=0.05, weight=0.04),
      cls=dict(temperature=0.05, weight=0.2))
  c.optim = dict(
      lr=1e-5, warmup_ratio=0.0, warmup_steps=-1, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
      clip_norm=1.0, grad_accum=1, freeze=("embeddings/position",))
  c.train = dict(epochs=3, max_steps=0, log_every=10, chunk_size=0)  # chunk_size > 0: gradient caching.
  c.mesh = dict(fsdp=1)
  c.checkpoint = dict(every=1000, keep=3, dir="")  # dir: default WORKDIR/checkpoints; may be gs://
  c.eval = dict(tasks=(), every=0, dims=(), batch_size=64, best_metric="")
  c.export = dict(truncate_dim=0)
  return c
