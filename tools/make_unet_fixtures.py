"""Regenerate the U-Net fixtures under tests/fixtures/models/ from diffusers.

  pip install torch==2.13.0 diffusers && python tools/make_unet_fixtures.py

Tiny random `UNet2DConditionModel`s in the shapes sdjax supports, every parameter perturbed so norms,
biases and zero-initialised output convs are nontrivial, saved with `save_pretrained` (config.json +
diffusion_pytorch_model.safetensors) and reloaded; `reference.npz` holds inputs and outputs in NHWC:

  unet_sd1    SD 1.x: conv proj_in/proj_out, heads from attention_head_dim, layers_per_block 2,
              a 10x10 input whose sizes do not halve evenly (diffusers' forward_upsample_size path)
  unet_sd2    SD 2.x: use_linear_projection, per-block heads, upcast_attention
  unet_sdxl   SDXL: DownBlock2D first, text_time addition embedding, transformer_layers_per_block (1, 2)
  unet_class  class-conditional (num_class_embeds), pixel-space channels. (diffusers has no U-Net whose
              attention blocks are self-attention only, so sdjax's own small configs without
              cross_attention_dim have no diffusers twin; this one keeps a small context.)
"""
import os
import shutil

import numpy as np
import torch
from diffusers import UNet2DConditionModel

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "models")

BASE = dict(sample_size=8, in_channels=4, out_channels=4, norm_num_groups=4, layers_per_block=1)
CONFIGS = {
    "unet_sd1": dict(BASE, block_out_channels=(8, 16, 16), layers_per_block=2, attention_head_dim=2,
                     cross_attention_dim=12,
                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "unet_sd2": dict(BASE, block_out_channels=(8, 16, 24), attention_head_dim=(2, 4, 4), cross_attention_dim=16,
                     use_linear_projection=True, upcast_attention=True,
                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "unet_sdxl": dict(BASE, block_out_channels=(8, 16), layers_per_block=2, attention_head_dim=(2, 4),
                      cross_attention_dim=20, use_linear_projection=True, transformer_layers_per_block=(1, 2),
                      addition_embed_type="text_time", addition_time_embed_dim=4,
                      projection_class_embeddings_input_dim=10 + 6 * 4,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
    "unet_class": dict(BASE, in_channels=1, out_channels=1, block_out_channels=(8, 16), attention_head_dim=2,
                       cross_attention_dim=8, num_class_embeds=11,
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
}


def nhwc(a):
  return a.permute(0, 2, 3, 1).numpy()


def main():
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  for name, config in CONFIGS.items():
    folder = os.path.join(ROOT, name)
    shutil.rmtree(folder, ignore_errors=True)
    model = UNet2DConditionModel(**config).eval()
    with torch.no_grad():
      for p in model.parameters():
        p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    model = UNet2DConditionModel.from_pretrained(folder).eval()
    size = 10 if name == "unet_sd1" else 8
    b = 2
    x = torch.from_numpy(rng.standard_normal((b, config["in_channels"], size, size)).astype(np.float32))
    t = torch.tensor([3.0, 617.25])  # fractional timesteps, as Karras-sigma samplers produce
    ref = {"x": nhwc(x), "t": t.numpy()}
    kwargs = {}
    context = None
    if config["cross_attention_dim"] is not None:
      context = torch.from_numpy(rng.standard_normal((b, 5, config["cross_attention_dim"])).astype(np.float32))
      ref["context"] = context.numpy()
    if config.get("num_class_embeds"):
      labels = torch.tensor([3, 10])
      kwargs["class_labels"] = labels
      ref["class_labels"] = labels.numpy()
    if config.get("addition_embed_type") == "text_time":
      text = torch.from_numpy(rng.standard_normal((b, 10)).astype(np.float32))
      time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 512.0, 16.0, 8.0, 640.0, 480.0]])
      kwargs["added_cond_kwargs"] = {"text_embeds": text, "time_ids": time_ids}
      ref["text_embeds"], ref["time_ids"] = text.numpy(), time_ids.numpy()
    with torch.no_grad():
      out = model(x, t, encoder_hidden_states=context, **kwargs).sample
    ref["out"] = nhwc(out)
    np.savez_compressed(os.path.join(folder, "reference.npz"), **ref)
    size_kb = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 1024
    print(f"{name}: {sum(p.numel() for p in model.parameters())} params, {size_kb:.0f} KiB, "
          f"|out| max {float(out.abs().max()):.3f}")


if __name__ == "__main__":
  main()
