import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from sdjax.models import UNet, UNetConfig, layers, remat as remat_lib
from sdjax.models.attention import dot_product_attention

SMALL = dict(in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=2,
             cross_attention_dim=None, num_class_embeds=11, norm_num_groups=4)


def init(cfg, x, t, **kw):
  return UNet(cfg).init(jax.random.key(0), x, t, **kw)["params"]


def test_timestep_embedding_matches_diffusers_formula():
  t = np.array([0.0, 1.0, 37.5, 999.0])
  dim, shift = 16, 1.0
  half = dim // 2
  freqs = np.exp(-math.log(10000.0) * np.arange(half) / (half - shift))
  args = t[:, None] * freqs[None]
  ref = np.concatenate([np.cos(args), np.sin(args)], axis=1)  # flip_sin_to_cos=True
  out = layers.timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=True, freq_shift=shift)
  np.testing.assert_allclose(out, ref, atol=1e-4)


def test_attention_matches_float64_softmax_reference():
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((2, n, 3, 8)).astype(np.float32) for n in (5, 7, 7))
  logits = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k) / np.sqrt(8)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  ref = np.einsum("bhqk,bkhd->bqhd", w, v)
  np.testing.assert_allclose(dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)), ref,
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="attention expects"):
    dot_product_attention(jnp.asarray(q), jnp.asarray(k[:, :, :2]), jnp.asarray(v))


def test_unet_shapes_names_and_logical_axes():
  cfg = UNetConfig(**SMALL)
  x, t, y = jnp.zeros((2, 28, 28, 1)), jnp.array([1.0, 500.0]), jnp.array([3, 10])
  boxed = UNet(cfg).init(jax.random.key(0), x, t, class_labels=y)["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
  assert all(isinstance(a, nn.LogicallyPartitioned) for a in leaves), "every parameter has logical axis names"
  params = nn.meta.unbox(boxed)
  # diffusers' structure and names.
  assert set(params) == {"time_embedding", "class_embedding", "conv_in", "down_blocks_0", "down_blocks_1",
                         "mid_block", "up_blocks_0", "up_blocks_1", "conv_norm_out", "conv_out"}
  assert set(params["down_blocks_1"]["attentions_0"]["transformer_blocks_0"]) == {
      "norm1", "attn1", "norm3", "ff"}  # no cross-attention without a context
  assert set(params["up_blocks_0"]) == {"resnets_0", "resnets_1", "attentions_0", "attentions_1", "upsamplers_0"}
  assert params["down_blocks_0"]["downsamplers_0"]["conv"]["kernel"].shape == (3, 3, 8, 8)
  out = UNet(cfg).apply({"params": params}, x, t, class_labels=y)
  assert out.shape == (2, 28, 28, 1) and out.dtype == jnp.float32


def test_cross_attention_unet_needs_context():
  cfg = UNetConfig(**{**SMALL, "cross_attention_dim": 12, "num_class_embeds": None,
                      "use_linear_projection": True, "transformer_layers_per_block": 2})
  x, t = jnp.zeros((1, 16, 16, 1)), jnp.array([10.0])
  params = nn.meta.unbox(init(cfg, x, t, context=jnp.ones((1, 5, 12))))
  block = params["down_blocks_1"]["attentions_0"]
  assert set(block) == {"norm", "proj_in", "transformer_blocks_0", "transformer_blocks_1", "proj_out"}
  assert block["transformer_blocks_0"]["attn2"]["to_k"]["kernel"].shape == (12, 16)
  with pytest.raises(ValueError, match="needs a context"):
    UNet(cfg).apply({"params": params}, x, t)


def test_remat_gives_identical_outputs_and_gradients():
  cfg = UNetConfig(**SMALL)
  x = jax.random.normal(jax.random.key(1), (2, 12, 12, 1))
  t, y = jnp.array([3.0, 700.0]), jnp.array([1, 2])
  params = nn.meta.unbox(init(cfg, x, t, class_labels=y))

  def loss(p, remat):
    c = UNetConfig(**{**SMALL, "remat": remat})
    return jnp.sum(UNet(c).apply({"params": p}, x, t, class_labels=y) ** 2)

  l0, g0 = jax.value_and_grad(loss)(params, False)
  l1, g1 = jax.value_and_grad(loss)(params, True)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  # Recomputation may fuse differently: equal to 1e-5 relative to each gradient's largest entry.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(a).max()) + 1e-8),
               g0, g1)
  # The policies that save named attention outputs (sdjax.models.remat), through the U-Net, in one compile.
  policies = ["attention", "offload"]
  results = jax.jit(lambda p: [jax.value_and_grad(loss)(p, name) for name in policies])(params)
  for name, (l2, g2) in zip(policies, results):
    np.testing.assert_allclose(l0, l2, rtol=1e-6, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(a).max()) + 1e-8,
                                                         err_msg=name), g0, g2)


