"""Checks stored content against its digests: python -m piccolo_jax.verify DIR [DIR ...].

DIR is a model dir, a sentence-transformers export (their digests.json), a prepared dataset (its digests.json),
a checkpoint step (WORKDIR/checkpoints/N: every array shard and the data position against the digests its
processes wrote), a checkpoints directory (each step) or a workdir (its model/, export/ and checkpoints). Prints
one line per problem and ends with a verdict; exits 1 if anything differs, 0 if all matches.
"""
import argparse
import json
import pathlib
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from piccolo_jax import checkpoint
from piccolo_jax import digest


def targets(path) -> list[tuple[str, pathlib.Path]]:
  """[(kind, dir)] of what DIR holds."""
  p = pathlib.Path(path)
  if (p / "digests").is_dir() and (p / "state").is_dir():
    return [("checkpoint", p)]
  if p.name == "checkpoints" or any((c / "state").is_dir() for c in p.glob("[0-9]*")):
    return [("checkpoint", c) for c in sorted(p.glob("[0-9]*"), key=lambda c: int(c.name)) if c.name.isdigit()]
  if (p / "config.json").is_file() and (p / "checkpoints").is_dir():  # A workdir.
    return [t for sub in ("model", "export", "checkpoints") if (p / sub).is_dir() for t in targets(p / sub)]
  if (p / digest.MANIFEST).is_file() or (p / "model_config.json").is_file() or (p / "modules.json").is_file():
    return [("files", p)]
  raise FileNotFoundError(f"{p}: not a model dir, export, prepared dataset, checkpoint or workdir")


def check_checkpoint(step_dir) -> list[str]:
  """What differs between a checkpoint step's arrays (read whole, on this host) and data position and the digests
  its processes wrote."""
  if not (step_dir / "digests").is_dir():
    return [f"{step_dir}: no digests (written by an older piccolo_jax): content not checked"]
  stored = checkpoint.DigestHandler().restore(step_dir / "digests")
  data = json.loads((step_dir / "data" / "metadata").read_text())
  out = [] if digest.of_json(data) == stored["data"] else [f"{step_dir}: its data position {data} differs from its digest"]
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata((step_dir / "state").absolute())
    tree = getattr(meta, "item_metadata", meta)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(
        jax.devices("cpu")[0])), tree, is_leaf=lambda m: hasattr(m, "shape"))
    state = ckptr.restore((step_dir / "state").absolute(), target)
  names = {digest.name(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)}
  if missing := sorted(stored["arrays"].keys() - names):
    out.append(f"{step_dir}: its digests name {len(missing)} arrays its state lacks, e.g. {missing[0]}")
  for path, x in jax.tree_util.tree_leaves_with_path(state):
    name, x = digest.name(path), np.asarray(x)
    for key, want in stored["arrays"].get(name, {}).items():
      if digest.of_bytes(x[digest.box(key)]) != want:
        out.append(f"{step_dir}: array {name} (shard {key or 'whole'}) differs from its digest")
  return out


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m piccolo_jax.verify", description=__doc__.split("\n")[0],
                              epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("dirs", nargs="+", metavar="DIR")
  args = p.parse_args(argv)
  bad = 0
  for d in args.dirs:
    try:
      found = targets(d)
    except FileNotFoundError as e:
      print(f"error: {e}", file=sys.stderr)
      bad += 1
      continue
    for kind, path in found:
      problems, extra = (check_checkpoint(path), []) if kind == "checkpoint" else digest.check_manifest(path)
      for line in problems + extra:
        print(line)
      bad += bool(problems)
      print(f"{path}: {'DAMAGED' if problems else 'ok'} ({kind})")
  sys.exit(1 if bad else 0)


if __name__ == "__main__":
  main()
