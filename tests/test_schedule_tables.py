"""sdjax's schedule tables vs diffusers 0.42.1 / torch 2.13 (CPU), bit for bit.

Fixture: tools/make_schedule_fixtures.py. For every beta schedule (with and without zero-terminal-SNR
rescaling) it holds diffusers' betas and alphas_cumprod, and for every scheduler class sdjax implements,
timestep spacing, Karras option and a few step counts, `set_timesteps`' timesteps and sigmas.

Each array is recorded twice, "host" (diffusers as run where the fixture was made) and "ieee" (the same with
torch's float32 sqrt correctly rounded). torch takes float32 sqrt from MKL's vsSqrt, whose result depends on
the CPU: correctly rounded with MKL's AVX2 kernel, but 1 ulp off for some inputs with the kernel MKL runs on
AMD CPUs (seeded by `rsqrtps`; the fixture was made on one) and with its AVX-512 kernel. sdjax computes a
correctly rounded sqrt, so it matches "ieee" exactly everywhere, and "host" exactly wherever no sqrt is
involved (all betas and alphas_cumprod without zero-SNR rescaling, all discrete timesteps, non-Karras
timesteps); where one is, the difference from "host" is torch's own, bounded below.
"""
import json
import os
from fractions import Fraction

import numpy as np
import pytest

from sdjax import samplers, schedules

FIXTURES = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "schedule_tables.npz"))
INDEX = json.loads(str(FIXTURES["index"]))
POOL = {k.split("/", 1)[1]: FIXTURES[k] for k in FIXTURES.files if k.startswith("pool/")}
BETAS = {b["beta"]: b for b in INDEX["betas"]}
SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "rescale_betas_zero_snr",
                 "prediction_type", "clip_sample")


def get(ref: str) -> np.ndarray:
  dtype, offset, length = ref.split(":")
  return POOL[dtype][int(offset):int(offset) + int(length)]


def reference(entry, mode: str) -> dict[str, np.ndarray]:
  refs = {**entry["host"], **(entry["ieee"] if mode == "ieee" else {})}
  return {k: get(v) for k, v in refs.items()}


def make_schedule(beta: str, spacing: str | None = None, karras: bool = False, set_alpha_to_one: bool = False):
  config = BETAS[beta]["config"]
  kwargs = {k: config[k] for k in SCHEDULE_KEYS if k in config}
  if spacing is not None:
    kwargs.update(INDEX["spacings"][spacing])
  return schedules.make_schedule(**kwargs, use_karras_sigmas=karras, set_alpha_to_one=set_alpha_to_one)


def sdjax_tables(case) -> dict[str, np.ndarray]:
  """sdjax's sampler tables for a fixture case, laid out as diffusers' scheduler holds them."""
  schedule = make_schedule(case["beta"], case["spacing"], case["karras"])
  t = samplers.get(INDEX["samplers"][case["class"]]).tables(schedule, case["steps"])
  out = {"timesteps": t["timesteps"]}
  if "sigmas" in t:
    out["sigmas"] = t["sigmas"]
  if case["class"] == "HeunDiscreteScheduler":  # diffusers repeats each step's (timestep, sigma) for the corrector
    ts, sig = t["timesteps"], t["sigmas"]
    np.testing.assert_array_equal(t["next_timesteps"][:-1], ts[1:])
    out = {"timesteps": np.concatenate([ts[:1], np.repeat(ts[1:], 2)]),
           "sigmas": np.concatenate([sig[:1], np.repeat(sig[1:-1], 2), sig[-1:]])}
  if case["class"] == "DDPMScheduler":
    out["prev"] = t["prev"]
  return out


