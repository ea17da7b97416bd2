"""Hard negatives re-mined during training (config section `refresh`; docs/training.md, "Stale negatives").

Every process embeds a dataset's prepared texts on the whole mesh and mines them with mine.mine_chunk, so all
compute the same negatives; process 0 writes them to WORKDIR/negatives/step-S/DATASET/ (renamed when complete),
which training memory-maps (prepare.Prepared.with_negatives) and checkpoints name.
"""
import contextlib
import functools
import json
import logging
import math
import sys
import time

import jax
import numpy as np
import tqdm
from flax import nnx

from piccolo_jax import attention
from piccolo_jax import losses
from piccolo_jax import mine
from piccolo_jax import modeldir
from piccolo_jax import packing
from piccolo_jax import plan as plan_lib
from piccolo_jax import prepare
from piccolo_jax import search
from piccolo_jax import sharding

log = logging.getLogger("piccolo_jax.train")
ROW_TOKENS = 16384  # Tokens of the packed rows embedded a call (all devices together, at least a row each).


def due(refresh_cfg, step) -> bool:
  """Whether training re-mines before batch `step`."""
  return bool(refresh_cfg.every) and step > 0 and step % refresh_cfg.every == 0


def refreshed(tables, tasks_cfg) -> list:
  """The tables whose negatives a refresh replaces: retrieval datasets that train with negatives."""
  return [t for t in tables if t.task == "retrieval" and plan_lib.negatives(t, tasks_cfg)]


class Embed:
  """Unit embeddings of a prepared dataset's texts by the model of some parameters, on the whole mesh."""

  def __init__(self, graphdef, rngs, mesh, data_cfg, length_multiple=1):
    self.mesh, self.S, self.pack_length, self.rngs = mesh, data_cfg.pack_segments, data_cfg.pack_length, rngs
    self.rows, self.block = sharding.batch_sharding(mesh), length_multiple

    @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
    def embed(params, rngs, *arrays):
      with attention.on(mesh):
        model = nnx.merge(graphdef, params, rngs)
        model.eval()
        e_RSD = model.packed(*arrays)
        return losses.normalize(e_RSD.reshape(-1, e_RSD.shape[-1]))
    self.fn = embed

  def __call__(self, params, t, slot, ids, longest, progress=None) -> np.ndarray:
    """float32 [len(ids), D] of queries (slot "query") or passages `ids` of table t; longest: their longest."""
    L = max(packing.round_up(self.pack_length, self.block), packing.round_up(longest, math.lcm(8, self.block)))
    packed = packing.Packed(t.q_len(ids) if slot == "query" else t.p_len(ids), packing.ladder(L, self.block), self.S)
    R_G = [packing.round_up(max(1, ROW_TOKENS // L), self.mesh.size) for L in packed.lengths]
    embed = lambda rows: np.asarray(self.fn(params, self.rngs, *(
        jax.make_array_from_callback(x.shape, self.rows, x.__getitem__) for x in rows)).addressable_data(0))
    out_ND = None
    for sel, e_nD in packed.embedded(R_G, lambda sel: t.flat(slot, ids[sel]), embed):
      if out_ND is None:
        out_ND = np.empty((len(ids), e_nD.shape[1]), np.float32)
      out_ND[sel] = e_nD
      if progress:
        progress(len(sel))
    return out_ND


def mine_table(embed, params, t, opts, key, out_dir, show) -> dict:
  """Re-mines table t's negatives into out_dir (written by process 0) with mine.mine_chunk; returns mine.Stats'
  report. key: mine.row_rng's, (seed, step)."""
  P = len(t.p_off) - 1
  with tqdm.tqdm(total=P, unit=" text", desc=f"refresh {t.name}: embed passages", file=sys.stderr,
                 disable=not show) as bar:
    corpus = search.place(embed(params, t, "pos", np.arange(P), t.longest_passage, bar.update), embed.mesh)
  writing, stats = jax.process_index() == 0, mine.Stats(opts)
  with contextlib.ExitStack() as files, tqdm.tqdm(total=len(t), unit=" query", desc=f"refresh {t.name}: mine",
                                                   file=sys.stderr, disable=not show) as bar:
    if writing:
      neg_off = files.enter_context(prepare.Offsets(out_dir / "neg_off.bin"))
      neg_ids = files.enter_context(prepare.Flat(out_dir / "neg_ids.bin", np.int32))
    for first in range(0, len(t), mine.ROW_CHUNK):
      rows = np.arange(first, min(first + mine.ROW_CHUNK, len(t)))
      pos = [t.pos_ids[t.pos_off[r]:t.pos_off[r + 1]] for r in rows]
      chosen = mine.mine_chunk(embed(params, t, "query", rows, t.longest_query), corpus, mine.padded(pos), pos,
                               np.arange(P), opts, first, stats, key=key)  # Passage ids are their own normal form.
      if writing:
        neg_ids.add(np.concatenate(chosen) if chosen else [])
        neg_off.extend([len(x) for x in chosen])
      bar.update(len(rows))
  if writing:
    np.full(neg_ids.n, np.nan, np.float32).tofile(out_dir / "neg_score.bin")
  return stats.report()


def refresh(workdir, embed, params, tables, opts, seed, step) -> tuple[str, dict]:
  """(version, metrics) of the negatives of `tables` re-mined before batch `step` with `params` and mine.Options
  `opts`, written under workdir/negatives (or found there complete)."""
  root, version, start = workdir / "negatives", f"step-{step}", time.perf_counter()
  final = root / version
  metrics = {}
  if not (final / "done.json").is_file():
    show = jax.process_index() == 0
    with modeldir.atomic_dir(final, collective=True) as tmp:  # One a refresh cut short (kill -9) left is cleared.
      for t in tables:
        if show:
          (tmp / t.path.name).mkdir()
        report = mine_table(embed, params, t, opts, (seed, step), tmp / t.path.name, show)
        metrics |= {f"refresh/{t.name}/{k}": report[k] for k in ("negatives", "rows_without", "filtered")}
        metrics[f"refresh/{t.name}/positive_first"] = report["positive_rank"].get("1", 0) / max(report["rows"], 1)
      if show:
        (tmp / "done.json").write_text(json.dumps({"step": step, **metrics}) + "\n")
  else:
    log.info("refresh: %s found complete in %s; reusing it", version, root)
    metrics = {k: v for k, v in json.loads((final / "done.json").read_text()).items() if k != "step"}
  metrics["refresh/seconds"] = time.perf_counter() - start
  log.info("refresh: negatives re-mined at step %d in %.1f s -> %s (%s)", step, metrics["refresh/seconds"], final,
           ", ".join(f"{k} {v}" for k, v in metrics.items() if "/seconds" not in k))
  return version, metrics


def with_version(tables, tasks_cfg, workdir, version) -> list:
  """The tables, those that a refresh replaces reading the negatives refreshed at `version` ("": their own)."""
  if not version:
    return tables
  where = workdir / "negatives" / version
  if not (where / "done.json").is_file():
    raise FileNotFoundError(f"{where}: the checkpoint trains on negatives refreshed at {version}, which are "
                            "missing; restore that directory, or resume from an earlier checkpoint")
  mined = {t.path for t in refreshed(tables, tasks_cfg)}
  return [t.with_negatives(where / t.path.name) if t.path in mined else t for t in tables]
