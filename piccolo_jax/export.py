"""piccolo_jax model directory -> sentence-transformers directory (safetensors).

Usage: python -m piccolo_jax.export MODEL_DIR OUT_DIR [--truncate-dim N]
"""
import argparse
import json
import pathlib
import shutil

import numpy as np
from safetensors.numpy import save_file

from piccolo_jax import convert
from piccolo_jax import decoder
from piccolo_jax import digest
from piccolo_jax import modeldir
from piccolo_jax import model as model_lib
from piccolo_jax import tasks as tasks_lib

ST_ACTIVATIONS = {v: k for k, v in convert.DENSE_ACTIVATION_NAMES.items()}


def hf_config(cfg) -> dict:
  """The Hugging Face config dict of cfg: a BertConfig's, or its decoder family's base model's."""
  if isinstance(cfg, decoder.Config):
    return _decoder_hf_config(cfg)
  from transformers import BertConfig  # pylint: disable=g-import-not-at-top  (imports torch: slow)
  return BertConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
      max_position_embeddings=cfg.max_position, type_vocab_size=cfg.type_vocab_size,
      layer_norm_eps=cfg.layer_norm_eps, hidden_act=cfg.hidden_act, hidden_dropout_prob=cfg.dropout,
      attention_probs_dropout_prob=cfg.attention_dropout, pad_token_id=cfg.pad_token_id,
      architectures=["BertModel"]).to_dict()


def _decoder_hf_config(cfg: decoder.Config) -> dict:
  import transformers  # pylint: disable=g-import-not-at-top
  kind, arch = {"qwen3": ("Qwen3Config", "Qwen3Model"), "qwen2": ("Qwen2Config", "Qwen2Model"),
                "llama": ("LlamaConfig", "LlamaModel")}[cfg.family]
  kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            intermediate_size=cfg.intermediate_size, rms_norm_eps=cfg.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            max_position_embeddings=cfg.max_position, pad_token_id=cfg.pad_token_id, architectures=[arch])
  if cfg.family == "llama":
    kw.update(attention_bias=cfg.output_bias, mlp_bias=cfg.mlp_bias)
  elif cfg.family == "qwen3":
    kw.update(attention_bias=cfg.output_bias)
  return getattr(transformers, kind)(**kw).to_dict()


def to_weights(cfg, params: dict) -> dict[str, np.ndarray]:
  """Our parameter pure dict -> HF-keyed numpy weights (inverse of convert.to_params)."""
  out = {}
  for path, (key, transpose) in convert.name_map(cfg).items():
    value = params
    for p in path:
      value = value[p]
    value = np.asarray(value, np.float32)
    out[key] = np.ascontiguousarray(value.T if transpose else value)
  return out


def _write_json(path, obj):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj, indent=2) + "\n")


def export(model_dir, out_dir, truncate_dim: int | None = None):
  """Writes a sentence-transformers directory that SentenceTransformer(out_dir) loads."""
  cfg = modeldir.load_config(model_dir)
  write_sentence_transformers(cfg, modeldir.load_params(model_dir, cfg), model_dir, out_dir, truncate_dim)


def prompts(tasks_cfg, datasets=()) -> dict:
  """sentence-transformers prompts of the training prefixes: `query` and `passage` (retrieval's), TASK_query /
  TASK_passage for another task whose non-empty prefix differs, and NAME_query / NAME_passage for a dataset entry
  whose own prefix (an `instruction`: tasks.prefix) differs from its task's."""
  out = {}
  for name, settings in tasks_cfg.items():
    for kind in ("query", "passage"):
      p = settings.get(f"{kind}_prefix")
      if p is not None and (name == "retrieval" or p and p != tasks_cfg["retrieval"][f"{kind}_prefix"]):
        out[kind if name == "retrieval" else f"{name}_{kind}"] = p
  for entry in datasets:
    task = tasks_lib.lookup(entry.get("task", "retrieval"))
    for kind in ("query", "passage"):
      p = tasks_lib.prefix(task, tasks_cfg, entry, f"{kind}_prefix")
      if p != tasks_lib.prefix(task, tasks_cfg, {}, f"{kind}_prefix"):
        out[f"{entry.get('name') or pathlib.PurePath(entry.get('path', '')).name}_{kind}"] = p
  return out


def card_head(cfg, origin: str) -> list[str]:
  """The first lines of an exported model's README.md: front matter, what it is (`origin`: how it was made), usage."""
  return ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
          "tags: [sentence-transformers, piccolo_jax]", "---", "",
          "# A piccolo_jax embedding model", "",
          f"{origin} {cfg.embed_dim}-dim embeddings ({cfg.pooling} pooling, {cfg.num_layers} layers, "
          f"{cfg.max_seq_length} tokens).", "",
          "```python", "from sentence_transformers import SentenceTransformer",
          "model = SentenceTransformer(PATH)  # this directory",
          "q = model.encode(queries, prompt_name=\"query\")  # the training query prefix",
          "p = model.encode(passages, prompt_name=\"passage\")", "```", ""]


