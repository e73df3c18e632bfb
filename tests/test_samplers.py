import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import samplers, schedules
from sdjax.guidance import classifier_free_guidance


def gaussian_model(schedule, mu, s):
  """Exact model output for data ~ N(mu, s^2): the posterior mean of epsilon (or v, or x0) given x_t."""

  def model_fn(x, t):
    abar = schedule.alphas_cumprod[t.astype(jnp.int32)].reshape((-1,) + (1,) * (x.ndim - 1))
    a, b = jnp.sqrt(abar), jnp.sqrt(1 - abar)
    var = abar * s**2 + (1 - abar)
    x0 = mu + a * s**2 * (x - a * mu) / var          # E[x0 | x_t]
    eps = b * (x - a * mu) / var                      # E[eps | x_t]
    if schedule.prediction_type == "epsilon":
      return eps
    if schedule.prediction_type == "v_prediction":
      return a * eps - b * x0
    return x0

  return model_fn


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_recovers_a_point_mass_exactly(prediction_type):
  # Data is the single point c: the exact denoiser predicts x0 = c at every step, so DDIM (eta=0)
  # lands on c up to float32 rounding.
  s = schedules.make_schedule("linear", 1000, prediction_type=prediction_type)
  model = gaussian_model(s, 0.3, 0.0)
  noise = jax.random.normal(jax.random.key(0), (16, 3))
  out = jax.jit(lambda n: samplers.sample(model, n, schedule=s, sampler="ddim", num_steps=10))(noise)
  np.testing.assert_allclose(out, 0.3, atol=2e-4)


@pytest.mark.parametrize("sampler,steps", [("ddim", 1000), ("ddpm", 250)])
def test_samples_have_the_data_distribution(sampler, steps):
  s = schedules.make_schedule("linear", 1000)
  mu, sd = 0.5, 0.4
  noise = jax.random.normal(jax.random.key(1), (20000, 1))
  out = samplers.sample(gaussian_model(s, mu, sd), noise, schedule=s, sampler=sampler, num_steps=steps,
                        rng=jax.random.key(2))
  # Standard errors: mean 0.4/sqrt(2e4) = 0.003, std ~0.002; allow discretisation error on top.
  assert abs(float(out.mean()) - mu) < 0.015
  assert abs(float(out.std()) - sd) < 0.015


def test_ddim_matches_a_float64_recursion_on_gaussian_data():
  # With the exact Gaussian denoiser every DDIM step is affine in x; iterate eq. 12 in float64.
  s = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012, steps_offset=1)
  mu, sd, n = -0.2, 0.7, 10
  abar = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2)
  x = np.linspace(-2.0, 2.0, 9)
  for t in schedules.discrete_timesteps(s, n):
    a_t, a_prev = abar[t], (abar[t - 100] if t >= 100 else 1.0)
    eps = np.sqrt(1 - a_t) * (x - np.sqrt(a_t) * mu) / (a_t * sd**2 + 1 - a_t)
    x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
  out = samplers.sample(gaussian_model(s, mu, sd), jnp.linspace(-2.0, 2.0, 9)[:, None], schedule=s,
                        sampler="ddim", num_steps=n)
  np.testing.assert_allclose(out[:, 0], x, rtol=1e-4, atol=1e-5)


def test_model_is_traced_once_under_jit():
  s = schedules.make_schedule("linear", 1000)
  traces = []

  def model_fn(x, t):
    traces.append(t.shape)
    assert t.dtype == jnp.float32 and t.shape == (x.shape[0],)
    return jnp.zeros_like(x)

  f = jax.jit(lambda n, r: samplers.sample(model_fn, n, schedule=s, sampler="ddpm", num_steps=25, rng=r))
  f(jnp.ones((2, 3)), jax.random.key(0)).block_until_ready()
  assert len(traces) == 1


def test_timesteps_handed_to_the_model_are_diffusers_leading_spacing():
  s = schedules.make_schedule("linear", 1000, steps_offset=1)
  seen = []

  def model_fn(x, t):
    jax.debug.callback(lambda t: seen.append(float(t[0])), t)
    return jnp.zeros_like(x)

  samplers.sample(model_fn, jnp.ones((1, 1)), schedule=s, sampler="ddim", num_steps=10)
  jax.effects_barrier()
  assert seen == [901.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0]


def test_unknown_sampler_and_option_are_errors():
  s = schedules.make_schedule()
  with pytest.raises(ValueError, match="unknown sampler 'eular'"):
    samplers.sample(lambda x, t: x, jnp.ones((1, 1)), schedule=s, sampler="eular", num_steps=2)
  with pytest.raises(ValueError, match="does not take option"):
    samplers.sample(lambda x, t: x, jnp.ones((1, 1)), schedule=s, sampler="ddpm", num_steps=2, eta=1.0)