def as_float32(ours: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Both as float32; integer timesteps (< 2**24) are exact in float32."""
  if ref.dtype != np.float32 or ours.dtype != np.float32:
    assert np.array_equal(ours, np.round(ours)), "timesteps that diffusers keeps integer must be integers"
  return np.asarray(ours, np.float32), np.asarray(ref, np.float32)


def ulps(a: np.ndarray, b: np.ndarray) -> int:
  """Max distance in units in the last place between float32 arrays of one sign (ours are all >= 0)."""
  return int(np.max(np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64)), initial=0))


def test_fixture_is_small_and_complete():
  assert os.path.getsize(os.path.join(os.path.dirname(__file__), "fixtures", "schedule_tables.npz")) < 300_000
  assert INDEX["meta"]["diffusers"] == "0.42.1" and INDEX["meta"]["torch"].startswith("2.13")
  classes = {c["class"] for c in INDEX["cases"]}
  # (dpmpp_2m_sde has dpmpp_2m's tables.)
  assert {INDEX["samplers"][c] for c in classes} == {"ddim", "ddpm", "pndm", "euler", "euler_a", "heun", "lms",
                                                     "dpmpp_2m", "unipc"}
  assert samplers.get("dpmpp_2m_sde").tables is samplers.get("dpmpp_2m").tables
  assert {c["spacing"] for c in INDEX["cases"]} == set(INDEX["spacings"])
  assert {c["karras"] for c in INDEX["cases"] if c["class"] == "EulerDiscreteScheduler"} == {False, True}
  assert {BETAS[b]["config"]["beta_schedule"] for b in BETAS} == set(schedules.BETA_SCHEDULES)


@pytest.mark.parametrize("beta", sorted(BETAS))
def test_betas_and_alphas_cumprod_are_bit_identical(beta):
  for set_alpha_to_one in (False, True):
    s = make_schedule(beta, set_alpha_to_one=set_alpha_to_one)
    ref = reference(BETAS[beta], "ieee")
    np.testing.assert_array_equal(np.asarray(s.betas), ref["betas"])
    np.testing.assert_array_equal(np.asarray(s.alphas_cumprod), ref["alphas_cumprod"])
    np.testing.assert_array_equal(s.host_abar(), ref["alphas_cumprod"])
    # DDIM's / PNDM's abar before t = 0 (ddim._alphas, pndm.pndm_step).
    final = np.float32(1.0) if s.set_alpha_to_one else np.asarray(s.alphas_cumprod)[0]
    np.testing.assert_array_equal([final], ref[f"final_alpha_cumprod/{set_alpha_to_one}"])
    host = reference(BETAS[beta], "host")
    if not BETAS[beta]["config"].get("rescale_betas_zero_snr", False):  # no sqrt involved: torch's own values
      for k in host:
        np.testing.assert_array_equal(ref[k], host[k])


@pytest.mark.parametrize("cls", sorted({c["class"] for c in INDEX["cases"]}))
def test_sampler_tables_are_bit_identical(cls):
  """timesteps and sigmas of every (spacing, Karras, beta schedule, step count) as diffusers' set_timesteps."""
  cases = [c for c in INDEX["cases"] if c["class"] == cls]
  bad = []
  for case in cases:
    ours = sdjax_tables(case)
    for name, ref in reference(case, "ieee").items():
      o, r = as_float32(ours[name], ref)
      if o.shape != r.shape or not np.array_equal(o, r):
        bad.append(f"{case['beta']}/{case['spacing']}/karras={case['karras']}/{case['steps']} {name}: "
                   f"ours {o[:6]} diffusers {r[:6]}")
  assert not bad, f"{len(bad)} of {len(cases)} cases differ:\n" + "\n".join(bad[:20])


def test_torch_sqrt_differences_are_all_that_separates_sdjax_from_this_hosts_diffusers():
  """vs "host": identical wherever no float32 sqrt is involved; elsewhere within torch's MKL-sqrt spread
  (bounds measured on the fixture's host: sqrt off by 1 ulp in ~15% of entries there)."""
  if INDEX["meta"]["torch_sqrt_is_ieee"]:
    assert all(not c["ieee"] for c in INDEX["cases"] + INDEX["betas"])
    return
  worst = {}
  for case in INDEX["cases"]:
    ours = sdjax_tables(case)
    zsnr = BETAS[case["beta"]]["config"].get("rescale_betas_zero_snr", False)
    for name, ref in reference(case, "host").items():
      o, r = as_float32(ours[name], ref)
      if name not in case["ieee"]:
        np.testing.assert_array_equal(o, r)
        continue
      kind = ("zsnr " if zsnr else "") + ("karras " if case["karras"] else "") + name
      diff = np.abs(o.astype(np.float64) - r)
      w = worst.setdefault(kind, [0.0, 0, 0.0])
      w[0] = max(w[0], float(np.max(diff / np.maximum(np.abs(r), 1e-30))))
      w[1], w[2] = max(w[1], ulps(o, r)), max(w[2], float(diff.max()))
  print({k: f"rel {v[0]:.2e}, {v[1]} ulp, abs {v[2]:.2e}" for k, v in sorted(worst.items())})
  # Without zero-SNR rescaling one sqrt separates the tables: sigmas within 2 ulp, Karras timesteps (fractional,
  # through log sigma) within 8 ulp.
  assert worst["sigmas"][1] <= 1 and worst["karras sigmas"][1] <= 2
  assert worst["karras timesteps"][0] < 1e-6
  # Zero-SNR rescaling subtracts nearly equal square roots (and 1 - abar for betas): torch's 1-ulp sqrt
  # differences grow there, in diffusers itself.
  assert all(v[0] < 2e-3 for k, v in worst.items() if k.startswith("zsnr") and "timesteps" not in k)
  assert all(v[2] <= 1 for k, v in worst.items() if k.startswith("zsnr") and "timesteps" in k)


def test_old_float32_tables_differed_from_diffusers():
  """Regression (issue 16): np.cumprod(..., dtype=float32) and numpy's float32 linspace are not torch's."""
  for beta in ("linear", "scaled_linear", "cosine"):
    ref = reference(BETAS[beta], "host")
    alphas = np.float32(1) - ref["betas"]
    old = np.cumprod(alphas, dtype=np.float32)
    differ = old != ref["alphas_cumprod"]
    assert differ.mean() > 0.5, beta  # most entries
    assert np.max(np.abs(old.astype(np.float64) / ref["alphas_cumprod"] - 1)) > 5e-7  # (up to 1.2e-6: cosine)
    np.testing.assert_array_equal(schedules.cumprod_f32(alphas), ref["alphas_cumprod"])
  ref = reference(BETAS["linear"], "host")
  old_betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float32)
  assert np.sum(old_betas != ref["betas"]) > 100
  np.testing.assert_array_equal(schedules.torch_linspace_f32(1e-4, 0.02, 1000), ref["betas"])


