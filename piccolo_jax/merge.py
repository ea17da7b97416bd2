"""Model merging: weighted mean, slerp, task arithmetic and TIES of models, run checkpoints and exports.

  python -m piccolo_jax.merge OUT MODEL [MODEL ...] [--method mean|slerp|task|ties] [--weights W ...]
      [--auto DATA ...] [--base MODEL] [--t T] [--density D] [--scale S]

MODEL: a piccolo_jax model dir, a sentence-transformers or HF BERT dir (an export), "minilm", or a run's
checkpoint WORKDIR/checkpoints/STEP. OUT gets OUT/model (a model dir) and OUT/export (a sentence-transformers
dir whose model card lists the sources and weights, with the sources' prompts). Sources must share architecture
and tokenizer (one line says which differs). Each tensor is merged where it lives: the parameters are sharded
over every device (fsdp), the merge is one jitted program, and OUT/model is written shard by shard.

--auto DATA weighs the models LM-Cocktail's way (Xiao et al. 2023): each one's training loss on the first
--examples rows of each DATA ([TASK=]KIND:PATH, a data.datasets entry: jsonl, tsv, piccolo, ...), averaged over
the DATA, and weights softmax(-loss / --temperature). Along a run, train.merge_last=N exports the mean of its
last N checkpoints (docs/training.md).
"""
import argparse
import dataclasses
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from piccolo_jax import checkpoint
from piccolo_jax import config as config_lib
from piccolo_jax import data as data_lib
from piccolo_jax import encode
from piccolo_jax import export as export_lib
from piccolo_jax import model as model_lib
from piccolo_jax import modeldir
from piccolo_jax import models
from piccolo_jax import sharding
from piccolo_jax import step as step_lib

log = logging.getLogger("piccolo_jax.merge")
METHODS = ("mean", "slerp", "task", "ties")
RUN_MODEL = "model_config.json"  # A run's model config and tokenizer/, written at its start (rundir.write_model).


class MergeError(ValueError):
  """Sources that cannot be merged, or a merge asked for wrongly."""


# The merges: pure functions of parameter pytrees (float arrays), jitted over sharded arrays.

def mean(trees, weights):
  """Σ w_i θ_i / Σ w_i, as θ_0 + Σ (w_i / Σ w)(θ_i - θ_0): identical models merge to themselves bit for bit."""
  w = [wi / sum(weights) for wi in weights]
  return jax.tree.map(lambda t0, *ts: t0 + sum(wi * (t - t0) for wi, t in zip(w[1:], ts)), *trees)


def slerp(a, b, t, eps=1e-8):
  """Spherical interpolation of each tensor pair at t in [0, 1] (the angle of the flattened tensors; their norms
  interpolate with it); linear where they are (anti)parallel within eps."""
  def one(x, y):
    cos = jnp.vdot(x, y) / jnp.maximum(jnp.linalg.norm(x) * jnp.linalg.norm(y), eps)
    omega = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    sin = jnp.sin(omega)
    flat = sin < eps
    ca = jnp.where(flat, 1 - t, jnp.sin((1 - t) * omega) / jnp.where(flat, 1.0, sin))
    cb = jnp.where(flat, t, jnp.sin(t * omega) / jnp.where(flat, 1.0, sin))
    return ca * x + cb * y
  return jax.tree.map(one, a, b)


def task_arithmetic(base, trees, weights, scale=1.0):
  """θ_base + scale Σ w_i (θ_i - θ_base) (Ilharco et al. 2023)."""
  return jax.tree.map(lambda b, *ts: b + scale * sum(w * (t - b) for w, t in zip(weights, ts)), base, *trees)


def ties(base, trees, weights, density=0.2, scale=1.0):
  """TIES-merging (Yadav et al. 2023) of the deltas τ_i = θ_i - θ_base, per tensor: each keeps its `density`
  largest-magnitude entries; each entry's sign is that of Σ w_i τ_i (trimmed); the w-weighted mean of the
  trimmed deltas that have it is added, times scale."""
  def one(b, *ts):
    kept = []
    for t in ts:
      d = (t - b).reshape(-1)
      k = max(1, int(round(density * d.size)))
      threshold = jax.lax.top_k(jnp.abs(d), k)[0][-1]
      kept.append(jnp.where(jnp.abs(d) >= threshold, d, 0.0))
    sign = jnp.sign(sum(w * d for w, d in zip(weights, kept)))
    agree = [(jnp.sign(d) == sign) & (d != 0) for d in kept]
    num = sum(w * jnp.where(a, d, 0.0) for w, d, a in zip(weights, kept, agree))
    den = sum(w * a for w, a in zip(weights, agree))
    return b + scale * jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0).reshape(b.shape)
  return jax.tree.map(one, base, *trees)


def auto_weights(losses, temperature=5.0) -> np.ndarray:
  """LM-Cocktail's weights of candidates with these example losses: softmax(-loss / temperature)."""
  z = -np.asarray(losses, np.float64) / temperature
  return np.exp(z - z.max()) / np.exp(z - z.max()).sum()