def test_classifier_free_guidance_is_one_batched_call_with_the_cfg_formula():
  calls = []

  def model(x, t, c):
    calls.append(x.shape)
    return x * c[:, None]

  x, t = jnp.ones((3, 2)), jnp.zeros((3,))
  cond, uncond = jnp.array([2.0, 3.0, 4.0]), jnp.zeros(3)
  out = classifier_free_guidance(model, cond, uncond, scale=5.0)(x, t)
  assert calls == [(6, 2)]
  np.testing.assert_allclose(out, 5.0 * x * cond[:, None])
  # Rescale by 1 matches the guided output's std to the conditional's.
  out = classifier_free_guidance(lambda x, t, c: x * c[:, None] + jnp.arange(2.0), cond, uncond, 5.0, 1.0)(x, t)
  cond_out = x * cond[:, None] + jnp.arange(2.0)
  np.testing.assert_allclose(out.std(axis=1), cond_out.std(axis=1), rtol=1e-5)


# Deterministic samplers, each on a spacing where its step count does not move the start or end of the
# trajectory (so the 500-step run is the limit the coarser runs converge to), and the observed order.
CONVERGENCE = [
    ("ddim", {"timestep_spacing": "trailing"}, 1.6),
    ("pndm", {"timestep_spacing": "trailing"}, 1.5),
    ("euler", {"timestep_spacing": "linspace", "use_karras_sigmas": True}, 1.6),
    ("heun", {"timestep_spacing": "linspace", "use_karras_sigmas": True}, 3.5),
    ("lms", {"timestep_spacing": "linspace", "use_karras_sigmas": True}, 3.0),
    ("dpmpp_2m", {"use_karras_sigmas": True}, 3.5),
    ("unipc", {"use_karras_sigmas": True}, 3.5),
]


@pytest.mark.parametrize("name,spacing,min_ratio", CONVERGENCE, ids=[c[0] for c in CONVERGENCE])
def test_error_falls_with_the_samplers_order(name, spacing, min_ratio):
  """First-order samplers' error about halves when steps double; second-order ones' about quarters."""
  from sdjax.samplers.analytic import mixture_model
  s = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012, **spacing)
  model = mixture_model(s)
  noise = jax.random.normal(jax.random.key(0), (256,))
  run = lambda n: np.asarray(samplers.sample(model, noise, schedule=s, sampler=name, num_steps=n), np.float64)
  ref = run(500)
  errors = [np.sqrt(np.mean((run(n) - ref) ** 2)) for n in (10, 20, 40)]
  ratios = [errors[0] / errors[1], errors[1] / errors[2]]
  assert min(ratios) >= min_ratio, f"errors {errors}, ratios {ratios}"
  if min_ratio < 3:
    assert max(ratios) < 3.0, f"a first-order sampler converging faster than expected: {ratios}"


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_every_sampler_traces_the_model_a_fixed_number_of_times(name):
  # (UniPC with B(h) = h or noise prediction needs a nonzero last sigma: diffusers' last step is NaN at 0.)
  needs_sigma_min = name.startswith("unipc") and ("_bh1" in name or "_eps" in name)
  s = schedules.make_schedule("linear", 1000, final_sigmas_type="sigma_min" if needs_sigma_min else "zero",
                              edm=name.startswith("edm_"))  # (the EDM samplers need an EDM schedule)
  counts = []
  for steps in (4, 12):
    traces = []

    def model_fn(x, t):
      traces.append(1)
      return jnp.zeros_like(x)

    # The schedule goes in as a traced argument: samplers must not need its values at trace time.
    jax.jit(lambda n, sched: samplers.sample(model_fn, n, schedule=sched, sampler=name, num_steps=steps,
                                             rng=jax.random.key(0))).lower(jnp.ones((2, 3)), s)
    counts.append(len(traces))
  assert counts[0] == counts[1] <= 2, counts  # heun traces two calls (predictor, corrector); others one


def test_img2img_and_inpainting_arguments_are_checked():
  s = schedules.make_schedule("linear", 1000)
  x = jnp.ones((2, 3))
  with pytest.raises(ValueError, match="need init_image"):
    samplers.sample(lambda x, t: x, x, schedule=s, sampler="ddim", num_steps=4, strength=0.5)
  with pytest.raises(ValueError, match="leaves no steps"):
    samplers.sample(lambda x, t: x, x, schedule=s, sampler="ddim", num_steps=4, strength=0.1, init_image=x)
  with pytest.raises(ValueError, match="does not support strength"):
    samplers.sample(lambda x, t: x, x, schedule=s, sampler="pndm", num_steps=4, strength=0.5, init_image=x)
  with pytest.raises(ValueError, match="same shape"):
    samplers.sample(lambda x, t: x, x, schedule=s, sampler="ddim", num_steps=4, init_image=jnp.ones((1, 3)),
                    inpaint_mask=x)


