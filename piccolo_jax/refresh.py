"""Hard negatives re-mined during training: train.refresh_negatives_every = N (docs/training.md).

Before batch S, for S a positive multiple of N, every retrieval dataset with negatives is mined again with the
parameters after S steps. Its queries and distinct passages (the prepared tokens: the prefixes and token caps
that training sees) are embedded on the whole mesh, packed rows split over every device and the unit embeddings
gathered to every process; the passages are placed on the mesh for the miner's exact search (search.place,
iter_top_k), and each row gets new negatives as `python -m piccolo_jax.mine` chooses them (mine.select with
train.refresh_options: ranks START..END, minus the row's positives, minus candidates scoring within the margin
of its positive, NUM of the rest, drawn by the row's own generator seeded (seed, S, row)). Every process computes
the same negatives; process 0 writes them, as prepared arrays (neg_off, neg_ids, neg_score: NaN, no teacher
scored them), to WORKDIR/negatives/step-S/DATASET/, in a temporary directory renamed when complete. Training
then reads them memory-mapped (prepare.Prepared's `negatives`) and checkpoints name the version they train on,
so a resume reads the same files; a version already complete on disk is reused, a partial one is ignored.
"""
import functools
import json
import logging
import math
import shutil
import sys
import time

import jax
import numpy as np
import tqdm
from flax import nnx

from piccolo_jax import attention
from piccolo_jax import data as data_lib
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


def due(c, step) -> bool:
  """Whether training re-mines before batch `step` (c: the train config)."""
  every = c.refresh_negatives_every
  return bool(every) and step > 0 and step % every == 0


def name(step) -> str:
  return f"step-{step}"


def refreshed(config, tables) -> list:
  """The tables whose negatives a refresh replaces: retrieval datasets that train with negatives."""
  return [t for t in tables if t.task == "retrieval" and plan_lib.negatives(t, config.tasks)]


def check(config):
  """Refuses what a refresh cannot honour, in one line each."""
  every, kl = config.train.refresh_negatives_every, config.tasks.retrieval.kl_weight
  if every < 0:
    raise ValueError(f"train.refresh_negatives_every={every}: expected 0 (off) or a number of steps")
  if every and kl:
    raise ValueError(f"train.refresh_negatives_every={every} with tasks.retrieval.kl_weight={kl}: refreshed "
                     "negatives have no teacher scores; score them offline (mine --scores) instead")
  mine.selection_options(config.train.refresh_options)


