"""An AutoencoderKL (Stable Diffusion's VAE) with a patch-GAN on a folder of RGB images at 64x64 -> 16x16x4.

  # once: images -> records in DIR (prepare wants captions: without sidecars, list the images with empty ones)
  (cd PICS && for f in *.jpg; do echo "{\"file_name\": \"$f\", \"caption\": \"\"}"; done > metadata.jsonl)
  python -m sdjax.data.prepare --input PICS --output DIR --allow_empty_captions
  python train.py --config configs/vae_folder.py --config.data.path=DIR --workdir runs/vae_folder
  python train.py --config configs/vae_folder.py:tiny --config.data.path=DIR --workdir runs/vae_tiny  # seconds

The discriminator joins after gan.start_step steps of reconstruction + KL training (LDM's warm-up). The
trained autoencoder is exported as a diffusers AutoencoderKL folder, <workdir>/vae, with scaling_factor =
1 / std of its latents; a latent-diffusion config takes it as its vae.path.
"""
import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "vae"
  c.data = common.data(       # captions and labels are not read
      source="records",       # required: data.path
      name="",
      num_classes=0,
      resolution=64,
      crop="random",
      random_flip=True,
      num_threads=8)          # decode + resize
  c.vae = common.vae(in_channels=3, out_channels=3, block_out_channels=(64, 128, 256), layers_per_block=2,
                     norm_num_groups=32, sample_size=64)
  c.loss = common.vae_loss()
  c.gan = common.gan(
      enabled=True,
      start_step=5000,
      disc_channels=64,
      disc_layers=3)          # 64px -> 6x6 patch logits
  c.optim = common.optim(adafactor=False, lr=2e-4, warmup_steps=500, final_lr_fraction=0.1)
  c.train = common.train(denoiser=False, batch_size=32, num_steps=20000, ema_decay=0.999, log_every=100,
                         checkpoint_every=1000, sample_every=1000)
  c.sample = common.sample_reconstructions()
  c.export = common.export(scaling_batches=8)
  c.mesh = common.mesh()

  if arg == "tiny":
    common.tiny_run(c)
    c.data.resolution = 32
    c.vae.block_out_channels = (8, 8, 8)
    c.vae.layers_per_block = 1
    c.vae.norm_num_groups = 4
    c.vae.sample_size = 32
    c.vae.mid_block_add_attention = False
    c.gan.start_step = 2
    c.gan.disc_channels = 8
    c.gan.disc_layers = 2
    c.optim.lr = 3e-3
    c.sample.num_images = 4
    c.export.scaling_batches = 1
  elif arg:
    raise ValueError(f"configs/vae_folder.py: unknown variant {arg!r}; expected 'tiny' or nothing")
  return c.lock()
