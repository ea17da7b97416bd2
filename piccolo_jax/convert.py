"""PyTorch sentence-transformers / Hugging Face directory (BERT, or a Qwen3 / Qwen2 / Llama / Mistral decoder)
-> piccolo_jax model directory.

Usage: python -m piccolo_jax.convert SRC_DIR OUT_DIR
"""
import argparse
import json
import logging
import pathlib

import numpy as np
import ml_dtypes
from flax import nnx

from piccolo_jax import decoder
from piccolo_jax import modeldir
from piccolo_jax import model as model_lib

# Hugging Face BERT weights that sentence embeddings do not use: dropped with a log line.
IGNORED_PREFIXES = ("pooler.", "cls.", "embeddings.position_ids", "lm_head.")
DENSE_ACTIVATION_NAMES = {"torch.nn.modules.linear.Identity": "identity",
                          "torch.nn.modules.activation.Tanh": "tanh"}


# Hugging Face model types of the decoder families (decoder.FAMILIES); Mistral is Llama's layers.
DECODER_TYPES = {"qwen3": "qwen3", "qwen2": "qwen2", "llama": "llama", "mistral": "llama"}
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                      "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                      "BOOL": np.bool_}


def name_map(cfg) -> dict[tuple, tuple[str, bool]]:
  """Our parameter path -> (Hugging Face / sentence-transformers key, transpose?)."""
  m = _decoder_names(cfg) if isinstance(cfg, decoder.Config) else _bert_names(cfg)
  if cfg.dense_out:
    m[("dense", "kernel")] = ("2_Dense.linear.weight", True)
    if cfg.dense_bias:
      m[("dense", "bias")] = ("2_Dense.linear.bias", False)
  return m


def _decoder_names(cfg: decoder.Config) -> dict:
  """A decoder's names, as its HF base model (Qwen3Model, ...) saves them."""
  m = {("embed", "embedding"): ("embed_tokens.weight", False), ("norm", "scale"): ("norm.weight", False)}
  for i in range(cfg.num_layers):
    pre = f"layers.{i}."
    m[("layers", i, "attn_norm", "scale")] = (pre + "input_layernorm.weight", False)
    m[("layers", i, "mlp_norm", "scale")] = (pre + "post_attention_layernorm.weight", False)
    biases = {"q": cfg.attention_bias, "k": cfg.attention_bias, "v": cfg.attention_bias, "o": cfg.output_bias}
    for ours, theirs, bias in [(("attn", p), f"self_attn.{p}_proj", biases[p]) for p in "qkvo"] + [
        ((p,), f"mlp.{p}_proj", cfg.mlp_bias) for p in ("gate", "up", "down")]:
      m[("layers", i, *ours, "kernel")] = (pre + theirs + ".weight", True)
      if bias:
        m[("layers", i, *ours, "bias")] = (pre + theirs + ".bias", False)
    if cfg.qk_norm:
      for p in "qk":
        m[("layers", i, "attn", f"{p}_norm", "scale")] = (pre + f"self_attn.{p}_norm.weight", False)
  return m


def _bert_names(cfg: model_lib.Config) -> dict:
  m = {("embeddings", "word", "embedding"): ("embeddings.word_embeddings.weight", False),
       ("embeddings", "position", "embedding"): ("embeddings.position_embeddings.weight", False),
       ("embeddings", "token_type", "embedding"): ("embeddings.token_type_embeddings.weight", False),
       ("embeddings", "ln", "scale"): ("embeddings.LayerNorm.weight", False),
       ("embeddings", "ln", "bias"): ("embeddings.LayerNorm.bias", False)}
  linears = {("attn", "query"): "attention.self.query", ("attn", "key"): "attention.self.key",
             ("attn", "value"): "attention.self.value", ("attn", "out"): "attention.output.dense",
             ("ffn_in",): "intermediate.dense", ("ffn_out",): "output.dense"}
  norms = {("attn_ln",): "attention.output.LayerNorm", ("ffn_ln",): "output.LayerNorm"}
  for i in range(cfg.num_layers):
    pre = f"encoder.layer.{i}."
    for ours, theirs in linears.items():
      m[("layers", i, *ours, "kernel")] = (pre + theirs + ".weight", True)
      m[("layers", i, *ours, "bias")] = (pre + theirs + ".bias", False)
    for ours, theirs in norms.items():
      m[("layers", i, *ours, "scale")] = (pre + theirs + ".weight", False)
      m[("layers", i, *ours, "bias")] = (pre + theirs + ".bias", False)
  return m


def read_json(path) -> dict:
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found")
  return json.loads(path.read_text())


