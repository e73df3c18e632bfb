"""Flax Linen models: the U-Net (SD 1.x / 2.x / SDXL and sdjax's small ones), the VAE and CLIP text encoders."""
from sdjax.models.clip import CLIPTextConfig, CLIPTextModel
from sdjax.models.unet import UNet, UNetConfig
from sdjax.models.vae import AutoencoderKL, VAEConfig

__all__ = ["AutoencoderKL", "CLIPTextConfig", "CLIPTextModel", "UNet", "UNetConfig", "VAEConfig"]
