import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sdjax import schedules
from sdjax.train import losses, optim, state as state_lib
from sdjax.train.losses import LossConfig
from sdjax.train.step import StepConfig, ema_decay, make_train_step
from sdjax.train.tasks.diffusion import DiffusionTask
from sdjax.train.tasks.pixel import drop_labels

SCHEDULE = schedules.make_schedule("linear", 1000)


def toy_apply(params, x, t, labels, rng):
  return params["w"] * x + params["b"][labels][:, None, None, None] + params["c"] * (t / 1000)[:, None, None, None]


def toy_state(seed=0, lr=1e-2, opt=None):
  params = {"w": jnp.array(0.5), "b": jnp.zeros((3,)), "c": jnp.array(0.1)}
  opt = opt or optax.sgd(lr)
  return state_lib.create(params, opt, seed), opt


def batch(n=8, seed=5):
  x = jax.random.uniform(jax.random.key(seed), (n, 4, 4, 1), minval=-1, maxval=1)
  return {"image": x, "label": jnp.arange(n) % 2}


class ToyTask(DiffusionTask):
  """The diffusion task's prepare and loss (the pixel task's label dropout) around `apply`; null class 2."""

  def __init__(self, apply, schedule, loss=LossConfig(), cond_drop_prob=0.1):
    self.toy, self.schedule, self.loss, self.drop_prob = apply, schedule, loss, cond_drop_prob

  def encode(self, batch, rng, frozen):
    return batch["image"], batch["label"], rng

  def drop(self, labels, drop):
    return drop_labels(labels, drop, 2, self.drop_prob)

  def apply(self, params, frozen, x, t, labels, rng):
    return self.toy(params, x, t, labels, rng)


def cfg(cond_drop_prob=0.1, **loss):
  return {"loss": LossConfig(**loss), "cond_drop_prob": cond_drop_prob}


def make_step(apply, schedule, opt, c=None, step=StepConfig()):
  task = ToyTask(apply, schedule, **(c or cfg()))
  return make_train_step(task.loss_fn, opt, step, prepare=task.prepare)


def test_ema_follows_its_formula_with_warmup():
  c = StepConfig(ema_decay=0.9)
  state, opt = toy_state()
  step = jax.jit(make_step(toy_apply, SCHEDULE, opt, step=c))
  ema = state.params
  for i in range(4):
    new, metrics = step(state, batch())
    d = min(0.9, (1 + i) / (10 + i))
    ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, new.params)
    state = new
    assert int(metrics["skipped"]) == 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), state.ema_params, ema)
  assert int(state.step) == 4
  np.testing.assert_allclose(ema_decay(jnp.int32(10**6), c), 0.9)
  np.testing.assert_allclose(ema_decay(jnp.int32(0), StepConfig(ema_decay=0.9, ema_warmup=False)), 0.9)


def _reference_loss(params, b, rng, c: dict, schedule=SCHEDULE):
  """The loss written out with numpy from the step's own random draws."""
  k_draw, _ = jax.random.split(rng)
  d = losses.draw(k_draw, b["image"].shape, schedule, c["loss"], c["cond_drop_prob"])
  t, noise = np.asarray(d.t), np.asarray(d.noise, np.float64)
  abar = np.asarray(schedule.alphas_cumprod, np.float64)[t][:, None, None, None]
  x0 = np.asarray(b["image"], np.float64)
  x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
  labels = np.where(np.asarray(d.drop), 2, np.asarray(b["label"])) if c["cond_drop_prob"] > 0 else b["label"]
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  pred = p["w"] * x_t + p["b"][labels][:, None, None, None] + p["c"] * (t / 1000)[:, None, None, None]
  target = {"epsilon": noise, "v_prediction": np.sqrt(abar) * noise - np.sqrt(1 - abar) * x0,
            "sample": x0}[schedule.prediction_type]
  per = ((pred - target) ** 2).mean(axis=(1, 2, 3))
  snr = abar[:, 0, 0, 0] / (1 - abar[:, 0, 0, 0])
  if c["loss"].weighting == "min_snr":
    g = c["loss"].snr_gamma
    w = {"epsilon": np.minimum(snr, g) / snr, "v_prediction": np.minimum(snr, g) / (snr + 1),
         "sample": np.minimum(snr, g)}[schedule.prediction_type]
  else:
    w = np.ones_like(snr)
  return float((w * per).mean()), d


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_loss_matches_a_float64_reference(prediction_type, weighting):
  schedule = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012, prediction_type=prediction_type)
  c = cfg(weighting=weighting, snr_gamma=5.0, cond_drop_prob=0.3)
  state, opt = toy_state()
  _, metrics = jax.jit(make_step(toy_apply, schedule, opt, c))(state, batch(32))
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0)
  ref, d = _reference_loss(state.params, batch(32), rng, c, schedule)
  np.testing.assert_allclose(float(metrics["loss"]), ref, rtol=1e-5)
  if weighting == "min_snr":  # the weighting is active: some timesteps have SNR above gamma
    assert np.any(np.asarray(schedules.snr(schedule, d.t)) > 5.0)


