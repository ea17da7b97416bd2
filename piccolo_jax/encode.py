"""Batched encoding with a fixed set of shapes, in bounded chunks; CLI to embed a text file.

Usage: python -m piccolo_jax.encode MODEL_DIR --input texts.txt --output emb.npy
"""
import argparse
import collections
import itertools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx
import transformers

from piccolo_jax import attention
from piccolo_jax import model as model_lib
from piccolo_jax import models
from piccolo_jax import packing
from piccolo_jax import search

DEFAULT_BUCKETS = (32, 64, 128, 256, 512)  # Row lengths: one compiled program per bucket.
CHUNK = 4096  # Texts tokenized at a time: the tokenizer holds ~21 KB per 110-token text (BENCHMARKS.md).


def bucket_length(n: int, buckets, max_length: int) -> int:
  """Smallest bucket >= n (capped at max_length)."""
  return min([b for b in buckets if b >= n] + [max_length])


def _multiples(lengths, block) -> tuple:
  """The lengths rounded up to multiples of block, sorted, once each."""
  return tuple(sorted({packing.round_up(n, block) for n in lengths}))


def load_tokenizer(model_dir):
  """model_dir's fast tokenizer; from its tokenizer.json where it has one, which skips AutoTokenizer's torch
  import (2 s of every process's start-up; the same token ids)."""
  if (pathlib.Path(model_dir) / "tokenizer.json").exists():
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(model_dir))
  return transformers.AutoTokenizer.from_pretrained(str(model_dir))


@nnx.jit
def _embed(model, ids_BL, mask_BL):
  return model(ids_BL, mask_BL)


@nnx.jit
def _embed_packed(model, *arrays):
  return model.packed(*arrays)


