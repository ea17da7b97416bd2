"""Training on 8 fake devices: learning, compile counts, frozen params, resume, NaN stop, configs."""
import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest

import tiny_config
from piccolo_jax.configs import finetune
from piccolo_jax import model as model_lib
from piccolo_jax import cli, config, encode, modeldir, rundir, sharding, state, step as step_lib, train
from piccolo_jax import models

REPO = pathlib.Path(__file__).resolve().parent.parent


def _metrics(workdir):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [json.loads(l) for l in lines]


def test_train_learns_compiles_once_per_shape_and_freezes(tmp_path, monkeypatch):
  assert jax.device_count() == 8
  steps = []
  make = step_lib.make_train_step

  def spy(*args):
    steps.append(make(*args))
    return steps[-1]

  monkeypatch.setattr(step_lib, "make_train_step", spy)
  c = tiny_config.get_config()
  c.model.dropout, c.optim.lr, c.train.epochs = 0.0, 5e-3, 8
  c.tasks.retrieval.query_prefix = "query: "
  c.eval.update(tasks=(f"sts:{tiny_config.DATA}/sts-b-en/sts-b-en.dev.tsv",), every=24, dims=(16, 32),
                best_metric="sts-b-en/spearman@32")
  train.train(c, tmp_path)
  rows = [m for m in _metrics(tmp_path) if "task" in m]
  evals = {m["step"]: m for m in _metrics(tmp_path) if "eval/sts-b-en/spearman@32" in m}
  assert sorted(evals) == [0, 24, 48] and "eval/sts-b-en/spearman@16" in evals[48]
  best = json.loads((tmp_path / "best.json").read_text())
  assert best["value"] == max(m["eval/sts-b-en/spearman@32"] for m in evals.values())
  assert (tmp_path / "best" / "model_config.json").is_file()
  assert len(rows) == 8 * 6  # 8 epochs x (2 + 2 + 2) batches
  for m in rows:
    assert m["ok"] and np.isfinite(m[f"loss/{m['task']}"])
    # FLOP/s of the real tokens (flops.py); no MFU on a CPU, whose peak is unknown.
    assert 0 < m["flops_real"] < m["flops_computed"] and m["flops_per_s"] > 0 and "mfu" not in m
  for task in ("retrieval", "sts", "cls"):
    losses = [m[f"loss/{task}"] for m in rows if m["task"] == task]
    assert np.mean(losses[-4:]) < 0.9 * np.mean(losses[:4]), (task, losses)  # Last vs first 2 epochs.
    assert {f"loss/{task}/dim16", f"loss/{task}/dim32"} <= set(next(m for m in rows if m["task"] == task))
  assert steps[0]._cache_size() == len({(m["task"], str(m["rows"])) for m in rows})
  assert steps[0]._cache_size() <= 3 * c.data.pack_menu  # Packed: at most pack_menu row-count tuples per task.
  # Frozen position embeddings are bit-identical; word embeddings moved.
  init = models.random_params(models.init_params(c)[0], c.seed)
  cfg = modeldir.load_config(tmp_path / "model")
  final = modeldir.load_params(tmp_path / "model", cfg)
  np.testing.assert_array_equal(final["embeddings"]["position"]["embedding"],
                                init["embeddings"]["position"]["embedding"])
  assert np.abs(final["embeddings"]["word"]["embedding"] - init["embeddings"]["word"]["embedding"]).max() > 1e-4
  # The export documents itself and embeds queries as training did: the prefix is its "query" prompt.
  st = pytest.importorskip("sentence_transformers").SentenceTransformer(str(tmp_path / "export"), device="cpu")
  assert st.prompts["query"] == "query: " and st.prompts["passage"] == "" and "sts_query" not in st.prompts
  card = (tmp_path / "export" / "README.md").read_text()
  assert "## Evaluation (step 48)" in card and "| sts-b-en/spearman | " in card and "retrieval | 32 | 1 |" in card
  want = encode.Embedder.load(tmp_path / "model").encode(["query: a question"], normalize=False)
  np.testing.assert_allclose(st.encode(["a question"], prompt_name="query"), want, atol=1e-5)


def test_non_finite_loss_stops_with_step_and_task(tmp_path):
  c = tiny_config.get_config()
  c.tasks.sts.temperature = 0.0  # cos / 0: Inf and NaN logits.
  c.data.datasets = c.data.datasets[1:2]
  c.train.max_nonfinite_steps = 0
  with pytest.raises(train.NonFiniteError, match=r"step 1 \(task sts, dataset .*sts-b-en.*: loss nan.*"
                                                r"1 non-finite steps in a row.*resumes from checkpoint step 0"):
    train.train(c, tmp_path)
  assert not list((tmp_path / "checkpoints").glob("[0-9]*"))