def model_card(cfg, *, base, step, tables, config, evals, merged=()) -> str:
  """README.md of an exported model: what it is, how to use it, its training data and config, its evals."""
  dims = sorted({int(k.rsplit("@", 1)[1]) for k in evals if "@" in k})
  rows = [f"| {t.name} | {t.task} | {len(t)} | {t.repeat} |" for t in tables]
  metrics = sorted({k.rsplit("@", 1)[0] for k in evals if "@" in k})
  table = [f"| metric | {' | '.join(f'dim {d}' for d in dims)} |", "|---|" + "---|" * len(dims)] + [
      "| " + " | ".join([m] + [f"{evals[k]:.2f}" if (k := f"{m}@{d}") in evals else "" for d in dims]) + " |"
      for m in metrics]
  origin = f"Trained by piccolo_jax with Piccolo2's multi-task hybrid loss (arXiv 2405.06932) from `{base}`, {step} steps"
  origin += f" (the mean of the parameters of its checkpoints {', '.join(map(str, merged))})." if merged else "."
  return "\n".join([
      *card_head(cfg, origin),
      "## Training data", "", "| dataset | task | rows | repeat |", "|---|---|---|---|", *rows, "",
      f"## Evaluation (step {step})", "", *(table if metrics else ["None configured (eval.tasks)."]), "",
      "## Training config", "", "```json", config, "```", ""])


def merge_card(cfg, what: dict, sources, losses=None, data=None) -> str:
  """README.md of a merged model (piccolo_jax.merge): the method, and each source with its weight (and its
  example losses, --auto)."""
  head = ["| source | weight |" + (" example loss |" if losses is not None else ""), "|---|---|" +
          ("---|" if losses is not None else "")]
  rows = [f"| `{name}` | {w:.4f} |" + (f" {losses[i].mean():.4f} |" if losses is not None else "")
          for i, (name, w) in enumerate(sources)]
  how = ", ".join(f"{k} {v}" for k, v in what.items())
  auto = [f"Weights by LM-Cocktail's rule from the example losses on: {', '.join(data)}.", ""] if data else []
  return "\n".join([*card_head(cfg, f"Merged by piccolo_jax.merge ({how}) from {len(sources)} models."),
                    "## Sources", "", *head, *rows, "", *auto])


def write_sentence_transformers(cfg, params, tokenizer_dir, out_dir, truncate_dim=None, prompts=None, card=None):
  """Writes params as a sentence-transformers directory (single process; no Orbax); prompts: name -> prefix;
  card: its README.md."""
  if truncate_dim is not None and not 0 < truncate_dim <= cfg.embed_dim:
    raise ValueError(f"--truncate-dim {truncate_dim} out of range: embeddings have {cfg.embed_dim} dims")
  cfg, params = decoder.merge_lora(cfg, params)
  weights = to_weights(cfg, params)
  dense = {k.removeprefix("2_Dense."): weights.pop(k) for k in list(weights) if k.startswith("2_Dense.")}
  if isinstance(cfg, model_lib.Config):  # BertModel expects a pooler; sentence embeddings never use it. Zeros keep
    # its load report clean.
    D = cfg.hidden_size
    weights |= {"pooler.dense.weight": np.zeros((D, D), np.float32), "pooler.dense.bias": np.zeros(D, np.float32)}
  tok_files = modeldir.tokenizer_files(tokenizer_dir)
  with modeldir.atomic_dir(out_dir) as tmp:
    save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
    _write_json(tmp / "config.json", hf_config(cfg))
    for f in tok_files:
      shutil.copy2(f, tmp / f.name)
    _write_json(tmp / "sentence_bert_config.json", {"max_seq_length": cfg.max_seq_length,
                                                    "do_lower_case": False})
    modules = [("Transformer", ""), ("Pooling", "1_Pooling")]
    _write_json(tmp / "1_Pooling" / "config.json", {
        "word_embedding_dimension": cfg.hidden_size,
        "pooling_mode_cls_token": cfg.pooling == "cls", "pooling_mode_mean_tokens": cfg.pooling == "mean",
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": cfg.pooling == "lasttoken",
        "include_prompt": True})
    if cfg.dense_out:
      modules.append(("Dense", "2_Dense"))
      _write_json(tmp / "2_Dense" / "config.json", {
          "in_features": cfg.hidden_size, "out_features": cfg.dense_out, "bias": cfg.dense_bias,
          "activation_function": ST_ACTIVATIONS[cfg.dense_activation]})
      save_file(dense, tmp / "2_Dense" / "model.safetensors", metadata={"format": "pt"})
    if cfg.normalize:
      modules.append(("Normalize", f"{len(modules)}_Normalize"))
    _write_json(tmp / "modules.json", [
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (kind, path) in enumerate(modules)])
    st_config = {"prompts": prompts or {}, "default_prompt_name": None, "similarity_fn_name": "cosine"}
    if card:
      (tmp / "README.md").write_text(card)
    if truncate_dim:
      st_config["truncate_dim"] = truncate_dim
    _write_json(tmp / "config_sentence_transformers.json", st_config)
    digest.write_manifest(tmp)  # Last: every file's digest (python -m piccolo_jax.verify).


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m piccolo_jax.export", description=__doc__.split("\n")[0])
  parser.add_argument("model_dir", help="piccolo_jax model directory (from convert or train)")
  parser.add_argument("out_dir", help="new sentence-transformers directory (must not exist or be empty)")
  parser.add_argument("--truncate-dim", type=int, default=None,
                      help="Matryoshka dimension SentenceTransformer truncates to when loading")
  args = parser.parse_args(argv)
  try:
    export(args.model_dir, args.out_dir, args.truncate_dim)
  except (OSError, ValueError) as e:
    parser.exit(2, f"error: {e}\n")
  print(f"exported {args.model_dir} -> {args.out_dir}")


if __name__ == "__main__":
  main()