def read_safetensors(path) -> dict[str, np.ndarray]:
  """The tensors of a safetensors file, memory-mapped (bfloat16 as ml_dtypes'), as the format's header lays them."""
  try:
    with open(path, "rb") as f:
      n = int.from_bytes(f.read(8), "little")
      header = json.loads(f.read(n))
    size = pathlib.Path(path).stat().st_size
    data = np.memmap(path, np.uint8, "r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    out = {}
    for k, t in header.items():
      if k != "__metadata__":
        start, end = t["data_offsets"]
        out[k] = data[start:end].view(SAFETENSORS_DTYPES[t["dtype"]]).reshape(t["shape"])
    return out
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def read_weights(directory) -> dict[str, np.ndarray]:
  """Tensors of model.safetensors (preferred; or the shards its index names) or pytorch_model.bin, float32."""
  directory = pathlib.Path(directory)
  index = directory / "model.safetensors.index.json"
  if (directory / "model.safetensors").is_file():
    tensors = read_safetensors(directory / "model.safetensors")
  elif index.is_file():
    tensors = {}
    for shard in sorted(set(read_json(index)["weight_map"].values())):
      tensors |= read_safetensors(directory / shard)
  elif (directory / "pytorch_model.bin").is_file():
    try:
      import torch
    except ImportError as e:
      raise ImportError(f"{directory / 'pytorch_model.bin'}: reading .bin weights needs torch "
                        "(pip install 'piccolo_jax[torch]')") from e
    state = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    tensors = {k: v.float().numpy() for k, v in state.items()}
  else:
    raise FileNotFoundError(f"{directory}: no model.safetensors or pytorch_model.bin")
  return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def _normalize_keys(tensors: dict, source) -> dict:
  """Strips a 'bert.' or 'model.' prefix (a ...ForCausalLM's) and renames legacy LayerNorm gamma/beta."""
  for prefix in ("bert.", "model."):
    if any(k.startswith(prefix) for k in tensors):
      tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
  out = {}
  for k, v in tensors.items():
    k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if k.startswith(IGNORED_PREFIXES):
      logging.info("%s: dropping %s (unused for sentence embeddings)", source, k)
      continue
    out[k] = v
  return out


def read_source(src_dir) -> tuple[model_lib.Config, dict[str, np.ndarray]]:
  """Reads a sentence-transformers or plain HF BERT directory into (Config, weights by HF key)."""
  src = pathlib.Path(src_dir)
  if not src.is_dir():
    raise FileNotFoundError(f"{src} is not a directory")
  modules = read_json(src / "modules.json") if (src / "modules.json").is_file() else []
  by_kind = {m["type"].rsplit(".", 1)[-1]: src / m.get("path", "") for m in modules}
  unknown = set(by_kind) - {"Transformer", "Pooling", "Dense", "Normalize"}
  if unknown:
    raise ValueError(f"{src / 'modules.json'}: unsupported module(s) {sorted(unknown)}; "
                     "supported: Transformer, Pooling, Dense, Normalize")
  tdir = by_kind.get("Transformer", src)
  hf = read_json(tdir / "config.json")
  if hf.get("model_type") not in ("bert", *DECODER_TYPES):
    raise ValueError(f"{tdir / 'config.json'}: model_type {hf.get('model_type')!r} is not supported; piccolo_jax "
                     f"converts bert and the decoders {', '.join(DECODER_TYPES)}")
  kw, longest = (_decoder_kw if hf["model_type"] in DECODER_TYPES else _bert_kw)(hf, tdir / "config.json")
  kw.update(normalize="Normalize" in by_kind, max_seq_length=_max_seq_length(tdir, longest))
  if "Pooling" in by_kind:
    kw["pooling"] = _pooling_mode(by_kind["Pooling"] / "config.json")
  weights = _normalize_keys(read_weights(tdir), tdir)
  if "Dense" in by_kind:
    ddir = by_kind["Dense"]
    dense = read_json(ddir / "config.json")
    act = dense.get("activation_function", "torch.nn.modules.activation.Tanh")
    if dense.get("use_residual"):
      raise ValueError(f"{ddir / 'config.json'}: Dense with use_residual is unsupported")
    if act not in DENSE_ACTIVATION_NAMES:
      raise ValueError(f"{ddir / 'config.json'}: activation_function {act!r} unsupported; "
                       f"supported: {sorted(DENSE_ACTIVATION_NAMES)}")
    kw.update(dense_out=dense["out_features"], dense_bias=dense.get("bias", True),
              dense_activation=DENSE_ACTIVATION_NAMES[act])
    weights.update({f"2_Dense.{k}": v for k, v in read_weights(ddir).items()})
  return (decoder.Config if "family" in kw else model_lib.Config)(**kw), weights


def _bert_kw(hf, path) -> tuple[dict, int]:
  """(model.Config fields, the longest text) of a Hugging Face BERT config."""
  del path
  return dict(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
              num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
              max_position=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
              layer_norm_eps=hf.get("layer_norm_eps", 1e-12), hidden_act=hf.get("hidden_act", "gelu"),
              dropout=hf.get("hidden_dropout_prob", 0.1), attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
              pad_token_id=hf.get("pad_token_id", 0)), hf["max_position_embeddings"]


def _decoder_kw(hf, path) -> tuple[dict, int]:
  """(decoder.Config fields, the longest text) of a Hugging Face Qwen3 / Qwen2 / Llama / Mistral config."""
  family = DECODER_TYPES[hf["model_type"]]
  rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10000.0), **(hf.get("rope_scaling") or {})}
  if rope.get("rope_type", rope.get("type", "default")) != "default":
    raise ValueError(f"{path}: rope type {rope.get('rope_type', rope.get('type'))!r} unsupported (default RoPE only)")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{path}: hidden_act {hf['hidden_act']!r} unsupported (SwiGLU with silu only)")
  if hf.get("use_sliding_window") or set(hf.get("layer_types") or ["full_attention"]) != {"full_attention"}:
    raise ValueError(f"{path}: sliding-window attention unsupported")
  # Mistral's window (use_sliding_window unset): texts up to it attend as with full attention; longer are cut.
  longest = min(hf["max_position_embeddings"], hf.get("sliding_window") or hf["max_position_embeddings"])
  bias = bool(hf.get("attention_bias"))
  return dict(family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
              num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
              num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
              head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
              intermediate_size=hf["intermediate_size"], rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
              rope_theta=float(rope["rope_theta"]), max_position=hf["max_position_embeddings"],
              qk_norm=family == "qwen3", attention_bias=family == "qwen2" or bias,
              output_bias=family != "qwen2" and bias, mlp_bias=bool(hf.get("mlp_bias")),
              pad_token_id=hf.get("pad_token_id") or 0, pooling="lasttoken"), longest