def test_every_registered_sampler_is_one_of_the_contract_names():
  assert set(samplers.SAMPLERS) == {"ddpm", "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpmpp_2m",
                                    "dpmpp_2m_sde", "unipc", "kdpm2", "kdpm2_a", "deis_1", "deis", "deis_3",
                                    "lcm", "tcd", "dpmpp_2s", "dpmpp_3s"} | {
                                    "pndm_prk", "unipc_1", "unipc_3", "unipc_bh1", "unipc_1_bh1", "unipc_3_bh1",
                                    "unipc_eps", "unipc_1_eps", "unipc_3_eps", "unipc_bh1_eps", "unipc_1_bh1_eps",
                                    "unipc_3_bh1_eps"} | {
                                    "dpmpp_1m", "dpmpp_1m_sde", "dpmpp_3m", "dpmpp_3m_sde"} | {
                                    "ipndm", "ipndm_v", "ipndm_karras", "ipndm_v_karras"} | {
                                    f"{s}_{steps}" for s in ("euler", "dpmpp_2m", "ipndm", "ipndm_v")
                                    for steps in ("ays", "ays_xl")} | {
                                    "edm_euler", "edm_dpmpp_1m", "edm_dpmpp_1m_sde", "edm_dpmpp_2m", "edm_dpmpp_2m_sde",
                                    "edm_dpmpp_3m"}


def test_zero_terminal_snr_is_refused_where_it_divides_by_zero():
  zsnr = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")
  s = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012, **zsnr)
  assert float(s.alphas_cumprod[-1]) == 0.0
  with pytest.raises(ValueError, match="zero terminal SNR"):
    samplers.sample(lambda x, t: x, jnp.ones((1, 1)), schedule=s, sampler="ddim", num_steps=4)
  with pytest.raises(ValueError, match="zero terminal SNR"):
    samplers.sample(lambda x, t: x, jnp.ones((1, 1)), schedule=s.replace(prediction_type="v_prediction"),
                    sampler="pndm", num_steps=4)
  out = samplers.sample(lambda x, t: jnp.zeros_like(x), jnp.ones((1, 1)),
                        schedule=s.replace(prediction_type="v_prediction"), sampler="ddim", num_steps=4)
  assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("name", ["dpmpp_2m", "euler_a", "heun"])
def test_sampling_a_batch_sharded_over_eight_devices_equals_one_device(name):
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from sdjax.samplers.analytic import mixture_model
  s = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012, steps_offset=1)
  model = mixture_model(s)
  noise = jax.random.normal(jax.random.key(3), (16, 4, 4, 1))
  fn = jax.jit(lambda z, r: samplers.sample(model, z, schedule=s, sampler=name, num_steps=8, rng=r))
  ref = fn(noise, jax.random.key(4))
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  sharded = jax.device_put(noise, NamedSharding(mesh, P("data")))
  out = fn(sharded, jax.random.key(4))
  assert len(out.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_a_schedule_option_a_sampler_does_not_implement_is_refused():
  """A Schedule carries options of some samplers only (thresholding, Karras sigmas, a corrector list, ...):
  any other sampler refuses them by name instead of silently sampling without them."""
  for option, (_, names) in samplers.SCHEDULE_OPTIONS.items():
    assert set(names) <= set(samplers.SAMPLERS), option
  noise = jnp.ones((1, 2))
  for kw, sampler in ((dict(thresholding=True), "ddim"), (dict(use_karras_sigmas=True), "pndm"),
                      (dict(use_karras_sigmas=True), "euler_ays"), (dict(clip_sample=True), "heun"),
                      (dict(final_sigmas_type="sigma_min"), "euler"), (dict(disable_corrector=(1,)), "dpmpp_2m")):
    option = next(iter(kw))
    with pytest.raises(ValueError, match=f"sampler '{sampler}' does not implement the schedule option {option}="):
      samplers.sample(lambda x, t: x, noise, schedule=schedules.make_schedule(**kw), sampler=sampler, num_steps=4)
  samplers.check_schedule(schedules.make_schedule(thresholding=True), "dpmpp_3m")
  samplers.check_schedule(schedules.make_schedule(use_karras_sigmas=True), "kdpm2")