# Sources.

@dataclasses.dataclass
class Source:
  name: str
  cfg: model_lib.Config
  params: dict
  tok_dir: str
  prompts: dict


def load(spec) -> Source:
  """The model a MODEL argument names (module docstring)."""
  path = pathlib.Path(str(spec))
  if path.name.isdigit() and path.parent.name == "checkpoints":
    return _checkpoint(path)
  cfg, params, tok_dir = models.load_init(str(spec))
  st = pathlib.Path(tok_dir) / "config_sentence_transformers.json"
  prompts = json.loads(st.read_text()).get("prompts") or {} if st.is_file() else {}
  return Source(str(spec), cfg, params, tok_dir, prompts)


def _checkpoint(path) -> Source:
  workdir = path.parent.parent
  if not (workdir / RUN_MODEL).is_file():
    raise MergeError(f"{path}: {workdir} has no {RUN_MODEL} (a run of an older piccolo_jax): merge its model/ "
                     "or export/ instead")
  cfg = model_lib.load_config(workdir / RUN_MODEL)
  if getattr(cfg, "lora_rank", 0):
    raise MergeError(f"{path}: a LoRA run's checkpoints hold its adapters alone: merge its model/ or export/, "
                     "which have them merged into the base")
  run = json.loads((workdir / "config.json").read_text())
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        nnx.to_pure_dict(nnx.state(model_lib.abstract_model(cfg), nnx.Param)))
  params = jax.tree.map(np.asarray, checkpoint.restore_params(path.parent, int(path.name), target))
  return Source(str(path), cfg, params, str(workdir / "tokenizer"), export_lib.prompts(run["tasks"]))


def architecture(cfg) -> dict:
  """What must agree between merged models: the config, less training-time settings and the distillation map."""
  skip = ("dropout", "attention_dropout", "dtype", "remat", "attention", "distill_dim")
  return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}


def check(sources):
  """One line for the first source whose architecture or tokenizer differs from the first source's."""
  first, vocab = sources[0], encode.load_tokenizer(sources[0].tok_dir).get_vocab()
  for s in sources[1:]:
    a, b = architecture(first.cfg), architecture(s.cfg)
    if diff := [k for k in a if a[k] != b[k]]:
      raise MergeError(f"{s.name}: another architecture than {first.name} "
                       f"({', '.join(f'{k} {b[k]} vs {a[k]}' for k in diff)}): merging needs the same one")
    if encode.load_tokenizer(s.tok_dir).get_vocab() != vocab:
      raise MergeError(f"{s.name}: another tokenizer (vocabulary) than {first.name}: merging needs the same one")


def merge(method, trees, weights, base=None, t=0.5, density=0.2, scale=1.0, mesh=None):
  """The merge of parameter trees on `mesh` (default: every device, parameters sharded over them)."""
  mesh = mesh or sharding.make_mesh(jax.device_count())
  shard = sharding.state_shardings(mesh, trees[0])
  place = lambda tree: jax.device_put(tree, shard)
  fns = {"mean": lambda b, ts: mean(ts, weights), "slerp": lambda b, ts: slerp(ts[0], ts[1], t),
         "task": lambda b, ts: task_arithmetic(b, ts, weights, scale),
         "ties": lambda b, ts: ties(b, ts, weights, density, scale)}
  if method == "slerp" and len(trees) != 2:
    raise MergeError(f"--method slerp merges two models, not {len(trees)}")
  if method in ("task", "ties") and base is None:
    raise MergeError(f"--method {method} needs --base MODEL (the model the deltas are taken from)")
  return jax.jit(fns[method], out_shardings=shard)(None if base is None else place(base), [place(x) for x in trees])


def last_checkpoints(mngr, n, params, shardings):
  """The mean of the last n checkpoints' parameters (fewer if fewer are kept), restored onto `shardings`; params:
  the newest one's, already in hand."""
  steps = sorted(mngr.all_steps())[-n:]
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
  trees = [checkpoint.restore_params(mngr.directory, s, target) for s in steps[:-1]] + [params]
  log.info("merge_last: the mean of the parameters of checkpoints %s", steps)
  return jax.jit(lambda ts: mean(ts, [1.0] * len(ts)), out_shardings=shardings)(trees), steps


def example_losses(sources, data, examples, tok_dir) -> np.ndarray:
  """[models, datasets]: each model's training loss (step.step_loss at full dimension, the tasks' default settings,
  dropout off) on a batch of the first `examples` rows of each DATA spec."""
  c = config_lib.base()
  c.data.update(datasets=tuple(data_entry(d, examples) for d in data), global_batch_size=examples, pack_menu=1)
  c.loss.mrl_dims = (sources[0].cfg.embed_dim,)  # The full embeddings.
  tables = data_lib.open_tables(c.data, c.tasks, encode.load_tokenizer(tok_dir))
  assemble = data_lib.assembler(c.data, c.tasks, tables)
  batches = {}
  for step in range(assemble.plan.steps_per_epoch):
    batches.setdefault(assemble.plan.units(step)[0][0], assemble(step)[0])
  out = np.zeros((len(sources), len(tables)))
  for i, s in enumerate(sources):
    model = model_lib.abstract_model(s.cfg)
    nnx.update(model, jax.tree.map(jnp.asarray, s.params))
    model.eval()
    for d, b in sorted(batches.items()):
      out[i, d] = float(step_lib.step_loss(model.embed_rows(b.rows), b, c)[0])
  return out


