"""Rematerialisation policies: what each U-Net / VAE block keeps from its forward pass for the backward pass.

A model config's `remat` field names one (`True` / `False` are accepted as "full" / "none", the values older
configs and workdirs hold):
  none           keep every activation (fastest, most memory)
  full           keep only each block's inputs; the backward recomputes the whole block
  dots           keep the outputs of matmuls (dense layers, attention logits/values); recompute the rest
                 (norms, activations, convolutions)
  dots_no_batch  keep only matmul outputs without batch dimensions (the dense projections; not attention's
                 batched products, whose logits are the largest tensors at SD resolutions)
  attention      keep only each attention's output (named "attention_out"); recompute everything else
  offload        as "attention", but the saved outputs go to pinned host memory during the forward and come
                 back for the backward (frees accelerator memory on TPU/GPU; on CPU it is a copy in host memory)
The memory/time trade-off of each, for the full-size U-Net, is in docs/benchmarks.md (bench/train_step.py
--mode remat). Policies change memory and time only: outputs and gradients are the same (tests/test_models.py).
"""
from __future__ import annotations

from typing import Any

import jax
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from sdjax.models import flops

POLICIES = ("none", "full", "dots", "dots_no_batch", "attention", "offload")
ATTENTION_OUT = "attention_out"


def normalize(where: str, value: Any) -> str:
  """The policy name of a config's `remat` value (bools as older configs hold them); a clear error otherwise."""
  if isinstance(value, bool):
    return "full" if value else "none"
  if isinstance(value, str) and value in POLICIES:
    return value
  raise ValueError(f"{where}: {value!r} is not a remat policy (expected one of {', '.join(POLICIES)}, or a bool)")


def _policy(name: str):
  cp = jax.checkpoint_policies
  return {"full": None, "dots": cp.checkpoint_dots, "dots_no_batch": cp.dots_with_no_batch_dims_saveable,
          "attention": cp.save_only_these_names(ATTENTION_OUT),
          "offload": cp.save_and_offload_only_these_names(
              names_which_can_be_saved=(), names_which_can_be_offloaded=(ATTENTION_OUT,),
              offload_src="device", offload_dst="pinned_host")}[name]


def wrap(module_cls: type, policy: str, static_argnums: tuple[int, ...] = ()) -> type:
  """`module_cls` rematerialised under `policy` (a normalised name), or itself for "none"."""
  if policy == "none" or flops.active():  # model-FLOPs counting excludes recomputation (sdjax.models.flops)
    return module_cls
  return nn.remat(module_cls, policy=_policy(policy), static_argnums=static_argnums)


def name_attention_output(x: jax.Array) -> jax.Array:
  """Tag an attention output so that the "attention" / "offload" policies save it (identity otherwise)."""
  return checkpoint_name(x, ATTENTION_OUT)
