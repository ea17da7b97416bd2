"""Model merging (piccolo_jax.merge): the merges against closed forms and a numpy TIES, LM-Cocktail's weights, the
CLI's export against our encoder, the refusals, and merges of a run's checkpoints (the CLI and train.merge_last)."""
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

import conftest
import tiny_config
from piccolo_jax import checkpoint, encode, merge, model as model_lib, modeldir, models as models_lib, train

TINY = model_lib.Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, dense_out=48)


def _host(tree):
  return jax.tree.map(np.asarray, tree)


def test_mean_of_identical_models_is_the_model_bit_for_bit():
  p = models_lib.random_params(TINY, 0)
  assert jax.device_count() == 8  # Sharded over every device.
  got = _host(merge.merge("mean", [p, p, p], [0.2, 0.3, 0.5]))
  jax.tree.map(np.testing.assert_array_equal, got, p)
  q = models_lib.random_params(TINY, 1)
  want = jax.tree.map(lambda a, b: 0.25 * a + 0.75 * b, p, q)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), _host(merge.merge("mean", [p, q], [1, 3])), want)


def test_slerp_endpoints_and_closed_form():
  p, q = models_lib.random_params(TINY, 0), models_lib.random_params(TINY, 1)
  jax.tree.map(np.testing.assert_array_equal, _host(merge.merge("slerp", [p, q], [], t=0.0)), p)
  jax.tree.map(np.testing.assert_array_equal, _host(merge.merge("slerp", [p, q], [], t=1.0)), q)
  a, b = {"v": np.array([2.0, 0.0], np.float32)}, {"v": np.array([0.0, 1.0], np.float32)}
  # 90 degrees apart: at t = 0.5 each weighs sin(pi/4) / sin(pi/2).
  np.testing.assert_allclose(merge.slerp(a, b, 0.5)["v"], [2 * np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-6)
  np.testing.assert_allclose(merge.slerp(a, b, 1 / 3)["v"], [2 * np.cos(np.pi / 6), np.sin(np.pi / 6)], rtol=1e-6)
  c = {"v": np.array([4.0, 0.0], np.float32)}  # Parallel: linear.
  np.testing.assert_allclose(merge.slerp(a, c, 0.25)["v"], [2.5, 0.0], rtol=1e-6)


def _ties_reference(base, models, weights, density, scale):
  """TIES-merging written out one entry at a time (Yadav et al. 2023, with weights)."""
  deltas = []
  for m in models:
    d = (m - base).ravel()
    k = max(1, int(round(density * d.size)))
    threshold = np.sort(np.abs(d))[::-1][k - 1]
    deltas.append(np.where(np.abs(d) >= threshold, d, 0.0))
  out = np.zeros(base.size)
  for j in range(base.size):
    elected = np.sign(sum(w * d[j] for w, d in zip(weights, deltas)))
    pairs = [(w, d[j]) for w, d in zip(weights, deltas) if d[j] != 0 and np.sign(d[j]) == elected]
    out[j] = sum(w * x for w, x in pairs) / sum(w for w, _ in pairs) if pairs else 0.0
  return base + scale * out.reshape(base.shape)


def test_ties_and_task_arithmetic_against_numpy():
  rng = np.random.default_rng(0)
  base = {"w": rng.normal(size=(6, 10)).astype(np.float32), "b": rng.normal(size=12).astype(np.float32)}
  models = [jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32), base) for _ in range(3)]
  weights = [1.0, 0.5, 2.0]
  got = merge.ties(base, models, weights, density=0.3, scale=0.8)
  for k in base:
    np.testing.assert_allclose(got[k], _ties_reference(base[k], [m[k] for m in models], weights, 0.3, 0.8),
                               rtol=1e-5, atol=1e-6)
  got = merge.task_arithmetic(base, models, weights, scale=0.5)
  for k in base:
    np.testing.assert_allclose(got[k], base[k] + 0.5 * sum(w * (m[k] - base[k]) for w, m in zip(weights, models)),
                               rtol=1e-5, atol=1e-6)


def test_auto_weights_hand_computed():
  # softmax(-[1, 2] / 5) = e^-0.2 / (e^-0.2 + e^-0.4), ...
  np.testing.assert_allclose(merge.auto_weights([1.0, 2.0], 5.0), [0.549834, 0.450166], rtol=1e-5)
  np.testing.assert_allclose(merge.auto_weights([3.0, 3.0, 3.0]), [1 / 3] * 3)


