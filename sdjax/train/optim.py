"""Optimizers from config: optax AdamW with linear warmup into a constant or cosine learning rate."""
from __future__ import annotations

from typing import Any, Mapping

import optax

SCHEDULES = ("constant", "cosine")


def learning_rate(cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  lr, warmup, kind = float(cfg["lr"]), int(cfg["warmup_steps"]), cfg["schedule"]
  if kind == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)],
                                [max(warmup, 1)])
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(total_steps, warmup + 1),
                                              end_value=lr * float(cfg.get("final_lr_fraction", 0.0)))
  raise ValueError(f"config.optim.schedule: unknown {kind!r}; expected one of {SCHEDULES}")


def make_optimizer(cfg: Mapping[str, Any], total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  if cfg["name"] != "adamw":
    raise ValueError(f"config.optim.name: unknown optimizer {cfg['name']!r}; expected 'adamw'")
  schedule = learning_rate(cfg, total_steps)
  chain = []
  if cfg.get("grad_clip"):
    chain.append(optax.clip_by_global_norm(float(cfg["grad_clip"])))
  chain.append(optax.adamw(schedule, b1=float(cfg["b1"]), b2=float(cfg["b2"]), eps=float(cfg["eps"]),
                           weight_decay=float(cfg["weight_decay"])))
  return optax.chain(*chain), schedule
