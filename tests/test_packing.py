"""Sequence packing: the row layout, the row-count menus, packed batches split over processes, and packed ==
unpacked through all-MiniLM-L6-v2, and the train step's gradient on a step of all three tasks (its first two
layers, dropout off), on 1 device and 8."""
import itertools
import re

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import conftest
import tiny_config
from bench import torch_ref
from piccolo_jax import attention
from piccolo_jax import batch as batch_lib
from piccolo_jax import config
from piccolo_jax import data
from piccolo_jax import encode
from piccolo_jax import models
from piccolo_jax import packing
from piccolo_jax import sharding
from piccolo_jax import state as state_lib
from piccolo_jax import step as step_lib


def _first_fit_loop(lens_N, lengths, S, budget=None):
  """First-fit decreasing, one text at a time: the reference of packing.first_fit (lengths ascending)."""
  row_N, slot_N, free, count, length = np.zeros(len(lens_N), int), np.zeros(len(lens_N), int), [], [], []
  left = list(budget) if budget is not None else [len(lens_N)] * len(lengths)
  for i in np.argsort(-np.asarray(lens_N), kind="stable"):
    r = next((r for r in range(len(free)) if free[r] >= lens_N[i] and count[r] < S), len(free))
    if r == len(free):
      k = next((k for k, L in enumerate(lengths) if L >= lens_N[i] and left[k]), None)
      if k is None:
        return None
      free.append(lengths[k]), count.append(0), length.append(lengths[k])
      left[k] -= 1
    row_N[i], slot_N[i], free[r], count[r] = r, count[r], free[r] - lens_N[i], count[r] + 1
  return row_N, slot_N, np.array(length, int)


