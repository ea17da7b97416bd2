"""Decoder embedders (decoder.py): parity with Hugging Face's Qwen3 / Qwen2 / Llama / Mistral and PEFT's LoRA on tiny random
models built here, FSDP gradients, and a LoRA training run that resumes exactly and exports to sentence-transformers."""
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from piccolo_jax.configs import decoder_tiny
from piccolo_jax import attention, convert, decoder, encode, export, modeldir, models, sharding, train
from piccolo_jax import state as state_lib
from piccolo_jax import model as model_lib
from piccolo_jax import step as step_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
REPO = pathlib.Path(__file__).resolve().parent.parent
LENS = (5, 9, 3, 12)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """{family: a saved tiny random HF base model (norms and biases perturbed), with MiniLM's tokenizer}."""
  out, tok = {}, pathlib.Path(models.resolve_init("minilm"))
  torch.manual_seed(0)
  for kind in ("Qwen3", "Qwen2", "Llama", "Mistral"):
    kw = dict(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, head_dim=24, max_position_embeddings=512, rope_theta=1e4, pad_token_id=0)
    # Llama as a ...ForCausalLM checkpoint ("model." keys and an lm_head), Qwen2's sharded: the converter reads both.
    cls = getattr(transformers, kind + ("ForCausalLM" if kind == "Llama" else "Model"))
    hf = cls(getattr(transformers, kind + "Config")(
        **kw, **{"Llama": {"attention_bias": True}, "Mistral": {"sliding_window": 256}}.get(kind, {}))).eval()
    with torch.no_grad():
      for n, p in hf.named_parameters():
        if "norm" in n or "bias" in n:
          p.add_(torch.randn_like(p) * 0.1)
    out[kind] = tmp_path_factory.mktemp(kind)
    hf.save_pretrained(out[kind], max_shard_size="1MB" if kind == "Qwen2" else "5GB")
    for f in modeldir.tokenizer_files(tok):
      shutil.copy2(f, out[kind] / f.name)
  return out


def _ours(path, **kw):
  cfg, weights = convert.read_source(path)
  cfg = cfg.replace(**kw)
  model = model_lib.abstract_model(cfg)
  nnx.update(model, jax.tree.map(jnp.asarray, convert.to_params(cfg, weights, path)))
  model.eval()
  return model


def _texts(side, L=12):
  rng = np.random.default_rng(0)
  ids_N = [rng.integers(100, 30000, n) for n in LENS]
  ids_BL, mask_BL = np.zeros((len(LENS), L), np.int64), np.zeros((len(LENS), L), np.int64)
  for i, t in enumerate(ids_N):
    at = slice(0, len(t)) if side == "right" else slice(L - len(t), L)
    ids_BL[i, at], mask_BL[i, at] = t, 1
  return ids_N, ids_BL, mask_BL


def _packed(ids_N, L=32):
  """One row holding every text: (tokens, segments, positions, lengths) [1, L] and [1, S]."""
  rows = [np.zeros((1, L), np.int32) for _ in range(3)] + [np.zeros((1, len(ids_N)), np.int32)]
  at = 0
  for s, t in enumerate(ids_N):
    for r, v in zip(rows, (t, s + 1, np.arange(len(t)))):
      r[0, at:at + len(t)] = v
    rows[3][0, s], at = len(t), at + len(t)
  return tuple(map(jnp.asarray, rows))


def _hidden(hf, ids_BL, mask_BL, causal=True):
  """HF's last hidden states; bidirectional through an additive 4D mask (a text's tokens see each other)."""
  m = mask_BL if causal else torch.where(torch.tensor(
      (mask_BL[:, None, :, None] * mask_BL[:, None, None, :]).astype(bool)) | torch.eye(mask_BL.shape[1], dtype=bool),
      0.0, torch.finfo(torch.float32).min)
  with torch.no_grad():
    return hf(input_ids=torch.tensor(ids_BL), attention_mask=torch.as_tensor(m)).last_hidden_state.numpy()


