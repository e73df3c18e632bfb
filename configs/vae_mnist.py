"""An AutoencoderKL (Stable Diffusion's VAE) on the bundled MNIST digits, resized to 32x32 -> 8x8x4 latents.

  python train.py --config configs/vae_mnist.py --workdir runs/vae_mnist        # a few minutes on a CPU
  python train.py --config configs/vae_mnist.py:tiny --workdir runs/vae_tiny   # seconds, for tests
  python train.py --config configs/vae_mnist.py --config.gan.enabled=True --config.gan.start_step=1000

The trained autoencoder is exported as a diffusers AutoencoderKL folder, runs/vae_mnist/vae, with
scaling_factor = 1 / std of its latents; a latent-diffusion config takes it as its vae.path.
"""
import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "vae"
  c.data = common.data(       # labels are not read
      resolution=32)          # resize the 28x28 digits so that the VAE's downsamples divide them
  c.vae = common.vae()
  c.loss = common.vae_loss()
  c.gan = common.gan()        # off here: the digits reconstruct sharply without it
  c.optim = common.optim(adafactor=False, lr=1e-3)
  c.train = common.train(denoiser=False, num_steps=2000, ema_decay=0.999, checkpoint_every=500, sample_every=500)
  c.sample = common.sample_reconstructions()
  c.export = common.export()
  c.mesh = common.mesh()

  if arg == "tiny":
    common.tiny_run(c)
    c.vae.block_out_channels = (8, 8, 8)
    c.vae.norm_num_groups = 4
    c.vae.mid_block_add_attention = False
    c.gan.disc_channels = 8
    c.optim.lr = 3e-3
    c.sample.num_images = 4
    c.export.scaling_batches = 1
  elif arg:
    raise ValueError(f"configs/vae_mnist.py: unknown variant {arg!r}; expected 'tiny' or nothing")
  return c.lock()
