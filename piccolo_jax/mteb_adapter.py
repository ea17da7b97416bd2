"""Runs the official `mteb` package (e.g. C-MTEB tasks, which need network access) on a piccolo_jax model.

  import mteb
  from piccolo_jax.mteb_adapter import MtebEncoder
  model = MtebEncoder.load("runs/x/model", dim=256)  # or an exported sentence-transformers dir
  mteb.evaluate(model, mteb.get_tasks(tasks=["LCQMC", "T2Retrieval"]))

Works with mteb 1.x (`encode(sentences, **kwargs)`) and 2.x (`encode(DataLoader of {"text": [...]},
task_metadata=..., prompt_type=..., ...)`); mteb's other keyword arguments are accepted and ignored.
"""
import pathlib

import numpy as np

from piccolo_jax import encode
from piccolo_jax import search


def _texts(inputs) -> list[str]:
  """A list of strings (mteb 1.x) or an iterable of batches {"text": [...]} (mteb 2.x) -> texts."""
  if isinstance(inputs, str):
    return [inputs]
  inputs = list(inputs)
  if all(isinstance(t, str) for t in inputs):
    return inputs
  if all(isinstance(b, dict) and "text" in b for b in inputs):
    return [t for b in inputs for t in b["text"]]
  raise TypeError("expected a list of strings or batches with a 'text' field")


def _prompt_kind(prompt_type) -> str | None:
  return getattr(prompt_type, "value", prompt_type)


class MtebEncoder:
  """What mteb expects of an encoder: encode -> normalised float32 [N, dim], cosine similarity."""

  def __init__(self, embedder, *, dim=None, batch_size=64, query_prefix="", passage_prefix="", name=None):
    self.embedder, self.dim, self.batch_size = embedder, dim or embedder.dim, batch_size
    self.query_prefix, self.passage_prefix = query_prefix, passage_prefix
    self.name = name or "piccolo_jax/model"

  @classmethod
  def load(cls, model_dir, *, dtype=None, **kwargs) -> "MtebEncoder":
    kwargs.setdefault("name", f"piccolo_jax/{pathlib.Path(model_dir).resolve().name}")
    return cls(encode.Embedder.load(model_dir, dtype=dtype), **kwargs)

  def encode(self, inputs, *, prompt_type=None, batch_size=None, **unused) -> np.ndarray:
    """Embeds texts; prompt_type 'query'/'document' (or 'passage') selects the configured prefix."""
    del unused  # task_name, task_metadata, hf_split, hf_subset, show_progress_bar, ...
    kind = _prompt_kind(prompt_type)
    prefix = {"query": self.query_prefix, "document": self.passage_prefix,
              "passage": self.passage_prefix}.get(kind, "")
    texts = [prefix + t for t in _texts(inputs)]
    if not texts:
      return np.zeros((0, self.dim), np.float32)
    return self.embedder.encode(texts, batch_size=batch_size or self.batch_size, dim=self.dim)

  def similarity(self, a_ND, b_MD) -> np.ndarray:
    a_ND, b_MD = (np.atleast_2d(np.asarray(x, np.float32)) for x in (a_ND, b_MD))
    return search.normalize(a_ND) @ search.normalize(b_MD).T

  def similarity_pairwise(self, a_ND, b_ND) -> np.ndarray:
    a_ND, b_ND = (np.atleast_2d(np.asarray(x, np.float32)) for x in (a_ND, b_ND))
    return (search.normalize(a_ND) * search.normalize(b_ND)).sum(1)

  @property
  def mteb_model_meta(self):
    """mteb 2.x's ModelMeta (name, embed_dim, cosine); mteb is imported only here."""
    from mteb.models import ModelMeta
    return ModelMeta.create_empty(overwrites={"name": self.name, "revision": "local", "embed_dim": self.dim,
                                              "similarity_fn_name": "cosine", "framework": ["JAX"]})
