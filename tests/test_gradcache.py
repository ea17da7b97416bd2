"""Gradient caching on 8 fake devices: same loss and update as the plain step, dropout replay, memory."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import tiny_config
from bench import step as bench_step
from piccolo_jax import config
from piccolo_jax import gradcache, losses, sharding, train
from piccolo_jax import models
from piccolo_jax import step as step_lib
from piccolo_jax import model as model_lib
from piccolo_jax import state as state_lib

B, K, L = 16, 2, 16  # Global batch, negatives per query, tokens.
CHUNK = 8


def _cfg(dropout=0.0):
  return model_lib.Config(vocab_size=1000, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                          dropout=dropout, attention_dropout=dropout)


def _loss_cfg():
  c = config.base()
  c.loss.mrl_dims = (16, 32)
  return c


def _texts(rng, n, length=L):
  ids_NL = rng.integers(1, 1000, (n, length)).astype(np.int32)
  lens_N = rng.integers(1, length + 1, n)
  return ids_NL, (np.arange(length) < lens_N[:, None]).astype(np.int32)


def _batch(rng, b=B, length=L):
  """A packed Batch of all three tasks, random texts of 1..length tokens, 4 a row, rows a multiple of CHUNK."""
  rows = {"retrieval": {"query": b, "pos": b, "neg": b * K}, "sts": {"text_a": b, "text_b": b},
          "cls": {"query": b, "pos": b, "neg": b * K}}
  texts = {task: {f: [rng.integers(1, 1000, rng.integers(1, length + 1)) for _ in range(n)] for f, n in fields.items()}
           for task, fields in rows.items()}
  extras = {"retrieval": {}, "sts": {"label": rng.integers(0, 6, b).astype(np.float32)},
            "cls": {"neg_valid": (rng.random((b, K)) < 0.7) | (np.arange(K) == 0)}}  # No row without negatives.
  return bench_step.of_texts(texts, extras, (length, length // 2), S=4, multiple=CHUNK)  # Rows of two lengths.


def _assert_grads_close(grads, ref_grads):
  """Float32 tolerance relative to each array's scale (logits are cosines / 0.01)."""
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(b).max()))


def _split_model(cfg):
  model = model_lib.abstract_model(cfg)
  model.train()
  nnx.reseed(model, default=0)
  graphdef, _, rngs = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(rngs)


