"""The original's step (issue [recipe]): loss groups, steps that mix tasks, rows without negatives,
per-dataset neg_num, trainable extended positions; parity with a PyTorch DDP reference."""
import dataclasses
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import conftest
import tiny_config
from piccolo_jax import config, data, encode, export, losses, model as model_lib, sharding
from piccolo_jax import models
from piccolo_jax import plan as plan_lib, state as state_lib, step as step_lib, train

G = 4  # Loss groups of the tests' global batch of 16: 4 rows each.


def test_compositions_give_exact_shares_in_few_programs():
  rng = np.random.default_rng(0)
  for _ in range(400):
    groups = int(rng.choice([1, 3, 4, 8, 32]))
    units_T = rng.integers(0, 300, rng.integers(1, 6))
    comp_ST = plan_lib.compositions(units_T, groups)
    S, T = comp_ST.shape
    assert S == units_T.sum() // groups and T == len(units_T)
    if not S:
      continue
    assert (comp_ST.sum(1) == groups).all()
    total_T = comp_ST.sum(0)
    assert (total_T <= units_T).all() and (np.abs(total_T - S * groups * units_T / units_T.sum()) < 1).all()
    assert (comp_ST.max(0) - comp_ST.min(0) <= 1).all()  # floor or ceil of the share every step
    assert len({tuple(c) for c in comp_ST}) <= math.comb(T, groups - (total_T // S).sum())


def _retrieval_rows(tmp_path):
  """The bundled retrieval rows with negatives cut: 0 for every third row, 1 for every third after it."""
  rows = [json.loads(l) for l in (tiny_config.DATA / "retrieval-zh/triplets.train.jsonl").open()][:32]
  for i, r in enumerate(rows):
    r["neg"] = r["neg"][:[0, 1, 10][i % 3]]
  path = tmp_path / "retrieval.jsonl"
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
  return path


@pytest.fixture(scope="module")
def mixed_cfg(tmp_path_factory):
  """The tiny config's three datasets, the retrieval one with rows short of negatives and neg_num 2."""
  c = tiny_config.get_config()
  retrieval = {"kind": "jsonl", "path": str(_retrieval_rows(tmp_path_factory.mktemp("recipe"))),
               "task": "retrieval", "neg_num": 2}
  c.data.datasets = (retrieval, *c.data.datasets[1:])
  c.data.mix, c.loss.groups = "groups", G
  return c


@pytest.fixture(scope="module")
def tables(mixed_cfg):
  return data.open_tables(mixed_cfg.data, mixed_cfg.tasks, encode.load_tokenizer(mixed_cfg.model.tokenizer), G)


def _assembler(c, tables, p=0, P=1, multiple=2):
  return data.assembler(c.data, c.tasks, tables, p, P, multiple, G)


def test_mixed_plan_deals_each_group_once_and_processes_agree(mixed_cfg, tables):
  one = _assembler(mixed_cfg, tables)
  two = [_assembler(mixed_cfg, tables, p, 2) for p in range(2)]
  assert one.plan.steps_per_epoch == 6  # 3 datasets x 32 rows = 24 groups of 4, 4 a step
  for epoch in (0, 1):
    ds_SU, rows_SB = one.plan.epoch(epoch)
    for d, t in enumerate(tables):  # every row of every dataset once an epoch
      assert sorted(rows_SB.reshape(-1, 4)[ds_SU.ravel() == d].ravel()) == list(range(len(t)))
  assert not np.array_equal(one.plan.epoch(0)[1], one.plan.epoch(1)[1])
  for step in range(one.plan.steps_per_epoch):
    b, info = one(step)
    assert info["task"] == "mixed" and [t for t, _ in b.mix] == ["cls", "retrieval", "sts"]
    assert sorted(n for _, n in b.mix) == [1, 1, 2]  # 4 groups: a third each, one extra
    assert info["rows"] in one.menus["mixed"].rows
    assert b.slots["retrieval"]["query"].shape == (dict(b.mix)["retrieval"] * 4,)
    assert b.extras["retrieval"]["neg_valid"].shape[1] == 2  # the dataset's neg_num
    halves = [a(step)[0] for a in two]
    for g, rows in enumerate(b.rows):
      jax.tree.map(lambda x, *h: np.testing.assert_array_equal(np.concatenate(h), x), rows, *(h.rows[g] for h in halves))
    for h in halves:
      jax.tree.map(np.testing.assert_array_equal, (h.slots, h.extras), (b.slots, b.extras))
  with pytest.raises(ValueError, match="not divisible by loss.groups=3"):
    config.check(config.replace(mixed_cfg, loss=config.replace(mixed_cfg.loss, groups=3)))


def test_rows_without_negatives_are_kept_with_in_batch_negatives_only(mixed_cfg, tables):
  t = next(t for t in tables if t.task == "retrieval")
  assert len(t) == 32 and not t.skipped
  plan = plan_lib.Plan(mixed_cfg.data, mixed_cfg.tasks, tables, G)
  d = tables.index(t)
  for step in range(plan.steps_per_epoch):
    for u, sel in plan.units(step):
      if u == d:
        have = np.minimum(t.neg_off[sel["query"] + 1] - t.neg_off[sel["query"]], 2)
        np.testing.assert_array_equal(sel["neg_valid"].sum(1), have)
  # The loss: a row without negatives sees the positives and the other rows' negatives, nothing else.
  rng = np.random.default_rng(0)
  q, p, n = (rng.normal(size=s).astype(np.float32) for s in ((4, 8), (4, 8), (4, 2, 8)))
  valid = np.array([[False, False], [True, False], [True, True], [False, False]])
  got = losses.retrieval_infonce(q, p, n, temperature=0.05, n_mask=valid)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  cands = np.concatenate([unit(p), unit(n)[valid]])
  logits = unit(q) @ cands.T / 0.05
  want = np.mean(np.log(np.exp(logits).sum(1)) - np.diag(logits[:, :4]))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  none = np.zeros_like(valid)
  np.testing.assert_allclose(losses.retrieval_infonce(q, p, n, temperature=0.05, n_mask=none),
                             losses.retrieval_infonce(q, p, temperature=0.05), rtol=1e-6)


def _assert_grads_close(got, want, what):
  top = max(np.abs(w).max() for w in want.values())
  for k, w in want.items():
    scale = max(np.abs(w).max(), 1e-2 * top) if ".key." in k else np.abs(w).max()  # softmax shift: tiny grads
    np.testing.assert_allclose(got[k], w, rtol=1e-5, atol=1e-5 * scale, err_msg=f"{what}: {k}")


def test_grouped_mixed_step_equals_torch_ddp_of_the_original(mixed_cfg, tables):
  """G simulated workers, each with its own group, task and loss (criteria.py semantics), gradients
  averaged, against loss.groups=G, data.mix="groups" on all-MiniLM-L6-v2's first two layers (dropout off), 1
  device and 8."""
  torch_ref = pytest.importorskip("bench.torch_ref")
  cfg, params = conftest.minilm_layers(2)
  lc = config.replace(mixed_cfg)
  lc.loss.mrl_dims = (128, 256, 384)
  assemble = _assembler(mixed_cfg, tables, multiple=8)
  step = next(s for s in range(assemble.plan.steps_per_epoch) if len(assemble(s)[0].mix) == 3)
  b, _ = assemble(step)
  workers = []  # each group as the original's GPU sees it: its own rows, each text padded
  for task, n in b.mix:
    padded = {f: torch_ref.unpacked(b, task, f) for f in b.slots[task]}
    for g in range(n):
      part = lambda x: np.split(x, n)[g]
      workers.append((task, {f"{f}_{k}": part(x) for f, xs in padded.items() for k, x in zip(("ids", "mask"), xs)}
                      | {k: part(x) for k, x in b.extras[task].items()}))
  assert sorted({w[0] for w in workers}) == ["cls", "retrieval", "sts"] and len(workers) == G
  want_loss, want = torch_ref.torch_ddp_grads(cfg, params, workers, lc)

  tx, _ = state_lib.make_optimizer(config.section("optim"), params, 10)
  graphdef, rngs = state_lib.init_state(cfg, params, tx, sharding.make_mesh(1), 0)[2:]
  grads = jax.jit(lambda p, b: step_lib.value_and_grad(graphdef, rngs, p, b, lc))
  for devices in (1, 8):
    mesh = sharding.make_mesh(1) if devices == 1 else jax.make_mesh(
        (8, 1), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    (loss, _), g = grads(jax.device_put(params, sharding.replicated(mesh)), sharding.put_batch(b, mesh))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    got = export.to_weights(cfg, jax.tree.map(np.asarray, g))
    _assert_grads_close(got, {k: want[k] for k in got}, f"{devices} devices")
  # One group is not G: the grouping changes the loss (retrieval's in-batch negatives).
  whole = dataclasses.replace(b, mix=tuple((t, 1) for t, _ in b.mix))
  loss, _ = jax.jit(lambda p, b: step_lib.step_loss(nnx.merge(graphdef, p, rngs).embed_rows(b.rows), b, lc))(params, whole)
  assert abs(float(loss) - want_loss) > 1e-3


def test_extended_positions_train_all_rows():
  cfg = model_lib.Config(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                         dropout=0.0, attention_dropout=0.0)
  params = models.random_params(cfg, 0)
  emb = params["embeddings"]["position"]
  emb["embedding"] = models.extend_positions(emb["embedding"], 1024, "tile")
  cfg = cfg.replace(max_position=1024, max_seq_length=1024)
  graphdef, _, rngs = nnx.split(model_lib.abstract_model(cfg), nnx.Param, ...)
  ids = jnp.asarray(np.random.default_rng(0).integers(1, 50, (2, 600)), jnp.int32)

  def loss_fn(p):
    e = nnx.merge(graphdef, p, nnx.to_pure_dict(rngs))(ids, jnp.ones_like(ids))
    return jnp.sum(e[0] * e[1])

  g = jax.jit(jax.grad(loss_fn))(params)["embeddings"]["position"]["embedding"]
  assert (np.abs(g[:600]).sum(1) > 0).all() and not g[600:].any()  # rows past 512 used: gradient
  for train_positions in (False, True):
    tx, _ = state_lib.make_optimizer(config.section("optim", warmup_steps=0), params, 10, train_positions)
    upd = jax.jit(lambda p: tx.update(jax.tree.map(jnp.ones_like, p), tx.init(p), p)[0])(params)
    pos = np.asarray(upd["embeddings"]["position"]["embedding"])
    assert pos.any() == train_positions and (np.abs(pos).min() > 0) == train_positions  # all rows, or none
    assert np.asarray(upd["embeddings"]["word"]["embedding"]).any()


def test_resume_is_bit_exact_with_mixed_steps(mixed_cfg, tmp_path):
  """A run resumed from its step-2 checkpoint ends with the uninterrupted run's parameters."""
  c = mixed_cfg.copy_and_resolve_references()
  c.data.pack_menu, c.train.epochs, c.checkpoint.every, c.checkpoint.keep = 1, 1, 2, 10
  c.data.datasets, c.loss.groups = c.data.datasets[:2], 2  # Retrieval and STS, a group each a step.
  train.train(c, tmp_path / "straight")
  shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
  for p in (tmp_path / "resumed" / "checkpoints").iterdir():
    if p.name.isdigit() and int(p.name) > 2:
      shutil.rmtree(p)
  shutil.rmtree(tmp_path / "resumed" / "model")
  last = train.train(c, tmp_path / "resumed")
  assert last["task"] == "mixed" and {"loss/retrieval", "loss/sts"} <= set(last)
  a, b = (models.load_init(str(tmp_path / r / "model"))[1] for r in ("straight", "resumed"))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  rows = [json.loads(l) for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "task" in r] == list(range(1, 5))


def test_piccolo2_differs_from_finetune_in_the_readme_table_only():
  from piccolo_jax.configs import finetune, piccolo2
  a, b = (config.flat(m.get_config()) for m in (finetune, piccolo2))
  assert {k: (a[k], b[k]) for k in a if a[k] != b[k]} == {
      "loss.groups": (1, 32), "data.mix": ("dataset", "groups"), "optim.clip_norm": (1.0, 0.0),
      "optim.warmup_ratio": (0.05, 0.0), "tasks.retrieval.mask_duplicates": (True, False)}
  readme = (tiny_config.DATA.parent / "README.md").read_text()
  assert "| `loss.groups` | 1 | 32 |" in readme and "| `tasks.retrieval.mask_duplicates` | True | False |" in readme


def test_neg_num_entry_is_checked(mixed_cfg, tables):
  with pytest.raises(data.DataError, match="'neg_num' must be an integer >= 0, got -1"):
    data.sources.check_entry({"kind": "jsonl", "path": "x.jsonl", "neg_num": -1})
  sts = next(t for t in tables if t.task == "sts")
  odd = data.prepare.Prepared(sts.path, neg_num=2)
  with pytest.raises(data.DataError, match="neg_num=2 is set, but task sts takes no negatives"):
    plan_lib.Plan(mixed_cfg.data, mixed_cfg.tasks, [t if t is not sts else odd for t in tables], G)
