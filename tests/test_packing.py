"""Sequence packing: the row layout, the row-count menus, packed batches of real data, and packed ==
padded through all-MiniLM-L6-v2 and the train step's gradient (dropout off), on 1 device and 8."""
import itertools
import re

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import tiny_config
from piccolo_jax import config
from piccolo_jax import data
from piccolo_jax import packing
from piccolo_jax import sharding
from piccolo_jax import state as state_lib
from piccolo_jax import step as step_lib


def test_first_fit_puts_every_text_once_in_its_row():
  rng = np.random.default_rng(0)
  for L, S, n in ((64, 4, 50), (32, 64, 200), (128, 8, 7)):
    lens = rng.integers(1, L + 1, n)
    row, slot, R = packing.first_fit(lens, L, S)
    assert sorted(set(row)) == list(range(R))  # no empty row
    assert all(lens[row == r].sum() <= L and (row == r).sum() <= S for r in range(R))
    assert len(set(zip(row, slot))) == n and (slot < S).all()
    b = packing.pack(np.repeat(np.arange(1, n + 1), lens), lens, row, slot, R, L, S)
    for i in range(n):
      m = b["pack_seg"][row[i]] == slot[i] + 1
      np.testing.assert_array_equal(b["pack_tok"][row[i]][m], np.full(lens[i], i + 1))
      np.testing.assert_array_equal(b["pack_pos"][row[i]][m], np.arange(lens[i]))
      assert np.ptp(np.flatnonzero(m)) == lens[i] - 1 and b["pack_len"][row[i], slot[i]] == lens[i]
    assert (b["pack_seg"] > 0).sum() == lens.sum() == b["pack_len"].sum()
    assert R <= np.ceil(1.23 * lens.sum() / L) + 1 or S < 64  # FFD: within 11/9 OPT + 1
  with pytest.raises(ValueError, match="lengths must be in 1..8"):
    packing.first_fit([3, 9], 8, 4)


@pytest.mark.parametrize("size,multiple", [(1, 1), (2, 1), (3, 1), (3, 4), (4, 2)])
def test_row_menu_is_the_least_padding_menu(size, multiple):
  needed = np.random.default_rng(size * 10 + multiple).integers(10, 31, 60)
  vals = sorted({packing.round_up(n, multiple) for n in needed})
  waste = lambda menu: sum(packing.rows_for(n, menu, multiple) - n for n in needed)
  best = min(waste((*c, vals[-1])) for k in range(size) for c in itertools.combinations(vals[:-1], k))
  menu = packing.row_menu(needed, size, multiple)
  assert len(menu) <= size and all(m % multiple == 0 for m in menu) and max(menu) == vals[-1]
  assert waste(menu) == best


def test_rows_past_the_menu_grow_geometrically():
  assert packing.rows_for(20, (16, 24)) == 24 and packing.rows_for(16, (16, 24)) == 16
  assert packing.rows_for(25, (16, 24)) == 27 and packing.rows_for(31, (16, 24)) == 31  # 24 * 1.125**k, up
  assert packing.rows_for(25, (16, 24), 8) == 32 and packing.rows_for(5, (), 8) == 8


@pytest.fixture(scope="module")
def dcfg():
  return tiny_config.get_config().data  # Real bundled data, three tasks; packing is the default.


@pytest.fixture(scope="module")
def tables(dcfg, minilm_path):
  from piccolo_jax import encode
  return data.load_tables(dcfg, encode.load_tokenizer(minilm_path))


def _padded_texts(arrays, field):
  return [ids[m == 1].tolist() for ids, m in zip(arrays[f"{field}_ids"], arrays[f"{field}_mask"])]