def data_entry(spec, examples) -> dict:
  """'[TASK=]KIND:PATH' -> a data.datasets entry of its first `examples` rows."""
  task, eq, rest = spec.partition("=")
  task, rest = (task, rest) if eq and ":" not in task else ("", spec)
  kind, colon, path = rest.partition(":")
  if not colon or not path:
    raise MergeError(f"--auto {spec!r}: expected [TASK=]KIND:PATH, e.g. retrieval=jsonl:data/retrieval-zh/"
                     "triplets.train.jsonl")
  return {"kind": kind, "path": path, "limit": examples} | ({"task": task} if task else {})


def write(out, cfg, params, tok_dir, prompts, card):
  """OUT/model (a model dir, written shard by shard) and OUT/export (sentence-transformers, gathered)."""
  out = pathlib.Path(out)
  modeldir.save_model_dir(out / "model", cfg, params, tok_dir)
  if jax.process_index() == 0:
    export_lib.write_sentence_transformers(cfg, jax.tree.map(np.asarray, params), tok_dir, out / "export",
                                           prompts=prompts, card=card)


def prompts_of(sources) -> dict:
  """The sources' prompts (sentence-transformers names -> prefixes); the first source's where they differ."""
  found = [s.prompts for s in sources if s.prompts]
  if any(p != found[0] for p in found[1:]):
    log.warning("the sources' prompts differ; the export keeps %s's: %s", sources[0].name, found[0])
  return found[0] if found else {}


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m piccolo_jax.merge", description=__doc__.split("\n")[0],
                              epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("out", help="new directory: OUT/model and OUT/export")
  p.add_argument("models", nargs="+", metavar="MODEL")
  p.add_argument("--method", choices=METHODS, default="mean",
                 help="mean (weighted), slerp (two models, at --t), task (task arithmetic), ties (--base, --density)")
  p.add_argument("--weights", type=float, nargs="+", help="one per MODEL (default: equal; or --auto)")
  p.add_argument("--auto", nargs="+", metavar="DATA", help="weights from each model's loss on [TASK=]KIND:PATH")
  p.add_argument("--examples", type=int, default=8, help="--auto: rows of each DATA")
  p.add_argument("--temperature", type=float, default=5.0, help="--auto: softmax(-loss / temperature)")
  p.add_argument("--base", help="task, ties: the model the deltas are taken from (e.g. the fine-tunes' init)")
  p.add_argument("--t", type=float, default=0.5, help="slerp: 0 is the first model, 1 the second")
  p.add_argument("--density", type=float, default=0.2, help="ties: the share of each delta's entries kept")
  p.add_argument("--scale", type=float, default=1.0, help="task, ties: the merged delta's scale")
  args = p.parse_args(argv)
  try:
    sources = [load(m) for m in args.models]
    base = load(args.base) if args.base else None
    check(sources + ([base] if base else []))
    if args.weights and len(args.weights) != len(sources):
      raise MergeError(f"--weights: {len(args.weights)} for {len(sources)} models")
    weights, losses = list(args.weights or [1.0] * len(sources)), None
    if args.auto:
      losses = example_losses(sources, args.auto, args.examples, sources[0].tok_dir)
      weights = list(auto_weights(losses.mean(1), args.temperature))
    if args.method == "mean":
      weights = [w / sum(weights) for w in weights]
    strip = lambda s: {k: v for k, v in s.params.items() if k != "distill_map"}  # Training-only: not merged.
    merged = merge(args.method, [strip(s) for s in sources], weights, strip(base) if base else None, args.t,
                   args.density, args.scale)
    cfg = sources[0].cfg.portable().replace(distill_dim=0)
    what = {"method": args.method, "t": args.t} if args.method == "slerp" else {"method": args.method} | (
        {"base": base.name, "density": args.density, "scale": args.scale} if base else {})
    card = export_lib.merge_card(cfg, what, [(s.name, w) for s, w in zip(sources, weights)], losses, args.auto)
    write(args.out, cfg, merged, sources[0].tok_dir, prompts_of(sources), card)
  except (OSError, ValueError) as e:
    p.exit(2, f"error: {e}\n")
  print(f"merged {len(sources)} models ({args.method}, weights {', '.join(f'{w:.4f}' for w in weights)}) -> "
        f"{args.out}/model and {args.out}/export")


if __name__ == "__main__":
  main()
