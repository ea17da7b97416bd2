"""Encoder parity with sentence-transformers, conversion round trips, and conversion errors.

PICCOLO_EVAL_FULL=1 runs the parity on all of STS-B dev (slow: sentence-transformers on CPU).
"""
import csv
import json
import os
import shutil

import numpy as np
import pytest

from piccolo_jax import convert, encode, export

torch = pytest.importorskip("torch")
st_lib = pytest.importorskip("sentence_transformers")
ZH_SENTENCES = ["一个戴着安全帽的男人在跳舞。", "孩子在骑马。", "一个女人在弹吉他。", "一架飞机要起飞了。",
                "一个男人在切洋葱。", "两个人在公园里散步，天气很好，阳光明媚。"]


def _st(path):
  return st_lib.SentenceTransformer(str(path), device="cpu")


@pytest.fixture(scope="module")
def stsb_dev_texts(data_dir):
  with open(data_dir / "sts-b-en" / "sts-b-en.dev.tsv", encoding="utf-8") as f:
    rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
  texts = sorted({r[6] for r in rows} | {r[7] for r in rows})
  if os.environ.get("PICCOLO_EVAL_FULL"):
    return texts
  # Every 4th of the 2910 texts (sorted by text, so every length): packed into rows of 64 tokens as the
  # whole set is (its longest text: 53 tokens, theirs 45), at a quarter of sentence-transformers' encoding time.
  return texts[::4]


@pytest.fixture(scope="module")
def minilm_jax(minilm_path, tmp_path_factory):
  out = tmp_path_factory.mktemp("conv") / "minilm"
  convert.main([str(minilm_path), str(out)])  # Through the CLI, as a user would.
  return out


@pytest.fixture(scope="module")
def minilm_reference(minilm_path, stsb_dev_texts):
  return _st(minilm_path).encode(stsb_dev_texts, batch_size=32, normalize_embeddings=True)


def test_minilm_parity_on_stsb_dev(minilm_jax, stsb_dev_texts, minilm_reference):
  emb = encode.Embedder.load(minilm_jax).encode(stsb_dev_texts, batch_size=32)
  assert emb.shape == minilm_reference.shape == (len(stsb_dev_texts), 384)
  assert np.abs(emb - minilm_reference).max() <= 1e-5


def test_bfloat16_close_to_float32(minilm_jax, stsb_dev_texts, minilm_reference):
  emb = encode.Embedder.load(minilm_jax, dtype="bfloat16").encode(stsb_dev_texts, batch_size=64)
  cos = (emb * minilm_reference).sum(1)
  assert cos.min() >= 0.999
  assert np.abs(emb - minilm_reference).max() > 1e-6  # It really ran in bfloat16.


def test_round_trip_export(minilm_jax, minilm_path, stsb_dev_texts, minilm_reference, tmp_path):
  export.main([str(minilm_jax), str(tmp_path / "st")])
  emb = _st(tmp_path / "st").encode(stsb_dev_texts[:256], batch_size=32, normalize_embeddings=True)
  assert np.abs(emb - minilm_reference[:256]).max() <= 1e-5


def test_export_truncate_dim(minilm_jax, tmp_path):
  export.export(minilm_jax, tmp_path / "st", truncate_dim=128)
  assert json.loads((tmp_path / "st" / "config_sentence_transformers.json").read_text())["truncate_dim"] == 128
  emb = _st(tmp_path / "st").encode(ZH_SENTENCES[:2] + ["A man is dancing."], normalize_embeddings=True)
  ours = encode.Embedder.load(minilm_jax).encode(ZH_SENTENCES[:2] + ["A man is dancing."], dim=128)
  assert emb.shape == (3, 128) and np.abs(emb - ours).max() <= 1e-5


