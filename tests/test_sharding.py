"""Meshes and shardings on 8 fake CPU devices: data parallel and FSDP give the single-device numbers,
FSDP splits the state, and checkpoints move between meshes."""
import importlib.util
import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import ROOT
from sdjax import checkpoint, parallel
from sdjax.data import input_pipeline
from sdjax.train.trainer import Trainer


def tiny_config(**overrides):
  spec = importlib.util.spec_from_file_location("default", os.path.join(ROOT, "configs", "default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  with config.unlocked():
    config.mesh.fsdp_min_size = 0  # the tiny model's arrays are small: shard every one that divides
    for key, value in overrides.items():
      section, name = key.split(".")
      config[section][name] = value
  return config


def run(mesh_sizes, steps=5, devices=None, **overrides):
  mesh = parallel.make_mesh(mesh_sizes, devices)
  exp = Trainer.from_config(tiny_config(**overrides), mesh)
  state = exp.init_state()
  data = input_pipeline.pipeline_from_config(exp.config.data, channels=1, global_batch_size=16, seed=0, label=True)
  fn = exp.train_step(donate=False)
  losses = []
  for s in range(steps):
    batch = parallel.global_batch(data.batch(s), exp.batch_sharding)
    state, metrics = fn(state, batch)
    losses.append(float(metrics["loss"]))
  return exp, state, losses, batch


_RUNS = {}


def cached_run(name, mesh_sizes, devices=None):
  """5 steps of the tiny config on a mesh, computed once per test session."""
  if name not in _RUNS:
    _RUNS[name] = run(mesh_sizes, devices=devices)
  return _RUNS[name]


@pytest.fixture(scope="module")
def single_device():
  return cached_run("single", {"data": 1}, jax.devices()[:1])


def assert_same_state(a, b, rtol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("name,mesh", [("dp8", {"data": 8}), ("dp2_fsdp4", {"data": 2, "fsdp": 4})])
def test_sharded_training_equals_single_device(single_device, name, mesh):
  _, s1, l1, _ = single_device
  exp, s8, l8, batch8 = cached_run(name, mesh)
  assert len(batch8["image"].sharding.device_set) == 8
  assert batch8["image"].addressable_shards[0].data.shape[0] == 2  # 16 examples over 8 devices
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  assert_same_state(s1.params, s8.params)
  assert_same_state(s1.ema_params, s8.ema_params)
  assert_same_state(s1.opt_state, s8.opt_state)
  if mesh.get("fsdp", 1) > 1:  # the state really is split: params, Adam moments and EMA alike
    kernel = s8.params["conv_in"]["kernel"]  # [3, 3, 1, 8]: the last (largest) dimension is split
    assert kernel.sharding.spec == P(None, None, None, "fsdp")
    assert kernel.addressable_shards[0].data.shape == (3, 3, 1, 8 // mesh["fsdp"])
    mu = s8.opt_state[1][0].mu["conv_in"]["kernel"]
    assert mu.sharding.spec == kernel.sharding.spec
    assert s8.ema_params["conv_in"]["kernel"].sharding.spec == kernel.sharding.spec
    per_device = sum(s.data.nbytes for x in jax.tree.leaves(s8.params) for s in x.addressable_shards[:1])
    total = sum(x.nbytes for x in jax.tree.leaves(s8.params))
    assert per_device < 0.5 * total


def test_spec_for_fsdp_picks_the_largest_dimension_that_divides():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
  assert parallel.spec_for((3, 3, 320, 640), None, mesh, fsdp_min_size=0) == P(None, None, None, "fsdp")
  assert parallel.spec_for((3, 3, 640, 6), None, mesh, fsdp_min_size=0) == P(None, None, "fsdp")
  assert parallel.spec_for((5, 7), None, mesh, fsdp_min_size=0) == P()          # nothing divides
  assert parallel.spec_for((640,), None, mesh, fsdp_min_size=1024) == P()       # too small
  assert parallel.spec_for((), None, mesh, fsdp_min_size=0) == P()
  # Logical rules place named dimensions first; fsdp takes the largest of the rest.
  mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
  names = ("channels_in", "channels_out")
  assert parallel.spec_for((1024, 4096), names, mesh, [("channels_out", "tensor")], 0) == P("fsdp", "tensor")
  assert parallel.spec_for((1024, 4096), names, mesh, [], 0) == P(None, "fsdp")


def test_adafactor_state_shardings():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
  exp = Trainer.from_config(tiny_config(**{"optim.name": "adafactor", "model.block_out_channels": (128, 256)}), mesh)
  factored = exp.abstract_state.opt_state[1][0]
  kernel = exp.abstract_state.params["down_blocks_1"]["resnets_0"]["conv1"]["kernel"]  # [3, 3, 128, 256]
  assert kernel.sharding.spec == P(None, None, None, "fsdp")
  # Factored second moments have their own shapes: they match no parameter and are split on their own.
  v_row = factored.v_row["down_blocks_1"]["resnets_0"]["conv1"]["kernel"]
  v_col = factored.v_col["down_blocks_1"]["resnets_0"]["conv1"]["kernel"]
  assert (v_row.shape, v_col.shape) == ((3, 3, 128), (3, 3, 256))
  assert v_row.sharding.spec == P(None, None, "fsdp") and v_col.sharding.spec == P(None, None, "fsdp")


def test_checkpoint_restores_onto_another_mesh(tmp_path):
  _, s8, _, _ = cached_run("dp2_fsdp4", {"data": 2, "fsdp": 4})
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(2, s8, {"kind": "test", "next_step": 2})
  ckpt.wait()
  for sizes, devices in [({"data": 1}, jax.devices()[:1]), ({"fsdp": 4}, jax.devices()[:4]),
                         ({"data": 8}, None)]:
    mesh = parallel.make_mesh(sizes, devices)
    exp = Trainer.from_config(tiny_config(), mesh)
    restored = ckpt.restore(exp.abstract_state)
    for a, b, s in zip(jax.tree.leaves(s8), jax.tree.leaves(restored), jax.tree.leaves(exp.state_shardings)):
      assert b.sharding == s
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert ckpt.restore_data_state() == {"kind": "test", "next_step": 2}
  ckpt.close()


def test_mesh_shapes_and_rules():
  assert parallel.mesh_shape({"data": -1, "fsdp": 2}, 8) == (4, 2, 1)
  assert parallel.mesh_shape({"data": 8}, 8) == (8, 1, 1)
  with pytest.raises(ValueError, match="needs 4 devices"):
    parallel.mesh_shape({"data": 4}, 8)
  with pytest.raises(ValueError, match="at most one"):
    parallel.mesh_shape({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="unknown mesh axis"):
    parallel.mesh_shape({"model": 2}, 8)
  with pytest.raises(ValueError, match="config.mesh.rules"):
    parallel.rules_from_config({"rules": (("channels_out", "model"),)})
  with pytest.raises(ValueError, match="grad_accum_steps=3"):
    Trainer.from_config(tiny_config(**{"train.grad_accum_steps": 3}), parallel.make_mesh({"data": 8})).train_step()


def test_initialize_is_a_no_op_for_one_process_and_checks_its_arguments(monkeypatch):
  for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
              parallel.ENV_COORDINATOR, parallel.ENV_NUM_PROCESSES, parallel.ENV_PROCESS_ID):
    monkeypatch.delenv(var, raising=False)
  assert parallel.initialize() is False
  assert parallel.initialize("127.0.0.1:1234", 1, 0) is False
  with pytest.raises(ValueError, match="process_id missing"):
    parallel.initialize("127.0.0.1:1234", 2)
  with pytest.raises(ValueError, match="not in"):
    parallel.initialize("127.0.0.1:1234", 2, 2)
  monkeypatch.setenv("SLURM_JOB_ID", "1")
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert parallel._cluster_detected() == "SLURM"


def test_fsdp_warns_about_arrays_it_cannot_split(caplog):
  import jax.numpy as jnp
  mesh = parallel.make_mesh({"fsdp": 8})
  state = {"a": jax.ShapeDtypeStruct((40, 64), jnp.float32), "b": jax.ShapeDtypeStruct((5, 300), jnp.float32)}
  with caplog.at_level("WARNING", logger="sdjax"):
    shardings = parallel.state_shardings(state, {}, mesh, fsdp_min_size=1024)
  assert shardings["a"].spec == P(None, "fsdp") and shardings["b"].spec == P()
  assert "1 arrays" in caplog.text and "['b']" in caplog.text and "fsdp=8" in caplog.text
