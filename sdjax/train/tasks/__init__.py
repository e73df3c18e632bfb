"""The built-in training tasks. Importing this package imports every module in it, and each registers its task
(sdjax.train.task.register), so adding a task here is adding one file:

  diffusion  pixel-space class-conditional / unconditional U-Net (pixel.py; the default job)
  ldm        text-conditioned latent diffusion from a frozen VAE and text encoder(s), trained from scratch or
             fine-tuned from a diffusers checkpoint, fully or with LoRA (latent.py)
  vae        an AutoencoderKL: reconstruction + KL, optional patch-GAN (autoencoder.py)
  upscale    text-guided latent super-resolution with Stable Diffusion's x4-upscaler structure, exported as a
             diffusers StableDiffusionUpscalePipeline (upscale.py; subclasses ldm)
  controlnet a ControlNet next to a frozen Stable Diffusion (U-Net, VAE, text encoder), on control images derived
             from the training images (silhouettes, edges), exported as a diffusers ControlNetModel (controlnet.py;
             subclasses ldm)

diffusion.py holds what the two diffusion tasks share. Tasks outside sdjax register themselves when their
module is imported (e.g. by the config file that names them).
"""
import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
  importlib.import_module(f"{__name__}.{_info.name}")