def test_every_remat_policy_keeps_outputs_and_gradients():
  """Each policy of sdjax.models.remat on a transformer block (self + cross-attention, feed-forward): the loss
  and gradients of the plain block, all policies in one compile."""
  x, ctx = jax.random.normal(jax.random.key(0), (2, 16, 8)), jax.random.normal(jax.random.key(1), (2, 5, 8))
  make = lambda policy: remat_lib.wrap(layers.BasicTransformerBlock, policy)(8, 2, 4, cross_attention=True)
  params = make("none").init(jax.random.key(2), x, ctx)

  def loss(p, policy):
    return jnp.sum(make(policy).apply(p, x, ctx) ** 2)

  results = jax.jit(lambda p: [jax.value_and_grad(loss)(p, name) for name in remat_lib.POLICIES])(params)
  (l0, g0), rest = results[0], results[1:]
  for name, (l1, g1) in zip(remat_lib.POLICIES[1:], rest):
    np.testing.assert_allclose(l0, l1, rtol=1e-6, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * float(np.abs(a).max()) + 1e-9,
                                                         err_msg=name), g0, g1)


def test_remat_policy_names_and_old_bools():
  assert UNetConfig(**{**SMALL, "remat": True}).remat == "full"
  assert UNetConfig(**{**SMALL, "remat": False}).remat == "none"
  assert UNetConfig(**{**SMALL, "remat": "dots"}).remat == "dots"
  with pytest.raises(ValueError, match=r"UNetConfig.remat: 'dot' is not a remat policy \(expected one of none, full"):
    UNetConfig(**{**SMALL, "remat": "dot"})
  with pytest.raises(ValueError, match="UNetConfig.remat: 1 is not a remat policy"):
    UNetConfig(**{**SMALL, "remat": 1})


def test_bfloat16_compute_keeps_float32_params_and_output():
  cfg = UNetConfig(**{**SMALL, "dtype": "bfloat16"})
  x, t, y = jnp.ones((1, 8, 8, 1)), jnp.array([5.0]), jnp.array([0])
  params = nn.meta.unbox(init(cfg, x, t, class_labels=y))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  out = UNet(cfg).apply({"params": params}, x, t, class_labels=y)
  ref = UNet(UNetConfig(**SMALL)).apply({"params": params}, x, t, class_labels=y)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=0.1)  # bf16 has ~3 significant digits


def test_default_config_parameter_count():
  import importlib.util, os
  from conftest import ROOT
  spec = importlib.util.spec_from_file_location("default", os.path.join(ROOT, "configs", "default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = UNetConfig.from_dict(module.get_config().model.to_dict())
  shapes = jax.eval_shape(lambda: nn.meta.unbox(init(cfg, jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,)),
                                                     class_labels=jnp.zeros((1,), jnp.int32))))
  assert sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)) == DEFAULT_PARAMS


DEFAULT_PARAMS = 919_921  # golden value: a change here changes every default checkpoint


def test_resnet_block_parameter_count_closed_form():
  cin, cout, temb = 8, 12, 20
  block = layers.ResnetBlock2D(cout, groups=4)
  p = jax.eval_shape(lambda: nn.meta.unbox(block.init(jax.random.key(0), jnp.zeros((1, 6, 6, cin)),
                                                      jnp.zeros((1, temb)))))
  expected = (2 * cin + 9 * cin * cout + cout + temb * cout + cout + 2 * cout + 9 * cout * cout + cout
              + cin * cout + cout)
  assert sum(math.prod(a.shape) for a in jax.tree.leaves(p)) == expected


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="down_block_types has 1 entries"):
    UNetConfig(**{**SMALL, "down_block_types": ("DownBlock2D",)})
  with pytest.raises(ValueError, match="unknown field"):
    UNetConfig.from_dict({"block_out_channel": (8,)})
  with pytest.raises(ValueError, match="x of shape"):
    UNet(UNetConfig(**SMALL)).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)),
                                   class_labels=jnp.zeros((1,), jnp.int32))
