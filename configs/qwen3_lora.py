"""Piccolo2's recipe on a decoder embedder with LoRA: Qwen3-Embedding (0.6B, 4B or 8B) from its Hugging Face or
sentence-transformers directory, causal attention and last-token pooling as it was trained, rank-16 adapters on every
projection (the base frozen in bfloat16), parameters sharded over 8 devices.

  python -m piccolo_jax.train --config=qwen3_lora --config.model.init=/path/to/Qwen3-Embedding-0.6B \\
      --config.data.datasets='({"kind": "meta", "path": "meta_lists/piccolo-ft.txt", "root": "data/"},)'

A dataset entry's `instruction` is its query prefix in Qwen3-Embedding's format ("Instruct: ...\\nQuery:") and
becomes a prompt of the export. README.md, "Decoder embedders", gives the memory per device of each size.
"""
from piccolo_jax import config


def get_config():
  c = config.base()
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.model.lora.update(rank=16, alpha=32.0, dropout=0.05)
  c.mesh.fsdp = 8
  c.loss.mrl_dims = (256, 512, 768, 1024)  # 0.6B's 1024 dims; 4B: up to 2560, 8B: up to 4096.
  c.optim.update(lr=1e-4, warmup_ratio=0.05)
  c.data.global_batch_size = 256
  # Qwen3-Embedding's default retrieval instruction; passages take none.
  c.tasks.retrieval.update(neg_num=7, query_max_len=64, passage_max_len=512, query_prefix=(
      "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"))
  c.train.epochs = 1
  c.checkpoint.every = 500
  return c
