"""A tiny random Qwen3-shape decoder with LoRA on bundled data: the decoder path's mechanics on a CPU, in minutes.

It learns little (a random base under rank-8 adapters); configs/qwen3_lora.py is the real run. MiniLM's tokenizer
stands in for Qwen's (no download); its [SEP] is the last token that pooling reads, as Qwen3-Embedding's appended
<|endoftext|>. Run it from the repository root:

  python -m piccolo_jax.train --config=decoder_tiny --workdir=runs/decoder-tiny
"""
from piccolo_jax import config
from piccolo_jax import models


def get_config():
  c = config.base()
  c.model.init = ""
  c.model.tokenizer = models.resolve_init("minilm")
  c.model.arch = dict(family="qwen3", vocab_size=30522, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, intermediate_size=128, max_position=512, pad_token_id=0)
  c.model.lora.update(rank=8, alpha=16.0)
  c.data.datasets = (
      {"kind": "jsonl", "path": "data/retrieval-zh/triplets.train.jsonl", "task": "retrieval", "limit": 256,
       "instruction": "Given a web search query, retrieve relevant passages that answer the query"},
      {"kind": "tsv", "path": "data/sts-b-zh/sts-b-zh.train.tsv", "task": "sts", "limit": 256},
  )
  c.data.global_batch_size = 32
  c.tasks.retrieval.update(query_max_len=48, passage_max_len=64)
  c.tasks.sts.update(query_max_len=32, passage_max_len=32)
  c.loss.mrl_dims = (32, 64)
  c.optim.update(lr=1e-2, warmup_ratio=0.1)
  c.train.update(epochs=2, log_every=4)
  c.checkpoint.every = 8
  c.eval.tasks = ("sts:data/sts-b-zh/sts-b-zh.valid.tsv",)
  return c