class Embed:
  """Unit embeddings of a prepared dataset's texts by the model of some parameters, on the whole mesh."""

  def __init__(self, graphdef, rngs, mesh, c, length_multiple=1):
    self.mesh, self.S, self.pack_length, self.rngs = mesh, c.pack_segments, c.pack_length, rngs
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
    lens_N = t.q_len(ids) if slot == "query" else t.p_len(ids)
    row_N, slot_N, rows = packing.first_fit(lens_N, L, self.S)
    R = packing.round_up(max(1, ROW_TOKENS // L), self.mesh.size)
    order = np.argsort(row_N, kind="stable")  # Texts by row: a call embeds rows first..first + R.
    bounds = np.searchsorted(row_N[order], np.arange(0, rows + R, R))
    out_ND = None
    for first, a, b in zip(range(0, rows, R), bounds, bounds[1:]):
      sel = order[a:b]
      arrays = packing.pack(t.flat(slot, ids[sel]), lens_N[sel], row_N[sel] - first, slot_N[sel], R, L, self.S)
      rows_RL = [jax.make_array_from_callback(arrays[k].shape, self.rows, arrays[k].__getitem__)
                 for k in packing.ARRAYS]
      e_ND = np.asarray(self.fn(params, self.rngs, *rows_RL).addressable_data(0))
      if out_ND is None:
        out_ND = np.empty((len(ids), e_ND.shape[1]), np.float32)
      out_ND[sel] = e_ND[(row_N[sel] - first) * self.S + slot_N[sel]]
      if progress:
        progress(len(sel))
    return out_ND


def mine_table(embed, params, t, opts, seed, step, out_dir, show) -> dict:
  """Re-mines table t's negatives into out_dir (written by process 0); returns mine.Stats' report."""
  P = len(t.p_off) - 1
  with tqdm.tqdm(total=P, unit=" text", desc=f"refresh {t.name}: embed passages", file=sys.stderr,
                 disable=not show) as bar:
    corpus = search.place(embed(params, t, "pos", np.arange(P), t.longest_passage, bar.update), embed.mesh)
  writing = jax.process_index() == 0
  if writing:
    neg_off, neg_ids = prepare.Offsets(out_dir / "neg_off.bin"), prepare.Flat(out_dir / "neg_ids.bin", np.int32)
  stats, ident_C = mine.Stats(opts), np.arange(P)
  with tqdm.tqdm(total=len(t), unit=" query", desc=f"refresh {t.name}: mine", file=sys.stderr,
                 disable=not show) as bar:
    for first in range(0, len(t), mine.ROW_CHUNK):
      rows = np.arange(first, min(first + mine.ROW_CHUNK, len(t)))
      q_BD = embed(params, t, "query", rows, t.longest_query)
      pos = [t.pos_ids[t.pos_off[r]:t.pos_off[r + 1]] for r in rows]
      pos_BP = mine.padded(pos)
      chosen = []
      for qs, s_BT, i_BT, g_BP in search.iter_top_k(q_BD, corpus, min(opts.end, P), ids_QP=pos_BP):
        for b, (s_T, i_T, g_P) in enumerate(zip(s_BT, i_BT, g_BP)):
          r, pos_P = first + qs + b, pos[qs + b]
          rng = np.random.default_rng([seed, step, r])
          ids, counts = mine.select(i_T, s_T, g_P[:len(pos_P)].min(), pos_P, ident_C, opts, rng)
          hit_T = np.isin(i_T, pos_P)
          stats.add(int(hit_T.argmax()) + 1 if hit_T.any() else 0, ids, counts)
          chosen.append(ids)
      if writing:
        neg_ids.add(np.concatenate(chosen) if chosen else [])
        neg_off.extend([len(x) for x in chosen])
      bar.update(len(rows))
  if writing:
    for f in (neg_off, neg_ids):
      f.f.close()
    np.full(neg_ids.n, np.nan, np.float32).tofile(out_dir / "neg_score.bin")
  return stats.report()


def refresh(run, params, step) -> tuple[str, dict]:
  """(version, metrics) of the negatives re-mined before batch `step` with `params`, written under
  run.workdir/negatives (or found there complete)."""
  root, version, start = run.workdir / "negatives", name(step), time.perf_counter()
  final = root / version
  opts = mine.selection_options(run.config.train.refresh_options)
  metrics = {}
  if not (final / "done.json").is_file():
    tmp = root / f".{version}.tmp"
    if jax.process_index() == 0:
      shutil.rmtree(tmp, ignore_errors=True)  # A refresh cut short (kill -9) left it.
      tmp.mkdir(parents=True)
    modeldir.sync(f"refresh {version}: start")
    embed = Embed(run.graphdef, run.rngs, run.mesh, run.config.data, attention.block(run.mcfg.attention))
    show = jax.process_index() == 0
    for t in refreshed(run.config, run.tables):
      if show:
        (tmp / t.path.name).mkdir()
      report = mine_table(embed, params, t, opts, run.config.seed, step, tmp / t.path.name, show)
      metrics |= {f"refresh/{t.name}/{k}": report[k] for k in ("negatives", "rows_without", "filtered")}
      metrics[f"refresh/{t.name}/positive_first"] = report["positive_rank"].get("1", 0) / max(report["rows"], 1)
    if show:
      (tmp / "done.json").write_text(json.dumps({"step": step, **metrics}) + "\n")
      tmp.rename(final)
    modeldir.sync(f"refresh {version}: written")
  else:
    log.info("refresh: %s found complete in %s; reusing it", version, root)
    metrics = {k: v for k, v in json.loads((final / "done.json").read_text()).items() if k != "step"}
  metrics["refresh/seconds"] = time.perf_counter() - start
  log.info("refresh: negatives re-mined at step %d in %.1f s -> %s (%s)", step, metrics["refresh/seconds"], final,
           ", ".join(f"{k} {v}" for k, v in metrics.items() if "/seconds" not in k))
  return version, metrics


def iterator(run, version, position):
  """The data iterator over run.tables with the refreshed negatives `version` ("" : the datasets' own) at the
  data position `position` (a grain state), its packing menus the run's (chosen from the datasets' own)."""
  tables = run.tables
  if not version:
    run.data.set_state(position)
    return run.data
  where = run.workdir / "negatives" / version
  if not (where / "done.json").is_file():
    raise FileNotFoundError(f"{where}: the checkpoint trains on negatives refreshed at {version}, which are "
                            "missing; restore that directory, or resume from an earlier checkpoint")
  mined = {t.path for t in refreshed(run.config, tables)}
  tables = [prepare.Prepared(t.path, t.repeat, t.neg_num, t.teacher_file, str(where / t.path.name))
            if t.path in mined else t for t in tables]
  c = run.config
  plan = plan_lib.Plan(c.data, c.tasks, tables, c.loss.groups)
  a = run.assemble
  it = data_lib.make_iterator(type(a)(c.data, plan, a.menus, a.p, a.P, a.multiple, c.loss.groups, a.length_multiple),
                              c.data)
  it.set_state(position)
  return it