def test_min_snr_weight_at_zero_terminal_snr_is_finite():
  schedule = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012, rescale_betas_zero_snr=True)
  snr = schedules.snr(schedule, jnp.array([0, 500, 999]))
  assert float(snr[-1]) == 0.0
  w = losses.min_snr_weight(snr, 5.0, "epsilon")
  np.testing.assert_allclose(w, [5.0 / float(snr[0]), 1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(losses.min_snr_weight(snr, 5.0, "v_prediction")[-1], 0.0)
  state, opt = toy_state()
  c = cfg(weighting="min_snr")
  _, metrics = jax.jit(make_step(toy_apply, schedule, opt, c))(state, batch(64))
  assert np.isfinite(float(metrics["loss"])) and int(metrics["skipped"]) == 0


def test_offset_noise_shifts_each_channel_mean():
  d0 = losses.draw(jax.random.key(1), (256, 8, 8, 3), SCHEDULE, LossConfig())
  d1 = losses.draw(jax.random.key(1), (256, 8, 8, 3), SCHEDULE, LossConfig(offset_noise=0.5))
  offset = np.asarray(d1.noise - d0.noise)  # the same base draw plus 0.5 * N(0, 1) per (example, channel)
  np.testing.assert_allclose(offset, np.broadcast_to(offset[:, :1, :1, :], offset.shape), atol=1e-6)
  assert 0.4 < offset[:, 0, 0, :].std() < 0.6


def test_step_is_the_gradient_of_the_diffusion_loss():
  c = cfg(cond_drop_prob=0.0)
  state, opt = toy_state(lr=0.1)
  new, metrics = jax.jit(make_step(toy_apply, SCHEDULE, opt, c))(state, batch())
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0)
  k_draw, k_model = jax.random.split(rng)
  b = batch()
  d = losses.draw(k_draw, b["image"].shape, SCHEDULE, c["loss"], c["cond_drop_prob"])
  loss, grads = jax.value_and_grad(
      lambda p: losses.diffusion_loss(toy_apply, p, SCHEDULE, b["image"], b["label"], d, k_model, c["loss"]))(state.params)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
  jax.tree.map(lambda p, g, n: np.testing.assert_allclose(n, p - 0.1 * g, rtol=1e-6), state.params, grads,
               new.params)


@pytest.mark.parametrize("k", [2, 4])
def test_gradient_accumulation_equals_the_large_batch_step(k):
  opt = optax.adamw(1e-2)
  state, _ = toy_state(opt=opt)
  one = jax.jit(make_step(toy_apply, SCHEDULE, opt, cfg()))
  acc = jax.jit(make_step(toy_apply, SCHEDULE, opt, cfg(), step=StepConfig(grad_accum_steps=k)))
  s1, s2 = state, state
  for i in range(3):
    s1, m1 = one(s1, batch(16, seed=i))
    s2, m2 = acc(s2, batch(16, seed=i))
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), s2.params, s1.params)
  with pytest.raises(ValueError, match="micro-batches"):
    acc(state, batch(2 * k + 1))


