"""MFU: the FLOP counter (closed form, kernels XLA cannot see, recomputation), the peak table, the metrics.

The metrics a real run logs are checked in tests/test_e2e.py (metrics.jsonl against summary.json)."""
import types

import jax
import jax.numpy as jnp
import pytest

from sdjax.models import flops as model_flops
from sdjax.models.attention import dot_product_attention
from sdjax.train import mfu


def test_lowered_flops_of_a_matmul_is_the_closed_form():
  b, k, n = 16, 32, 24
  x, w = jnp.ones((b, k)), jnp.ones((k, n))
  assert mfu.lowered_flops(lambda x, w: x @ w, x, w) == 2 * b * k * n
  # forward 2bkn, backward for both operands 2 x 2bkn (d/dx and d/dw of a sum are the same matmuls)
  grads = jax.grad(lambda x, w: jnp.sum(x @ w), argnums=(0, 1))
  assert mfu.lowered_flops(grads, x, w) >= 4 * b * k * n
  assert mfu.lowered_flops(grads, jax.ShapeDtypeStruct(x.shape, x.dtype), w) == mfu.lowered_flops(grads, x, w)


def test_a_backend_that_counts_nothing_before_compiling_is_counted_on_the_cpu_lowering(monkeypatch):
  # jax 0.11's GPU client returns no FLOPs from a lowering (seen on an H200: MFU 0); the fallback lowers the
  # same program for the CPU on unsharded shapes, also from inside a mesh with sharded inputs.
  from jax.sharding import NamedSharding, PartitionSpec as P

  from sdjax import parallel
  original, calls = jax.stages.Lowered.cost_analysis, []

  def nothing_the_first_time(self):
    calls.append(self)
    return {} if len(calls) == 1 else original(self)

  monkeypatch.setattr(jax.stages.Lowered, "cost_analysis", nothing_the_first_time)
  b, k, n = 16, 32, 24
  mesh = parallel.make_mesh({"data": jax.device_count()})
  x = jax.ShapeDtypeStruct((b, k), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh):
    assert mfu.lowered_flops(lambda x, w: x @ w, x, jnp.ones((k, n))) == 2 * b * k * n
  assert len(calls) == 2


def test_chunked_attention_and_remat_count_as_the_model_flops():
  q = jnp.ones((1, 256, 2, 8))

  def loss(q, implementation):
    return jnp.sum(dot_product_attention(q, q, q, implementation=implementation, query_chunk=64, key_chunk=64))

  chunked = lambda q: jax.grad(loss)(q, "chunked")
  xla = mfu.lowered_flops(lambda q: jax.grad(loss)(q, "xla"), q)
  assert mfu.lowered_flops(chunked, q) == xla
  assert mfu.lowered_flops(jax.checkpoint(chunked), q) == xla
  # Outside the model-FLOPs mode, XLA counts the chunked scan's body once: far fewer FLOPs than the model does.
  # (The same function: the counting trace must not be reused by a later jit of it.)
  plain = jax.jit(chunked).lower(q).cost_analysis()
  assert plain["flops"] < 0.5 * xla


def _device(platform, kind):
  return types.SimpleNamespace(platform=platform, device_kind=kind)


@pytest.mark.parametrize("kind, peak", [("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5", 459.0),
                                        ("TPU v5p", 459.0), ("TPU v6 lite", 918.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.0), ("NVIDIA B200", 2250.0), ("Some GPU", None)])
def test_peak_table(kind, peak):
  assert mfu.peak_tflops(_device("tpu" if "TPU" in kind else "gpu", kind)) == peak


def test_cpu_has_no_peak_and_no_mfu():
  assert mfu.peak_tflops(_device("cpu", "cpu")) is None
  t = mfu.Throughput(flops_per_step=4e12, num_devices=2, peak_tflops=None)
  assert t.metrics(0.5) == {"tflops_per_device": 1.0}
  assert mfu.Throughput(4e12, 2, 4.0).metrics(0.5) == {"tflops_per_device": 1.0, "mfu": 0.25}


def test_trainer_counts_the_same_flops_whatever_the_attention_remat_and_accumulation():
  """The tiny pixel-diffusion step: chunked attention + full remat + 2 micro-batches counts as xla / none / 1."""
  import sys
  sys.path.insert(0, ".")
  from configs import default
  from sdjax.train import trainer as trainer_lib

  def flops(**model):
    config = default.get_config("tiny")
    config.model.update(model)
    config.train.grad_accum_steps = 2 if model else 1
    t = trainer_lib.Trainer.from_config(config)
    n = config.train.batch_size
    batch = {"image": jnp.zeros((n, 28, 28, 1)), "label": jnp.zeros((n,), jnp.int32)}
    return t.flops_per_step(batch)

  base = flops()
  assert base > 0
  assert flops(attention_implementation="chunked", remat="full") == base


def test_train_step_runs_pallas_attention_per_shard_under_the_mesh():
  """The trainer traces its step under its mesh, so the Pallas kernels are partitioned with shard_map (lowered
  only, in TPU interpret mode: no TPU here)."""
  import sys
  sys.path.insert(0, ".")
  from jax.experimental.pallas import tpu as pltpu
  from configs import default
  from sdjax.train import trainer as trainer_lib

  config = default.get_config("tiny")
  config.model.attention_implementation = "pallas_tpu"
  t = trainer_lib.Trainer.from_config(config)
  n = config.train.batch_size
  batch = {"image": jax.ShapeDtypeStruct((n, 28, 28, 1), jnp.float32, sharding=t.batch_sharding),
           "label": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=t.batch_sharding)}
  with pltpu.force_tpu_interpret_mode():
    text = t.lower_step(t.train_step(), t.abstract_state, batch).as_text()
  assert "manual_computation" in text or "shard_map" in text


@pytest.mark.parametrize("value, message", [(float("nan"), "finite"), (float("inf"), "finite"), (-1.0, ">= 0")])
def test_a_careless_peak_is_refused_naming_the_key(value, message):
  import sys
  sys.path.insert(0, ".")
  from configs import default
  from sdjax.train import trainer as trainer_lib

  config = default.get_config("tiny")
  config.train.peak_tflops = value
  with pytest.raises(ValueError, match=f"config.train.peak_tflops must be .*{message}"):
    trainer_lib.TrainConfig.from_config(config)