def _pooling_mode(path) -> str:
  """'mean', 'cls' or 'lasttoken' from a Pooling config, old (pooling_mode_*_tokens) or new (pooling_mode) style."""
  pool = read_json(path)
  modes = pool.get("pooling_mode") or [k.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token")
                                       for k, v in pool.items() if k.startswith("pooling_mode_") and v]
  modes = [modes] if isinstance(modes, str) else list(modes)
  if modes in (["mean"], ["cls"], ["lasttoken"]):
    return modes[0]
  raise ValueError(f"{path}: pooling mode {modes} unsupported; use mean, cls or lasttoken alone")


def _max_seq_length(tdir, default) -> int:
  """sentence_bert_config.json's max_seq_length, else the tokenizer's model_max_length, else default."""
  for name, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
    value = read_json(tdir / name).get(key) if (tdir / name).is_file() else None
    if isinstance(value, int) and value <= default:
      return value
  return default


def to_params(cfg, weights: dict, source="weights") -> dict:
  """HF-keyed numpy weights -> our parameter pure dict, strict on missing/extra/shape."""
  names = name_map(cfg)
  missing = sorted(k for k, _ in names.values() if k not in weights)
  if missing:
    raise ValueError(f"{source}: missing weight(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
  extra = sorted(set(weights) - {k for k, _ in names.values()})
  if extra:
    raise ValueError(f"{source}: unexpected weight(s) {extra[:5]}{' ...' if len(extra) > 5 else ''}")
  shapes = {p: v.shape for p, v in _flat(_abstract_params(cfg))}
  params = {}
  for path, (key, transpose) in names.items():
    value = weights[key].T if transpose else weights[key]
    if value.shape != shapes[path]:
      raise ValueError(f"{source}: weight {key} has shape {weights[key].shape}; "
                       f"the config implies {shapes[path][::-1] if transpose else shapes[path]}")
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = np.ascontiguousarray(value)
  return params


def _abstract_params(cfg):
  return nnx.to_pure_dict(nnx.state(model_lib.abstract_model(cfg), nnx.Param))


def _flat(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flat(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def convert(src_dir, out_dir):
  """Converts src_dir into a model directory at out_dir; nothing is written on error."""
  cfg, weights = read_source(src_dir)
  params = to_params(cfg, weights, source=src_dir)
  modeldir.save_model_dir(out_dir, cfg, params, tokenizer_src=src_dir)
  return cfg


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m piccolo_jax.convert", description=__doc__.split("\n")[0])
  parser.add_argument("src_dir", help="sentence-transformers or Hugging Face directory: BERT, or a Qwen3, Qwen2, "
                      "Llama or Mistral decoder")
  parser.add_argument("out_dir", help="new piccolo_jax model directory (must not exist or be empty)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    cfg = convert(args.src_dir, args.out_dir)
  except (OSError, ValueError) as e:
    parser.exit(2, f"error: {e}\n")
  print(f"converted {args.src_dir} -> {args.out_dir}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"pooling {cfg.pooling}, embedding dim {cfg.embed_dim}")


if __name__ == "__main__":
  main()
