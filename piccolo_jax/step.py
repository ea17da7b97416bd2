"""The jitted train step: embed a Batch's packed rows, take each task's loss within its groups, update.

`batch.mix` is ((task, groups), ...): a task's rows form `groups` equal groups of consecutive rows, each
group's loss is taken on its own rows (and their negatives) only, and the step loss is the mean over all
the step's groups: the DDP average of per-GPU losses when the groups are the original's GPUs
(docs/training.md). A step of one dataset is a mix of one task.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from piccolo_jax import attention
from piccolo_jax import gradcache
from piccolo_jax import losses
from piccolo_jax import state as state_lib
from piccolo_jax import tasks as tasks_lib


def dropout_key(seed, step):
  """The dropout key of a training step: a function of (seed, step) only, so resumes replay it."""
  return jax.random.fold_in(jax.random.key(seed), step)


def task_loss(task, emb, extras, config, groups=1):
  """(loss, per-MRL-dim losses, {name: mean over groups} of its loss_args' logged scalars) of one task's rows from
  its fields' embeddings {field: [N, D]} and extras: the mean over `groups` equal groups of consecutive rows.
  config: a run's config (its `loss` and `tasks` sections)."""
  spec = tasks_lib.TASKS[task]
  mrl = losses.matryoshka(spec.loss, dims=tuple(config.loss.mrl_dims), weights=config.loss.mrl_weights,
                          return_per_dim=True)

  def group(emb, extras):
    a = spec.loss_args(emb, extras, config.tasks[task])
    return *mrl(*a.args, **a.kwargs), a.stats or {}

  split = lambda x: x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
  loss_G, per_dim_GL, stats_G = jax.vmap(group)(*jax.tree.map(split, (emb, extras)))
  return jnp.mean(loss_G), jnp.mean(per_dim_GL, axis=0), jax.tree.map(jnp.mean, stats_G)


class Aux(NamedTuple):
  """What a step's loss reports besides its value."""
  per_dim: jax.Array  # Per-MRL-dim losses [len(loss.mrl_dims)].
  by_task: dict  # {task: its groups' mean loss}.
  stats: dict  # {task/name: logged scalar} (tasks.LossArgs.stats).


def step_loss(emb_ND, batch, config, project=None) -> tuple[jax.Array, Aux]:
  """(loss, Aux) of a batch from its packed rows' embeddings (model.Bert.embed_rows); project: the model's map to
  a teacher's dimension (model.Bert.project), for the tasks that take it."""
  total = sum(n for _, n in batch.mix)
  loss, per_dim, by_task, stats = 0.0, 0.0, {}, {}
  for task, n in batch.mix:
    emb = {f: emb_ND[slots] for f, slots in batch.slots[task].items()}
    if project is not None and tasks_lib.TASKS[task].mapped:
      emb = {f: project(e) for f, e in emb.items()}
    by_task[task], dims, task_stats = task_loss(task, emb, batch.extras[task], config, n)
    loss, per_dim = loss + n / total * by_task[task], per_dim + n / total * dims
    stats |= {f"{task}/{k}": v for k, v in task_stats.items()}
  return loss, Aux(per_dim, by_task, stats)


def value_and_grad(graphdef, rngs, params, batch, config, key=None, chunk_size=0, frozen=None):
  """((loss, Aux), grads of params) of a batch; frozen: the parameters that take no gradient (state.py). With
  chunk_size > 0 by gradient caching (piccolo_jax.gradcache), chunk_size packed rows of a group at a time (not with a
  distillation map: its gradient would be lost; config.check_run refuses it). key: the dropout key."""
  frozen = frozen or {}
  if chunk_size:
    embed = gradcache.nnx_embed_fn(graphdef, rngs, lambda model, rows: model.packed(*rows))
    embed_fn = lambda p, xs, k: embed(state_lib.combine(p, frozen), xs, k)
    groups = {f"rows{g:02d}": rows for g, rows in enumerate(batch.rows)}  # Sorted in group order.
    concat = lambda e: jnp.concatenate([e[f].reshape(-1, e[f].shape[-1]) for f in sorted(e)])
    grad_fn = gradcache.cached_value_and_grad(embed_fn, lambda e: step_loss(concat(e), batch, config), chunk_size)
    return grad_fn(params, groups, key)

  def loss_fn(params):
    model = nnx.merge(graphdef, state_lib.combine(params, frozen), rngs)
    if key is not None:
      nnx.reseed(model, default=key)
    return step_loss(model.embed_rows(batch.rows), batch, config, model.project)

  return jax.value_and_grad(loss_fn, has_aux=True)(params)


def make_train_step(graphdef, tx, config, chunk_size=0, mesh=None):
  """The jitted step (state, batch, rngs) -> (state, metrics); non-finite updates are skipped.

  Dropout keys depend only on (config.seed, step), so a resumed run replays the same masks. chunk_size > 0
  gets the same gradient by gradient caching, chunk_size packed rows at a time. mesh: the one the batch is
  sharded over, where the fused attention kernels run per device (attention.attend).
  """

  def train_step(state, batch, rngs):
    with attention.on(mesh):
      return _train_step(state, batch, rngs)

  def _train_step(state, batch, rngs):
    key = dropout_key(config.seed, state["step"])
    (loss, (per_dim, by_task, stats)), grads = value_and_grad(graphdef, rngs, state["params"], batch, config, key,
                                                              chunk_size, state["frozen"])
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(_):
      updates, opt = tx.update(grads, state["opt"], state["params"])
      return {"params": optax.apply_updates(state["params"], updates), "opt": opt}

    # A cond, not a select over every parameter and moment: XLA:CPU ran that as extra passes over the
    # whole state (BENCHMARKS.md, stella shape).
    new = jax.lax.cond(ok, update, lambda _: {k: state[k] for k in ("params", "opt")}, None)
    new["step"], new["frozen"] = state["step"] + 1, state["frozen"]  # A skipped update still consumes its batch
    # and step.
    return new, {"loss": loss, "loss_per_dim": per_dim, "task_loss": by_task, "stats": stats, "grad_norm": grad_norm,
                 "ok": ok}

  return jax.jit(train_step, donate_argnums=0)
