"""The pure training step of a (class-conditional) diffusion model."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from sdjax import schedules
from sdjax.schedules import Schedule
from sdjax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepConfig:
  ema_decay: float = 0.999
  ema_warmup: bool = True         # decay = min(ema_decay, (1 + step) / (10 + step))
  cond_drop_prob: float = 0.1     # labels replaced by the null class (for classifier-free guidance)
  null_class: int | None = None   # index of the "no class" embedding; None: unconditional model


def ema_decay(step: jax.Array, cfg: StepConfig) -> jax.Array:
  if not cfg.ema_warmup:
    return jnp.float32(cfg.ema_decay)
  step = step.astype(jnp.float32)
  return jnp.minimum(jnp.float32(cfg.ema_decay), (1.0 + step) / (10.0 + step))


def diffusion_loss(apply_fn: Callable[..., jax.Array], params: Any, schedule: Schedule, x0: jax.Array,
                   labels: jax.Array | None, rng: jax.Array, cfg: StepConfig) -> jax.Array:
  """Mean squared error to the schedule's training target at uniformly drawn timesteps (Ho et al. 2020).

  apply_fn(params, x_t, t, labels, rng) -> prediction; `rng` is for the model's own randomness (dropout).
  """
  k_t, k_noise, k_drop, k_model = jax.random.split(rng, 4)
  b = x0.shape[0]
  t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  x_t = schedules.add_noise(schedule, x0, noise, t)
  if labels is not None and cfg.null_class is not None and cfg.cond_drop_prob > 0:
    drop = jax.random.bernoulli(k_drop, cfg.cond_drop_prob, (b,))
    labels = jnp.where(drop, cfg.null_class, labels)
  pred = apply_fn(params, x_t, t.astype(jnp.float32), labels, k_model)
  target = schedules.training_target(schedule, x0, noise, t)
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target))


def make_train_step(apply_fn: Callable[..., jax.Array], schedule: Schedule,
                    optimizer: optax.GradientTransformation, cfg: StepConfig,
                    lr_schedule: optax.Schedule | None = None):
  """train_step(state, batch) -> (state, metrics); batch = {"image": float [B,H,W,C] in [-1,1], "label"}.

  A step whose loss or gradients are not finite leaves params, optimizer state and EMA unchanged
  (the step counter still advances) and reports `skipped = 1`.
  """

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    x0 = batch["image"].astype(jnp.float32)
    labels = batch.get("label")

    loss, grads = jax.value_and_grad(
        lambda p: diffusion_loss(apply_fn, p, schedule, x0, labels, rng, cfg))(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(state.step, cfg)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)

    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state),
                              ema_params=keep(ema, state.ema_params))
    metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": 1 - ok.astype(jnp.int32)}
    if lr_schedule is not None:
      metrics["lr"] = lr_schedule(state.step)
    return new_state, metrics

  return train_step