@pytest.mark.parametrize("kind", ["Qwen3", "Qwen2", "Llama", "Mistral"])
def test_parity_with_hugging_face_padded_either_side_and_packed(hf_dirs, kind):
  hf = getattr(transformers, kind + "Model").from_pretrained(hf_dirs[kind], attn_implementation="eager").eval()
  for causal in (True, False):
    ours = _ours(hf_dirs[kind], causal=causal)
    for side in ("right", "left"):
      ids_N, ids_BL, mask_BL = _texts(side)
      want_BLD = _hidden(hf, ids_BL, mask_BL, causal)
      pos_BL = np.maximum(np.cumsum(mask_BL, 1) - 1, 0)
      got_BLD = np.asarray(ours.hidden_states(*map(jnp.asarray, (ids_BL, mask_BL, pos_BL, mask_BL.sum(1, keepdims=True)))))
      real = mask_BL == 1
      np.testing.assert_allclose(got_BLD[real], want_BLD[real], atol=1e-5)
      last_ND = np.stack([h[m == 1][-1] for h, m in zip(want_BLD, mask_BL)])  # Last-token pooling.
      np.testing.assert_allclose(ours(jnp.asarray(ids_BL), jnp.asarray(mask_BL)), last_ND, atol=1e-5)
    np.testing.assert_allclose(ours.packed(*_packed(ids_N))[0], last_ND, atol=1e-5)
  files = {f.name for f in hf_dirs[kind].iterdir()}
  assert ("model.safetensors.index.json" in files) == (kind == "Qwen2")
  # Mistral's sliding window (256 of its 512 positions) caps the texts: up to it, attention is full.
  assert convert.read_source(hf_dirs[kind])[0].max_seq_length == (256 if kind == "Mistral" else 512)
  ids_N, ids_BL, mask_BL = _texts("left")
  want_ND = np.stack([h[m == 1].mean(0) for h, m in zip(_hidden(hf, ids_BL, mask_BL), mask_BL)])  # Mean pooling.
  np.testing.assert_allclose(_ours(hf_dirs[kind], pooling="mean").packed(*_packed(ids_N))[0], want_ND, atol=1e-5)


def test_safetensors_reader_takes_bfloat16(tmp_path):
  """Real checkpoints are bfloat16, which safetensors.numpy cannot read: the memory-mapped reader does, exactly."""
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  want = {"w": torch.randn(3, 5, dtype=torch.bfloat16), "b": torch.randn(4, dtype=torch.float32),
          "e": torch.zeros(0, 2, dtype=torch.float16)}
  save_file(want, tmp_path / "m.safetensors")
  got = convert.read_safetensors(tmp_path / "m.safetensors")
  for k, v in want.items():
    assert str(got[k].dtype) == str(v.dtype).removeprefix("torch.") and got[k].shape == tuple(v.shape)
    np.testing.assert_array_equal(np.asarray(got[k], np.float32), v.float().numpy())


def _lora(path, rank=4, alpha=8.0):
  """Our tiny Qwen3 with adapters whose lora_b are random (a new adapter's are 0)."""
  cfg, weights = convert.read_source(path)
  cfg = cfg.replace(lora_rank=rank, lora_alpha=alpha)
  params = decoder.add_lora(cfg, convert.to_params(cfg.replace(lora_rank=0), weights, path), 0)
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: rng.normal(0, 0.05, x.shape).astype(np.float32) if "lora_b" in jax.tree_util.keystr(p) else x,
      params)
  return cfg, params


def test_lora_equals_peft_and_merged_and_trains_adapters_only(hf_dirs):
  peft = pytest.importorskip("peft")
  cfg, params = _lora(hf_dirs["Qwen3"])
  model = model_lib.abstract_model(cfg)
  nnx.update(model, jax.tree.map(jnp.asarray, params))
  model.eval()
  ids_N, ids_BL, mask_BL = _texts("left")
  got_ND = np.asarray(model(jnp.asarray(ids_BL), jnp.asarray(mask_BL)))
  hf = transformers.Qwen3Model.from_pretrained(hf_dirs["Qwen3"], attn_implementation="eager")
  names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
  hf = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                               target_modules=[n.split(".")[1] for n in names.values()])).eval()
  with torch.no_grad():
    for i, layer in params["layers"].items():
      for ours, theirs in names.items():
        p = layer["attn"][ours] if ours in "qkvo" else layer[ours]
        mod = hf.base_model.model.layers[i].get_submodule(theirs)
        mod.lora_A["default"].weight.copy_(torch.tensor(p["lora_a"].T))
        mod.lora_B["default"].weight.copy_(torch.tensor(p["lora_b"].T))
  want_BLD = _hidden(hf, ids_BL, mask_BL)
  np.testing.assert_allclose(got_ND, np.stack([h[m == 1][-1] for h, m in zip(want_BLD, mask_BL)]), atol=1e-5)
  merged_cfg, merged = decoder.merge_lora(cfg, params)
  plain = model_lib.abstract_model(merged_cfg)
  nnx.update(plain, jax.tree.map(jnp.asarray, merged))
  np.testing.assert_allclose(plain.packed(*_packed(ids_N))[0], got_ND, atol=1e-5)
  assert np.abs(got_ND - np.asarray(_ours(hf_dirs["Qwen3"])(jnp.asarray(ids_BL), jnp.asarray(mask_BL)))).max() > 1e-3

  # Only the adapters train: the base is frozen in bfloat16 apart from the optimizer, and a step leaves it as it was.
  trained, frozen = state_lib.split_frozen(params, cfg)
  leaf_paths = lambda t: {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(t)}
  assert leaf_paths(trained) and all("lora_" in p for p in leaf_paths(trained))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(frozen))
  c = decoder_tiny.get_config()
  c.optim.warmup_ratio = 0.0
  tx, _ = state_lib.make_optimizer(c.optim, trained, 10)
  mesh = sharding.make_mesh(fsdp=2)
  st, _, graphdef, rngs = state_lib.init_state(cfg, trained, tx, mesh, 0, frozen)
  opt_shapes = {x.shape for x in jax.tree.leaves(st["opt"]) if x.ndim}
  assert opt_shapes <= {x.shape for x in jax.tree.leaves(trained)}
  batch, before = sharding.put_batch(_batch(), mesh), jax.tree.map(np.asarray, st)  # The step donates st.
  new, m = step_lib.make_train_step(graphdef, tx, c, 0, mesh)(st, batch, rngs)
  assert m["ok"] and int(new["step"]) == 1
  jax.tree.map(np.testing.assert_array_equal, new["frozen"], before["frozen"])
  assert max(np.abs(np.asarray(a) - b).max() for a, b in
             zip(jax.tree.leaves(new["params"]), jax.tree.leaves(before["params"]))) > 0