class Embedder:
  """A model + tokenizer that encodes texts to numpy embeddings."""

  def __init__(self, model: model_lib.Bert, tokenizer, buckets=DEFAULT_BUCKETS, packing=True):
    self.block = attention.block(model.cfg.attention)  # Row lengths: multiples of the attention kernel's block.
    self.model, self.tokenizer = model, tokenizer
    self.buckets = _multiples(buckets, self.block)
    self.packing = packing  # Several texts per row (see encode_to); False pads each text to its bucket.
    self.computed = 0  # Tokens the model has run on, padding included.
    self.model.eval()

  @classmethod
  def load(cls, spec, *, dtype=None, buckets=DEFAULT_BUCKETS, packing=True) -> "Embedder":
    """Embedder of a piccolo_jax model dir, a sentence-transformers / HF BERT dir (converted in memory) or
    'minilm' (models.load_init)."""
    cfg, params, tok_dir = models.load_init(str(spec))
    return cls.from_params(cfg.replace(dtype=dtype) if dtype else cfg, params, tok_dir, buckets, packing)

  @classmethod
  def from_params(cls, cfg, params, tok_dir, buckets=DEFAULT_BUCKETS, packing=True) -> "Embedder":
    """Embedder of a model config, its parameters (host or device arrays) and a tokenizer dir."""
    model = model_lib.abstract_model(cfg)
    nnx.update(model, jax.tree.map(jnp.asarray, params))
    nnx.reseed(model, default=0)
    return cls(model, load_tokenizer(tok_dir), buckets, packing)

  @property
  def dim(self) -> int:
    return self.model.cfg.embed_dim

  def tokenize(self, texts, max_length):
    """Token ids per text (truncated, with special tokens, unpadded)."""
    return self.tokenizer(list(texts), truncation=True, max_length=max_length,
                          return_attention_mask=False, return_token_type_ids=False)["input_ids"]

  def encode(self, texts, *, batch_size=32, max_length=None, normalize=True, dim=None, chunk=CHUNK) -> np.ndarray:
    """Embeds texts -> float32 [N, dim or full dim], in input order; see encode_to."""
    texts = list(texts)
    out_ND = np.empty((len(texts), self.check_dim(dim)), np.float32)
    self.encode_to(texts, out_ND, batch_size=batch_size, max_length=max_length, normalize=normalize, chunk=chunk)
    return out_ND

  def encode_to(self, texts, out_ND, *, batch_size=32, max_length=None, normalize=True, chunk=CHUNK,
                progress=None):
    """Embeds an iterable of N texts into out_ND [N, dim] (an array or np.memmap): row i for text i.

    Texts are tokenized `chunk` at a time. Packed (the default): the texts of a chunk and those left
    from the last are packed first-fit decreasing into rows of the buckets up to L tokens, L the smallest
    bucket that holds the longest of them, each text in the shortest that holds it (packing.py); every full
    batch of batch_size rows of a length is encoded and the texts of the rows left over wait for the next
    chunk. So a run compiles at most len(buckets) shapes and pads little. Unpacked: texts are queued by
    bucket length; a full queue is one batch of batch_size texts, so each text is padded to its own bucket only. Either way the queues left at the end are
    padded to batch_size rows, at most a chunk and a batch of texts' tokens are held, and each
    embedding is its text's alone. The first dim coordinates are kept (Matryoshka) before the
    optional L2 normalisation. progress: called with the number of texts of each batch done.
    """
    max_length = max_length or self.model.cfg.max_seq_length
    self.check_dim(out_ND.shape[1])
    if self.packing:
      queue = []  # [(output row, token ids)] not encoded yet
      for tokenized in self._tokenized(texts, len(out_ND), max_length, chunk):
        queue = self._encode_packed(queue + tokenized, out_ND, batch_size, max_length, normalize, progress)
      self._encode_packed(queue, out_ND, batch_size, max_length, normalize, progress, final=True)
      return
    queues = collections.defaultdict(list)  # bucket length -> [(row, token ids)]
    for tokenized in self._tokenized(texts, len(out_ND), max_length, chunk):
      for row, ids in tokenized:
        L = packing.round_up(bucket_length(len(ids), self.buckets, max_length), self.block)
        queues[L].append((row, ids))
        if len(queues[L]) == batch_size:
          self._encode_batch(L, queues[L], out_ND, batch_size, normalize, progress)
    for L, queue in queues.items():
      if queue:
        self._encode_batch(L, queue, out_ND, batch_size, normalize, progress)

  def _tokenized(self, texts, n_out, max_length, chunk):
    """[(output row, token ids)] of each `chunk` texts, checked against the n_out texts expected."""
    texts, n = iter(texts), 0
    for part in iter(lambda: list(itertools.islice(texts, chunk)), []):
      if n + len(part) > n_out:
        raise ValueError(f"more texts than the {n_out} output rows")
      yield list(enumerate(self.tokenize(part, max_length), n))
      n += len(part)
    if n != n_out:
      raise ValueError(f"{n} texts for {n_out} output rows")

  def _encode_packed(self, queue, out_ND, R, max_length, normalize, progress, final=False):
    """Packs queued (row, token ids) into rows, encodes each full batch of R rows (final: all of them)
    into out_ND; returns the queue of texts in the rows left over."""
    if not queue:
      return queue
    lens_N = np.array([len(ids) for _, ids in queue])
    L = packing.round_up(bucket_length(lens_N.max(), self.buckets, max_length), self.block)
    lengths = [b for b in self.buckets if b < L] + [L]
    packed, left_N = packing.Packed(lens_N, lengths, packing.SEGMENTS), np.ones(len(queue), bool)
    tokens = lambda sel: np.concatenate([queue[i][1] for i in sel])
    embed = lambda rows: np.asarray(_embed_packed(self.model, *map(jnp.asarray, rows)))
    for sel, emb_nD in packed.embedded([R] * len(lengths), tokens, embed, full_only=not final):
      self.computed += R * packed.lengths[packed.group_N[sel[0]]]
      self._write(out_ND, [queue[i][0] for i in sel], emb_nD[:, :out_ND.shape[1]], normalize, progress)
      left_N[sel] = False
    return [q for q, left in zip(queue, left_N) if left]

  @staticmethod
  def _write(out_ND, rows, emb_ND, normalize, progress):
    out_ND[rows] = search.normalize(emb_ND) if normalize else emb_ND
    if progress:
      progress(len(rows))

  def _encode_batch(self, L, queue, out_ND, batch_size, normalize, progress):
    """Encodes and empties a queue of (row, token ids) padded to [batch_size, L] into its rows of out_ND."""
    ids_BL = np.full((batch_size, L), self.model.cfg.pad_token_id, np.int32)
    mask_BL = np.zeros((batch_size, L), np.int32)
    for r, (_, ids) in enumerate(queue):
      ids_BL[r, :len(ids)], mask_BL[r, :len(ids)] = ids, 1
    emb_BD = np.asarray(_embed(self.model, jnp.asarray(ids_BL), jnp.asarray(mask_BL))[:len(queue), :out_ND.shape[1]])
    self.computed += ids_BL.size
    self._write(out_ND, [row for row, _ in queue], emb_BD, normalize, progress)
    queue.clear()

  def check_dim(self, dim) -> int:
    """dim (default: the full dim), checked against the model's."""
    if dim is None:
      return self.dim
    if not 0 < dim <= self.dim:
      raise ValueError(f"dim {dim} out of range: the model's embeddings have {self.dim} dims")
    return dim


