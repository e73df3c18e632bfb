"""A ControlNet on the coloured, captioned digits: the frozen text-to-image model of "Stable Diffusion from scratch"
(U-Net of configs/ldm_digits.py, VAE of configs/vae_digits.py, the random tiny CLIP of runs/tiny_sd1) learns to
follow a control image derived from each training image, by default the digit's silhouette
(sdjax.train.tasks.controlnet and sdjax.data.control_images have the conventions).

  python train.py --config configs/controlnet_digits.py --workdir runs/controlnet_digits
  python train.py --config configs/controlnet_digits.py:tiny --workdir runs/controlnet_tiny   # seconds
  python bench/digits_demo.py controlnet --controlnet runs/controlnet_digits

It needs the trained stages first (README, "Stable Diffusion from scratch"): runs/tiny_sd1 (the text encoder,
tokenizer and scheduler), runs/vae_digits/vae and a text-to-image U-Net folder (runs/ldm_digits_6k/unet: the
6,000-step ldm_digits run's export). The run ends with `runs/controlnet_digits/controlnet`, a diffusers
ControlNetModel folder. `--config.control.kind=edges` (or sobel) trains on edge maps instead. The tiny variant runs
on the random tiny SD 1.x pipeline alone (its 2x VAE: 16x16 images): a smoke test, not pictures.
"""
import ml_collections

from configs import common


def controlnet(**overrides) -> ml_collections.ConfigDict:
  """config.controlnet: where the trainable ControlNet starts."""
  c = ml_collections.ConfigDict()
  c.from_pretrained = ""        # a diffusers ControlNetModel folder; "": controlnet.from_unet of the frozen U-Net
  # widths of the control-image encoder (len - 1 stride-2 convs = the VAE's downscale); (): diffusers' default
  # (16, 32, 96, 256) cut to the VAE (4x: (16, 32, 96))
  c.conditioning_embedding_out_channels = ()
  return common._section(c, overrides)


def control(**overrides) -> ml_collections.ConfigDict:
  """config.control: sdjax.data.control_images.ControlConfig (each example's control image)."""
  c = ml_collections.ConfigDict()
  c.kind = "silhouette"         # silhouette | edges | sobel
  c.threshold = 0.5             # ink level of the silhouette
  c.border = 2                  # frame (pixels) whose median colour is the background
  return common._section(c, overrides)


def sample(**overrides) -> ml_collections.ConfigDict:
  """Sample grids: control | generated | original rows of the first `num_images` training examples."""
  c = ml_collections.ConfigDict()
  c.sampler = "ddim"
  c.num_steps = 25
  c.guidance_scale = 4.0        # against the empty caption, as bench/digits_demo.py samples the ldm run
  c.num_images = 8              # 0: no grids
  return common._section(c, overrides)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "controlnet"
  c.frozen = common.frozen(from_pipeline="runs/tiny_sd1", vae="runs/vae_digits/vae")
  with c.frozen.unlocked():
    c.frozen.unet = "runs/ldm_digits_6k/unet"  # "": <from_pipeline>/unet
  c.controlnet = controlnet()
  c.control = control()
  # Images (the control image is made from each), encoded by the frozen VAE inside the step.
  c.data = common.text_data(source="colored_digits", caption_dropout=0.1)
  c.model = common.unet_compute()
  c.diffusion = common.diffusion(  # the schedule the U-Net was trained with (configs/ldm_digits.py)
      beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
  c.loss = common.loss()
  c.optim = common.optim(lr=1e-3)
  # ~1 step/s measured on the shared 2-core CPU: 1000 x 64 = 64k images (14 epochs), ~17 min.
  c.train = common.train(num_steps=1000, ema_decay=0.999, cond_drop_prob=0.0, checkpoint_every=500,
                         sample_every=500)
  c.sample = sample()
  c.mesh = common.mesh()

  if arg == "tiny":
    common.tiny_run(c)
    c.frozen.vae = ""               # the random tiny pipeline's 2x VAE and U-Net
    c.frozen.unet = ""
    c.data.resolution = 16          # -> 8x8 latents
    c.sample = sample(num_steps=3, num_images=2)
  elif arg:
    raise ValueError(f"configs/controlnet_digits.py: unknown variant {arg!r}; expected 'tiny' or nothing")
  return c.lock()