def _exact_f32(x: Fraction) -> np.float32:
  """The float32 nearest to the rational x (ties to even), for normal-range x."""
  lo = np.float32(float(x))  # within an ulp or two; walk to the exact answer
  while Fraction(float(lo)) > x:
    lo = np.nextafter(lo, np.float32(-np.inf))
  while Fraction(float(np.nextafter(lo, np.float32(np.inf)))) <= x:
    lo = np.nextafter(lo, np.float32(np.inf))
  hi = np.nextafter(lo, np.float32(np.inf))
  d_lo, d_hi = x - Fraction(float(lo)), Fraction(float(hi)) - x
  if d_lo != d_hi:
    return lo if d_lo < d_hi else hi
  return lo if int(lo.view(np.int32)) % 2 == 0 else hi


def test_round_sum_f32_rounds_once():
  """torch_linspace_f32's fused multiply-add: exact sum rounded once, including float64 sums that land
  exactly halfway between two float32 values (where rounding the float64 sum again would be wrong)."""
  rng = np.random.default_rng(0)
  a = rng.uniform(-1, 1, 300).astype(np.float32).astype(np.float64)
  b = (rng.uniform(-1, 1, 300).astype(np.float32).astype(np.float64) * rng.integers(1, 4000, 300))
  # Constructed near-ties: a float32 midpoint m plus a tiny b that float64 addition loses.
  f = rng.uniform(0.5, 1, 40).astype(np.float32)
  mid = (f.astype(np.float64) + np.nextafter(f, np.float32(2)).astype(np.float64)) / 2
  tiny = np.ldexp(np.float64(1), -80) * rng.choice([-1, 1], 40)
  a, b = np.concatenate([a, mid, mid]), np.concatenate([b, tiny, np.zeros(40)])
  got = schedules._round_sum_f32(a, b)
  want = np.array([_exact_f32(Fraction(float(x)) + Fraction(float(y))) for x, y in zip(a, b)], np.float32)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("start,end,steps", [(1e-4, 0.02, 1000), (0.00085**0.5, 0.012**0.5, 1000), (0.3, -2.0, 7),
                                              (0.0, 1.0, 2), (5.0, 5.0, 1)])
def test_torch_linspace_f32_endpoints_and_halves(start, end, steps):
  x = schedules.torch_linspace_f32(start, end, steps)
  assert x.dtype == np.float32 and x.shape == (steps,)
  assert x[0] == np.float32(start) and (steps == 1 or x[-1] == np.float32(end))
  np.testing.assert_allclose(x, np.linspace(start, end, steps), rtol=1e-6, atol=1e-7)