def test_non_finite_loss_skips_the_update():
  state, opt = toy_state()
  bad = batch()
  bad["image"] = bad["image"].at[0, 0, 0, 0].set(jnp.nan)
  new, metrics = jax.jit(make_step(toy_apply, SCHEDULE, opt, cfg()))(state, bad)
  assert int(metrics["skipped"]) == 1 and not np.isfinite(float(metrics["loss"]))
  jax.tree.map(np.testing.assert_array_equal, new.params, state.params)
  jax.tree.map(np.testing.assert_array_equal, new.ema_params, state.ema_params)
  assert int(new.step) == 1


def test_label_dropout_uses_the_null_class():
  seen = []

  def spy(params, x, t, labels, rng):
    jax.debug.callback(lambda y: seen.append(np.asarray(y)), labels)
    return toy_apply(params, x, t, labels, rng)

  state, _ = toy_state()
  b = batch(64)
  task = ToyTask(spy, SCHEDULE, cond_drop_prob=0.5)
  prepared, rng = task.prepare(b, jax.random.key(0), None)
  d = prepared["draws"]
  task.loss_fn(state.params, prepared, rng, None, state)
  jax.effects_barrier()
  labels = seen[0]
  assert set(np.unique(labels)) == {0, 1, 2}
  assert 10 < np.sum(labels == 2) < 54
  np.testing.assert_array_equal(labels == 2, np.asarray(d.drop))


def test_bf16_compute_keeps_float32_params_grads_and_loss():
  def bf16_apply(params, x, t, labels, rng):
    return toy_apply(jax.tree.map(lambda p: p.astype(jnp.bfloat16), params), x.astype(jnp.bfloat16),
                     t, labels, rng)

  state, opt = toy_state()
  new, metrics = jax.jit(make_step(bf16_apply, SCHEDULE, opt, cfg()))(state, batch())
  assert metrics["loss"].dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new.params))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new.ema_params))


OPTIM = {"lr": 1.0, "schedule": "cosine", "warmup_steps": 10, "final_lr_fraction": 0.1, "b1": 0.9, "b2": 0.99,
         "eps": 1e-8, "weight_decay": 0.0, "grad_clip": 1.0}


def test_warmup_then_cosine_learning_rate():
  _, lr = optim.make_optimizer({**OPTIM, "name": "adamw"}, 110)
  np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(60), lr(110)], [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
  _, lr = optim.make_optimizer({**OPTIM, "name": "adamw", "schedule": "constant"}, 110)
  np.testing.assert_allclose([lr(5), lr(10), lr(100)], [0.5, 1.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion"])
def test_optimizers_match_optax_and_reduce_the_loss(name):
  cfg_ = {**OPTIM, "name": name, "lr": 0.05, "warmup_steps": 0, "schedule": "constant", "grad_clip": 0.0}
  tx, lr = optim.make_optimizer(cfg_, 100)
  params = {"w": jnp.full((4, 256), 2.0), "b": jnp.ones((256,))}
  loss = lambda p: jnp.mean(jnp.square(p["w"])) + jnp.mean(jnp.square(p["b"]))
  ref = {"adamw": optax.adamw(lr, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0),
         "lion": optax.lion(lr, b1=0.9, b2=0.99, weight_decay=0.0),
         "adafactor": optax.adafactor(lr, multiply_by_parameter_scale=False, clipping_threshold=None)}[name]
  ps, pr = params, params
  ss, sr = tx.init(ps), ref.init(pr)
  for _ in range(20):
    u, ss = tx.update(jax.grad(loss)(ps), ss, ps)
    ps = optax.apply_updates(ps, u)
    u, sr = ref.update(jax.grad(loss)(pr), sr, pr)
    pr = optax.apply_updates(pr, u)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ps, pr)
  assert float(loss(ps)) < 0.5 * float(loss(params))


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="config.optim.name.*sgd"):
    optim.make_optimizer({**OPTIM, "name": "sgd"}, 10)
  with pytest.raises(ValueError, match="weighting.*snr"):
    LossConfig(weighting="snr")
  with pytest.raises(ValueError, match="grad_accum_steps"):
    StepConfig(grad_accum_steps=0)
