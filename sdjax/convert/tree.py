"""PyTorch state dicts (diffusers / transformers key names) <-> sdjax Flax parameter trees.

The Flax path of every parameter mirrors its PyTorch key: `down_blocks.0.resnets.1.conv1.weight` is
`down_blocks_0/resnets_1/conv1/kernel`. Numbered children of the containers in CONTAINERS are named
`<container>_<N>`; every other name is kept. Leaves:
  Dense kernel [in, out]          <-> Linear weight [out, in] (transposed)
  Conv kernel [kh, kw, in, out]   <-> Conv2d weight [out, in, kh, kw]
  norm scale, Embed embedding     <-> weight;  bias <-> bias
The Flax side is the source of truth: conversion walks the target parameter shapes (from
`jax.eval_shape` of the module's init), so every missing, extra or mis-shaped weight is reported by name.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import jax
import numpy as np
from flax import traverse_util

CONTAINERS = ("down_blocks", "up_blocks", "mid_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
              "transformer_blocks", "to_out", "net", "layers")
_NUMBERED = re.compile(rf"^({'|'.join(CONTAINERS)})_(\d+)$")
# Buffers and bookkeeping that PyTorch state dicts carry but that are not parameters.
IGNORED = (re.compile(r"(^|\.)position_ids$"), re.compile(r"(^|\.)num_batches_tracked$"))


class WeightMismatchError(ValueError):
  """The weights do not fit the model: lists every missing, unexpected and mis-shaped tensor."""


def torch_key(path: Iterable[str]) -> str:
  """Flax parameter path -> PyTorch state-dict key."""
  *modules, leaf = path
  names = [_NUMBERED.sub(r"\1.\2", m) for m in modules]
  return ".".join(names + ["bias" if leaf == "bias" else "weight"])


def _to_flax_leaf(leaf: str, a: np.ndarray, ndim: int) -> np.ndarray:
  if leaf == "kernel" and ndim == 4:
    return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a
  if leaf == "kernel" and ndim == 2:
    return a.T if a.ndim == 2 else a
  return a


def _to_torch_leaf(leaf: str, a: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and a.ndim == 4:
    return a.transpose(3, 2, 0, 1)
  if leaf == "kernel" and a.ndim == 2:
    return a.T
  return a


def to_flax(state_dict: Mapping[str, Any], target: Any, *, what: str = "model",
            dtype: Any = np.float32) -> dict:
  """Map a PyTorch-layout state dict onto the Flax parameter tree `target` (arrays or ShapeDtypeStructs).

  Returns a nested dict of numpy arrays of `dtype` (None keeps each file's dtype). Raises
  WeightMismatchError naming each missing, unexpected or mis-shaped weight.
  """
  flat = traverse_util.flatten_dict(target)
  used, missing, shapes, out = set(), [], [], {}
  for path, spec in flat.items():
    key = torch_key(path)
    if key not in state_dict:
      missing.append(f"{key} (shape {_torch_shape(path[-1], spec.shape)})")
      continue
    used.add(key)
    a = np.asarray(state_dict[key])
    a = _to_flax_leaf(path[-1], a, len(spec.shape))
    if tuple(a.shape) != tuple(spec.shape):
      shapes.append(f"{key}: checkpoint {tuple(np.asarray(state_dict[key]).shape)}, model expects "
                    f"{_torch_shape(path[-1], spec.shape)}")
      continue
    out[path] = a.astype(dtype) if dtype is not None else np.asarray(a)
  unexpected = [k for k in state_dict if k not in used and not any(p.search(k) for p in IGNORED)]
  if missing or unexpected or shapes:
    raise WeightMismatchError(_report(what, missing, unexpected, shapes))
  return traverse_util.unflatten_dict(out)


def from_flax(params: Any, dtype: Any = None) -> dict[str, np.ndarray]:
  """Flax parameter tree -> PyTorch-layout state dict of numpy arrays (optionally cast to `dtype`)."""
  flat = traverse_util.flatten_dict(jax.device_get(params))
  out = {}
  for path, a in flat.items():
    a = _to_torch_leaf(path[-1], np.asarray(a))
    out[torch_key(path)] = np.ascontiguousarray(a.astype(dtype) if dtype is not None else a)
  return out


def _torch_shape(leaf: str, shape) -> tuple:
  shape = tuple(shape)
  if leaf == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == "kernel" and len(shape) == 2:
    return shape[::-1]
  return shape


def _report(what: str, missing: list[str], unexpected: list[str], shapes: list[str], limit: int = 25) -> str:
  lines = [f"{what}: the weights do not match the model config"]
  for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
    if items:
      lines.append(f"  {len(items)} {title}:")
      lines += [f"    {item}" for item in items[:limit]]
      if len(items) > limit:
        lines.append(f"    ... and {len(items) - limit} more")
  return "\n".join(lines)
