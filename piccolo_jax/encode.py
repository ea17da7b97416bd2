"""Batched encoding with a fixed set of shapes; CLI to embed a text file.

Usage: python -m piccolo_jax.encode MODEL_DIR --input texts.txt --output emb.npy
"""
import argparse
import pathlib
import tempfile

import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import AutoTokenizer

from piccolo_jax import config
from piccolo_jax import convert
from piccolo_jax import model as model_lib
from piccolo_jax import modeldir

DEFAULT_BUCKETS = config.BUCKETS


def bucket_length(n: int, buckets, max_length: int) -> int:
  """Smallest bucket >= n (capped at max_length)."""
  return min([b for b in buckets if b >= n] + [max_length])


def load_tokenizer(model_dir):
  return AutoTokenizer.from_pretrained(str(model_dir))


@nnx.jit
def _embed(model, ids_BL, mask_BL):
  return model(ids_BL, mask_BL)


class Embedder:
  """A model + tokenizer that encodes lists of texts to numpy embeddings."""

  def __init__(self, model: model_lib.Bert, tokenizer, buckets=DEFAULT_BUCKETS):
    self.model, self.tokenizer, self.buckets = model, tokenizer, tuple(sorted(buckets))
    self.model.eval()

  @classmethod
  def load(cls, model_dir, *, dtype=None, buckets=DEFAULT_BUCKETS) -> "Embedder":
    overrides = {"dtype": dtype} if dtype else {}
    return cls(modeldir.load_model(model_dir, **overrides), load_tokenizer(model_dir), buckets)

  @property
  def dim(self) -> int:
    return self.model.cfg.embed_dim

  def tokenize(self, texts, max_length):
    """Token ids per text (truncated, with special tokens, unpadded)."""
    return self.tokenizer(list(texts), truncation=True, max_length=max_length,
                          return_attention_mask=False, return_token_type_ids=False)["input_ids"]

  def encode(self, texts, *, batch_size=32, max_length=None, normalize=True, dim=None) -> np.ndarray:
    """Embeds texts -> float32 [N, dim or full dim], in input order.

    Texts are sorted by length and padded to a bucket length, and the last batch is padded
    to batch_size rows, so a run compiles at most len(buckets) shapes. `dim` keeps the first
    `dim` coordinates (Matryoshka) before the optional L2 normalisation.
    """
    max_length = max_length or self.model.cfg.max_seq_length
    dim = self._check_dim(dim)
    ids = self.tokenize(texts, max_length)
    order = np.argsort([-len(x) for x in ids], kind="stable")
    out = np.zeros((len(ids), dim), np.float32)
    for start in range(0, len(ids), batch_size):
      rows = order[start:start + batch_size]
      L = bucket_length(max(len(ids[i]) for i in rows), self.buckets, max_length)
      ids_BL = np.full((batch_size, L), self.model.cfg.pad_token_id, np.int32)
      mask_BL = np.zeros((batch_size, L), np.int32)
      for r, i in enumerate(rows):
        ids_BL[r, :len(ids[i])], mask_BL[r, :len(ids[i])] = ids[i], 1
      emb_BD = _embed(self.model, jnp.asarray(ids_BL), jnp.asarray(mask_BL))
      out[rows] = np.asarray(emb_BD[:len(rows), :dim])
    if normalize:
      out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out

  def _check_dim(self, dim):
    if dim is None:
      return self.dim
    if not 0 < dim <= self.dim:
      raise ValueError(f"dim {dim} out of range: the model's embeddings have {self.dim} dims")
    return dim


def load_embedder(model_dir, dtype=None) -> Embedder:
  """Embedder of a piccolo_jax model dir, or of a sentence-transformers / HF dir converted on the fly."""
  model_dir = pathlib.Path(model_dir)
  if (model_dir / modeldir.CONFIG_FILE).is_file():
    return Embedder.load(model_dir, dtype=dtype)
  if not any((model_dir / f).is_file() for f in ("modules.json", "config.json")):
    raise FileNotFoundError(f"{model_dir}: not a piccolo_jax model dir ({modeldir.CONFIG_FILE}) nor a "
                            "sentence-transformers or Hugging Face dir (modules.json / config.json)")
  with tempfile.TemporaryDirectory() as tmp:
    convert.convert(model_dir, pathlib.Path(tmp) / "model")
    return Embedder.load(pathlib.Path(tmp) / "model", dtype=dtype)


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m piccolo_jax.encode", description=__doc__.split("\n")[0])
  parser.add_argument("model_dir", help="piccolo_jax model directory (from convert or train)")
  parser.add_argument("--input", required=True, help="UTF-8 text file, one text per line")
  parser.add_argument("--output", required=True, help="output .npy file [N, dim] float32")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--max-length", type=int, default=None, help="default: the model's max_seq_length")
  parser.add_argument("--dim", type=int, default=None, help="Matryoshka dimension to keep")
  parser.add_argument("--no-normalize", action="store_true", help="skip L2 normalisation")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
  args = parser.parse_args(argv)
  try:
    texts = pathlib.Path(args.input).read_text(encoding="utf-8").splitlines()
    if not texts:
      raise ValueError(f"{args.input}: no texts (an empty file)")
    emb = Embedder.load(args.model_dir, dtype=args.dtype).encode(
        texts, batch_size=args.batch_size, max_length=args.max_length,
        normalize=not args.no_normalize, dim=args.dim)
  except (OSError, UnicodeDecodeError, ValueError) as e:
    parser.exit(2, f"error: {e}\n")
  np.save(args.output, emb)
  print(f"wrote {args.output}: {emb.shape[0]} x {emb.shape[1]} float32")


if __name__ == "__main__":
  main()