def test_fsdp_shards_state_and_matches_data_parallel(tmp_path):
  c = tiny_config.get_config()
  c.train.max_steps, c.model.dropout, c.data.datasets = 3, 0.0, c.data.datasets[1:2]  # STS: one program.
  losses = {}
  for fsdp in (1, 4):
    c.mesh.fsdp = fsdp
    train.train(c, tmp_path / f"fsdp{fsdp}")
    losses[fsdp] = [m[f"loss/{m['task']}"] for m in _metrics(tmp_path / f"fsdp{fsdp}") if "task" in m]
  np.testing.assert_allclose(losses[4], losses[1], rtol=1e-5)
  mesh = sharding.make_mesh(fsdp=4)
  cfg, params, _ = models.init_params(c)
  tx, _ = state.make_optimizer(c.optim, params, 10)
  st, _, _, _ = state.init_state(cfg, params, tx, mesh, 0)
  word = st["params"]["embeddings"]["word"]["embedding"]
  assert "fsdp" in word.sharding.spec and word.addressable_shards[0].data.size == word.size // 4
  mu = jax.tree.leaves(st["opt"], is_leaf=lambda x: getattr(x, "shape", None) == word.shape)
  assert any(getattr(x, "sharding", None) == word.sharding for x in mu)


def test_config_by_name_and_overrides():
  assert cli.resolve_config_path("finetune").endswith("configs/finetune.py")
  assert cli.resolve_argv(["--config=demo", "--config.optim.lr=2e-5"]) == [
      f"--config={REPO / 'configs/demo.py'}", "--config.optim.lr=2e-5"]
  with pytest.raises(SystemExit, match="no config 'nope'"):
    cli.resolve_config_path("nope")
  old = config.base()  # A config file written for the schema before tasks.NAME sections.
  old.data.neg_num, old.loss.sts = 3, dict(weight=1.0)
  with pytest.raises(ValueError, match=r"data.neg_num is now tasks.retrieval.neg_num"):
    config.check(old)
  del old.data["neg_num"]
  with pytest.raises(ValueError, match=r"loss.sts is now tasks.sts.temperature and tasks.sts.weight"):
    config.check(old)
  c = finetune.get_config()
  assert c.model.dense_out == 1792 and c.loss.mrl_dims[-1] == 1792 and c.model.dtype == "bfloat16"
  assert c.optim.lr == 1e-5 and c.train.epochs == 3 and "embeddings/position" in c.optim.freeze
  with pytest.raises(ValueError, match=r"^set --config.model.init \(.*stella.*\) and --config.data.datasets"):
    config.check(c)  # finetune names neither the stella dir nor the data: one line naming both.


def test_config_names_resolve_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # No ./configs here: the installed piccolo_jax.configs serve.
  assert cli.resolve_config_path("finetune") == str(REPO / "configs" / "finetune.py")
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "finetune.py").write_text("")  # A user's own configs/ comes first.
  assert cli.resolve_config_path("finetune") == str(tmp_path / "configs" / "finetune.py")
  (tmp_path / "configs" / "finetune.py").unlink()
  spec = importlib.util.spec_from_file_location("stsb", cli.resolve_config_path("stsb"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # As config_flags loads it: by path, outside the repository.
  assert module.get_config().tasks.sts.weight == 1.0


def test_best_tracker(tmp_path):
  best = rundir.Best(tmp_path, "sts/spearman@384", model_lib.Config(), "")
  assert best.improved(100, {"sts/spearman@384": 80.0})
  assert not best.improved(200, {"sts/spearman@384": 79.0})
  assert best.improved(300, {"sts/spearman@384": 81.0}) and (best.step, best.value) == (300, 81.0)
  with pytest.raises(KeyError, match="not among the eval metrics"):
    best.improved(400, {"other@1": 1.0})


def test_position_extension():
  p = np.random.default_rng(0).normal(size=(8, 4))
  tiled = models.extend_positions(p, 20, "tile")
  np.testing.assert_array_equal(tiled[8:16], p)
  h = models.extend_positions(p, 64, "hierarchical")
  np.testing.assert_allclose(h[:8], p, atol=1e-12)  # The first n positions are unchanged.
  u = (p - 0.4 * p[0]) / 0.6
  np.testing.assert_allclose(h[3 * 8 + 5], 0.4 * u[3] + 0.6 * u[5], atol=1e-12)
  with pytest.raises(ValueError, match="position_extension 'rope'"):
    models.extend_positions(p, 16, "rope")
