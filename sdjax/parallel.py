"""Meshes, shardings and global arrays.

The mesh has axes ("data", "fsdp", "tensor"); a size of -1 takes the devices that remain. The batch is
sharded over ("data", "fsdp"); parameters by their logical axis names through `rules`
(logical name -> mesh axis or None). With the default rules every parameter is replicated, i.e. plain
data parallelism.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolve -1 in {"data": .., "fsdp": .., "tensor": ..} against `num_devices`."""
  unknown = sorted(set(sizes) - set(AXES))
  if unknown:
    raise ValueError(f"unknown mesh axis name(s) {unknown}; expected {AXES}")
  shape = [int(sizes.get(a, 1)) for a in AXES]
  free = [i for i, s in enumerate(shape) if s == -1]
  if len(free) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(AXES, shape))}")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(zip(AXES, shape))}")
  fixed = math.prod(s for s in shape if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"mesh {dict(zip(AXES, shape))}: {num_devices} devices are not divisible by {fixed}")
    shape[free[0]] = num_devices // fixed
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh {dict(zip(AXES, shape))} needs {math.prod(shape)} devices, "
                     f"but {num_devices} exist")
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(sizes, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for a tree of (possibly `nn.LogicallyPartitioned`) leaves, from logical rules."""
  specs = nn.get_partition_spec(abstract_boxed)
  with nn.logical_axis_rules(list(rules)):
    mesh_specs = nn.logical_to_mesh(specs)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), mesh_specs, is_leaf=lambda x: isinstance(x, P))


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assemble each process's share of the batch into global arrays sharded by `sharding`."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
