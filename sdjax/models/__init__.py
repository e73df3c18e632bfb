"""Flax Linen models: U-Net and the layers it is built from."""
from sdjax.models.unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig"]
