"""Regenerate tests/fixtures/models/vae_*/: tiny diffusers AutoencoderKL models and their outputs.

  pip install torch==2.13.0 diffusers safetensors && python tools/make_vae_fixtures.py

Each folder holds what `AutoencoderKL.save_pretrained(..., safe_serialization=True)` writes
(`config.json`, `diffusion_pytorch_model.safetensors`) and `reference.npz` with, all float32 NHWC:
  image   [B, H, W, 3]       the encoder input, uniform in [-1, 1]
  mean    [B, h, w, C]       posterior mean (diffusers' `latent_dist.mean`)
  logvar  [B, h, w, C]       posterior logvar, clamped as diffusers does
  latent  [B, h, w, C]       a standard-normal latent
  decoded [B, H, W, 3]       `vae.decode(latent).sample`
The random initialisation is perturbed (every parameter gets noise) so norm scales and biases are not
1 and 0 and a mis-mapped parameter cannot hide. Seeded and single-threaded: reruns give identical files.
torch is needed only here.
"""
import os
import shutil

import numpy as np
import torch
from diffusers import AutoencoderKL

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "models")

CASES = {
    # SD 1.x/2.x layout: two levels, two resnets per encoder level, quant convs, mid attention.
    "vae_sd": dict(
        config=dict(block_out_channels=(8, 16), layers_per_block=2, norm_num_groups=4, latent_channels=4,
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                    sample_size=16, scaling_factor=0.18215),
        image_hw=(16, 12)),
    # SDXL layout: three levels (the real one has four), scaling factor 0.13025.
    "vae_sdxl": dict(
        config=dict(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4, latent_channels=4,
                    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                    sample_size=32, scaling_factor=0.13025, force_upcast=True),
        image_hw=(24, 16)),
    # SD3/Flux-style: shift_factor, no quant convs, more latent channels; also no mid-block attention.
    "vae_shift": dict(
        config=dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=8,
                    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                    sample_size=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                    use_post_quant_conv=False, mid_block_add_attention=False, force_upcast=False),
        image_hw=(16, 20)),
}
BATCH = 2


def nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().permute(0, 2, 3, 1).contiguous().numpy().astype(np.float32)


def make(name: str, case: dict, seed: int) -> None:
  torch.manual_seed(seed)
  vae = AutoencoderKL(**case["config"]).eval()
  gen = torch.Generator().manual_seed(seed + 1000)
  with torch.no_grad():
    for p in vae.parameters():
      # Norm scales / biases (1-D): O(0.2) noise around their init; weights: noise at half their own scale.
      scale = 0.2 if p.ndim == 1 else 0.5 * float(p.std())
      p.add_(scale * torch.randn(p.shape, generator=gen))
    h, w = case["image_hw"]
    image = torch.rand(BATCH, 3, h, w, generator=gen) * 2 - 1
    posterior = vae.encode(image).latent_dist
    f = 2 ** (len(case["config"]["block_out_channels"]) - 1)
    latent = torch.randn(BATCH, vae.config.latent_channels, h // f, w // f, generator=gen)
    decoded = vae.decode(latent).sample

  folder = os.path.join(OUT, name)
  shutil.rmtree(folder, ignore_errors=True)
  vae.save_pretrained(folder, safe_serialization=True)
  np.savez(os.path.join(folder, "reference.npz"), image=nhwc(image), mean=nhwc(posterior.mean),
           logvar=nhwc(posterior.logvar), latent=nhwc(latent), decoded=nhwc(decoded))
  size = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))
  print(f"{name}: {sum(p.numel() for p in vae.parameters())} parameters, {size / 1024:.0f} KiB")


def main():
  torch.set_num_threads(1)
  for seed, (name, case) in enumerate(CASES.items()):
    make(name, case, seed)


if __name__ == "__main__":
  main()