def test_first_fit_puts_every_text_once_in_its_row():
  rng = np.random.default_rng(0)
  for lengths, S, n in (((64,), 4, 50), ((32, 8), 64, 200), ((128, 48, 16), 8, 70), ((16,), 1, 9), ((512,), 64, 0)):
    lens = rng.integers(1, lengths[0] + 1, n)
    placed = packing.Packed(lens, lengths, S)
    b = placed.pack(np.repeat(np.arange(1, n + 1), lens), np.arange(n), [0] * len(lengths), placed.rows)
    assert [r.tokens.shape for r in b] == [(R, L) for R, L in zip(placed.rows, lengths) if R]
    rows = [(g, r) for g, R in enumerate(placed.rows) for r in range(R)]
    assert sorted(set(zip(placed.group_N, placed.row_N))) == rows  # No empty row.
    assert len(set(zip(placed.group_N, placed.row_N, placed.slot_N))) == n and (placed.slot_N < S).all()
    at = {g: i for i, g in enumerate(g for g, R in enumerate(placed.rows) if R)}
    for i in range(n):
      group, row, slot = b[at[placed.group_N[i]]], placed.row_N[i], placed.slot_N[i]
      m = group.segments[row] == slot + 1
      np.testing.assert_array_equal(group.tokens[row][m], np.full(lens[i], i + 1))
      np.testing.assert_array_equal(group.positions[row][m], np.arange(lens[i]))
      assert np.ptp(np.flatnonzero(m)) == lens[i] - 1 and group.lengths[row, slot] == lens[i]
      # The shortest length that holds it, unless it filled room in a longer row.
      assert lengths[placed.group_N[i]] >= lens[i]
    assert sum((r.segments > 0).sum() for r in b) == lens.sum() == sum(r.lengths.sum() for r in b)
    slots = placed.slots(np.arange(n), placed.rows)  # One [sum R * S] order, group by group.
    assert len(set(slots)) == n and (slots < np.dot(placed.rows, placed.S_G)).all()
    R = sum(placed.rows)
    assert len(lengths) > 1 or R <= np.ceil(1.23 * lens.sum() / lengths[0]) + 1 or S < 64  # FFD: 11/9 OPT + 1
  for lengths, S in itertools.product(((16,), (128,), (8, 16), (32, 96, 128)), (1, 3, 64)):
    L = lengths[-1]  # Placed a length at a time = one text at a time, with and without a budget.
    for lens in (rng.integers(1, L + 1, 300), rng.integers(1, L // 4, 300), rng.choice([1, L // 2, L // 2 + 1, L], 99)):
      own = np.bincount(np.searchsorted(lengths, _first_fit_loop(lens, lengths, S)[2]), minlength=len(lengths))
      fewer_short = own - np.eye(len(lengths), dtype=int)[0] * (own[0] // 2)  # Spills into longer rows, or fails.
      for budget in (None, own, fewer_short, fewer_short + np.eye(len(lengths), dtype=int)[-1] * 3):
        got, want = packing.first_fit(lens, lengths, S, budget), _first_fit_loop(lens, lengths, S, budget)
        assert (got is None) == (want is None)
        assert want is None or all(np.array_equal(a, b) for a, b in zip(got, want))
  with pytest.raises(ValueError, match="lengths must be in 1..8"):
    packing.first_fit([3, 9], 8, 4)


@pytest.mark.parametrize("size,multiple", [(1, 1), (2, 1), (3, 1), (3, 4), (4, 2)])
def test_row_menu_is_the_least_padding_menu(size, multiple):
  needed = np.random.default_rng(size * 10 + multiple).integers(10, 31, 60)
  vals = sorted({packing.round_up(n, multiple) for n in needed})
  taken = lambda n, menu: min([m for m in menu if m >= packing.round_up(n, multiple)])
  waste = lambda menu: sum(taken(n, menu) - n for n in needed)
  best = min(waste((*c, vals[-1])) for k in range(size) for c in itertools.combinations(vals[:-1], k))
  menu = [m for m, in packing.row_menu(needed, size, multiple)]
  assert len(menu) <= size and all(m % multiple == 0 for m in menu) and max(menu) == vals[-1]
  assert waste(menu) == best


def test_row_menu_of_several_lengths_holds_every_step_by_tokens():
  """Row counts per length: each tuple holds, for every g, the tokens of the need's rows of the g longest
  lengths in its own rows of those lengths (texts also fit longer rows); `repaired` then makes place() pack every
  step within one, and a batch past the menu grows per length."""
  rng, lengths = np.random.default_rng(0), (128, 32)
  steps = [np.r_[rng.integers(33, 129, rng.integers(5, 20)), rng.integers(1, 33, rng.integers(40, 90))] for _ in range(40)]
  needed = [packing.Packed(l, lengths, 64).rows for l in steps]
  w = packing.row_cost(lengths, 256)
  menu = packing.row_menu(needed, 3, 2, lengths, w)
  assert len(menu) <= 3 and all(r % 2 == 0 for m in menu for r in m)
  for n in needed:
    assert any((np.cumsum(np.multiply(m, lengths)) >= np.cumsum(np.multiply(n, lengths))).all() for m in menu)
  menu = packing.repaired(menu, steps, lengths, 64, 2, w)
  for l in steps:
    packed, R_G = packing.place(l, lengths, menu, 64, 2, w)
    assert R_G in menu and all(a <= b for a, b in zip(packed.rows, R_G))
    assert R_G == min((m for m in menu if packing.Packed(l, lengths, 64, m).rows is not None), key=lambda m: np.dot(m, w))
  big = np.r_[np.full(200, 100), np.full(10, 30)]  # Past the menu: each length's own rows, grown.
  packed, R_G = packing.place(big, lengths, ((16, 24), (24, 24)), 64, 8)
  assert packed.rows == (200, 10) and R_G == (208, 24)  # 24 * 1.125**k up to 200, in 8s; 10 -> the menu's 24.


@pytest.fixture(scope="module")
def c():
  return tiny_config.get_config()  # Real bundled data, three tasks.


@pytest.fixture(scope="module")
def tables(c, minilm_path):
  return data.open_tables(c.data, c.tasks, encode.load_tokenizer(minilm_path))


def test_processes_split_the_rows_of_one_packing(c, tables):
  """Two processes plan the same packing from token lengths; each holds its half of the rows and every
  slot and extra whole. The menus, chosen from the first epoch, hold every step of it."""
  one = data.assembler(c.data, c.tasks, tables, row_multiple=2)
  two = [data.assembler(c.data, c.tasks, tables, p, 2, row_multiple=2) for p in range(2)]
  assert all(a.menus == one.menus for a in two) and set(one.menus) == {"retrieval", "sts", "cls"}
  assert any(len(m.lengths) > 1 for m in one.menus.values())
  programs = set()
  for step in range(2 * one.plan.steps_per_epoch):
    (b, info), halves = one(step), [a(step) for a in two]
    programs.add((info["task"], info["rows"]))
    assert info["rows"] == halves[0][1]["rows"] == halves[1][1]["rows"] and all(R % 2 == 0 for R in info["rows"])
    assert step >= one.plan.steps_per_epoch or info["rows"] in one.menus[info["task"]].rows
    for g, rows in enumerate(b.rows):
      jax.tree.map(lambda x, *h: np.testing.assert_array_equal(np.concatenate(h), x), rows,
                   *(h.rows[g] for h, _ in halves))
    for h, hinfo in halves:
      jax.tree.map(np.testing.assert_array_equal, (h.slots, h.extras), (b.slots, b.extras))
    assert sum(hinfo["tokens"] for _, hinfo in halves) == info["tokens"]
  # The program-count bound: a row-count tuple of the task's menu a step, at most data.pack_menu a task.
  assert len(programs) <= sum(len(m.rows) for m in one.menus.values()) <= c.data.pack_menu * len(one.menus)


@pytest.fixture(scope="module")
def minilm():
  cfg, params, _ = models.load_init("minilm")
  return cfg.replace(dropout=0.0, attention_dropout=0.0), params


@pytest.fixture(scope="module")
def mixed_batch(c, tables):
  """A global batch of all three tasks (data.mix=groups, 4 loss groups), packed rows of two lengths, each a
  multiple of 8 rows (short rows made cheap: 8 rows of them pay off at 8 devices)."""
  mixed = config.replace(c.data, mix="groups", pack_attention=4)
  assemble = data.assembler(mixed, c.tasks, tables, row_multiple=8, groups=4)
  b = next(b for b, _ in map(assemble, range(assemble.plan.steps_per_epoch)) if len(b.mix) == 3)
  assert len(b.rows) == 2  # Rows of two lengths.
  return b


@pytest.fixture(scope="module")
def fused_batch(c, tables, mixed_batch):
  """The same step's texts in rows of the fused kernels' 128-token blocks: 8 rows of 128, the rest spilled into
  rows of 256 (a menu of that one tuple)."""
  mixed = config.replace(c.data, mix="groups")
  assemble = data.assembler(mixed, c.tasks, tables, row_multiple=8, groups=4, length_multiple=128)
  assemble.menus = {"mixed": batch_lib.Menu((256, 128), ((8, 8),))}
  b, info = next((b, i) for b, i in map(assemble, range(assemble.plan.steps_per_epoch)) if len(b.mix) == 3)
  assert info["shape"] == ((8, 256), (8, 128)) and info["rows"] == (8, 8)
  jax.tree.map(np.testing.assert_array_equal, b.extras, mixed_batch.extras)
  return b


def _split(cfg, params):
  """(graphdef, rngs) of the train step's model."""
  tx, _ = state_lib.make_optimizer(config.section("optim"), params, 10)
  return state_lib.init_state(cfg, params, tx, sharding.make_mesh(1), 0)[2:]


def _loss_config(dims):
  c = config.base()
  c.loss.mrl_dims = dims
  return c


def _unpacked_value_and_grad(graphdef, rngs, lc):
  """The parity reference: each text embedded alone, padded (model.Bert.__call__), then each task's loss,
  weighed by its share of the step's groups."""
  def loss_fn(p, padded, b):
    model, total = nnx.merge(graphdef, p, rngs), sum(n for _, n in b.mix)
    out = {task: step_lib.task_loss(task, {f: model(*x) for f, x in padded[task].items()}, b.extras[task], lc, n)
           for task, n in b.mix}
    weigh = lambda i: sum(n / total * out[task][i] for task, n in b.mix)
    return weigh(0), (weigh(1), {task: v[0] for task, v in out.items()})
  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def _padded(b):
  return {task: {f: torch_ref.unpacked(b, task, f) for f in b.slots[task]} for task, _ in b.mix}


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_packed_embeddings_equal_unpacked_through_minilm(minilm, mixed_batch, pooling):
  cfg, params = minilm
  graphdef, rngs = _split(cfg.replace(pooling=pooling), params)
  packed = jax.jit(lambda p, rows: nnx.merge(graphdef, p, rngs).embed_rows(rows))
  unpacked = jax.jit(lambda p, *x: nnx.merge(graphdef, p, rngs)(*x))
  b = mixed_batch
  emb_ND = np.asarray(packed(params, b.rows))
  for task, fields in _padded(b).items():
    for f, (ids, mask) in fields.items():
      keep = b.extras[task]["neg_valid"].reshape(-1) if f == "neg" else slice(None)
      np.testing.assert_allclose(emb_ND[b.slots[task][f]][keep], unpacked(params, ids, mask)[keep], atol=1e-5,
                                 err_msg=f"{task} {f}")


def _assert_close(got, want):
  """Loss and per-dim losses to rtol 1e-5; gradients to 1e-5 of each array's scale (they are sums over
  every token, accumulated in another order; attention key biases have none, only rounding)."""
  (loss, (per_dim, *_)), grads = got
  (ref, (ref_per_dim, *_)), ref_grads = want
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(per_dim, ref_per_dim, rtol=1e-5)
  top = max(np.abs(b).max() for b in jax.tree.leaves(ref_grads))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
    # Attention keys' gradients are small differences (softmax is shift-invariant; the key bias gets none
    # at all): their rounding is measured against the gradient's largest entry.
    scale = max(np.abs(b).max(), 1e-2 * top) if "'key'" in jax.tree_util.keystr(path) else np.abs(b).max()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def two_layers(mixed_batch):
  """all-MiniLM-L6-v2's first two layers (dropout off), its loss config, and the loss and gradients of the mixed
  batch with each text embedded alone (the written-out attention, padded)."""
  cfg, params = conftest.minilm_layers(2)
  graphdef, rngs = _split(cfg, params)
  lc = _loss_config((128, 256, 384))
  return cfg, params, lc, _unpacked_value_and_grad(graphdef, rngs, lc)(params, _padded(mixed_batch), mixed_batch)


@pytest.mark.parametrize("impl", ["xla", "splash", "pallas_gpu"])
def test_packed_step_gradient_equals_unpacked_on_1_and_8_devices(mixed_batch, fused_batch, two_layers, impl):
  """A step of all three tasks, 4 loss groups: its loss and every parameter gradient, packed, equal each text
  embedded alone (all-MiniLM-L6-v2's first two layers, dropout off), through each attention implementation (the
  fused kernels in Pallas' interpret mode, under shard_map on the mesh); and so do the embeddings."""
  cfg, params, lc, want = two_layers
  graphdef, rngs = _split(cfg.replace(attention=impl), params)
  b = mixed_batch if impl == "xla" else fused_batch
  if impl != "xla":  # xla's embeddings: test_packed_embeddings_equal_unpacked_through_minilm.
    emb_ND = np.asarray(jax.jit(lambda p, rows: nnx.merge(graphdef, p, rngs).embed_rows(rows))(params, b.rows))
    unpacked = jax.jit(lambda p, *x: nnx.merge(_split(cfg, params)[0], p, rngs)(*x))
    for task, fields in _padded(b).items():
      for f, (ids, mask) in fields.items():
        keep = b.extras[task]["neg_valid"].reshape(-1) if f == "neg" else slice(None)
        np.testing.assert_allclose(emb_ND[b.slots[task][f]][keep],
                                   unpacked(params, ids, mask)[keep], atol=1e-5, err_msg=f"{task} {f}")
  # The fused kernels run per device under shard_map, the same program on 1 device or 8: the 8-device mesh alone.
  for mesh in (sharding.make_mesh(1, jax.devices()[:1]),) * (impl == "xla") + (sharding.make_mesh(1),):
    def grads(p, b, mesh=mesh):
      with attention.on(mesh):
        return step_lib.value_and_grad(graphdef, rngs, p, b, lc)
    sharded, on_mesh = jax.device_put(params, sharding.replicated(mesh)), sharding.put_batch(b, mesh)
    compiled = jax.jit(grads).lower(sharded, on_mesh).compile()
    _assert_close(compiled(sharded, on_mesh), want)
  # Slot embeddings cross devices; the activations do not.
  slots, row_tokens, D = sum(r.lengths.size for r in b.rows), sum(r.tokens.size for r in b.rows), cfg.hidden_size
  results = re.findall(r"= (.*?) (?:all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)\(",
                       compiled.as_text())
  moved = sum(np.prod([int(d) for d in dims.split(",") if d]) for r in results for dims in re.findall(r"f32\[([\d,]*)\]", r))
  beyond_grads = moved - sum(x.size for x in jax.tree.leaves(params))  # The gradients' all-reduce.
  assert 0 < beyond_grads <= slots * D <= row_tokens * D  # One gradient all-reduce, whatever the row lengths.


def test_packed_gradient_caching_remat_and_bf16(c, mixed_batch):
  """On the step of all three tasks (tiny random BERT): gradient caching and remat give the plain gradient;
  bfloat16 compute stays close to it."""
  cfg, params, _ = models.init_params(c)
  cfg, mesh = cfg.replace(dropout=0.0, attention_dropout=0.0), sharding.make_mesh(1)
  lc = _loss_config((16, 32))

  def grads(cfg, b, chunk=0):
    graphdef, rngs = _split(cfg, params)
    return jax.jit(lambda p: step_lib.value_and_grad(graphdef, rngs, p, b, lc, chunk_size=chunk))(params)

  b = sharding.put_batch(mixed_batch, mesh)
  plain = grads(cfg, b)
  _assert_close(grads(cfg, b, chunk=8), plain)
  _assert_close(grads(cfg.replace(remat=True), b), plain)
  (loss, _), g = grads(cfg.replace(dtype="bfloat16"), b)
  np.testing.assert_allclose(loss, plain[0][0], rtol=2e-2)
  assert abs(float(optax.tree.norm(g)) / float(optax.tree.norm(plain[1])) - 1) < 0.1
