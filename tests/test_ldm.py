"""Latent diffusion training (config.task = "ldm"): from scratch on the shapes data with a frozen VAE and text
encoder, and fine-tuning a diffusers checkpoint with LoRA; exact resume; loading a run for sampling."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import losses, with_overrides
from configs import ldm_shapes, sd_finetune
from sdjax import checkpoint, convert, lora, runs
from sdjax.train import run
from sdjax.train.trainer import Trainer



def _config(module, variant, **overrides):
  return with_overrides(module.get_config(variant), **overrides)


def _restore(config, workdir):
  exp = Trainer.from_config(config)
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    return exp, ckpt.restore(exp.abstract_state)
  finally:
    ckpt.close()


def test_lora_finetuning_changes_only_lora_params(tmp_path, tiny_sd1, compilation_cache):
  config = _config(sd_finetune, "tiny_lora", pretrained=tiny_sd1, **{"train.num_steps": 4, "train.checkpoint_every": 4})
  run(config, str(tmp_path / "run"))
  exp, state = _restore(config, str(tmp_path / "run"))
  base = convert.load_unet(os.path.join(tiny_sd1, "unet"))[1]

  # The trainable (and checkpointed) tree is the LoRA tree alone; the frozen base is the checkpoint's U-Net.
  expected = lora.init(base, exp.task.lora, jax.random.key(0))
  assert jax.tree.structure(state.params) == jax.tree.structure(expected)
  assert lora.count(state.params) < 0.2 * sum(a.size for a in jax.tree.leaves(base))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(exp.frozen["unet"]), base)
  ups = [np.abs(np.asarray(leaf)).max() for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)
         if path[-1].key == "up"]
  assert min(ups) > 0  # every adapter moved away from its zero init

  # Exported in diffusers' LoRA format: loads back onto the base as the EMA adapters.
  loaded, loaded_config = lora.load(os.path.join(str(tmp_path / "run"), "lora"), base)
  assert loaded_config.rank == exp.task.lora.rank
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(state.ema_params))

  # Merged into the base, only the targeted attention kernels differ from the checkpoint.
  merged = jax.device_get(exp.task.unet_params(state.params, exp.frozen))
  changed = []
  for (path, new), old in zip(jax.tree_util.tree_leaves_with_path(merged), jax.tree.leaves(base)):
    name = jax.tree_util.keystr(path)
    if not np.array_equal(new, old):
      changed.append(name)
      assert name.endswith("['kernel']") and any(f"['{t}']" in name for t in exp.task.lora.targets), name
  assert len(changed) == len(jax.tree.leaves(state.params)) // 2


def test_ldm_from_scratch_resumes_exactly_and_loads_for_sampling(tmp_path, tiny_sd1, compilation_cache):
  overrides = {"frozen.from_pipeline": tiny_sd1, "train.num_steps": 4, "train.checkpoint_every": 2,
               "train.log_every": 1}
  full = str(tmp_path / "full")
  run(_config(ldm_shapes, "tiny", **overrides), full)
  assert os.path.exists(os.path.join(full, "samples", "step_0000004.png"))  # validation prompts grid at the end
  part = str(tmp_path / "part")
  run(_config(ldm_shapes, "tiny", **{**overrides, "train.num_steps": 2}), part)
  run(_config(ldm_shapes, "tiny", **overrides), part)  # resumes at step 2
  a, b = losses(full), losses(part)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-6)

  exported = convert.load_unet(os.path.join(full, "unet"))[1]  # the EMA U-Net as a diffusers folder
  loaded = runs.load(full)
  (sd, params, tokenizers), model_id = loaded.model, loaded.model_id
  jax.tree.map(np.testing.assert_array_equal, exported, jax.device_get(params["unet"]))
  assert model_id.endswith("@4") and len(tokenizers) == 1 and not sd.sdxl
  with open(os.path.join(full, "unet", "config.json")) as f:  # its size travels with it (sample.py --model)
    assert json.load(f)["sample_size"] == sd.latent_shape(32, 32)[0]
  _, state = _restore(_config(ldm_shapes, "tiny", **overrides), full)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params["unet"]), jax.device_get(state.ema_params))


def test_ldm_config_errors(tmp_path, tiny_sd1):
  with pytest.raises(FileNotFoundError, match=r"config.frozen.from_pipeline: .* \(no model_index.json\)"):
    Trainer.from_config(_config(ldm_shapes, "tiny", **{"frozen.from_pipeline": str(tmp_path)}))
  with pytest.raises(ValueError, match="lora.rank > 0 needs config.pretrained"):
    Trainer.from_config(_config(ldm_shapes, "tiny", **{"frozen.from_pipeline": tiny_sd1, "lora.rank": 2}))
  with pytest.raises(ValueError, match="cross_attention_dim is 8 but the text encoder"):
    Trainer.from_config(_config(ldm_shapes, "tiny", **{"frozen.from_pipeline": tiny_sd1, "model.cross_attention_dim": 8}))
  with pytest.raises(ValueError, match="sample.prompts is empty"):
    task = Trainer.from_config(_config(ldm_shapes, "tiny", **{"frozen.from_pipeline": tiny_sd1, "sample.prompts": ()}))
    task.task.sample_grid(None, task.frozen)


def test_tiny_ldm_follows_its_captions(tmp_path, tiny_sd1):
  """Trained for 400 steps on the shapes data (16x16, frozen random VAE and text encoder), the model is used
  as a diffusion classifier (Li et al. 2023): for held-out images, the caption whose conditioning gives the
  lowest denoising error at a few noise levels. Chance picks the right colour 1 time in 4."""
  from PIL import Image
  from sdjax import pipelines, schedules
  from sdjax.data.shapes import COLORS, ShapesSource, captions
  from sdjax.models import vae as vae_lib

  # The random VAE with SD's recipe for its scaling factor: 1 / std of its latents on the data.
  folder = str(tmp_path / "pipeline")
  shutil.copytree(tiny_sd1, folder)
  vae, vae_params = convert.load_vae(os.path.join(folder, "vae"))
  train_images = np.stack([ShapesSource("train")[i]["image"] for i in range(256)]).astype(np.float32) / 127.5 - 1
  with open(os.path.join(folder, "vae", "config.json")) as f:
    vae_config = json.load(f)
  vae_config["scaling_factor"] = float(1 / np.std(vae.apply({"params": vae_params}, train_images, method="encode")[0]))
  with open(os.path.join(folder, "vae", "config.json"), "w") as f:
    json.dump(vae_config, f)

  config = _config(ldm_shapes, "tiny", **{"frozen.from_pipeline": folder, "data.resolution": 16,
                                          "train.num_steps": 400, "train.batch_size": 32, "train.log_every": 50,
                                          "train.checkpoint_every": 400, "optim.lr": 2e-3, "optim.warmup_steps": 50,
                                          "train.ema_decay": 0.99})
  run(config, str(tmp_path / "run"))
  sd, params, tokenizers = runs.load(str(tmp_path / "run")).model

  src = ShapesSource("test")
  examples = [src[i] for i in range(96)]
  images = np.stack([np.asarray(Image.fromarray(e["image"]).resize((16, 16), Image.BILINEAR))
                     for e in examples]).astype(np.float32) / 127.5 - 1
  labels = np.array([e["label"] for e in examples])
  caps = captions()
  context = pipelines.encode_prompt(sd.text_encoders, params["text_encoders"],
                                    pipelines.tokenize(tokenizers, sd.text_encoders, caps))["context"]
  mean, _ = sd.vae.apply({"params": params["vae"]}, images, method="encode")
  latents = vae_lib.scale_latents(mean, sd.vae.config)
  timesteps = jax.numpy.array([100, 300, 500, 700])

  def errors(z, key):  # [captions]: denoising error summed over the noise levels, the same noise for every caption
    def at(t, k):
      noise = jax.random.normal(k, z.shape)
      x_t = schedules.add_noise(sd.schedule, z[None], noise[None], t[None])[0]
      out = sd.unet.apply({"params": params["unet"]}, jax.numpy.broadcast_to(x_t, (len(caps),) + x_t.shape),
                          jax.numpy.full((len(caps),), t, jax.numpy.float32), context)
      return ((out - noise) ** 2).mean(axis=(1, 2, 3))
    return jax.vmap(at)(timesteps, jax.random.split(key, len(timesteps))).sum(0)

  pred = np.argmin(jax.jit(jax.vmap(errors))(latents, jax.random.split(jax.random.key(0), len(examples))), axis=1)
  color_acc = float(np.mean(pred // 3 == labels // 3))
  caption_acc = float(np.mean(pred == labels))
  print(f"diffusion-classifier accuracy: colour {color_acc:.2f} (chance 0.25), caption {caption_acc:.2f} (chance 0.08)")
  # Chance would get >= 0.40 of 96 right with probability < 1e-3 (binomial n=96, p=1/4; measured ~0.6).
  assert len(COLORS) == 4 and color_acc >= 0.40, color_acc
