"""configs/mlperf_sd2.py: the full recipe resolves to the SD 2 base U-Net (built abstractly: diffusers' parameter
count) with the reference's objective and optimizer, its learning rate and step counts follow the global batch,
and the :tiny variant trains end to end on latents and prompt embeddings cached here from a tiny random SD 2
pipeline."""
import json
import math
import os

import jax
import numpy as np
import pytest

from conftest import losses
from configs import mlperf_sd2
from sdjax.convert.random import write_random_pipeline
from sdjax.convert.single_file import default_configs
from sdjax.data import cache_latents, records
from sdjax.data.shapes import ShapesSource
from sdjax.models import UNet, UNetConfig
from sdjax.models.unet import init_args
from sdjax.train import run

TOKENIZER = os.path.join(os.path.dirname(__file__), "fixtures", "models", "tokenizer")
# diffusers' UNet2DConditionModel with stabilityai/stable-diffusion-2-base's unet config (counted on the meta
# device with torch; norm_num_groups does not change it).
SD2_UNET_PARAMS = 865_910_724


def test_full_config_is_the_sd2_base_unet_with_the_reference_recipe():
  c = mlperf_sd2.get_config()
  unet = UNetConfig.from_dict(c.model.to_dict())
  ref = UNetConfig.from_diffusers_config(default_configs("sd2")["unet"])
  for field in ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
                "up_block_types", "mid_block_attention", "cross_attention_dim", "use_linear_projection",
                "transformer_layers_per_block", "sample_size"):
    assert getattr(unet, field) == getattr(ref, field), field
  assert unet.heads == ref.heads == (5, 10, 20, 20)  # heads of 64 channels
  assert unet.norm_num_groups == 16 and unet.dtype == "bfloat16"

  def init(rng):
    x, t, ctx, _, added = init_args(unet, size=8)
    return UNet(unet).init(rng, x, t, ctx, added_cond=added)["params"]

  shapes = jax.eval_shape(init, jax.random.key(0))
  assert sum(math.prod(a.shape) for a in jax.tree.leaves(shapes)) == SD2_UNET_PARAMS

  assert (c.task, c.pretrained, c.data.source, c.data.caption_dropout, c.train.cond_drop_prob) == ("ldm", "", "latents",
                                                                                                  0.0, 0.0)
  assert c.diffusion.to_dict() == {"beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "beta_start": 0.00085,
                               "beta_end": 0.012, "prediction_type": "v_prediction", "clip_sample": False,
                               "rescale_betas_zero_snr": False}
  o = c.optim
  assert (o.name, o.schedule, o.warmup_steps, o.b1, o.b2, o.eps, o.weight_decay, o.grad_clip) == (
      "adamw", "constant", 1000, 0.9, 0.999, 1e-8, 0.01, 0.0)
  assert c.train.ema_decay == 0.0 and (c.loss.weighting, c.loss.offset_noise) == ("none", 0.0)
  assert (c.sample.num_steps, c.sample.guidance_scale, c.sample.size) == (50, 8.0, 512)


@pytest.mark.parametrize("batch, val_check_interval", [(64, None), (512, 1000), (1024, 500), (2048, 250)])
def test_learning_rate_and_step_counts_follow_the_global_batch(batch, val_check_interval):
  """lr = 1.25e-7 x global batch (the reference's --scale_lr); steps for 5.12M images and an evaluation (here a
  checkpoint and a sample grid) every 512,000 images: the reference yamls' val_check_interval at 32 x 8 x {2, 4, 8}."""
  c = mlperf_sd2.get_config()
  c.train.batch_size = batch  # as --config.train.batch_size=N does
  assert c.optim.lr == pytest.approx(1.25e-7 * batch, rel=1e-12)
  assert c.train.num_steps == math.ceil(5_120_000 / batch)
  assert c.train.checkpoint_every == c.train.sample_every == math.ceil(512_000 / batch)
  if val_check_interval:
    assert c.train.checkpoint_every == val_check_interval
  c.optim.lr = 3e-4  # an explicit value replaces the rule
  c.train.batch_size = 2 * batch
  assert c.optim.lr == 3e-4 and c.train.num_steps == math.ceil(2_560_000 / batch)
  assert json.loads(c.to_json_best_effort())["optim"]["lr"] == 3e-4  # what the run records


class _First:
  """The first n examples of a source."""

  def __init__(self, source, n):
    self.source, self.n = source, n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return self.source[i]


def test_tiny_variant_trains_on_cached_latents_and_embeddings(tmp_path):
  pipe = str(tmp_path / "tiny_sd2")
  write_random_pipeline(pipe, "sd2", tokenizer=TOKENIZER)
  cache = str(tmp_path / "latents")
  opts = cache_latents.CacheOptions(vae=os.path.join(pipe, "vae"), resolution=16, batch_size=8, dtype="float32",
                                    text_encoder=os.path.join(pipe, "text_encoder"),
                                    tokenizer=os.path.join(pipe, "tokenizer"), examples_per_shard=32)
  meta = cache_latents.cache(cache, _First(ShapesSource("train"), 32), opts, progress=False)
  assert meta["latent_shape"] == [8, 8, 4] and meta["num_examples"] == 32
  first = records.RecordSource(cache, kind="latents")[0]
  assert first["prompt_embeds"].shape == (16, 16) and "mean" in first and "logvar" in first

  c = mlperf_sd2.get_config("tiny").unlock()
  c.frozen.from_pipeline, c.data.path = pipe, cache
  c.train.num_steps = c.train.checkpoint_every = 3  # one checkpoint (saving ~800 replicated arrays is slow here)
  c.train.log_every = 1
  workdir = str(tmp_path / "run")
  summary = run(c.lock(), workdir)
  assert summary["final_step"] == 3
  got = losses(workdir)
  assert sorted(got) == [1, 2, 3] and all(np.isfinite(v) for v in got.values())
  with open(os.path.join(workdir, "unet", "config.json")) as f:
    exported = json.load(f)
  assert (exported["use_linear_projection"], exported["norm_num_groups"], exported["sample_size"],
          exported["attention_head_dim"], exported["cross_attention_dim"]) == (True, 16, 8, [4, 8], 16)
  assert os.path.exists(os.path.join(workdir, "samples", "step_0000003.png"))
