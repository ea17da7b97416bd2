"""Content digests (xxh3-64): of each array shard of a checkpoint, and of each file of a model dir, an export or a
prepared dataset (its digests.json). A value that changed but stayed finite (a flipped bit, a partial overwrite)
then shows.

Shards: each process hashes the bytes of the shards it holds (replica 0 of each), keyed by the array's path and
the shard's place in the global array ("0:384,0:1536"), before a save returns (checkpoint.save: the next step
reuses the state's buffers; the cost is in BENCHMARKS.md, "Integrity"). A restore hashes its shards again: a
stored shard inside one the process holds is compared (every one when the mesh is the same); one split over
several devices of the new layout is counted unchecked.
"""
import json
import pathlib

import jax
import numpy as np
import xxhash

MANIFEST = "digests.json"
CHUNK = 64 << 20  # Bytes of a file hashed at a time.


def _bytes(x) -> memoryview:
  return memoryview(np.ascontiguousarray(x).reshape(-1).view(np.uint8))


def of_bytes(x) -> str:
  return xxhash.xxh3_64_hexdigest(_bytes(x))


def of_json(obj) -> str:
  return xxhash.xxh3_64_hexdigest(json.dumps(obj, sort_keys=True).encode())


def _key(index, shape) -> str:
  return ",".join(f"{s.start or 0}:{shape[d] if s.stop is None else s.stop}" for d, s in enumerate(index))


def box(key) -> tuple:
  """The slices of a shard key."""
  return tuple(slice(*map(int, part.split(":"))) for part in key.split(",")) if key else ()


def name(path) -> str:
  """An array's name: its path in the state, as Orbax's metadata tree spells it (dict keys, attribute names,
  sequence indices)."""
  return "/".join(str(next(getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a))) for k in path)


def shards(tree) -> dict:
  """{array path: {shard key: digest}} of the shards this process holds (replica 0 of each)."""
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    out[name(path)] = {_key(s.index, x.shape): of_bytes(s.data) for s in x.addressable_shards if s.replica_id == 0}
  return out


def check(tree, stored) -> tuple[tuple | None, int]:
  """((array path, shard key) of the first stored shard this process holds that hashes otherwise, or of an array the
  digests name that the tree lacks, or None; how many of its stored shards it could not check: each held whole by
  no shard of this process)."""
  unchecked, names = 0, {name(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)}
  if missing := sorted(stored.keys() - names):
    return (missing[0], "none: the state has no such array"), 0
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    array, held = name(path), [(s.index, s.data) for s in x.addressable_shards if s.replica_id == 0]
    for key, want in stored.get(array, {}).items():
      want_box = box(key)
      inside = next(((i, d) for i, d in held if all(
          (a.start or 0) <= b.start and b.stop <= (x.shape[k] if a.stop is None else a.stop)
          for k, (a, b) in enumerate(zip(i, want_box)))), None)
      if inside is None:
        unchecked += 1
        continue
      index, data = inside
      local = tuple(slice(b.start - (a.start or 0), b.stop - (a.start or 0)) for a, b in zip(index, want_box))
      if of_bytes(np.asarray(data)[local]) != want:
        return (array, key), unchecked
  return None, unchecked


def file(path) -> str:
  h = xxhash.xxh3_64()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(CHUNK), b""):
      h.update(chunk)
  return h.hexdigest()


def write_manifest(directory):
  """DIR/digests.json: every file under DIR (but itself), its size and digest; written last."""
  d = pathlib.Path(directory)
  files = sorted(p for p in d.rglob("*") if p.is_file() and p.name != MANIFEST)
  entries = {str(p.relative_to(d)): {"size": p.stat().st_size, "xxh3_64": file(p)} for p in files}
  (d / MANIFEST).write_text(json.dumps({"files": entries}, indent=1) + "\n")


def check_manifest(directory) -> tuple[list[str], list[str]]:
  """(what differs from DIR/digests.json: files missing, of another size or content; files it does not list)."""
  d = pathlib.Path(directory)
  if not (d / MANIFEST).is_file():
    return [f"{d}: no {MANIFEST} (written by an older piccolo_jax, or not a piccolo_jax directory)"], []
  want = json.loads((d / MANIFEST).read_text())["files"]
  have = {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != MANIFEST}
  out = [f"{d / f}: missing" for f in sorted(want.keys() - have)]
  for f in sorted(want.keys() & have):
    size = (d / f).stat().st_size
    if size != want[f]["size"]:
      out.append(f"{d / f}: {size} bytes, {want[f]['size']} when written")
    elif file(d / f) != want[f]["xxh3_64"]:
      out.append(f"{d / f}: its content differs from its digest (same size)")
  return out, [f"{d / f}: not in {MANIFEST} (added since)" for f in sorted(have - want.keys())]