def _packed_texts(per_process, field):
  """Each text of the global field, read from the packed rows of the process that holds its slot."""
  R, S = per_process[0]["pack_len"].shape
  out = []
  for a in per_process:
    for slot in a[f"{field}_idx"]:
      b, (r, s) = per_process[slot // S // R], divmod(slot % (R * S), S)
      out.append(b["pack_tok"][r][b["pack_seg"][r] == s + 1].tolist())
  return out


@pytest.mark.parametrize("processes", [1, 2])
def test_packed_batches_hold_the_padded_batches_texts(dcfg, tables, processes):
  padded = data.Batcher(config.replace(dcfg, packing=False), tables)
  packers = [data.Batcher(dcfg, tables, p, processes, row_multiple=2) for p in range(processes)]
  assert all(b.menus == packers[0].menus for b in packers)
  for step in range(2 * padded.steps_per_epoch):
    (want, meta), got = padded(step), [b(step) for b in packers]
    assert len({m["rows"] for _, m in got}) == 1 and got[0][1]["rows"] % 2 == 0
    assert got[0][1]["rows"] in packers[0].menus[meta["task"]]  # every step here is in the menus' sample
    arrays = [a for a, _ in got]
    for field in step_lib.text_fields(want):
      texts = _packed_texts(arrays, field)
      keep = want["neg_valid"].reshape(-1) if field == "neg" and "neg_valid" in want else np.ones(len(texts), bool)
      assert [t for t, k in zip(texts, keep) if k] == [t for t, k in zip(_padded_texts(want, field), keep) if k]
    for k in ("label", "neg_valid"):
      if k in want:
        np.testing.assert_array_equal(np.concatenate([a[k] for a in arrays]), want[k])
    assert sum(m["tokens"] for _, m in got) <= meta["tokens"]


@pytest.fixture(scope="module")
def minilm():
  cfg, params, _ = state_lib.load_init("minilm")
  return cfg.replace(dropout=0.0, attention_dropout=0.0), params


@pytest.fixture(scope="module")
def task_batches(dcfg, tables):
  """task -> (padded, packed) global batch: the first of each task, packed rows a multiple of 8."""
  padded, packed, out = data.Batcher(config.replace(dcfg, packing=False), tables), data.Batcher(
      dcfg, tables, row_multiple=8), {}
  for step in range(padded.steps_per_epoch):
    (a, meta), (b, _) = padded(step), packed(step)
    out.setdefault(meta["task"], (a, b))
  return out


def _split(cfg, params):
  """(graphdef, rngs) of the train step's model."""
  tx, _ = state_lib.make_optimizer(config.section("optim"), params, 10)
  return state_lib.init_state(cfg, params, tx, sharding.make_mesh(1), 0)[2:]


def _grads_fn(cfg, params):
  graphdef, rngs = _split(cfg, params)
  loss_cfg = config.section("loss", mrl_dims=(128, 256, 384))
  return jax.jit(lambda p, b, task: step_lib.value_and_grad(graphdef, rngs, p, b, task, loss_cfg),
                 static_argnames="task"), graphdef, rngs


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_packed_embeddings_equal_padded_through_minilm(minilm, task_batches, pooling):
  cfg, params = minilm
  _, graphdef, rngs = _grads_fn(cfg.replace(pooling=pooling), params)
  embed = jax.jit(lambda p, b: step_lib.fields_of(
      {f: step_lib.embed(nnx.merge(graphdef, p, rngs), x) for f, x in step_lib.texts(b).items()}, b))
  for task, (a, b) in task_batches.items() if pooling == "mean" else [("cls", task_batches["cls"])]:
    want, got = embed(params, a), embed(params, b)
    for f in want:
      keep = a["neg_valid"].reshape(-1) if f == "neg" and "neg_valid" in a else slice(None)
      np.testing.assert_allclose(got[f][keep], want[f][keep], atol=1e-5, err_msg=f"{task} {f}")


def _assert_close(got, want):
  """Loss and per-dim losses to rtol 1e-5; gradients to 1e-5 of each array's scale (they are sums over
  every token, accumulated in another order; attention key biases have none, only rounding)."""
  (loss, (per_dim, _)), grads = got
  (ref, (ref_per_dim, _)), ref_grads = want
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(per_dim, ref_per_dim, rtol=1e-5)
  top = max(np.abs(b).max() for b in jax.tree.leaves(ref_grads))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
    # Attention keys' gradients are small differences (softmax is shift-invariant; the key bias gets none
    # at all): their rounding is measured against the gradient's largest entry.
    scale = max(np.abs(b).max(), 1e-2 * top) if "'key'" in jax.tree_util.keystr(path) else np.abs(b).max()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_packed_step_gradient_equals_padded_on_1_and_8_devices(minilm, task_batches):
  cfg, params = minilm
  grads, _, _ = _grads_fn(cfg, params)
  mesh = sharding.make_mesh(1)
  sharded = jax.device_put(params, sharding.replicated(mesh))
  for task, (a, b) in task_batches.items():
    want = grads(params, a, task=task)
    _assert_close(grads(params, b, task=task), want)
    on_mesh = sharding.put_batch(b, mesh)
    _assert_close(grads(sharded, on_mesh, task=task), want)
    if task == "retrieval":  # Slots are gathered across devices; the activations are not.
      hlo = grads.lower(sharded, on_mesh, task=task).compile().as_text()
      R, L = b["pack_tok"].shape
      gathered = [np.prod([int(d) for d in dims.split(",") if d]) for dims in
                  re.findall(r"\[([\d,]*)\][^ ]* all-gather\(", hlo)]
      assert gathered and max(gathered) <= R * b["pack_len"].shape[1] * cfg.hidden_size < R * L * cfg.hidden_size


def test_packed_gradient_caching_remat_and_bf16(dcfg, tables):
  """On packed batches of the three tasks (tiny random BERT, 8 devices): gradient caching and remat give
  the plain gradient; bfloat16 compute stays close to it."""
  c = tiny_config.get_config()
  cfg, params, _ = state_lib.init_params(c)
  cfg, mesh = cfg.replace(dropout=0.0, attention_dropout=0.0), sharding.make_mesh(1)
  loss_cfg = config.section("loss", mrl_dims=(16, 32))

  def grads(cfg, b, task, chunk=0):
    graphdef, rngs = _split(cfg, params)
    return jax.jit(lambda p: step_lib.value_and_grad(graphdef, rngs, p, b, task, loss_cfg, chunk_size=chunk))(params)

  packed, tasks = data.Batcher(dcfg, tables, row_multiple=8), set()
  for step in range(packed.steps_per_epoch):
    b, meta = packed(step)
    if meta["task"] in tasks:
      continue
    tasks.add(meta["task"])
    b, task = sharding.put_batch(b, mesh), meta["task"]
    plain = grads(cfg, b, task)
    _assert_close(grads(cfg, b, task, chunk=8), plain)
    _assert_close(grads(cfg.replace(remat=True), b, task), plain)
    (loss, _), g = grads(cfg.replace(dtype="bfloat16"), b, task)
    np.testing.assert_allclose(loss, plain[0][0], rtol=2e-2)
    assert abs(float(optax.tree.norm(g)) / float(optax.tree.norm(plain[1])) - 1) < 0.1
