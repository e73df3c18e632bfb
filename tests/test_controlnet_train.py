"""ControlNet training (config.task = "controlnet") next to the random tiny SD 1.x pipeline's frozen U-Net, VAE and
text encoder: the trainable tree is the ControlNet's alone, step 0 predicts what the frozen U-Net predicts, exact
resume, the diffusers ControlNetModel export, the data-side control images, and config errors before step 1."""
import dataclasses
import os
import shutil

import jax
import numpy as np
import pytest
from flax import linen as nn

from conftest import losses, with_overrides
from configs import controlnet_digits
from sdjax import convert, runs
from sdjax.data import colored_digits as cd
from sdjax.data import control_images
from sdjax.models import controlnet as controlnet_lib
from sdjax.train import run
from sdjax.train.trainer import Trainer


def _config(tiny_sd1, **overrides):
  return with_overrides(controlnet_digits.get_config("tiny"), **{"frozen.from_pipeline": tiny_sd1, **overrides})


def test_controlnet_trains_resumes_and_exports_a_diffusers_controlnet(tmp_path, tiny_sd1, compilation_cache):
  # 4 steps on a data x FSDP mesh (4 x 2: the ControlNet's larger kernels split over fsdp), checkpoints at 2 and 4;
  # then a copy without its step-4 checkpoint (as if the run had died there) resumes at step 2 with the same train
  # step (compiled once, cached). No sample grids (their sampler's compile would double the time).
  config = _config(tiny_sd1, **{"train.num_steps": 4, "train.checkpoint_every": 2, "train.log_every": 1,
                                "sample.num_images": 0, "mesh.data": 4, "mesh.fsdp": 2})
  full, part = str(tmp_path / "full"), str(tmp_path / "part")
  run(config, full)
  shutil.copytree(full, part)
  shutil.rmtree(os.path.join(part, "checkpoints", "4"))
  assert run(config, part)["start_step"] == 2
  a, b = losses(full), losses(part)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4] and np.all(np.isfinite(list(a.values())))
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-6)

  # The export: a ControlNetModel folder holding the EMA ControlNet; the frozen U-Net is the pipeline's, unchanged.
  loaded = runs.load(full)
  model = loaded.model
  specs = {leaf.sharding.spec for leaf in jax.tree.leaves(model.params["controlnets"][0])}
  assert dict(loaded.mesh.shape)["fsdp"] == 2 and any("fsdp" in str(spec) for spec in specs)
  module, params = convert.load_controlnet(os.path.join(full, "controlnet"))
  assert module.config == model.controlnet.config
  jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(model.params["controlnets"][0]))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(model.params["unet"]),
               convert.load_unet(os.path.join(tiny_sd1, "unet"))[1])
  zero = np.asarray(params["controlnet_mid_block"]["kernel"])
  assert np.abs(zero).max() > 0  # trained away from its zero init


def test_controlnet_trainable_tree_and_zero_init(tiny_sd1):
  """The state's params are exactly a ControlNet's tree (copied from the U-Net, zero convolutions zero), the U-Net
  is frozen, and step 0's prediction equals the frozen U-Net's."""
  exp = Trainer.from_config(_config(tiny_sd1))
  task = exp.task
  x, t, ctx, image, scale, added = controlnet_lib.init_args(task.controlnet.config)
  expected = jax.eval_shape(lambda: nn.meta.unbox(task.controlnet.init(jax.random.key(0), x, t, ctx, image))["params"])
  assert jax.tree.structure(exp.abstract_state.params) == jax.tree.structure(expected)
  assert jax.tree.map(lambda a: a.shape, exp.abstract_state.params) == jax.tree.map(lambda a: a.shape, expected)
  assert set(exp.frozen) == {"vae", "text", "unet"}
  initial = task.initial_params()
  unet = jax.device_get(exp.frozen["unet"])
  for name in ("conv_in", "time_embedding", "down_blocks_0", "mid_block"):
    jax.tree.map(np.testing.assert_array_equal, initial[name], unet[name])
  zero_convs = [k for k in initial if k.startswith("controlnet_down_blocks_")] + ["controlnet_mid_block"]
  assert len(zero_convs) == task.controlnet.config.num_down_residuals + 1
  for k in zero_convs:
    assert not np.any(initial[k]["kernel"]) and not np.any(initial[k]["bias"])
  assert not np.any(initial["controlnet_cond_embedding"]["conv_out"]["kernel"])

  batch = task.input_pipeline(0, 1).batch(0)
  assert batch["control"].shape == (16, 16, 16, 3) and set(np.unique(batch["control"])) == {0.0, 1.0}

  # Any latents, timesteps and text features (the residuals are zero for every input), the data's control images.
  rng = np.random.default_rng(0)
  x_t = rng.standard_normal((2,) + task.latent_shape).astype(np.float32)
  cond = {"context": rng.standard_normal((2, 16, 16)).astype(np.float32), "control": batch["control"][:2]}
  tt = np.array([10.0, 500.0], np.float32)

  @jax.jit
  def both(params, frozen, x_t, tt, cond):
    plain = task.unet.apply({"params": frozen["unet"]}, x_t, tt, cond["context"])
    down, mid = task.residuals(params, x_t, tt, cond)
    return task.apply(params, frozen, x_t, tt, cond, jax.random.key(0)), plain, down, mid

  controlled, plain, down, mid = both(initial, exp.frozen, x_t, tt, cond)
  assert all(not np.any(np.asarray(d)) for d in down) and not np.any(np.asarray(mid))
  np.testing.assert_array_equal(np.asarray(controlled), np.asarray(plain))


