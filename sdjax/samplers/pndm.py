"""PLMS: pseudo linear multistep (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models"), as
diffusers' PNDMScheduler with `skip_prk_steps=True` (Stable Diffusion's default scheduler): "pndm"; and with its
pseudo Runge-Kutta warm-up (`skip_prk_steps=False`, the class default): "pndm_prk", below.

`num_steps` steps take num_steps + 1 model evaluations: the first step is a pseudo-Heun step (two
evaluations), then Adams-Bashforth combinations of order 2, 3 and 4 of the epsilon history, each
applied with the pseudo-numerical DDIM transfer (eq. 11 of the paper).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sdjax import samplers
from sdjax.samplers import discretisation as disc
from sdjax.samplers.ddim import check_terminal_snr
from sdjax.samplers.denoiser import predict
from sdjax.schedules import Schedule


def _tables(schedule: Schedule, num_steps: int) -> dict[str, np.ndarray]:
  T = schedule.num_train_timesteps
  if not 2 <= num_steps <= T:
    raise ValueError(f"pndm needs num_steps in [2, {T}], got {num_steps}")
  r = T // num_steps
  ts = disc.discrete_timesteps(schedule, num_steps)[::-1]  # ascending
  model_t = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1]  # [t_{n-1}, t_{n-2}, t_{n-2}, ..., t_0]
  check_terminal_snr(schedule, model_t, "pndm", allowed=())  # its transfer divides by abar_t
  t_from, t_to = model_t.copy(), model_t - r
  t_from[1], t_to[1] = model_t[0], model_t[1]  # the pseudo-Heun correction redoes step 0
  # Weights of [eps_new, eps_{-1}, eps_{-2}, eps_{-3}] (history excludes the correction's eps).
  w = np.zeros((len(model_t), 4), np.float32)
  w[0] = [1, 0, 0, 0]
  w[1] = [0.5, 0.5, 0, 0]
  if len(model_t) > 2:
    w[2] = [1.5, -0.5, 0, 0]
  if len(model_t) > 3:
    w[3] = [23 / 12, -16 / 12, 5 / 12, 0]
  w[4:] = [55 / 24, -59 / 24, 37 / 24, -9 / 24]
  return {"timesteps": model_t.astype(np.float32), "t_from": t_from, "t_to": t_to, "weights": w}


def _eps(schedule: Schedule, combined, sample, a_t, name: str):
  """The noise of the combined (multistep) model output at `sample`, abar = a_t: as diffusers, PNDM combines the
  raw outputs and converts the combination (epsilon or v_prediction)."""
  if schedule.prediction_type not in ("epsilon", "v_prediction"):
    raise ValueError(f"{name} supports prediction_type epsilon or v_prediction")
  return predict(schedule.prediction_type, combined, sample, jnp.sqrt(a_t), jnp.sqrt(1 - a_t))[1]


def _init(schedule, noise, tables):
  return {"x": noise, "x_start": noise, "history": jnp.zeros((3,) + noise.shape, noise.dtype)}


def pndm_step(schedule, model_fn, carry, i, z, tables, options):
  x, history = carry["x"], carry["history"]
  eps = model_fn(x, samplers.at(tables, "timesteps", i))
  w = samplers.at(tables, "weights", i)
  combined = w[0] * eps + jnp.tensordot(w[1:], history, axes=1)
  # The correction (i == 1) restarts from the sample of step 0 and does not enter the history.
  sample = jnp.where(i == 1, carry["x_start"], x)
  history = jnp.where(i == 1, history, jnp.concatenate([eps[None], history[:-1]], axis=0))
  ac = schedule.alphas_cumprod
  t_from, t_to = samplers.at(tables, "t_from", i), samplers.at(tables, "t_to", i)
  a_t = ac[t_from]
  final = 1.0 if schedule.set_alpha_to_one else ac[0]
  a_prev = jnp.where(t_to >= 0, ac[jnp.maximum(t_to, 0)], final)
  combined = _eps(schedule, combined, sample, a_t, "pndm")
  # Liu et al. (2022) eq. 11: the transfer from t to t_prev along the predicted noise.
  denom = a_t * jnp.sqrt(1 - a_prev) + jnp.sqrt(a_t * (1 - a_t) * a_prev)
  x_next = jnp.sqrt(a_prev / a_t) * sample - (a_prev - a_t) * combined / denom
  return {"x": x_next, "x_start": jnp.where(i == 0, x, carry["x_start"]), "history": history}


# img2img is refused: diffusers' PNDM run from a sliced timestep list restarts its pseudo-Heun warm-up
# on mismatched timesteps, a behaviour not worth reproducing.
samplers.register("pndm", samplers.Sampler(_tables, _init, pndm_step, samplers.noised_vp, img2img=False))


# PNDM with its pseudo Runge-Kutta warm-up (Liu et al. 2022, Algorithm 1 / eq. 13; diffusers' PNDMScheduler
# default, skip_prk_steps=False): three pseudo-RK4 steps of four model evaluations each over the last (noisiest)
# four timesteps, then PLMS (eq. 12) from the fourth on, its epsilon history seeded with the first evaluation of
# each RK step. num_steps steps take num_steps + 9 model evaluations; one scan step per evaluation.
_RK_ACC = np.array([[0, 1 / 6], [1, 1 / 3], [1, 1 / 3], [0, 0]], np.float32)  # acc <- acc * [0] + eps * [1]


def _prk_tables(schedule: Schedule, num_steps: int) -> dict[str, np.ndarray]:
  T = schedule.num_train_timesteps
  if not 4 <= num_steps <= T:
    raise ValueError(f"pndm_prk needs num_steps in [4, {T}], got {num_steps}")
  r = T // num_steps
  ts = disc.discrete_timesteps(schedule, num_steps)[::-1]  # ascending
  half = r // 2
  # The four noisiest timesteps and their midpoints, as diffusers' prk_timesteps: [t3, t2 + h, t2 + h, t2, t2,
  # t1 + h, ..., t0] for ascending t0..t3 (h = r // 2), three RK steps of four evaluations each.
  prk = (ts[-4:].repeat(2) + np.tile([0, half], 4))[:-1].repeat(2)[1:-1][::-1]
  plms = ts[:-3][::-1]
  model_t = np.concatenate([prk, plms]).astype(np.int64)
  check_terminal_snr(schedule, model_t, "pndm_prk", allowed=())  # its transfer divides by abar_t
  n_prk, n = len(prk), len(model_t)
  k = np.arange(n_prk)
  # RK evaluation k of step k // 4 transfers from that step's start (sample and t = prk[k // 4 * 4]) to t - h on
  # even k, to t on odd k (the timestep it was evaluated at), as diffusers' step_prk.
  t_from = np.concatenate([prk[k // 4 * 4], plms])
  t_to = np.concatenate([prk - np.where(k % 2, 0, half), plms - r])
  # Combined epsilon = w_eps * eps + w_acc * acc + history . w_hist (history: the last 3 stored epsilons).
  w = np.zeros((n, 5), np.float32)  # [w_eps, w_acc, w_h1, w_h2, w_h3]
  w[:n_prk, 0] = np.where(k % 4 == 3, 1 / 6, 1)
  w[:n_prk, 1] = k % 4 == 3
  w[n_prk:] = [55 / 24, 0, -59 / 24, 37 / 24, -9 / 24]
  acc = np.zeros((n, 2), np.float32)
  acc[:n_prk] = _RK_ACC[k % 4]
  push = np.concatenate([k % 4 == 0, np.ones(n - n_prk, bool)])  # eps enters the history
  rk = np.concatenate([np.ones(n_prk, bool), np.zeros(n - n_prk, bool)])
  return {"timesteps": model_t.astype(np.float32), "t_from": t_from, "t_to": t_to, "weights": w, "acc": acc,
          "push": push, "rk": rk}


def _prk_init(schedule, noise, tables):
  return {"x": noise, "x_start": noise, "acc": jnp.zeros_like(noise),
          "history": jnp.zeros((3,) + noise.shape, noise.dtype)}


def pndm_prk_step(schedule, model_fn, carry, i, z, tables, options):
  x, acc, history = carry["x"], carry["acc"], carry["history"]
  eps = model_fn(x, samplers.at(tables, "timesteps", i))
  w = samplers.at(tables, "weights", i)
  combined = w[0] * eps + w[1] * acc + jnp.tensordot(w[2:], history, axes=1)
  a = samplers.at(tables, "acc", i)
  acc = a[0] * acc + a[1] * eps
  push, rk = samplers.at(tables, "push", i), samplers.at(tables, "rk", i)
  # An RK step's four evaluations all transfer from its start, the sample of its first evaluation.
  x_start = jnp.where(rk & push, x, carry["x_start"])
  sample = jnp.where(rk, x_start, x)
  history = jnp.where(push, jnp.concatenate([eps[None], history[:-1]], axis=0), history)
  ac = schedule.alphas_cumprod
  t_from, t_to = samplers.at(tables, "t_from", i), samplers.at(tables, "t_to", i)
  a_t = ac[t_from]
  final = 1.0 if schedule.set_alpha_to_one else ac[0]
  a_prev = jnp.where(t_to >= 0, ac[jnp.maximum(t_to, 0)], final)
  combined = _eps(schedule, combined, sample, a_t, "pndm_prk")
  denom = a_t * jnp.sqrt(1 - a_prev) + jnp.sqrt(a_t * (1 - a_t) * a_prev)  # eq. 11, as pndm_step
  x_next = jnp.sqrt(a_prev / a_t) * sample - (a_prev - a_t) * combined / denom
  return {"x": x_next, "x_start": x_start, "acc": acc, "history": history}


# img2img is refused, as for pndm: diffusers would start mid-way through an RK step.
samplers.register("pndm_prk", samplers.Sampler(_prk_tables, _prk_init, pndm_prk_step, samplers.noised_vp,
                                               img2img=False))
