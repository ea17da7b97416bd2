"""Model directories: model_config.json + Orbax params + tokenizer files.

A model directory is what `convert` writes, what training exports, and what `encode`,
`evaluate` and `export` read.
"""
import contextlib
import pathlib
import shutil
import tempfile

import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from flax import nnx

from piccolo_jax import decoder
from piccolo_jax import digest
from piccolo_jax import model as model_lib

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def tokenizer_files(src_dir) -> list[pathlib.Path]:
  """The tokenizer files in src_dir; an error naming the directory if it has none usable."""
  src_dir = pathlib.Path(src_dir)
  found = [src_dir / f for f in TOKENIZER_FILES if (src_dir / f).is_file()]
  if not any(f.name in ("tokenizer.json", "vocab.txt") for f in found):
    raise FileNotFoundError(f"{src_dir}: no tokenizer found (need tokenizer.json or vocab.txt)")
  return found


def files_key(path) -> list:
  """What identifies a model's files: their paths, sizes and modification times."""
  path = pathlib.Path(path).resolve()
  files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
  return [str(path)] + [(str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f != path]


def sync(name):
  """Barrier across processes (no-op in a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def atomic_dir(out_dir, collective=False):
  """Yields a temporary sibling of out_dir, renamed to out_dir only on success.

  collective=True: every process enters (e.g. around an Orbax save); process 0 creates and renames.
  """
  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and any(out_dir.iterdir()):
    raise FileExistsError(f"{out_dir} exists and is not empty; choose a new output directory")
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  owner = not collective or jax.process_index() == 0
  if collective:
    tmp = out_dir.parent / f".{out_dir.name}.tmp"
    if owner:
      shutil.rmtree(tmp, ignore_errors=True)
      tmp.mkdir()
    sync(f"mkdir {tmp}")
  else:
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
  try:
    yield tmp
    if collective:
      sync(f"written {tmp}")
    if owner:
      if out_dir.exists():
        out_dir.rmdir()
      tmp.rename(out_dir)
    if collective:  # No process reads out_dir before it exists (a refresh's negatives: train.data_at).
      sync(f"renamed {out_dir}")
  finally:
    if owner:
      shutil.rmtree(tmp, ignore_errors=True)


def save_model_dir(out_dir, cfg, params, tokenizer_src):
  """Writes a model directory atomically: config, Orbax params (pure dict), tokenizer.

  Collective under multi-process: every process calls it with the same (replicated) params. A decoder's LoRA
  adapters are merged in (decoder.merge_lora): a model dir holds plain weights.
  """
  cfg, params = decoder.merge_lora(cfg, params)
  tok_files = tokenizer_files(tokenizer_src)
  with atomic_dir(out_dir, collective=True) as tmp:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save((tmp / PARAMS_DIR).absolute(), params)
    if jax.process_index() == 0:
      cfg.save(tmp / CONFIG_FILE)
      for f in tok_files:
        shutil.copy2(f, tmp / f.name)
      digest.write_manifest(tmp)  # Last: every file's digest (python -m piccolo_jax.verify).


def load_config(model_dir):
  path = pathlib.Path(model_dir) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: {model_dir} is not a piccolo_jax model directory "
                            "(make one with `python -m piccolo_jax.convert SRC OUT`)")
  return model_lib.load_config(path)


def load_params(model_dir, cfg):
  """Restores the parameter pure dict (numpy-backed jax arrays on the default device)."""
  abstract = nnx.to_pure_dict(nnx.state(model_lib.abstract_model(cfg), nnx.Param))
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore((pathlib.Path(model_dir) / PARAMS_DIR).absolute(), abstract)
