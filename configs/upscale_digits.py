"""Stable Diffusion's x4 upscaler structure trained from scratch on the captioned coloured digits: 8x8 low-res
digits (32x32 downsampled 4x) + "a red 7 on a black background" -> 32x32 digits, with a frozen 4x VAE and CLIP
text encoder (sdjax.train.tasks.upscale has the conventions).

  python -m sdjax.convert.random runs/tiny_sd1 --tokenizer tests/fixtures/models/tokenizer  # text encoder
  python train.py --config configs/vae_digits.py --workdir runs/vae_digits                 # the 4x VAE
  python train.py --config configs/upscale_digits.py --workdir runs/upscale_digits          # ~15 min, 2 CPUs
  python train.py --config configs/upscale_digits.py:tiny --workdir runs/upscale_tiny       # seconds

The run ends with `runs/upscale_digits/upscaler`, a diffusers StableDiffusionUpscalePipeline folder:
  StableDiffusionUpscalePipeline.from_pretrained("runs/upscale_digits/upscaler")(prompt=..., image=low_res_8x8)
The tiny variant takes the random tiny pipeline's VAE, whose downscale is 2: it upscales 8x8 -> 16x16
(data.resolution 16); the task derives the low-res size as image size / VAE factor.
"""
import ml_collections

from configs import common


def upscale(**overrides) -> ml_collections.ConfigDict:
  """config.upscale: sdjax.train.tasks.upscale.UpscaleConfig (the x4 upscaler's values)."""
  c = ml_collections.ConfigDict()
  c.max_noise_level = 350               # noise levels 0..350 on the low-res image, the U-Net's class label
  c.low_res_beta_schedule = "scaled_linear"  # LDM's "linear" (sqrt-spaced) 1e-4..0.02, as x4-upscaling.yaml
  c.low_res_beta_start = 1e-4
  c.low_res_beta_end = 0.02
  c.low_res_num_train_timesteps = 1000
  c.downsample = "area"                 # area (f x f block mean) | bicubic (antialiased)
  return common._section(c, overrides)


def sample(**overrides) -> ml_collections.ConfigDict:
  """Sample grids: low-res | upscaled | original rows of the first `num_images` training examples."""
  c = ml_collections.ConfigDict()
  c.sampler = "ddim"
  c.num_steps = 25
  c.guidance_scale = 2.0                # against the empty caption; 1: no guidance
  c.noise_level = 20                    # the pipeline's default
  c.num_images = 8                      # 0: no grids
  return common._section(c, overrides)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "upscale"
  c.frozen = common.frozen(from_pipeline="runs/tiny_sd1", vae="runs/vae_digits/vae")
  c.data = common.text_data(source="colored_digits", caption_dropout=0.1)
  c.upscale = upscale()
  # in = 4 latent + 3 low-res image channels; noise level -> class embedding; cross-attention at the 8x8 level.
  c.model = common.unet(
      in_channels=7,
      out_channels=4,
      block_out_channels=(64, 128),
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      attention_head_dim=4,
      cross_attention_dim=16,
      num_class_embeds=1000,
      norm_num_groups=16)
  c.diffusion = common.diffusion(  # the x4 upscaler's scheduler: v-prediction, scaled_linear 1e-4..0.02
      beta_schedule="scaled_linear", beta_start=1e-4, beta_end=0.02, prediction_type="v_prediction",
      clip_sample=False)
  c.loss = common.loss()
  c.optim = common.optim(lr=1e-3)
  # 73 images/s measured on the shared 2-core CPU (load ~5): 2500 x 32 = 80k images, ~18 min there, less idle.
  c.train = common.train(batch_size=32, num_steps=2500, ema_decay=0.999, cond_drop_prob=0.0, checkpoint_every=500,
                         sample_every=500)
  c.sample = sample()
  c.mesh = common.mesh()

  if arg == "tiny":
    common.tiny_run(c)
    c.frozen.vae = ""                   # the random tiny pipeline's 2x VAE: a smoke test, not pictures
    c.data.resolution = 16              # -> 8x8 low-res images and latents
    c.model.block_out_channels = (16, 32)
    c.model.attention_head_dim = 2
    c.model.norm_num_groups = 8
    c.sample = sample(num_steps=3, num_images=2)
  elif arg:
    raise ValueError(f"configs/upscale_digits.py: unknown variant {arg!r}; expected 'tiny' or nothing")
  return c.lock()
