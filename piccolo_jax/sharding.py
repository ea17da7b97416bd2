"""Device mesh and shardings: batch over ('data', 'fsdp'), parameters ZeRO-style over 'fsdp'; processes."""
import dataclasses
import os

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # The batch is split over every device.


def make_mesh(fsdp: int = 1, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp) mesh over `devices` (default: all devices of all processes)."""
  n = len(devices) if devices is not None else jax.device_count()
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} must divide the device count {n}")
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((n // fsdp, fsdp), ("data", "fsdp"), axis_types=auto, devices=devices)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def put_batch(batch, mesh):
  """The one place host data becomes device arrays (batch.Batch's contract): each process's packed rows ->
  global arrays sharded by row over every device (process slices concatenate in process order); the
  per-task arrays, whole on every process, replicated."""
  put = lambda sharded, tree: jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharded, x), tree)
  return dataclasses.replace(batch, rows=put(batch_sharding(mesh), batch.rows), slots=put(replicated(mesh), batch.slots),
                             extras=put(replicated(mesh), batch.extras))


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


def initialize_distributed(coordinator: str, num_processes: int, process_id: int):
  """jax.distributed.initialize(): explicit flags, else auto-detected on TPU pods and SLURM."""
  if coordinator:
    jax.distributed.initialize(coordinator, num_processes, process_id)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    jax.distributed.initialize()