def test_encode_order_dim_chunks_and_cli(minilm_jax, stsb_dev_texts, tmp_path):
  texts = stsb_dev_texts[:40] + ["short", "a much longer sentence " * 20]
  embedder = encode.Embedder.load(minilm_jax)
  emb = embedder.encode(texts, batch_size=8, dim=64)
  perm = np.random.default_rng(0).permutation(len(texts))
  np.testing.assert_allclose(embedder.encode([texts[i] for i in perm], batch_size=8, dim=64), emb[perm], atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
  # Tokenized 5 at a time, from an iterator: packed otherwise, the same embeddings up to rounding.
  np.testing.assert_allclose(embedder.encode(iter(texts), batch_size=8, dim=64, chunk=5), emb, atol=1e-6)
  embedder.packing = False  # One text a row: the same batches whatever the chunk size, the same bits.
  padded = embedder.encode(texts, batch_size=8, dim=64)
  np.testing.assert_array_equal(embedder.encode(iter(texts), batch_size=8, dim=64, chunk=5), padded)
  np.testing.assert_allclose(padded, emb, atol=1e-6)
  (tmp_path / "t.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
  encode.main([str(minilm_jax), "--input", str(tmp_path / "t.txt"), "--output", str(tmp_path / "e.npy"),
               "--batch-size", "8", "--dim", "64", "--chunk", "16", "--no-packing"])
  out = np.load(tmp_path / "e.npy", mmap_mode="r")  # Written through a memmap, renamed once complete.
  assert out.shape == (len(texts), 64) and out.dtype == np.float32 and sorted(os.listdir(tmp_path)) == ["e.npy", "t.txt"]
  np.testing.assert_array_equal(out, padded)
  with pytest.raises(ValueError, match="dim 999"):
    embedder.encode(texts, dim=999)
  with pytest.raises(ValueError, match="more texts than the 3 output rows"):
    embedder.encode_to(texts, np.zeros((3, 64), np.float32), chunk=2)


@pytest.fixture(scope="module")
def stella_like(data_dir, tmp_path_factory):
  """A random BERT + mean pooling + Dense 64->96 (identity) with a Chinese character vocabulary."""
  from transformers import BertConfig, BertModel, BertTokenizerFast
  from sentence_transformers.models import Dense, Pooling, Transformer
  root = tmp_path_factory.mktemp("stella")
  text = (data_dir / "sts-b-zh" / "sts-b-zh.valid.tsv").read_text(encoding="utf-8")
  chars = sorted({c for c in text if not c.isspace()})
  (root / "hf").mkdir()
  (root / "hf" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars),
                                         encoding="utf-8")
  tok = BertTokenizerFast(vocab_file=str(root / "hf" / "vocab.txt"))
  torch.manual_seed(0)
  bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=128, max_position_embeddings=128))
  bert.save_pretrained(root / "hf")
  tok.save_pretrained(root / "hf")
  dense = Dense(64, 96, activation_function=torch.nn.Identity())
  torch.nn.init.normal_(dense.linear.bias)
  st = st_lib.SentenceTransformer(modules=[Transformer(str(root / "hf")), Pooling(64, "mean"), dense],
                                  device="cpu")
  st.save(str(root / "safetensors"))
  # The .bin variant: transformer and Dense weights as pytorch_model.bin, as stella ships them.
  shutil.copytree(root / "safetensors", root / "bin")
  (root / "bin" / "model.safetensors").unlink()
  (root / "bin" / "2_Dense" / "model.safetensors").unlink()
  torch.save(bert.state_dict(), root / "bin" / "pytorch_model.bin")
  torch.save(dense.state_dict(), root / "bin" / "2_Dense" / "pytorch_model.bin")
  return root


@pytest.mark.parametrize("variant", ["safetensors", "bin"])
def test_stella_shaped_round_trip(stella_like, variant, tmp_path):
  src = stella_like / variant
  ref = _st(src).encode(ZH_SENTENCES, normalize_embeddings=True)
  assert ref.shape == (6, 96)
  convert.convert(src, tmp_path / "jax")
  ours = encode.Embedder.load(tmp_path / "jax").encode(ZH_SENTENCES)
  assert np.abs(ours - ref).max() <= 1e-5
  export.export(tmp_path / "jax", tmp_path / "st")
  assert (tmp_path / "st" / "2_Dense" / "model.safetensors").is_file()
  back = _st(tmp_path / "st").encode(ZH_SENTENCES, normalize_embeddings=True)
  assert np.abs(back - ref).max() <= 1e-5


def _broken_copy(stella_like, tmp_path):
  src = tmp_path / "src"
  shutil.copytree(stella_like / "safetensors", src)
  return src


def _edit_weights(path, fn):
  from safetensors.numpy import load_file, save_file
  save_file(fn(load_file(path)), path)


def _edit_json(path, **kw):
  path.write_text(json.dumps(json.loads(path.read_text()) | kw))


