"""Gradient caching (Gao et al. 2021): the exact full-batch gradient of an embedding loss in one chunk's memory.

The loss needs every embedding of the global batch at once (in-batch negatives), but the
encoder's activations are only needed chunk by chunk. So: (1) embed all texts in chunks,
keeping no activations; (2) take the loss and its gradient with respect to the embeddings
on the whole batch; (3) re-run each chunk's forward pass under `jax.vjp` and pull its slice
of the cached embedding gradient back to the parameters, summing over chunks. Passes 1 and 3
are `lax.map`/`lax.scan` loops, so peak memory is one chunk's activations. The price: one more
forward pass, and under data parallelism one gradient all-reduce per chunk instead of per step.
"""
import jax
import jax.numpy as jnp
from flax import nnx


def chunk_key(key, field_index, chunk):
  """The dropout key of one chunk: the same in the forward pass and in its replay."""
  return jax.random.fold_in(jax.random.fold_in(key, field_index), chunk)


def _rows_per_chunk(field, n, chunk_size, num_devices):
  """chunk_size (a field with fewer rows is one chunk), checked against n rows and the devices."""
  c = min(chunk_size, n)
  if chunk_size < 1 or n % c or c % num_devices:
    raise ValueError(f"gradcache: chunk_size {chunk_size} does not fit field {field!r} of {n} rows on "
                     f"{num_devices} devices: it must divide the rows and be a multiple of the devices")
  return c


def split(x_N, c):
  """[N, ...] -> [N/c, c, ...], chunk j = rows j, j + N/c, j + 2N/c, ...

  Strided, so when N is sharded over the devices each chunk takes c/devices rows from every
  device's block: a chunk stays spread over all devices and no rows move.
  """
  return jnp.swapaxes(x_N.reshape(c, x_N.shape[0] // c, *x_N.shape[1:]), 0, 1)


def merge(x_SR):
  """Inverse of split: [N/c, c, ...] -> [N, ...] in the original row order."""
  return jnp.swapaxes(x_SR, 0, 1).reshape(-1, *x_SR.shape[2:])


def cached_value_and_grad(embed_fn, loss_fn, chunk_size, num_devices=None):
  """Like jax.value_and_grad(has_aux=True) of loss_fn(embed every text), with gradient caching.

  Args:
    embed_fn: (params, xs, key) -> emb_R..., one chunk of rows of each array in xs. `key` is
      chunk_key(step key, index of the field in sorted order, chunk index), or None when no
      key is given; pass 1 and pass 3 call it with the same key, so dropout replays exactly.
      Anything it does per row must not depend on the other rows of the chunk.
    loss_fn: {field: emb_N...} -> (loss, aux), on the whole global batch.
    chunk_size: global rows per chunk. It must divide every field's row count and be a multiple
      of the device count. A field of at most chunk_size rows is one chunk, but XLA inlines
      one-trip loops and may then keep several such fields' activations at once: for the memory
      bound, give every field at least two chunks.
    num_devices: devices the batch rows are sharded over (default: jax.device_count()).

  Returns:
    (params, texts, key=None) -> ((loss, aux), grads), where texts = {field: tuple of arrays [N, ...]}
    (padded texts: (ids_NL, mask_NL); packed rows: a packing.Rows).
    Equal to the plain gradient up to float rounding when embed_fn is deterministic; with
    dropout, the plain step draws one mask per field, this one mask per chunk.
  """
  num_devices = num_devices or jax.device_count()

  def value_and_grad(params, texts, key=None):
    fields = sorted(texts)
    rows = {f: _rows_per_chunk(f, texts[f][0].shape[0], chunk_size, num_devices) for f in fields}
    chunks = {f: [split(x, rows[f]) for x in texts[f]] for f in fields}

    def embed(p, i, c, xs):
      return embed_fn(p, xs, None if key is None else chunk_key(key, i, c))

    embs = {}
    for i, f in enumerate(fields):  # Pass 1: embeddings only, no activations kept.
      xs = (jnp.arange(chunks[f][0].shape[0]), tuple(chunks[f]))
      emb_SRD = jax.lax.map(lambda x, i=i: embed(params, i, *x), xs)
      embs[f] = jax.lax.stop_gradient(merge(emb_SRD))
    (loss, aux), d_embs = jax.value_and_grad(loss_fn, has_aux=True)(embs)  # Pass 2: full batch.

    def replay(i, grads, x):  # Pass 3: one chunk's forward again, its cached cotangent back.
      c, xs, d_emb_RD = x
      _, vjp = jax.vjp(lambda p: embed(p, i, c, xs), params)
      return jax.tree.map(jnp.add, grads, vjp(d_emb_RD)[0]), None

    grads = jax.tree.map(jnp.zeros_like, params)
    for i, f in enumerate(fields):
      xs = (jnp.arange(chunks[f][0].shape[0]), tuple(chunks[f]), split(d_embs[f], rows[f]))
      grads, _ = jax.lax.scan(lambda g, x, i=i: replay(i, g, x), grads, xs)
    return (loss, aux), grads

  return value_and_grad


def nnx_embed_fn(graphdef, rngs, apply=lambda model, xs: model(*xs)):
  """embed_fn of an NNX encoder split into (graphdef, params, rngs), run as apply(model, xs); dropout
  reseeded with the chunk key."""

  def embed_fn(params, xs, key):
    model = nnx.merge(graphdef, params, rngs)
    if key is not None:
      nnx.reseed(model, default=key)
    return apply(model, xs)

  return embed_fn
