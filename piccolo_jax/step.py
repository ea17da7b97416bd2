"""The jitted train step: embed a global batch, take its tasks' losses within their groups, update.

A step's `mix` is ((task, groups), ...): the global batch is loss.groups equal groups of rows, each
group's loss is taken on its own rows only, and the step loss is the mean over all groups (the DDP
average of per-GPU losses when the groups are the original's GPUs). A single-task batch (data.mix=
"dataset") is flat; a mixed one (data.mix="groups") keeps each task's arrays under its name.
"""
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from piccolo_jax import gradcache
from piccolo_jax import losses
from piccolo_jax import packing
from piccolo_jax import tasks as tasks_lib


def dropout_key(seed, step):
  """The dropout key of a training step: a function of (seed, step) only, so resumes replay it."""
  return jax.random.fold_in(jax.random.key(seed), step)


def task_loss(task, emb, batch, loss_cfg, groups=1):
  """(loss, per-MRL-dim losses) of one task's rows: the mean over `groups` equal groups of consecutive
  rows, each group's loss on its own rows (and their negatives) only."""
  t = tasks_lib.TASKS[task]
  mrl = losses.matryoshka(t.loss, dims=tuple(loss_cfg.mrl_dims), weights=loss_cfg.mrl_weights,
                          return_per_dim=True)
  args_kwargs = jax.tree.map(lambda x: x.reshape(groups, x.shape[0] // groups, *x.shape[1:]), t.loss_args(emb, batch))
  loss_G, per_dim_GL = jax.vmap(lambda a, kw: mrl(*a, **kw, **dict(loss_cfg[task])))(*args_kwargs)
  return jnp.mean(loss_G), jnp.mean(per_dim_GL, axis=0)


def step_loss(embs, batch, mix, loss_cfg):
  """(loss, (per-MRL-dim losses, {task: its groups' mean loss})) of a step of mix ((task, groups), ...)
  from the embeddings of texts(batch)."""
  total = sum(n for _, n in mix)
  loss, per_dim, by_task = 0.0, 0.0, {}
  for task, n in mix:
    part = batch.get(task, batch)  # A mixed batch keeps each task's arrays under its name.
    by_task[task], dims = task_loss(task, fields_of(embs, part), part, loss_cfg, n)
    loss, per_dim = loss + n / total * by_task[task], per_dim + n / total * dims
  return loss, (per_dim, by_task)


def text_fields(batch) -> list[str]:
  """The batch's text fields: {f}_ids/_mask padded, or {f}_idx slots into the packed rows."""
  return sorted(k[:-4] for k in batch if k.endswith(("_ids", "_idx")))


def texts(batch) -> dict:
  """The encoder's inputs: {"packed": pack_* arrays} for a packed batch, else {field: (ids, mask)}."""
  if "pack_tok" in batch:
    return {"packed": tuple(batch[k] for k in packing.ARRAYS)}
  return {f: (batch[f + "_ids"], batch[f + "_mask"]) for f in text_fields(batch)}


def embed(model, inputs):
  """The encoder on texts(batch) values: model.packed for the packed rows, else the padded model call."""
  return model.packed(*inputs) if len(inputs) == len(packing.ARRAYS) else model(*inputs)


def fields_of(embs, batch) -> dict:
  """{field: emb [N, D]} in the batch's text order, from the embeddings of texts(batch)."""
  if "packed" not in embs:
    return embs
  emb_ND = embs["packed"].reshape(-1, embs["packed"].shape[-1])  # [R * S, D]
  return {f: emb_ND[batch[f + "_idx"]] for f in text_fields(batch)}


def value_and_grad(graphdef, rngs, params, batch, mix, loss_cfg, key=None, chunk_size=0):
  """((loss, (per-MRL-dim losses, {task: loss})), grads) of a global batch, padded or packed; with
  chunk_size > 0 by gradient caching (piccolo_jax.gradcache), chunk_size rows at a time. mix: the step's
  ((task, groups), ...), or a task name for one group. key: the dropout key."""
  mix = ((mix, 1),) if isinstance(mix, str) else mix
  loss_of = lambda embs: step_loss(embs, batch, mix, loss_cfg)
  if chunk_size:
    grad_fn = gradcache.cached_value_and_grad(gradcache.nnx_embed_fn(graphdef, rngs, embed), loss_of, chunk_size)
    return grad_fn(params, texts(batch), key)

  def loss_fn(params):
    model = nnx.merge(graphdef, params, rngs)
    if key is not None:
      nnx.reseed(model, default=key)
    return loss_of({f: embed(model, x) for f, x in texts(batch).items()})

  return jax.value_and_grad(loss_fn, has_aux=True)(params)


def make_train_step(graphdef, tx, loss_cfg, seed, chunk_size=0):
  """The jitted step (state, batch, rngs, mix) -> (state, metrics); non-finite updates are skipped.

  Dropout keys depend only on (seed, step), so a resumed run replays the same masks. chunk_size > 0
  gets the same gradient by gradient caching (piccolo_jax.gradcache), chunk_size rows at a time (texts, or
  packed rows).
  """

  def train_step(state, batch, rngs, mix):
    key = dropout_key(seed, state["step"])
    (loss, (per_dim, by_task)), grads = value_and_grad(graphdef, rngs, state["params"], batch, mix, loss_cfg, key,
                                                       chunk_size)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(_):
      updates, opt = tx.update(grads, state["opt"], state["params"])
      return {"params": optax.apply_updates(state["params"], updates), "opt": opt}

    # A cond, not a select over every parameter and moment: XLA:CPU ran that as extra passes over the
    # whole state (BENCHMARKS.md, stella shape).
    new = jax.lax.cond(ok, update, lambda _: {k: state[k] for k in ("params", "opt")}, None)
    new["step"] = state["step"] + 1  # A skipped update still consumes its batch and step.
    return new, {"loss": loss, "loss_per_dim": per_dim, "task_loss": by_task, "grad_norm": grad_norm, "ok": ok}

  return jax.jit(train_step, static_argnames="mix", donate_argnums=0)