def read_lines(path):
  """The lines of a UTF-8 text file without their ends (newline, CRLF or CR), one at a time."""
  with open(path, encoding="utf-8") as f:
    for line in f:
      yield line.rstrip("\n")


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m piccolo_jax.encode", description=__doc__.split("\n")[0])
  parser.add_argument("model_dir", help="piccolo_jax model directory (from convert or train)")
  parser.add_argument("--input", required=True, help="UTF-8 text file, one text per line (read line by line)")
  parser.add_argument("--output", required=True, help="output .npy file [N, dim] float32 (written as it goes)")
  parser.add_argument("--batch-size", type=int, default=32, help="rows per model call (packed, a row holds "
                      "several texts)")
  parser.add_argument("--no-packing", action="store_true", help="one text per row, padded to its length bucket")
  parser.add_argument("--max-length", type=int, default=None, help="default: the model's max_seq_length")
  parser.add_argument("--dim", type=int, default=None, help="Matryoshka dimension to keep")
  parser.add_argument("--no-normalize", action="store_true", help="skip L2 normalisation")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
  parser.add_argument("--chunk", type=int, default=CHUNK, help="texts tokenized and length-sorted at a time")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.output if args.output.endswith(".npy") else args.output + ".npy")  # As np.save.
  partial = out.with_name(out.name + ".partial")  # Renamed to `out` once complete.
  try:
    n = sum(1 for _ in read_lines(args.input))  # Sizes the output; decoding errors surface before the model loads.
    if not n:
      raise ValueError(f"{args.input}: no texts (an empty file)")
    embedder = Embedder.load(args.model_dir, dtype=args.dtype, packing=not args.no_packing)
    emb_ND = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(n, embedder.check_dim(args.dim)))
    with tqdm.tqdm(total=n, unit="text", file=sys.stderr, desc="encode") as bar:
      embedder.encode_to(read_lines(args.input), emb_ND, batch_size=args.batch_size, max_length=args.max_length,
                         normalize=not args.no_normalize, chunk=args.chunk, progress=bar.update)
    emb_ND.flush()
    partial.replace(out)
  except (OSError, UnicodeDecodeError, ValueError) as e:
    parser.exit(2, f"error: {e}\n")
  finally:
    partial.unlink(missing_ok=True)
  print(f"wrote {out}: {emb_ND.shape[0]} x {emb_ND.shape[1]} float32")


if __name__ == "__main__":
  main()
