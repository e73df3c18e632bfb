"""Meshes, shardings, global arrays and multi-host start-up.

The mesh has axes ("data", "fsdp", "tensor"); a size of -1 takes the devices that remain. The batch is
split over ("data", "fsdp"). A parameter's sharding follows from its shape and logical axis names:

1. `rules` (logical name -> mesh axis, e.g. ("channels_out", "tensor")) place named dimensions;
2. when the mesh has fsdp > 1, the largest remaining dimension that the fsdp size divides is split over
   "fsdp" (arrays smaller than `fsdp_min_size` elements stay replicated: their gather costs more than
   they save).

Optimizer-state and EMA leaves take the sharding of the parameter whose path and shape they share (Adam's
mu/nu, Lion's momentum, EMA); leaves that match no parameter (Adafactor's factored moments) follow rule 2
on their own shape; scalars are replicated. With no rules and fsdp = 1 everything is replicated: plain
data parallelism.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger("sdjax")

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
FSDP_MIN_SIZE = 1024


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
  """A ("data", "fsdp", "tensor") mesh. Devices keep jax's order (process by process), so each process
  holds a contiguous block of the batch axis, which `global_batch` relies on."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(sizes, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), AXES)


MESH_OPTIONS = ("rules", "fsdp_min_size")


def mesh_from_config(cfg: Mapping[str, Any], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh of `config.mesh` ({"data", "fsdp", "tensor", "rules", "fsdp_min_size"})."""
  return make_mesh({k: v for k, v in dict(cfg.items()).items() if k not in MESH_OPTIONS}, devices)


def rules_from_config(cfg: Mapping[str, Any]) -> tuple[tuple[str, str | None], ...]:
  rules = tuple(tuple(r) for r in cfg.get("rules", ()) or ())
  for r in rules:
    if len(r) != 2 or not isinstance(r[0], str) or (r[1] is not None and r[1] not in AXES):
      raise ValueError(f"config.mesh.rules: each rule is (logical_name, mesh_axis or None) with a mesh "
                       f"axis in {AXES}; got {r!r}")
  return rules


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_devices(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def rows_sharding(mesh: Mesh, n: int) -> NamedSharding:
  """`n` rows (a sample batch) split over the batch devices when they divide evenly, else replicated."""
  return batch_sharding(mesh) if n % batch_devices(mesh) == 0 else replicated(mesh)


def spec_for(shape: Sequence[int], names: Sequence[str | None] | None, mesh: Mesh,
             rules: Sequence[tuple[str, str | None]] = (), fsdp_min_size: int = FSDP_MIN_SIZE) -> P:
  """The PartitionSpec of one array from its shape and (optional) logical axis names."""
  spec: list[Any] = [None] * len(shape)
  used: set[str] = set()
  if names is not None and len(names) == len(shape):
    table = dict(rules)
    for i, name in enumerate(names):
      axis = table.get(name) if name is not None else None
      if axis is not None and axis not in used and mesh.shape[axis] > 1 and shape[i] % mesh.shape[axis] == 0:
        spec[i] = axis
        used.add(axis)
  n = mesh.shape["fsdp"]
  if n > 1 and "fsdp" not in used and math.prod(shape) >= fsdp_min_size:
    free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % n == 0]
    if free:
      # Largest dimension first; among equals the last one (the output features of a kernel).
      i = max(free, key=lambda j: (shape[j], j))
      spec[i] = "fsdp"
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def _dict_path(path) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def state_shardings(abstract_state: Any, abstract_boxed_params: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, str | None]] = (), fsdp_min_size: int = FSDP_MIN_SIZE) -> Any:
  """NamedShardings for every leaf of a train state (params, optimizer state, EMA, step, rng).

  `abstract_boxed_params` is the model's `eval_shape`d params still wrapped in `nn.LogicallyPartitioned`,
  from which the logical names come; `abstract_state` holds plain `ShapeDtypeStruct`s.
  """
  names_by_path: dict[tuple[str, ...], tuple[Any, tuple[int, ...]]] = {}
  specs = nn.get_partition_spec(abstract_boxed_params)
  unboxed = nn.meta.unbox(abstract_boxed_params)
  for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(unboxed)[0],
                                jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
    names_by_path[_dict_path(path)] = (tuple(spec) if spec is not None else None, tuple(leaf.shape))

  unsplit = []  # (bytes, path) of arrays large enough for FSDP that no fsdp-divisible dimension could split

  def one(path, leaf):
    shape = tuple(leaf.shape)
    keys = _dict_path(path)
    names = None
    for start in range(len(keys)):  # the longest suffix of the leaf's dict path that names a parameter
      hit = names_by_path.get(keys[start:])
      if hit is not None and hit[1] == shape:
        names = hit[0]
        break
    spec = spec_for(shape, names, mesh, rules, fsdp_min_size)
    if (mesh.shape["fsdp"] > 1 and shape and math.prod(shape) >= fsdp_min_size
        and np.issubdtype(leaf.dtype, np.floating) and "fsdp" not in jax.tree.leaves(tuple(spec))):
      unsplit.append((math.prod(shape) * np.dtype(leaf.dtype).itemsize, jax.tree_util.keystr(path)))
    return NamedSharding(mesh, spec)

  shardings = jax.tree_util.tree_map_with_path(one, abstract_state)
  if unsplit:
    total = sum(b for b, _ in unsplit)
    log.warning("FSDP: %d arrays (%.2f GiB, e.g. %s) have no dimension divisible by fsdp=%d and stay "
                "replicated; a smaller fsdp size (times a data axis) may save more memory",
                len(unsplit), total / 2**30, max(unsplit)[1], mesh.shape["fsdp"])
  return shardings


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assemble each process's share of the batch into global arrays sharded by `sharding`."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


# --- multi-host -------------------------------------------------------------------------------------

ENV_COORDINATOR = "SDJAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "SDJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "SDJAX_PROCESS_ID"


def _cluster_detected() -> str | None:
  """The name of a multi-process cluster environment that `jax.distributed.initialize()` detects alone."""
  if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in os.environ:
    return "SLURM"
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "Open MPI"
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "Cloud TPU pod"
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Start jax's multi-process runtime, if this is a multi-process job. Returns whether it did.

  Explicit arguments win, then $SDJAX_COORDINATOR_ADDRESS / $SDJAX_NUM_PROCESSES / $SDJAX_PROCESS_ID;
  with none of them, `jax.distributed.initialize()` is called without arguments on a detected TPU pod,
  SLURM or Open MPI job, and single-process runs do nothing. Must run before anything touches devices.
  On CPU, cross-process collectives use gloo.
  """
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
    num_processes = int(os.environ[ENV_NUM_PROCESSES])
  if process_id is None and os.environ.get(ENV_PROCESS_ID):
    process_id = int(os.environ[ENV_PROCESS_ID])
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    missing = [n for n, v in zip(("coordinator_address", "num_processes", "process_id"), explicit) if v is None]
    if missing:
      raise ValueError(f"multi-host: {', '.join(missing)} missing; give all of coordinator_address, "
                       f"num_processes and process_id (flags or ${ENV_COORDINATOR}, ${ENV_NUM_PROCESSES}, "
                       f"${ENV_PROCESS_ID}) or none")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"multi-host: process_id={process_id} is not in [0, num_processes={num_processes})")
    if num_processes == 1:
      return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    cluster = _cluster_detected()
    if cluster is None:
      return False
    log.info("multi-host: %s detected; calling jax.distributed.initialize()", cluster)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize()
  log.info("multi-host: process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
