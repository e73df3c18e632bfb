"""Optimizers from config: AdamW, Adafactor or Lion (optax), gradient clipping, warmup + constant/cosine.

config.optim fields: name, lr, schedule, warmup_steps, final_lr_fraction, b1, b2, eps, weight_decay,
grad_clip, and for Adafactor adafactor_decay_rate, adafactor_factored, adafactor_scale_by_param.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import optax

SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adamw", "adafactor", "lion")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """config.optim, parsed and checked once (errors name `config.optim.<field>`)."""
  name: str = "adamw"
  lr: float = 1e-4
  schedule: str = "cosine"
  warmup_steps: int = 0
  final_lr_fraction: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  grad_clip: float = 0.0          # global-norm clipping; 0: off
  adafactor_decay_rate: float = 0.8
  adafactor_factored: bool = True
  adafactor_scale_by_param: bool = False

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any] | "OptimConfig") -> "OptimConfig":
    if isinstance(cfg, OptimConfig):
      return cfg
    cfg = dict(cfg.items())
    values = {}
    for f in dataclasses.fields(cls):
      if f.name not in cfg:
        continue
      kind = {"str": str, "float": float, "int": int, "bool": bool}[f.type]
      try:
        values[f.name] = kind(cfg[f.name] or 0) if kind in (int, float) else kind(cfg[f.name])
      except (TypeError, ValueError):
        raise ValueError(f"config.optim.{f.name} must be a {kind.__name__}, got {cfg[f.name]!r}") from None
    c = cls(**values)
    if c.name not in OPTIMIZERS:
      raise ValueError(f"config.optim.name: unknown optimizer {c.name!r}; expected one of {OPTIMIZERS}")
    if c.schedule not in SCHEDULES:
      raise ValueError(f"config.optim.schedule: unknown {c.schedule!r}; expected one of {SCHEDULES}")
    for field in ("lr", "warmup_steps", "weight_decay", "grad_clip"):
      if getattr(c, field) < 0:
        raise ValueError(f"config.optim.{field} must be >= 0, got {getattr(c, field)}")
    return c


def learning_rate(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  lr, warmup = cfg.lr, cfg.warmup_steps
  if cfg.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)],
                                [max(warmup, 1)])
  return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(total_steps, warmup + 1),
                                            end_value=lr * cfg.final_lr_fraction)


def _base(cfg: OptimConfig, lr: optax.Schedule) -> optax.GradientTransformation:
  wd = cfg.weight_decay
  if cfg.name == "adamw":
    return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd)
  if cfg.name == "lion":
    # Chen et al. (2023): sign updates; use a learning rate 3-10x smaller and weight decay 3-10x larger.
    return optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=wd)
  # Adafactor: Shazeer & Stern (2018), without relative step sizes: `lr` is an absolute learning rate as for
  # Adam. Global-norm clipping (grad_clip) replaces Adafactor's own update clipping.
  return optax.adafactor(lr, decay_rate=cfg.adafactor_decay_rate, factored=cfg.adafactor_factored,
                         multiply_by_parameter_scale=cfg.adafactor_scale_by_param, clipping_threshold=None,
                         weight_decay_rate=wd or None)


def make_optimizer(cfg: OptimConfig | Mapping[str, Any],
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, learning-rate schedule) from `config.optim` (an OptimConfig or the config section)."""
  cfg = OptimConfig.from_config(cfg)
  schedule = learning_rate(cfg, total_steps)
  chain = []
  if cfg.grad_clip:
    chain.append(optax.clip_by_global_norm(cfg.grad_clip))
  chain.append(_base(cfg, schedule))
  return optax.chain(*chain), schedule
