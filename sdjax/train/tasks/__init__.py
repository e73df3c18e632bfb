"""The built-in training tasks; importing this package registers them (sdjax.train.task.TASKS):

  diffusion  pixel-space class-conditional / unconditional U-Net (pixel.py; the default job)
  ldm        text-conditioned latent diffusion from a frozen VAE and text encoder(s), trained from scratch or
             fine-tuned from a diffusers checkpoint, fully or with LoRA (latent.py)
  vae        an AutoencoderKL: reconstruction + KL, optional patch-GAN (autoencoder.py)
"""
from sdjax.train.tasks import autoencoder, latent, pixel  # noqa: F401  (registration)
