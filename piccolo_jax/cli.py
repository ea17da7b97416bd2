"""Command-line plumbing of the config-driven tools (train, prepare): --config=NAME, checked overrides,
logging, and input errors as one `error:` line."""
import difflib
import importlib.util
import logging
import os
import pathlib
import re
import sys

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from piccolo_jax import config as config_lib


def config_dirs() -> list[pathlib.Path]:
  """Where --config=NAME is looked up: ./configs, then the installed piccolo_jax.configs."""
  spec = importlib.util.find_spec("piccolo_jax.configs")
  return [pathlib.Path.cwd() / "configs"] + [pathlib.Path(p) for p in spec.submodule_search_locations]


def resolve_config_path(name: str) -> str:
  """A config name (configs/NAME.py) or a path -> the path."""
  if os.path.isfile(name):
    return name
  for root in config_dirs():
    if (root / f"{name}.py").is_file():
      return str(root / f"{name}.py")
  raise SystemExit(f"error: no config {name!r}: not a file, and no {name}.py in "
                   f"{', '.join(map(str, config_dirs()))}")


def resolve_argv(argv):
  """Rewrites --config=NAME into --config=configs/NAME.py for config_flags."""
  out = []
  for arg in argv:
    m = re.fullmatch(r"--config=([^.]+?)(\.py)?", arg) if not arg.startswith("--config.") else None
    out.append(f"--config={resolve_config_path(arg.split('=', 1)[1])}" if m else arg)
  return out


def check_overrides(argv):
  """Exits with one line naming a --config.FIELD override that names no field (and the closest one, or
  where a moved field went)."""
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  fields = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  if not path or not fields:
    return
  spec = importlib.util.spec_from_file_location("_piccolo_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  for field in fields:
    if line := config_lib.moved(field):
      raise SystemExit(f"error: --config.{line}")
    node, keys = c, field.split(".")
    for i, key in enumerate(keys):
      if not isinstance(node, ml_collections.ConfigDict) or key not in node:
        here = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        close = difflib.get_close_matches(key, here, 1)
        hint = f"; did you mean '{'.'.join(keys[:i] + close)}'?" if close else ""
        raise SystemExit(f"error: --config.{field}: the config has no field '{'.'.join(keys[:i + 1])}'{hint}")
      node = node[key]


def define_config_flag():
  """--config (a name in configs/ or a path) and --verbose; returns the config flag."""
  flags.DEFINE_bool("verbose", False, "show tracebacks for errors in the input (data, config, files)")
  return config_flags.DEFINE_config_file("config", None, "config name (configs/NAME.py) or path")


def logging_setup():
  """piccolo_jax INFO lines as 'HH:MM:SS message'; other libraries' at WARNING (Orbax, JAX: noise)."""
  logging.getLogger().setLevel(logging.WARNING)
  for handler in logging.getLogger().handlers:
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  logging.getLogger("piccolo_jax").setLevel(logging.INFO)


def run(body, errors=(ValueError, OSError)):
  """absl's app.run of body() with --config=NAME resolved and its overrides checked; `errors` exit
  with one line (tracebacks under --verbose)."""
  def main(argv):
    del argv
    logging_setup()
    try:
      body()
    except errors as e:
      if flags.FLAGS.verbose:
        raise
      sys.exit(f"error: {e}")

  sys.argv = resolve_argv(sys.argv)
  check_overrides(sys.argv)
  app.run(main)
