"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"): the UniP-p predictor and the UniC-p
corrector, as diffusers' UniPCMultistepScheduler.

Each step k evaluates the model once at x_k; its prediction m_k (x0 with data prediction, epsilon with noise
prediction, `predict_x0`) first corrects x_k (UniC, from x_{k-1} and m_{k-1}, ..., m_k; not at k = 0 nor after a
step listed in the schedule's `disable_corrector`), then UniP predicts x_{k+1} from m_k, m_{k-1}, ... Orders warm
up (1 on the first step) and, with the schedule's `lower_order_final`, drop towards 1 on the last steps; the
corrector reuses the previous step's predictor order. B(h) = e^h - 1 ("bh2", the default) or h ("bh1").

Registered names: "unipc" + "_1" / "" / "_3" (solver_order 1, 2, 3) + "_bh1" (solver_type="bh1") + "_eps"
(predict_x0=False). Table settings are the schedule's: final_sigmas_type ("zero" or "sigma_min"),
lower_order_final, disable_corrector, and the sigma spacing (Karras etc.).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sdjax import samplers, schedules
from sdjax.samplers.denoiser import predict
from sdjax.samplers.dpmpp import alpha_sigma_lambda as _lam
from sdjax.samplers.dpmpp import dpm_tables
from sdjax.schedules import Schedule

ORDERS = (1, 2, 3)
SCHEDULE_OPTIONS = ("use_karras_sigmas", "final_sigmas_type", "lower_order_final", "disable_corrector")


def sampler_name(solver_order: int = 2, solver_type: str = "bh2", predict_x0: bool = True) -> str:
  """The registered name of a UniPC variant."""
  return ("unipc" + ("" if solver_order == 2 else f"_{solver_order}") + ("_bh1" if solver_type == "bh1" else "")
          + ("" if predict_x0 else "_eps"))


def _b(h, predict_x0: bool, bh1: bool):
  """(h phi_1, B(h), [b_1, b_2, b_3]) of Zhao et al. eq. (9) with hh = -h (data prediction) or h (noise)."""
  hh = -h if predict_x0 else h
  h_phi_1 = jnp.expm1(hh)
  b_h = hh if bh1 else jnp.expm1(hh)
  h_phi_k = h_phi_1 / hh - 1
  bs, factorial = [], 1
  for i in range(1, 4):
    bs.append(h_phi_k * factorial / b_h)
    factorial *= i + 1
    h_phi_k = h_phi_k / hh - 1 / factorial
  return h_phi_1, b_h, bs


def _solve(rows, rhs):
  """The solution of the small linear system rows . rho = rhs (scalars, traced), by LU as torch.linalg.solve."""
  return jnp.linalg.solve(jnp.stack([jnp.stack(r) for r in rows]), jnp.stack(rhs))


def _update(x, m0, res, alpha_t, sigma_t, alpha_s, sigma_s, h_phi_1, b_h, predict_x0):
  """x_t = base - (alpha_t or sigma_t) B(h) res, base the exponential-integrator step from s with m0."""
  if predict_x0:
    return sigma_t / sigma_s * x - alpha_t * h_phi_1 * m0 - alpha_t * b_h * res
  return alpha_t / alpha_s * x - sigma_t * h_phi_1 * m0 - sigma_t * b_h * res


def make_step(solver_order: int, bh1: bool, predict_x0: bool):
  """The scan step of UniPC-p with the given maximum order, B(h) and parameterisation."""

  def step(schedule, model_fn, carry, i, z, tables, options):
    x, last_x, hist = carry["x"], carry["last_x"], carry["m"]  # hist[j] = m_{k-1-j}
    sig = lambda k: samplers.at(tables, "sigmas", jnp.maximum(k, 0))
    lam = lambda k: _lam(sig(k))[2]
    alpha_k, sigma_k, lam_k = _lam(sig(i))
    out = model_fn(x, samplers.at(tables, "timesteps", i))
    # m: the model's x0 prediction (data prediction), or its epsilon prediction (noise prediction)
    m = predict(schedule.prediction_type, out, x, alpha_k, sigma_k)[0 if predict_x0 else 1]
    # Orders: min(cap, steps done + 1), cap the table's (solver_order, or lower near the end).
    p_order = jnp.minimum(samplers.at(tables, "cap", i), i + 1)
    c_order = jnp.where((i == 0) | ~samplers.at(tables, "corrector", i), 0,
                        jnp.minimum(samplers.at(tables, "cap", jnp.maximum(i - 1, 0)), i))

    # UniC-p: correct x_k from x_{k-1} with m_{k-1} (m0), m_{k-2}, m_{k-3} and the new m.
    alpha_p, sigma_p, lam_p = _lam(sig(i - 1))
    h = lam_k - lam_p
    h_phi_1, b_h, (b1, b2, b3) = _b(h, predict_x0, bh1)
    m0 = hist[0]
    d_t = m - m0
    corr = lambda res: _update(last_x, m0, res, alpha_k, sigma_k, alpha_p, sigma_p, h_phi_1, b_h,
                               predict_x0)
    cands = [x, corr(0.5 * d_t)]
    if solver_order >= 2:
      r1 = (lam(i - 2) - lam_p) / h
      d1 = (hist[1] - m0) / r1
      # rhos_c solves [[1, 1], [r1, 1]] rho = [b1, b2].
      rho0 = (b1 - b2) / (1 - r1)
      rho1 = b1 - rho0
      cands.append(corr(rho0 * d1 + rho1 * d_t))
    if solver_order >= 3:
      r2 = (lam(i - 3) - lam_p) / h
      d2 = (hist[2] - m0) / r2
      rho = _solve([[1.0, 1.0, 1.0], [r1, r2, 1.0], [r1 * r1, r2 * r2, 1.0]], [b1, b2, b3])
      cands.append(corr(rho[0] * d1 + rho[1] * d2 + rho[2] * d_t))
    x = jnp.select([c_order == k for k in range(len(cands))], cands, x)

    # UniP-p: predict x_{k+1} from m (m0), m_{k-1}, m_{k-2}.
    alpha_n, sigma_n, lam_n = _lam(samplers.at(tables, "sigmas", i + 1))
    h = lam_n - lam_k
    h_phi_1, b_h, (b1, b2, _) = _b(h, predict_x0, bh1)
    pred = lambda res: _update(x, m, res, alpha_n, sigma_n, alpha_k, sigma_k, h_phi_1, b_h, predict_x0)
    cands = [pred(jnp.zeros_like(m))]
    if solver_order >= 2:
      r1 = (lam(i - 1) - lam_k) / h
      d1 = (hist[0] - m) / r1
      cands.append(pred(0.5 * d1))
    if solver_order >= 3:
      r2 = (lam(i - 2) - lam_k) / h
      d2 = (hist[1] - m) / r2
      rho = _solve([[1.0, 1.0], [r1, r2]], [b1, b2])
      cands.append(pred(rho[0] * d1 + rho[1] * d2))
    x_next = jnp.select([p_order == k + 1 for k in range(len(cands))], cands, cands[0])
    hist = jnp.concatenate([m[None], hist[:-1]], axis=0)
    return {"x": x_next, "last_x": x, "m": hist}

  return step


def _init(schedule, noise, tables):
  return {"x": noise, "last_x": jnp.zeros_like(noise), "m": jnp.zeros((3,) + noise.shape, noise.dtype)}


def make_tables(solver_order: int, bh1: bool, predict_x0: bool):
  name = sampler_name(solver_order, "bh1" if bh1 else "bh2", predict_x0)

  def tables(schedule: Schedule, num_steps: int) -> dict[str, np.ndarray]:
    return unipc_tables(schedule, num_steps, solver_order=solver_order, name=name,
                        needs_sigma_min=bh1 or not predict_x0)

  return tables


def unipc_tables(schedule: Schedule, num_steps: int, *, solver_order: int = 2, name: str = "unipc",
                 needs_sigma_min: bool = False) -> dict[str, np.ndarray]:
  """diffusers' UniPC timesteps and sigmas [n + 1] (the last 0, or with final_sigmas_type="sigma_min" the
  smallest sigma: the training one, or the last Karras sigma), each step's order cap ("cap") and whether its
  corrector runs ("corrector", False at the steps after those in disable_corrector)."""
  sigma_min = schedule.final_sigmas_type == "sigma_min"
  if needs_sigma_min and not sigma_min:
    raise ValueError(f"{name}: final_sigmas_type={schedule.final_sigmas_type!r} makes diffusers' last step NaN "
                     f"(B(h) or h phi_1 is infinite at sigma 0); use final_sigmas_type='sigma_min'")
  if not schedule.lower_order_final and solver_order > 1 and not sigma_min:
    raise ValueError(f"{name}: lower_order_final=False with final_sigmas_type='zero' makes diffusers' last step "
                     f"inf/NaN; use final_sigmas_type='sigma_min'")
  t = dpm_tables(schedule.replace(final_sigmas_type="zero"), num_steps, unipc=True)
  sigmas = t["sigmas"]
  if sigma_min:
    sigmas = sigmas.copy()
    sigmas[-1] = sigmas[-2] if schedule.use_karras_sigmas else schedules.train_sigmas(schedule)[0]
  n = len(t["timesteps"])
  k = np.arange(n)
  cap = np.minimum(solver_order, n - k) if schedule.lower_order_final else np.full(n, solver_order)
  corrector = np.array([j - 1 not in schedule.disable_corrector for j in k])
  return {"timesteps": t["timesteps"], "sigmas": sigmas, "cap": cap.astype(np.int32), "corrector": corrector}


for _order in ORDERS:
  for _bh1 in (False, True):
    for _x0 in (True, False):
      samplers.register(sampler_name(_order, "bh1" if _bh1 else "bh2", _x0),
                        samplers.Sampler(make_tables(_order, _bh1, _x0), _init, make_step(_order, _bh1, _x0),
                                         samplers.noised_vp_sigma, schedule_options=SCHEDULE_OPTIONS))
