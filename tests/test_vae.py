"""AutoencoderKL: parity with diffusers on tiny random models (tests/fixtures/models/vae_*, made by
tools/make_vae_fixtures.py), latent scaling, reduced precision, remat and config validation.

Parity tolerance: max |sdjax - diffusers| <= 1e-4 * max |diffusers| for every float32 output.
"""
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from sdjax.models import vae as vae_lib
from sdjax.models.vae import AutoencoderKL, VAEConfig

try:
  from sdjax.convert import load_vae
except ImportError:  # the diffusers-folder loader is not there: map the fixture with the tree helpers
  load_vae = None

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "models")
CASES = ("vae_sd", "vae_sdxl", "vae_shift")
RTOL = 1e-4


def _load(folder, **overrides):
  if load_vae is not None:
    return load_vae(folder, **overrides)
  from sdjax.convert import safetensors_io, tree  # noqa: PLC0415
  with open(os.path.join(folder, "config.json")) as f:
    config = VAEConfig.from_diffusers_config(json.load(f), **overrides)
  module = AutoencoderKL(config)
  shapes = nn.meta.unbox(jax.eval_shape(
      lambda: module.init(jax.random.key(0), *vae_lib.init_args(config))))["params"]
  state = safetensors_io.load(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  return module, tree.to_flax(state, shapes, what=folder)


@functools.cache
def fixture(name, dtype="float32"):
  folder = os.path.join(FIXTURES, name)
  vae, params = _load(folder, dtype=dtype)
  with np.load(os.path.join(folder, "reference.npz")) as f:
    ref = dict(f)
  return vae, params, ref


def rel_err(out, ref):
  return float(np.max(np.abs(np.asarray(out, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("name", CASES)
def test_encode_decode_match_diffusers(name):
  vae, params, ref = fixture(name)
  mean, logvar = vae.apply({"params": params}, ref["image"], method="encode")
  decoded = vae.apply({"params": params}, ref["latent"], method="decode")
  errors = {"mean": rel_err(mean, ref["mean"]), "logvar": rel_err(logvar, ref["logvar"]),
            "decoded": rel_err(decoded, ref["decoded"])}
  print(name, errors)
  assert mean.shape == logvar.shape == ref["mean"].shape and decoded.shape == ref["decoded"].shape
  assert mean.dtype == decoded.dtype == jnp.float32
  assert max(errors.values()) <= RTOL, errors


def test_call_is_encode_then_decode_of_the_mode_or_a_sample():
  vae, params, ref = fixture("vae_sd")
  x = ref["image"][:1]
  mean, logvar = vae.apply({"params": params}, x, method="encode")
  np.testing.assert_allclose(vae.apply({"params": params}, x),
                             vae.apply({"params": params}, mean, method="decode"), rtol=1e-6, atol=1e-6)
  rng = jax.random.key(3)
  z = vae_lib.sample_latent(mean, logvar, rng)
  np.testing.assert_allclose(z, mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape), rtol=1e-6)
  np.testing.assert_allclose(vae.apply({"params": params}, x, rng=rng),
                             vae.apply({"params": params}, z, method="decode"), rtol=1e-6, atol=1e-6)


def test_logvar_is_clamped_as_in_diffusers():
  vae, params, ref = fixture("vae_sd")
  c = vae.config.latent_channels
  bias = jnp.asarray(params["quant_conv"]["bias"])
  for value, expected in ((1e3, 20.0), (-1e3, -30.0)):
    p = {**params, "quant_conv": {**params["quant_conv"], "bias": bias.at[c:].set(value)}}
    _, logvar = vae.apply({"params": p}, ref["image"], method="encode")
    np.testing.assert_array_equal(logvar, expected)


def test_legacy_attention_names_are_renamed():
  from sdjax.convert import safetensors_io, tree  # noqa: PLC0415
  vae, params, _ = fixture("vae_sd")
  state = safetensors_io.load(os.path.join(FIXTURES, "vae_sd", "diffusion_pytorch_model.safetensors"))
  legacy = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
            .replace(".to_out.0.", ".proj_attn."): v for k, v in state.items()}
  assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
  assert set(vae_lib.normalize_state_dict(legacy)) == set(state)
  restored = tree.to_flax(vae_lib.normalize_state_dict(legacy), params)
  jax.tree.map(np.testing.assert_array_equal, restored, params)


def test_parameter_names_and_logical_axes():
  cfg = fixture("vae_sd")[0].config
  boxed = jax.eval_shape(lambda: AutoencoderKL(cfg).init(jax.random.key(0), *vae_lib.init_args(cfg)))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
  assert all(isinstance(a, nn.LogicallyPartitioned) for a in leaves), "every parameter has logical axis names"
  p = nn.meta.unbox(boxed)
  assert set(p) == {"encoder", "decoder", "quant_conv", "post_quant_conv"}
  assert p["encoder"]["down_blocks_0"]["downsamplers_0"]["conv"]["kernel"].shape == (3, 3, 8, 8)
  assert "downsamplers_0" not in p["encoder"]["down_blocks_1"]
  assert set(p["decoder"]["up_blocks_0"]) == {"resnets_0", "resnets_1", "resnets_2", "upsamplers_0"}
  assert set(p["encoder"]["mid_block"]["attentions_0"]) == {"group_norm", "to_q", "to_k", "to_v", "to_out_0"}
  shift_params = fixture("vae_shift")[1]
  assert "quant_conv" not in shift_params and "post_quant_conv" not in shift_params
  assert set(shift_params["decoder"]["mid_block"]) == {"resnets_0", "resnets_1"}


@pytest.mark.parametrize("name", ["vae_sd", "vae_shift"])
def test_scale_unscale_round_trip_and_formulas(name):
  cfg = fixture(name)[0].config
  z = jax.random.normal(jax.random.key(0), (2, 3, 4, cfg.latent_channels))
  scaled = vae_lib.scale_latents(z, cfg)
  np.testing.assert_allclose(scaled, (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(vae_lib.unscale_latents(scaled, cfg), z, rtol=1e-5, atol=1e-6)


def test_scale_with_per_channel_latents_mean_and_std():
  mean, std = (0.1, -0.2, 0.3, 0.0), (2.0, 0.5, 1.0, 4.0)
  cfg = VAEConfig(scaling_factor=0.5, latents_mean=mean, latents_std=std)
  z = jax.random.normal(jax.random.key(1), (1, 2, 2, 4))
  scaled = vae_lib.scale_latents(z, cfg)
  # diffusers (SDXL pipelines): (z - mean) * scaling_factor / std, channels last here.
  np.testing.assert_allclose(scaled, (z - np.array(mean)) * 0.5 / np.array(std), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(vae_lib.unscale_latents(scaled, cfg), z, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["vae_sdxl"])
def test_bfloat16_compute_stays_close(name):
  vae, params, ref = fixture(name, "bfloat16")
  assert all(a.dtype == np.float32 for a in jax.tree.leaves(params)), "params stay float32"
  mean, logvar = vae.apply({"params": params}, ref["image"], method="encode")
  decoded = vae.apply({"params": params}, ref["latent"], method="decode")
  assert mean.dtype == logvar.dtype == decoded.dtype == jnp.float32
  errors = [rel_err(mean, ref["mean"]), rel_err(logvar, ref["logvar"]), rel_err(decoded, ref["decoded"])]
  assert max(errors) < 5e-2, errors


def test_remat_gives_identical_outputs_and_gradients():
  vae, params, ref = fixture("vae_sd")
  remat = AutoencoderKL(dataclasses.replace(vae.config, remat=True))
  x = ref["image"][:1, :8, :8]

  def loss(module, p):
    return jnp.mean(module.apply({"params": p}, x) ** 2)

  (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(functools.partial(loss, m)))(params) for m in (vae, remat))
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6), g0, g1)


def test_config_round_trips_through_diffusers_dict():
  with open(os.path.join(FIXTURES, "vae_shift", "config.json")) as f:
    d = json.load(f)
  cfg = VAEConfig.from_diffusers_config(d)
  assert cfg.shift_factor == pytest.approx(0.1159) and not cfg.use_quant_conv
  assert cfg.block_out_channels == (8, 16, 16) and cfg.dtype == "float32"
  exported = cfg.to_diffusers_config()
  assert exported == {k: v for k, v in d.items() if k != "_diffusers_version"}


@pytest.mark.parametrize("change, match", [
    ({"use_tiling": True}, r"unknown field\(s\) \['use_tiling'\]"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"down_block_types": ["AttnDownEncoderBlock2D"] * 2}, "down_block_types"),
    ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types has 1 entries"),
    ({"norm_num_groups": 3}, "norm_num_groups"),
    ({"latents_mean": [0.0] * 4}, "latents_std"),
    ({"_class_name": "AutoencoderTiny"}, "_class_name"),
])
def test_config_errors_name_the_field(change, match):
  with open(os.path.join(FIXTURES, "vae_sd", "config.json")) as f:
    d = json.load(f)
  with pytest.raises(ValueError, match=match):
    VAEConfig.from_diffusers_config({**d, **change})


def test_input_shape_errors():
  vae, params, _ = fixture("vae_sdxl")
  with pytest.raises(ValueError, match="not divisible by 4"):
    vae.apply({"params": params}, jnp.zeros((1, 6, 8, 3)), method="encode")
  with pytest.raises(ValueError, match=r"z of shape \[B, h, w, 4\]"):
    vae.apply({"params": params}, jnp.zeros((1, 2, 2, 3)), method="decode")