def _batch(seed=0, row_lengths=(64, 32)):
  from bench import accel  # pylint: disable=import-outside-toplevel
  return accel.texts({"retrieval": 8, "sts": 8}, 2, max(row_lengths), 20, 30522, seed=seed,
                     row_lengths=row_lengths)[0]


def test_fused_kernels_take_causal_and_segments(hf_dirs):
  """splash and the Pallas GPU kernel (interpreted), on rows of two lengths over 8 devices, embed as xla does, causal
  and bidirectional."""
  cfg, weights = convert.read_source(hf_dirs["Qwen3"])
  params, mesh = convert.to_params(cfg, weights), sharding.make_mesh(1)
  b = sharding.put_batch(_batch(row_lengths=(256, 128)), mesh)
  for causal in (True, False):
    emb = {}
    for impl in ("xla", "splash", "pallas_gpu"):
      graphdef, _, rngs = nnx.split(model_lib.abstract_model(cfg.replace(attention=impl, causal=causal)), nnx.Param, ...)

      def embed(p, rows):
        with attention.on(mesh):
          return nnx.merge(graphdef, p, rngs).embed_rows(rows)

      emb[impl] = np.asarray(jax.jit(embed)(params, b.rows))
    for impl in ("splash", "pallas_gpu"):
      np.testing.assert_allclose(emb[impl], emb["xla"], atol=1e-5, err_msg=f"{impl} causal={causal}")


def test_fsdp_and_gradient_caching_gradients_equal_one_device(hf_dirs):
  cfg, weights = convert.read_source(hf_dirs["Qwen3"])
  params = convert.to_params(cfg, weights)
  c = decoder_tiny.get_config()
  c.loss.mrl_dims = (32, 64)
  graphdef, _, rngs = nnx.split(model_lib.abstract_model(cfg), nnx.Param, ...)
  rngs = nnx.to_pure_dict(rngs)
  grads = {}
  for name, devices, fsdp, chunk in (("one", 1, 1, 0), ("fsdp", 8, 8, 0), ("cached", 8, 4, 8)):
    mesh = sharding.make_mesh(fsdp, jax.devices()[:devices])
    p = jax.device_put(params, sharding.state_shardings(mesh, params))
    b = sharding.put_batch(_batch(), mesh)
    fn = lambda p, b: step_lib.value_and_grad(graphdef, rngs, p, b, c, None, chunk)
    (loss, _), grads[name] = jax.jit(fn)(p, b)
    if name == "fsdp":
      assert "fsdp" in str(p["embed"]["embedding"].sharding.spec)
    grads[name] = jax.tree.map(np.asarray, grads[name])
  for name in ("fsdp", "cached"):  # Sums in another order: 1e-5 of a leaf's largest entry (measured: 1.3e-5 / 0.1).
    for a, b in zip(jax.tree.leaves(grads[name]), jax.tree.leaves(grads["one"])):
      assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


