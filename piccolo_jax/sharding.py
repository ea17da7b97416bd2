"""Device mesh and shardings: batch over ('data', 'fsdp'), parameters ZeRO-style over 'fsdp'."""
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # The batch is split over every device.


def make_mesh(fsdp: int = 1) -> jax.sharding.Mesh:
  """A (data, fsdp) mesh over all devices of all processes."""
  n = jax.device_count()
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} must divide the device count {n}")
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((n // fsdp, fsdp), ("data", "fsdp"), axis_types=auto)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def put_batch(arrays: dict, mesh) -> dict:
  """The one place host data becomes device arrays: each process's numpy rows -> global jax.Arrays
  sharded on the leading axis over every device (process slices concatenate in process order). A nested
  dict (a mixed step's per-task index arrays) holds global arrays, replicated."""
  def put(v, sharding):
    if isinstance(v, dict):
      return {k: put(x, replicated(mesh)) for k, x in v.items()}
    return jax.make_array_from_process_local_data(sharding, v)
  return {k: put(v, batch_sharding(mesh)) for k, v in arrays.items()}


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fsdp_spec(shape, n) -> P:
  """Shards the largest dimension divisible by n; small or indivisible arrays stay replicated."""
  if n == 1 or not shape or np.prod(shape) < 2 ** 14:
    return P()
  for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[i] % n == 0:
      return P(*[None] * i, "fsdp")
  return P()


def state_shardings(mesh, tree):
  """NamedShardings for a pytree of arrays (params, optimizer state) under the fsdp rule."""
  n = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, _fsdp_spec(np.shape(x), n)), tree)