def test_cached_step_equals_plain_step():
  """A step of all three tasks (fsdp 2 x data 4): the same loss, gradient norm and update, chunked."""
  assert jax.device_count() == 8
  mesh = sharding.make_mesh(fsdp=2)
  cfg, optim = _cfg(), config.base().optim
  optim.update(lr=1e-3, warmup_steps=0)
  params = models.random_params(cfg, 0)
  tx, _ = state_lib.make_optimizer(optim, params, 10)
  batch = sharding.put_batch(_batch(np.random.default_rng(1)), mesh)
  out, hlo = {}, {}
  for chunk in (0, CHUNK):
    st, _, graphdef, rngs = state_lib.init_state(cfg, params, tx, mesh, 0)
    compiled = step_lib.make_train_step(graphdef, tx, _loss_cfg(), chunk).lower(st, batch, rngs).compile()
    out[chunk], hlo[chunk] = compiled(st, batch, rngs), compiled.as_text()
  (new, m), (new_c, m_c) = out[0], out[CHUNK]
  assert m["ok"] and m_c["ok"] and int(new_c["step"]) == 1
  np.testing.assert_allclose(m_c["loss"], m["loss"], rtol=1e-5)
  np.testing.assert_allclose(m_c["loss_per_dim"], m["loss_per_dim"], rtol=1e-5)
  np.testing.assert_allclose(m_c["grad_norm"], m["grad_norm"], rtol=1e-5)
  # Adam's first step is ~lr * sign(g): a gradient entry near its eps (1e-8) magnifies rounding.
  for a, b in zip(jax.tree.leaves(new_c["params"]), jax.tree.leaves(new["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-2 * optim.lr)
  assert new_c["params"]["embeddings"]["word"]["embedding"].sharding.spec == P("fsdp")
  # Data parallel inside the chunk loops: each device embeds CHUNK / 8 rows of every chunk.
  assert len(batch.rows) == 2  # Chunks within each group of rows.
  for R, L_g in (r.tokens.shape for r in batch.rows):
    assert re.search(rf"s32\[{R // CHUNK},{CHUNK // 8},{L_g}\]", hlo[CHUNK])
    assert not re.search(rf"s32\[{R // CHUNK},{CHUNK},{L_g}\]", hlo[CHUNK])


def _retrieval_loss(emb):
  return losses.matryoshka(losses.retrieval_infonce, dims=(16, 32), return_per_dim=True)(
      emb["query"], emb["pos"], emb["neg"])


def test_dropout_is_replayed_per_chunk():
  """With dropout on, pass 3 must see pass 1's masks: the cached gradient equals the plain
  gradient of the same per-chunk-keyed forward pass, and changing the key changes it."""
  cfg = _cfg(dropout=0.1)
  graphdef, rngs = _split_model(cfg)
  embed_fn = gradcache.nnx_embed_fn(graphdef, rngs)
  params = models.random_params(cfg, 0)
  texts = {f: _texts(np.random.default_rng(i), n) for i, (f, n) in enumerate([("query", B), ("pos", B), ("neg", B * K)])}
  key = jax.random.key(3)

  def keyed_loss(p, key):  # Plain autodiff through the chunked forward, same keys.
    emb = {}
    for i, f in enumerate(sorted(texts)):
      ids_KCL, mask_KCL = (gradcache.split(jnp.asarray(x), CHUNK) for x in texts[f])
      embed = lambda x, i=i: embed_fn(p, x[1:], gradcache.chunk_key(key, i, x[0]))
      emb[f] = gradcache.merge(jax.lax.map(embed, (jnp.arange(ids_KCL.shape[0]), ids_KCL, mask_KCL)))
    return _retrieval_loss(emb)

  cached = jax.jit(gradcache.cached_value_and_grad(embed_fn, _retrieval_loss, CHUNK))
  (loss, per_dim), grads = cached(params, texts, key)
  plain = jax.jit(jax.value_and_grad(keyed_loss, has_aux=True))
  (ref, ref_per_dim), ref_grads = plain(params, key)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(per_dim, ref_per_dim, rtol=1e-5)
  _assert_grads_close(grads, ref_grads)
  (other, _), _ = plain(params, jax.random.key(4))
  assert abs(float(other) - float(ref)) > 1e-3  # Dropout is on: another key, other masks.


def test_chunk_size_must_divide_rows_and_devices():
  graphdef, rngs = _split_model(_cfg())
  params = models.random_params(_cfg(), 0)
  embed_fn = gradcache.nnx_embed_fn(graphdef, rngs)
  texts = {"query": _texts(np.random.default_rng(0), 16), "pos": _texts(np.random.default_rng(1), 16),
           "neg": _texts(np.random.default_rng(2), 48)}
  run = lambda c: jax.eval_shape(gradcache.cached_value_and_grad(embed_fn, _retrieval_loss, c), params, texts)
  with pytest.raises(ValueError, match=r"chunk_size 12 .* field 'neg' of 48 rows on 8 devices"):
    run(12)  # Does not divide 16 query rows either; fields are checked in sorted order.
  with pytest.raises(ValueError, match=r"chunk_size 32 .* field 'neg' of 48 rows"):
    run(32)  # Queries and positives (16 rows) are one chunk each, the 48 negatives do not split.
  with pytest.raises(ValueError, match=r"chunk_size 4 .* multiple of the devices"):
    run(4)
  assert jax.eval_shape(gradcache.cached_value_and_grad(embed_fn, _retrieval_loss, 16), params, texts)[0][0].shape == ()


def test_cached_temp_memory_is_a_fraction_of_plain():
  cfg = _cfg()
  graphdef, rngs = _split_model(cfg)
  embed_fn = gradcache.nnx_embed_fn(graphdef, rngs)
  params = models.random_params(cfg, 0)
  rng = np.random.default_rng(0)
  texts = {f: _texts(rng, 256, 64) for f in ("query", "pos", "neg")}

  def plain(p, texts, key):
    return jax.value_and_grad(lambda p: _retrieval_loss({f: embed_fn(p, texts[f], key) for f in texts}),
                              has_aux=True)(p)

  temp, out = {}, {}
  for name, fn in [("plain", plain), ("cached", gradcache.cached_value_and_grad(embed_fn, _retrieval_loss, 32))]:
    compiled = jax.jit(fn).lower(params, texts, None).compile()
    temp[name], out[name] = compiled.memory_analysis().temp_size_in_bytes, compiled(params, texts, None)
  assert temp["cached"] < 0.1 * temp["plain"], temp
  np.testing.assert_allclose(out["cached"][0][0], out["plain"][0][0], rtol=1e-5)
  _assert_grads_close(out["cached"][1], out["plain"][1])


def test_train_with_chunk_size_matches_plain(tmp_path):
  losses_by_chunk = {}
  for chunk in (0, 8):
    c = tiny_config.get_config()
    c.model.dropout, c.train.max_steps, c.train.chunk_size = 0.0, 2, chunk
    train.train(c, tmp_path / f"chunk{chunk}")
    rows = [json.loads(l) for l in (tmp_path / f"chunk{chunk}" / "metrics.jsonl").read_text().splitlines()]
    losses_by_chunk[chunk] = [m[f"loss/{m['task']}"] for m in rows if "task" in m]
  assert len(losses_by_chunk[8]) == 2
  np.testing.assert_allclose(losses_by_chunk[8], losses_by_chunk[0], rtol=1e-5)