def test_control_images_of_coloured_digits():
  """silhouette = the painted digit's alpha >= threshold, exactly, on both backgrounds; edges are the silhouette's
  inner contour; sobel is a soft map in [0, 1]; all three channels equal."""
  source = cd.ColoredDigitsSource("test")
  idx = range(40)
  images = np.stack([source[i]["image"] for i in idx])
  digits = source.digits[:40].reshape(40, 28, 28)
  alpha = np.pad(digits, ((0, 0), (cd.PAD, cd.PAD), (cd.PAD, cd.PAD))).astype(np.float64) / 255
  assert {source.attributes(i)[2] for i in idx} == {"black", "white"}
  sil = control_images.control_images(images, control_images.ControlConfig("silhouette"))
  assert sil.shape == (40, 32, 32, 3) and sil.dtype == np.float32
  assert np.all(sil == sil[..., :1])
  mask = sil[..., 0] > 0.5
  # painting rounds to uint8: an alpha within half a grey level of the threshold may land either side
  sure = np.abs(alpha - 0.5) > 2 / 255
  np.testing.assert_array_equal(mask[sure], (alpha >= 0.5)[sure])
  edges = control_images.control_images(images, control_images.ControlConfig("edges"))[..., 0] > 0.5
  assert np.all(mask[edges]) and 0 < edges.sum() < mask.sum()
  interior = mask & ~edges
  p = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
  assert np.all((p[:, :-2, 1:-1] & p[:, 2:, 1:-1] & p[:, 1:-1, :-2] & p[:, 1:-1, 2:])[interior])
  sob = control_images.control_images(images, control_images.ControlConfig("sobel"))
  assert sob.min() >= 0 and np.allclose(sob.max(axis=(1, 2, 3)), 1.0) and len(np.unique(sob)) > 10
  blank = control_images.control_images(np.zeros((1, 32, 32, 3), np.uint8), control_images.ControlConfig("sobel"))
  assert not np.any(blank)


@pytest.fixture(scope="module")
def mismatched_controlnets(tmp_path_factory, tiny_sd1):
  """ControlNet folders that do not fit the tiny pipeline: an 8x control-image encoder (its VAE is 2x), and a
  32-wide cross-attention (its text encoder is 16 wide)."""
  unet, params = convert.load_unet(os.path.join(tiny_sd1, "unet"))
  root = tmp_path_factory.mktemp("controlnets")
  folders = {}
  config, p = controlnet_lib.from_unet(unet.config, params, conditioning_embedding_out_channels=(4, 8, 8, 8))
  folders["8x"] = str(root / "8x")
  convert.save_component(folders["8x"], "controlnet", config, p)
  wide = dataclasses.replace(unet.config, cross_attention_dim=32)
  config = controlnet_lib.ControlNetConfig(unet=wide, conditioning_embedding_out_channels=(4, 8))
  shapes = jax.eval_shape(lambda: nn.meta.unbox(controlnet_lib.ControlNet(config).init(
      jax.random.key(0), *controlnet_lib.init_args(config)))["params"])
  folders["wide"] = str(root / "wide")
  convert.save_component(folders["wide"], "controlnet", config, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                                                                 shapes))
  return folders


@pytest.mark.parametrize("overrides, error, match", [
    ({"frozen.from_pipeline": ""}, ValueError, r"config.frozen.from_pipeline is empty: the controlnet task needs a "
                                               r"pretrained Stable Diffusion pipeline"),
    ({"frozen.from_pipeline": "/nonexistent"}, FileNotFoundError, r"config.frozen.from_pipeline: /nonexistent is not "
                                                                  r"a diffusers pipeline folder"),
    ({"control.kind": "depth"}, ValueError, r"config.control.kind: unknown control kind 'depth'; expected one of "
                                            r"\('silhouette', 'edges', 'sobel'\)"),
    ({"control.threshold": 0.0}, ValueError, r"config.control.threshold must be in \(0, 1\]"),
    ({"controlnet.conditioning_embedding_out_channels": (16, 32, 96)}, ValueError,
     r"conditioning_embedding_out_channels has 3 widths, i.e. a 4x control-image encoder; the VAE downscales 2x"),
    ({"controlnet.from_pretrained": "8x"}, ValueError,
     r"config.controlnet.from_pretrained: controlnets\[0\]'s control-image encoder downsamples 8x"),
    ({"controlnet.from_pretrained": "wide"}, ValueError,
     r"config.controlnet.from_pretrained: controlnets\[0\] does not fit the U-Net: its cross_attention_dim is 32"),
    ({"data.source": "latents", "data.path": "/tmp"}, ValueError, r"config.data.source: the controlnet task derives"),
])
def test_controlnet_config_errors(tiny_sd1, mismatched_controlnets, overrides, error, match):
  key = "controlnet.from_pretrained"
  if key in overrides:
    overrides = {**overrides, key: mismatched_controlnets[overrides[key]]}
  with pytest.raises(error, match=match):
    Trainer.from_config(_config(tiny_sd1, **overrides))