BROKEN = {
    "missing weight": (lambda s: _edit_weights(s / "model.safetensors",
                                               lambda w: {k: v for k, v in w.items() if "layer.1.output.dense.bias" not in k}),
                       "missing weight.*encoder.layer.1.output.dense.bias"),
    "extra weight": (lambda s: _edit_weights(s / "model.safetensors",
                                             lambda w: w | {"encoder.layer.9.adapter.weight": np.zeros(3, np.float32)}),
                     "unexpected weight.*encoder.layer.9.adapter.weight"),
    "shape mismatch": (lambda s: _edit_json(s / "config.json", intermediate_size=100),
                       "encoder.layer.0.intermediate.dense.weight has shape"),
    "roberta": (lambda s: _edit_json(s / "config.json", model_type="roberta"), "config.json: model_type 'roberta'"),
    "t5": (lambda s: _edit_json(s / "config.json", model_type="t5"), "model_type 't5'"),
    "no tokenizer": (lambda s: [(s / f).unlink() for f in ("tokenizer.json", "vocab.txt") if (s / f).exists()],
                     "no tokenizer found"),
    "no weights": (lambda s: (s / "model.safetensors").unlink(), "no model.safetensors or pytorch_model.bin"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_conversion_errors_name_the_problem(stella_like, tmp_path, case, capsys):
  src = _broken_copy(stella_like, tmp_path)
  breaker, message = BROKEN[case]
  breaker(src)
  out = tmp_path / "out"
  with pytest.raises(SystemExit) as e:
    convert.main([str(src), str(out)])
  assert e.value.code == 2
  assert capsys.readouterr().err.count("error:") == 1
  with pytest.raises((ValueError, OSError), match=message):
    convert.convert(src, out)
  assert not out.exists()
  assert [p.name for p in tmp_path.iterdir()] == ["src"]  # No temporary leftovers either.


def test_cosent_loss_and_gradients_match_sentence_transformers(minilm_path, data_dir):
  """The training math end to end: our model + cosent vs sentence-transformers' CoSENTLoss."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from sentence_transformers.sentence_transformer.losses import CoSENTLoss
  from piccolo_jax import losses, model as model_lib
  with open(data_dir / "sts-b-en" / "sts-b-en.train.tsv", encoding="utf-8") as f:
    rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:17]
  a, b = [r[6] for r in rows], [r[7] for r in rows]
  score = np.array([float(r[5]) for r in rows], np.float32)
  st = _st(minilm_path)
  st.eval()
  fa, fb = st.tokenize(a), st.tokenize(b)
  loss_t = CoSENTLoss(st)([fa, fb], torch.tensor(score / 5))  # Scale 20 = 1 / temperature 0.05.
  loss_t.backward()
  cfg, weights = convert.read_source(minilm_path)
  graphdef, _, rngs = nnx.split(model_lib.abstract_model(cfg), nnx.Param, ...)

  def loss_fn(params):
    model = nnx.merge(graphdef, params, nnx.to_pure_dict(rngs))
    model.eval()
    emb = [model(jnp.asarray(f["input_ids"]), jnp.asarray(f["attention_mask"])) for f in (fa, fb)]
    return losses.cosent(*emb, jnp.asarray(score), temperature=0.05, weight=1.0)

  loss, grads = jax.value_and_grad(loss_fn)(convert.to_params(cfg, weights))
  np.testing.assert_allclose(float(loss), loss_t.item(), rtol=1e-5)
  bert = st[0].auto_model
  layer0, layer3 = bert.encoder.layer[0], bert.encoder.layer[3]
  for ours, theirs in [(grads["layers"][3]["ffn_in"]["kernel"].T, layer3.intermediate.dense.weight),
                       (grads["layers"][0]["attn"]["query"]["kernel"].T, layer0.attention.self.query.weight),
                       (grads["embeddings"]["word"]["embedding"], bert.embeddings.word_embeddings.weight)]:
    ref = theirs.grad.numpy()
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-7


def test_dropout_rate_scale_and_sharding():
  """model.Dropout: drops `rate` of the entries, keeps the mean, and its mask ignores the batch sharding."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from piccolo_jax import model as model_lib
  drop = model_lib.Dropout(0.1, rngs=nnx.Rngs(dropout=0))
  nnx.reseed(drop, dropout=jax.random.key(7))
  x_BLD = jnp.ones((8, 128, 385))  # Odd last axis: the 16-bit halves must still cover it.
  y = np.asarray(nnx.jit(lambda m, x: m(x))(drop, x_BLD))
  kept = y != 0
  assert abs(1 - kept.mean() - 0.1) < 0.003  # 394k draws: ~6 standard deviations.
  np.testing.assert_allclose(y[kept], 65536 / (65536 - 6554), rtol=1e-6)  # Exact keep probability.
  assert abs(y.mean() - 1) < 0.004
  assert 0.097 < 1 - kept[..., 193:].mean() < 0.103  # Columns 193.. take the words' high 16 bits.
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x_sharded = jax.device_put(x_BLD, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  nnx.reseed(drop, dropout=jax.random.key(7))
  np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, x: m(x))(drop, x_sharded)), y)
  nnx.reseed(drop, dropout=jax.random.key(8))
  assert (np.asarray(nnx.jit(lambda m, x: m(x))(drop, x_BLD)) != y).any()  # Another key, another mask.
  drop.eval()
  assert drop(x_BLD) is x_BLD
  assert not model_lib.Dropout(1.0, rngs=nnx.Rngs(dropout=0))(x_BLD).any()
