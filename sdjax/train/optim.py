"""Optimizers from config: AdamW, Adafactor or Lion (optax), gradient clipping, warmup + constant/cosine.

config.optim fields: name, lr, schedule, warmup_steps, final_lr_fraction, b1, b2, eps, weight_decay,
grad_clip, and for Adafactor adafactor_decay_rate, adafactor_factored, adafactor_scale_by_param.
"""
from __future__ import annotations

from typing import Any, Mapping

import optax

SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adamw", "adafactor", "lion")


def learning_rate(cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  lr, warmup, kind = float(cfg["lr"]), int(cfg["warmup_steps"]), cfg["schedule"]
  if kind == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)],
                                [max(warmup, 1)])
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(total_steps, warmup + 1),
                                              end_value=lr * float(cfg.get("final_lr_fraction", 0.0)))
  raise ValueError(f"config.optim.schedule: unknown {kind!r}; expected one of {SCHEDULES}")


def _base(cfg: Mapping[str, Any], lr: optax.Schedule) -> optax.GradientTransformation:
  name = cfg["name"]
  wd = float(cfg.get("weight_decay", 0.0))
  if name == "adamw":
    return optax.adamw(lr, b1=float(cfg["b1"]), b2=float(cfg["b2"]), eps=float(cfg["eps"]), weight_decay=wd)
  if name == "lion":
    # Chen et al. (2023): sign updates; use a learning rate 3-10x smaller and weight decay 3-10x larger.
    return optax.lion(lr, b1=float(cfg["b1"]), b2=float(cfg["b2"]), weight_decay=wd)
  if name == "adafactor":
    # Shazeer & Stern (2018), without relative step sizes: `lr` is an absolute learning rate as for Adam.
    # Global-norm clipping (grad_clip) replaces Adafactor's own update clipping.
    return optax.adafactor(lr, decay_rate=float(cfg.get("adafactor_decay_rate", 0.8)),
                           factored=bool(cfg.get("adafactor_factored", True)),
                           multiply_by_parameter_scale=bool(cfg.get("adafactor_scale_by_param", False)),
                           clipping_threshold=None, weight_decay_rate=wd or None)
  raise ValueError(f"config.optim.name: unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


def make_optimizer(cfg: Mapping[str, Any], total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, learning-rate schedule) from `config.optim`."""
  schedule = learning_rate(cfg, total_steps)
  chain = []
  if cfg.get("grad_clip"):
    chain.append(optax.clip_by_global_norm(float(cfg["grad_clip"])))
  chain.append(_base(cfg, schedule))
  return optax.chain(*chain), schedule