def _metrics(workdir):
  return [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_tiny_decoder_run_learns_resumes_exactly_and_exports(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)  # The config's data paths.
  c = decoder_tiny.get_config()
  c.data.datasets = tuple({**d, "limit": 96} for d in c.data.datasets)
  c.train.update(epochs=3, tensorboard=False, log_every=1)
  c.data.pack_menu, c.checkpoint.every, c.checkpoint.keep, c.eval.tasks = 1, 3, 10, ()
  train.train(c, tmp_path / "run")
  rows = [m for m in _metrics(tmp_path / "run") if "task" in m]
  retrieval = [m["loss/retrieval"] for m in rows if m["task"] == "retrieval"]
  assert len(rows) == 18 and np.mean(retrieval[-3:]) < 0.8 * np.mean(retrieval[:3]), retrieval
  ckpt = tmp_path / "run" / "checkpoints"
  stored = json.loads((ckpt / "9" / "state" / "_METADATA").read_text())["tree_metadata"]
  params = [k for k in stored if k.startswith("('params'")]
  assert params and all("lora_" in k for k in params) and not any("frozen" in k and "embed" in k for k in stored)

  # Resume: the run from checkpoint 9 to the end is the straight run, bit for bit.
  shutil.copytree(tmp_path / "run", tmp_path / "resumed",
                  ignore=shutil.ignore_patterns("model", "export", "export.json", "metrics.jsonl"))
  for d in (tmp_path / "resumed" / "checkpoints").iterdir():
    if d.name.isdigit() and int(d.name) > 9:
      shutil.rmtree(d)
  train.train(c, tmp_path / "resumed")
  a, b = (modeldir.load_params(tmp_path / r / "model", modeldir.load_config(tmp_path / r / "model"))
          for r in ("run", "resumed"))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  loss = lambda r: {m["step"]: m[f"loss/{m['task']}"] for m in _metrics(tmp_path / r) if "task" in m}
  assert loss("resumed") == {s: v for s, v in loss("run").items() if s > 9}

  # The export: adapters merged, last-token pooling, the dataset's instruction as a prompt; SentenceTransformer
  # gives our embeddings, packed or padded.
  st_dir = tmp_path / "run" / "export"
  pool = json.loads((st_dir / "1_Pooling" / "config.json").read_text())
  assert pool["pooling_mode_lasttoken"] and not pool["pooling_mode_mean_tokens"]
  instruct = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
  st = pytest.importorskip("sentence_transformers").SentenceTransformer(str(st_dir), device="cpu")
  assert st.prompts["triplets.train.jsonl_query"] == instruct
  texts = ["今天天气很好", "a much longer text about nothing in particular, several words", "短"]
  ours = encode.Embedder.load(tmp_path / "run" / "model")
  np.testing.assert_allclose(st.encode(texts), ours.encode(texts), atol=1e-5)
  padded = encode.Embedder.load(tmp_path / "run" / "model", packing=False)
  np.testing.assert_allclose(padded.encode(texts), ours.encode(texts), atol=1e-5)
  np.testing.assert_allclose(st.encode(texts[:1], prompt_name="triplets.train.jsonl_query"),
                             ours.encode([instruct + texts[0]]), atol=1e-5)
  # The converter reads the export back (a sentence-transformers decoder dir), as every tool does.
  again = encode.Embedder.load(st_dir)
  assert isinstance(again.model.cfg, decoder.Config) and again.model.cfg.pooling == "lasttoken"
  np.testing.assert_allclose(again.encode(texts), ours.encode(texts), atol=1e-5)
  assert export.hf_config(again.model.cfg)["model_type"] == "qwen3"


@pytest.mark.parametrize("platform,impl,calls", [("tpu", "splash", ["tpu_custom_call"]),
                                                 ("cuda", "cudnn", ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"])])
def test_lora_step_lowers_with_causal_fused_attention(platform, impl, calls):
  """A LoRA decoder's step (bf16, remat, base frozen in bf16, 8 devices with fsdp) exports with the fused kernel, and
  the analytic parameter counts (bench/accel_bytes.py) are the model's."""
  from bench import accel, accel_bytes  # pylint: disable=import-outside-toplevel
  cfg = decoder.Config(**decoder_tiny.get_config().model.arch.to_dict(), lora_rank=4)
  batch, _ = accel.texts({"retrieval": 8, "sts": 8}, 2, 256, 60, cfg.vocab_size)
  out = accel.lower_one(cfg.replace(dtype="bfloat16", remat="full"), batch, (32, 64), sharding.make_mesh(4), platform,
                        impl)
  assert out["devices"] == 8 and out["custom_calls"] == calls and not out["LxL_tensors"]
  state, *_ = accel.abstract_state(cfg, sharding.make_mesh(4))
  size = lambda t: sum(x.size for x in jax.tree.leaves(t))
  assert accel_bytes.decoder_params(cfg) == (size(state["frozen"]), size(state["params"]))
  assert {x.dtype for x in jax.tree.leaves(state["frozen"])} == {jnp.dtype(jnp.bfloat16)}
  if platform == "tpu":  # The analytic state (accel_bytes.decoder_bytes) is XLA's arguments, full and LoRA.
    for row in accel_bytes.decoder_compare(cfg, batch, (32, 64), ranks=(0, 4), policies=("none",)):
      np.testing.assert_allclose(row["analytic_state_mb"], row["xla_arguments_mb"], rtol=1e-3, err_msg=str(row))
