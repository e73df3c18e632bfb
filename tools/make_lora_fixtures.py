"""Regenerate tests/fixtures/lora/ from diffusers + peft (the reference LoRA writer and runtime).

  pip install torch==2.13.0 diffusers peft && python tools/make_lora_fixtures.py

Adds a peft LoRA (rank 2, lora_alpha 3, so scale 1.5 != 1) to the key and output projections of self- and
cross-attention (to_k sees the text width, to_out.0 tests the name mapping) of the tiny SD 1.x U-Net in
tests/fixtures/models/unet_sd1, sets every LoRA factor to random non-zero values, and writes (~30 KiB):

  pytorch_lora_weights.safetensors   with diffusers' own `StableDiffusionPipeline.save_lora_weights`
                                     (keys unet.<module>.lora_A/B.weight, alpha in lora_adapter_metadata)
  reference.npz                      x, t, context (NHWC inputs) and `out`, the LoRA U-Net's output (NHWC),
                                     after reloading the file with `load_lora_weights`' own code path
"""
import os
import shutil

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures")
UNET = os.path.join(FIXTURES, "models", "unet_sd1")
OUT = os.path.join(FIXTURES, "lora")


def nhwc(a):
  return a.permute(0, 2, 3, 1).numpy()


def main():
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  shutil.rmtree(OUT, ignore_errors=True)
  unet = UNet2DConditionModel.from_pretrained(UNET).eval()
  unet.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=["to_k", "to_out.0"],
                              init_lora_weights="gaussian"))
  with torch.no_grad():
    for name, p in unet.named_parameters():
      if "lora_" in name:
        p.copy_(0.3 * torch.randn_like(p))
  StableDiffusionPipeline.save_lora_weights(OUT, unet_lora_layers=get_peft_model_state_dict(unet),
                                            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())

  # Reload as pipe.load_lora_weights(OUT) does, into a fresh U-Net, and record its output.
  unet = UNet2DConditionModel.from_pretrained(UNET).eval()
  state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(OUT, return_lora_metadata=True)
  StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, metadata=metadata)
  x = torch.from_numpy(rng.standard_normal((2, 4, 8, 8)).astype(np.float32))
  t = torch.tensor([3.0, 617.25])
  context = torch.from_numpy(rng.standard_normal((2, 5, 12)).astype(np.float32))
  with torch.no_grad():
    out = unet(x, t, encoder_hidden_states=context).sample
    unet.disable_adapters()
    base = unet(x, t, encoder_hidden_states=context).sample
  np.savez_compressed(os.path.join(OUT, "reference.npz"), x=nhwc(x), t=t.numpy(), context=context.numpy(),
                      out=nhwc(out))
  size_kb = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT)) / 1024
  print(f"{len(state)} LoRA tensors, {size_kb:.0f} KiB; |out| max {float(out.abs().max()):.3f}, "
        f"LoRA changes it by up to {float((out - base).abs().max()):.3f}")


if __name__ == "__main__":
  main()
