"""The data-parallel train step on 8 (fake CPU) devices equals the single-device step."""
import importlib.util
import os

import jax
import numpy as np

from conftest import ROOT
from sdjax import parallel
from sdjax.data import StepBatches, load_bundled
from sdjax.train.loop import Experiment, _to_batch
from sdjax.train.step import StepConfig, make_train_step


def tiny_config():
  spec = importlib.util.spec_from_file_location("default", os.path.join(ROOT, "configs", "default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("tiny")


def run(devices, steps=2):
  mesh = parallel.make_mesh({"data": -1}, devices)
  exp = Experiment(tiny_config(), mesh)
  state = exp.init_state()
  images, labels = load_bundled("train")
  data = StepBatches({"image": images, "label": labels}, 16, seed=0)
  fn = jax.jit(make_train_step(lambda p, x, t, y, rng: exp.model.apply({"params": p}, x, t, class_labels=y),
                               exp.schedule, exp.optimizer, StepConfig(null_class=10)),
               in_shardings=(exp.state_shardings, exp.batch_sharding),
               out_shardings=(exp.state_shardings, exp.replicated))
  losses = []
  for s in range(steps):
    batch = parallel.global_batch(_to_batch(data.batch(s)), exp.batch_sharding)
    state, metrics = fn(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses, batch


def test_eight_device_data_parallel_step_equals_single_device():
  assert jax.device_count() == 8
  s1, l1, _ = run(jax.devices()[:1])
  s8, l8, batch8 = run(jax.devices())
  assert len(batch8["image"].sharding.device_set) == 8
  assert batch8["image"].addressable_shards[0].data.shape[0] == 2  # 16 examples over 8 devices
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  flat1 = jax.tree.leaves(s1.params)
  flat8 = jax.tree.leaves(s8.params)
  for a, b in zip(flat1, flat8):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_mesh_shapes():
  assert parallel.mesh_shape({"data": -1, "fsdp": 2}, 8) == (4, 2, 1)
  assert parallel.mesh_shape({"data": 8}, 8) == (8, 1, 1)
  import pytest
  with pytest.raises(ValueError, match="needs 4 devices"):
    parallel.mesh_shape({"data": 4}, 8)
  with pytest.raises(ValueError, match="at most one"):
    parallel.mesh_shape({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="unknown mesh axis"):
    parallel.mesh_shape({"model": 2}, 8)
