import jax
import jax.numpy as jnp
import numpy as np
import optax

from sdjax import schedules
from sdjax.train import optim, state as state_lib
from sdjax.train.step import StepConfig, diffusion_loss, ema_decay, make_train_step

SCHEDULE = schedules.make_schedule("linear", 1000)


def toy_apply(params, x, t, labels, rng):
  return params["w"] * x + params["b"][labels][:, None, None, None]


def toy_state(seed=0, lr=1e-2):
  params = {"w": jnp.array(0.5), "b": jnp.zeros((3,))}
  opt = optax.sgd(lr)
  return state_lib.create(params, opt, seed), opt


def batch(n=8):
  x = jax.random.uniform(jax.random.key(5), (n, 4, 4, 1), minval=-1, maxval=1)
  return {"image": x, "label": jnp.arange(n) % 2}


def test_ema_follows_its_formula_with_warmup():
  cfg = StepConfig(ema_decay=0.9, null_class=2)
  state, opt = toy_state()
  step = jax.jit(make_train_step(toy_apply, SCHEDULE, opt, cfg))
  ema = state.params
  for i in range(4):
    new, metrics = step(state, batch())
    d = min(0.9, (1 + i) / (10 + i))
    ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, new.params)
    state = new
    assert int(metrics["skipped"]) == 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), state.ema_params, ema)
  assert int(state.step) == 4
  np.testing.assert_allclose(ema_decay(jnp.int32(10**6), cfg), 0.9)


def test_step_is_the_gradient_of_the_diffusion_loss():
  cfg = StepConfig(cond_drop_prob=0.0, null_class=2)
  state, opt = toy_state(lr=0.1)
  new, metrics = jax.jit(make_train_step(toy_apply, SCHEDULE, opt, cfg))(state, batch())
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0)
  b = batch()
  loss, grads = jax.value_and_grad(
      lambda p: diffusion_loss(toy_apply, p, SCHEDULE, b["image"], b["label"], rng, cfg))(state.params)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
  jax.tree.map(lambda p, g, n: np.testing.assert_allclose(n, p - 0.1 * g, rtol=1e-6), state.params, grads,
               new.params)


def test_non_finite_loss_skips_the_update():
  cfg = StepConfig(null_class=2)
  state, opt = toy_state()
  bad = batch()
  bad["image"] = bad["image"].at[0, 0, 0, 0].set(jnp.nan)
  new, metrics = jax.jit(make_train_step(toy_apply, SCHEDULE, opt, cfg))(state, bad)
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
  rng = jax.random.key(0)
  b = batch(64)
  diffusion_loss(spy, state.params, SCHEDULE, b["image"], b["label"], rng, StepConfig(cond_drop_prob=0.5, null_class=2))
  jax.effects_barrier()
  labels = seen[0]
  assert set(np.unique(labels)) == {0, 1, 2}
  assert 10 < np.sum(labels == 2) < 54


def test_warmup_then_cosine_learning_rate():
  cfg = {"name": "adamw", "lr": 1.0, "schedule": "cosine", "warmup_steps": 10, "final_lr_fraction": 0.1,
         "b1": 0.9, "b2": 0.99, "eps": 1e-8, "weight_decay": 0.0, "grad_clip": 1.0}
  _, lr = optim.make_optimizer(cfg, 110)
  np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(60), lr(110)], [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
  _, lr = optim.make_optimizer({**cfg, "schedule": "constant"}, 110)
  np.testing.assert_allclose([lr(5), lr(10), lr(100)], [0.5, 1.0, 1.0], atol=1e-6)
