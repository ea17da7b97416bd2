"""Training state: the optimizer, and the parameters and its state placed on the mesh (models.py loads them)."""
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


def init_state(cfg: model_lib.Config, params: dict, tx, mesh, seed: int):
  """(state on the mesh, its shardings, graphdef, dropout-RNG template) for train_step."""
  model = model_lib.abstract_model(cfg)
  model.train()
  nnx.reseed(model, default=seed)
  graphdef, _, rngs = nnx.split(model, nnx.Param, ...)
  p_shard = sharding.state_shardings(mesh, params)
  params = jax.device_put(params, p_shard)
  o_shard = sharding.state_shardings(mesh, jax.eval_shape(tx.init, params))
  state = {"params": params, "opt": jax.jit(tx.init, out_shardings=o_shard)(params),
           "step": jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))}
  shardings = {"params": p_shard, "opt": o_shard, "step": sharding.replicated(mesh)}
  return state, shardings, graphdef, nnx.to_pure_dict(rngs)


def host_params(params, mesh) -> dict:
  """Parameters gathered to every process as numpy (for export and evaluation)."""
  full = jax.jit(lambda p: p, out_shardings=sharding.replicated(mesh))(params)
  return jax.tree.map(np.asarray, full)
