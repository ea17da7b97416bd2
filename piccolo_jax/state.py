"""Training state: the optimizer, and the parameters and its state placed on the mesh (models.py loads them).

The state is {params: what trains, frozen: what does not (a LoRA run's base weights, in model.lora.base_dtype;
else empty), opt: the optimizer's state of params, step}. The step differentiates params only; checkpoints hold
all but `frozen`, which a run rebuilds from model.init (checkpoint.py).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from piccolo_jax import model as model_lib
from piccolo_jax import sharding


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def make_optimizer(o, params, total_steps: int, train_positions=False):
  """(tx, lr schedule): AdamW, warmup + linear decay, global-norm clip, frozen params, accumulation.
  train_positions: the position embeddings train even where o.freeze names them (extended positions)."""
  updates = max(total_steps // o.grad_accum, 1)
  warmup = o.warmup_steps if o.warmup_steps >= 0 else int(o.warmup_ratio * updates)
  schedule = optax.join_schedules([optax.linear_schedule(0.0, o.lr, max(warmup, 1)),
                                   optax.linear_schedule(o.lr, 0.0, max(updates - warmup, 1))], [warmup])
  decay = jax.tree.map(lambda x: np.ndim(x) >= 2, params)  # No decay on biases and LayerNorms.
  tx = optax.chain(optax.clip_by_global_norm(o.clip_norm) if o.clip_norm else optax.identity(),
                   optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay))
  frozen = [re.compile(p) for p in o.freeze]
  is_frozen = lambda path: (any(p.search(path) for p in frozen)
                            and not (train_positions and path.startswith("embeddings/position/")))
  labels = jax.tree_util.tree_map_with_path(lambda path, _: "frozen" if is_frozen(_path_str(path)) else "train",
                                            params)
  tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  if o.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=o.grad_accum)
  return tx, schedule


LORA_TRAINED = (r"/lora_[ab]$", r"^dense/", r"^distill_map/")  # A LoRA run's trained parameters: the adapters and
# the heads after pooling (small, and a new one starts random).


def split_frozen(params: dict, cfg, base_dtype="bfloat16") -> tuple[dict, dict]:
  """(trained, frozen) parameters (host arrays, or ShapeDtypeStructs) of a model config: with LoRA adapters
  (decoder.Config.lora_rank > 0) the adapters and heads, and the rest cast to base_dtype (config.model.lora's);
  else (params, {})."""
  if not getattr(cfg, "lora_rank", 0):
    return params, {}
  trained, dtype = [re.compile(p) for p in LORA_TRAINED], jnp.dtype(base_dtype)
  train, frozen = partition(params, lambda path: any(p.search(path) for p in trained))
  cast = lambda x: jax.ShapeDtypeStruct(x.shape, dtype) if isinstance(x, jax.ShapeDtypeStruct) else \
      np.asarray(x).astype(dtype)
  return train, jax.tree.map(cast, frozen)


def partition(tree: dict, keep) -> tuple[dict, dict]:
  """(the leaves whose path keep(path) is true, the others) of a nested dict, each a nested dict of its own."""
  a, b = {}, {}
  for k, v in tree.items():
    if isinstance(v, dict):
      x, y = partition(v, lambda p, k=k: keep(f"{k}/{p}"))
      a.update({k: x} if x else {})
      b.update({k: y} if y else {})
    else:
      (a if keep(str(k)) else b)[k] = v
  return a, b


def combine(a: dict, b: dict) -> dict:
  """The union of two nested dicts of disjoint leaves (partition's inverse)."""
  out = dict(a)
  for k, v in b.items():
    out[k] = combine(out[k], v) if k in out else v
  return out


def full_params(state) -> dict:
  """Every parameter of a train state: trained and frozen."""
  return combine(state["params"], state["frozen"])


def init_state(cfg, params: dict, tx, mesh, seed: int, frozen=None):
  """(state on the mesh, its shardings, graphdef, dropout-RNG template) for train_step; params: the trained ones,
  frozen: the others (split_frozen)."""
  model = model_lib.abstract_model(cfg)
  model.train()
  nnx.reseed(model, default=seed)
  graphdef, _, rngs = nnx.split(model, nnx.Param, ...)
  p_shard, f_shard = sharding.state_shardings(mesh, params), sharding.state_shardings(mesh, frozen or {})
  params, frozen = jax.device_put(params, p_shard), jax.device_put(frozen or {}, f_shard)
  o_shard = sharding.state_shardings(mesh, jax.eval_shape(tx.init, params))
  state = {"params": params, "frozen": frozen, "opt": jax.jit(tx.init, out_shardings=o_shard)(params),
           "step": jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))}
  shardings = {"params": p_shard, "frozen": f_shard, "opt": o_shard, "step": sharding.replicated(mesh)}
  return state, shardings, graphdef, nnx.to_pure_dict(rngs)


def host_params(params, mesh) -> dict:
  """Parameters gathered to every process as numpy (for export and evaluation)."""
  full = jax.jit(lambda p: p, out_shardings=sharding.replicated(mesh))(params)
  return jax.tree.map(np.asarray, full)