@pytest.fixture(scope="module")
def models(tmp_path_factory, minilm_path):
  """all-MiniLM-L6-v2's first two layers, the same with noise, the same cut to one layer, and the same under
  another vocabulary: model dirs."""
  root = tmp_path_factory.mktemp("merge")
  cfg, params = conftest.minilm_layers(2)
  rng = np.random.default_rng(0)
  noisy = jax.tree.map(lambda x: x + 0.05 * rng.normal(size=x.shape).astype(np.float32) * np.std(x), params)
  one = models_lib.prune(cfg, params, [0])
  dirs = {}
  for name, (c, p) in {"a": (cfg, params), "b": (cfg, noisy), "one": one, "vocab": (cfg, params)}.items():
    modeldir.save_model_dir(root / name, c, p, minilm_path)
    dirs[name] = root / name
  vocab = (dirs["vocab"] / "vocab.txt").read_text().splitlines()
  vocab[1000], vocab[1001] = vocab[1001], vocab[1000]
  (dirs["vocab"] / "vocab.txt").write_text("\n".join(vocab) + "\n")
  (dirs["vocab"] / "tokenizer.json").unlink()
  return dirs


def test_cli_export_is_our_encoder_and_auto_prefers_the_trained_model(models, tmp_path, data_dir):
  """--auto: the noisy copy loses more on a few examples, so weighs less, by softmax(-loss / T) of the losses
  in the card; the export loads in sentence-transformers with our encoder's embeddings."""
  from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top
  auto = [f"retrieval=jsonl:{data_dir}/retrieval-zh/triplets.train.jsonl", f"sts=tsv:{data_dir}/sts-b-zh/sts-b-zh.train.tsv"]
  merge.main([str(tmp_path / "m"), str(models["a"]), str(models["b"]), "--auto", *auto, "--examples", "8",
              "--temperature", "0.5"])
  card = (tmp_path / "m" / "export" / "README.md").read_text()
  rows = [l.split("|") for l in card.splitlines() if l.startswith("| `")]
  weights, losses = np.array([float(r[2]) for r in rows]), np.array([float(r[3]) for r in rows])
  assert losses[0] < losses[1] and weights[0] > weights[1]
  np.testing.assert_allclose(weights, merge.auto_weights(losses, 0.5), atol=1e-4)
  texts = ["一个男人在弹吉他。", "A man plays the guitar.", "短"]
  ours = encode.Embedder.load(tmp_path / "m" / "model").encode(texts)
  theirs = SentenceTransformer(str(tmp_path / "m" / "export"), device="cpu").encode(texts, normalize_embeddings=True)
  np.testing.assert_allclose(theirs, ours, atol=1e-5)


@pytest.mark.parametrize("other,message", [("one", r"another architecture than .*\(num_layers 1 vs 2\)"),
                                           ("vocab", "another tokenizer")])
def test_mismatched_models_are_refused_in_one_line(models, tmp_path, other, message, capsys):
  with pytest.raises(SystemExit):
    merge.main([str(tmp_path / "m"), str(models["a"]), str(models[other])])
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("error: ") and __import__("re").search(message, err), err
  assert not (tmp_path / "m").exists()


def test_merges_of_a_run_checkpoints(tmp_path):
  """train.merge_last=3 exports the mean of the last 3 checkpoints; the CLI merges the same checkpoints to the
  same parameters, bit for bit."""
  c = tiny_config.get_config()
  c.data.datasets = c.data.datasets[1:2]  # STS alone: one program to compile.
  c.train.update(max_steps=6, merge_last=3)
  c.checkpoint.update(every=2, keep=3)
  train.train(c, tmp_path / "run")
  cfg = modeldir.load_config(tmp_path / "run" / "model")
  steps = conftest.steps(tmp_path / "run")
  assert steps == [2, 4, 6] and json.loads((tmp_path / "run" / "export.json").read_text())["merged"] == steps
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), conftest.params(tmp_path / "run" / "model"))
  ckpts = [jax.tree.map(np.asarray, checkpoint.restore_params(tmp_path / "run" / "checkpoints", s, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
      target))) for s in steps]
  model = conftest.params(tmp_path / "run" / "model")
  jax.tree.map(lambda m, *x: np.testing.assert_allclose(m, sum(x) / 3, rtol=1e-6, atol=1e-7), model, *ckpts)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ckpts[0]), jax.tree.leaves(ckpts[2])))
  merge.main([str(tmp_path / "m"), *(str(tmp_path / "run" / "checkpoints" / str(s)) for s in steps)])
  conftest.same_params(tmp_path / "m" / "model", tmp_path / "run" / "model")
  assert modeldir.load_config(tmp_path / "m" / "model") == cfg
  assert json.loads((tmp_path / "m" / "export" / "config_sentence_transformers.json").read_text())["prompts"] == {
      "query": "", "passage": ""}

  def change(state):  # A finite change of one stored parameter: refused, not merged.
    conftest.leaf(state, "params", "ffn_in", "kernel")[0].reshape(-1)[3] += 1e-3

  conftest.rewrite_state(tmp_path / "run" / "checkpoints" / "4", change)
  with pytest.raises(SystemExit):
    merge.main([str(tmp_path / "m2"), *(str(tmp_path / "run" / "checkpoints" / str(s)) for s in steps)])
  assert not (tmp_path / "m2").exists()
