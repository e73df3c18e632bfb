"""Regenerate tests/fixtures/lora_fusion/ from diffusers 0.42 (the reference for sdjax.lora_loading).

  pip install torch==2.13.0 diffusers transformers peft && python tools/make_lora_fusion_fixtures.py

Builds a StableDiffusionPipeline from the tiny random SD 1.x components in tests/fixtures/models (unet_sd1,
clip_sd1, vae_sd, tokenizer) and writes two random LoRAs for it:

  diffusers.safetensors  diffusers/peft format via `save_lora_weights`: U-Net to_q/to_k/to_v/to_out.0 of every
                         attention (rank 2, lora_alpha 3) and text encoder q_proj/v_proj/out_proj (rank 2,
                         lora_alpha 1), alphas in the lora_adapter_metadata JSON
  kohya.safetensors      kohya/A1111 keys written by hand (lora_unet_..., lora_te_text_model_..., .lora_down,
                         .lora_up, .alpha): rank 3, U-Net attn2 to_k/to_v (overlapping the other LoRA),
                         ff.net.0.proj, proj_in (1x1 conv), a LoCon 3x3 conv (down_blocks.0.resnets.0.conv1), text
                         encoder mlp.fc1 and one mlp.fc2; alpha 1.5 (network_alpha), 0.75 for the convolutions
                         (conv_alpha), as kohya's LoCon writes them. No text-encoder self_attn layers: diffusers 0.42
                         with transformers 5 drops kohya self_attn LoRAs (renamed to_q_lora..., reported UNEXPECTED),
                         so tests/test_lora_loading.py checks those names against diffusers-format ones instead.
                         Nor per-layer alphas otherwise: diffusers 0.42 fused some of them with the most common alpha.

loads both with `pipe.load_lora_weights(f, adapter_name=...)`, `set_adapters(["a", "b"], adapter_weights=[0.7,
0.4])`, `fuse_lora()`, and saves reference.npz (~120 KiB in all): x, t, context (U-Net inputs, NHWC), unet (the fused
U-Net's output, NHWC), unet_base (without LoRAs), ids, text (the fused text encoder's last hidden state),
text_base. It checks that fused and unfused adapter outputs agree.
"""
import os
import shutil

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "tests", "fixtures", "models")
OUT = os.path.join(ROOT, "tests", "fixtures", "lora_fusion")
SCALES = (0.7, 0.4)


def nhwc(a):
  return a.permute(0, 2, 3, 1).numpy()


def pipeline():
  return StableDiffusionPipeline(
      vae=AutoencoderKL.from_pretrained(os.path.join(MODELS, "vae_sd")),
      text_encoder=CLIPTextModel.from_pretrained(os.path.join(MODELS, "clip_sd1")),
      tokenizer=CLIPTokenizer.from_pretrained(os.path.join(MODELS, "tokenizer")),
      unet=UNet2DConditionModel.from_pretrained(os.path.join(MODELS, "unet_sd1")), scheduler=DDIMScheduler(),
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def linears(model, suffixes):
  return {n: m for n, m in model.named_modules() if n.endswith(suffixes) and isinstance(m, (torch.nn.Linear,
                                                                                          torch.nn.Conv2d))}


def diffusers_lora(pipe, gen):
  def factors(modules, r):
    out = {}
    for name, m in modules.items():
      out[f"{name}.lora_A.weight"] = 0.3 * torch.randn(r, m.in_features, generator=gen)
      out[f"{name}.lora_B.weight"] = 0.3 * torch.randn(m.out_features, r, generator=gen)
    return out
  unet_mods = linears(pipe.unet, ("to_q", "to_k", "to_v", "to_out.0"))
  te_mods = linears(pipe.text_encoder, ("q_proj", "v_proj", "out_proj"))
  StableDiffusionPipeline.save_lora_weights(
      OUT, unet_lora_layers=factors(unet_mods, 2),
      text_encoder_lora_layers={"text_model." + k: v for k, v in factors(te_mods, 2).items()},  # transformers 4 names
      weight_name="diffusers.safetensors",
      unet_lora_adapter_metadata={"r": 2, "lora_alpha": 3, "target_modules": sorted(unet_mods)},
      text_encoder_lora_adapter_metadata={"r": 2, "lora_alpha": 1, "target_modules": sorted(te_mods)})
  return os.path.join(OUT, "diffusers.safetensors")


def kohya_lora(pipe, gen, r=3):
  out = {}
  groups = [("lora_unet_", linears(pipe.unet, ("attn2.to_k", "attn2.to_v", "ff.net.0.proj", "proj_in",
                                               "down_blocks.0.resnets.0.conv1"))),
            ("lora_te_", linears(pipe.text_encoder, ("mlp.fc1", "layers.2.mlp.fc2")))]
  for prefix, modules in groups:
    for name, m in sorted(modules.items()):
      key = prefix + ("text_model." * (prefix == "lora_te_") + name).replace(".", "_")  # kohya names (transformers 4)
      if isinstance(m, torch.nn.Conv2d):
        down = torch.randn(r, m.in_channels, *m.kernel_size, generator=gen)
        up = torch.randn(m.out_channels, r, 1, 1, generator=gen)
      else:
        down, up = torch.randn(r, m.in_features, generator=gen), torch.randn(m.out_features, r, generator=gen)
      out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = 0.3 * down, 0.3 * up
      out[f"{key}.alpha"] = torch.tensor(0.75 if isinstance(m, torch.nn.Conv2d) else 1.5)
  path = os.path.join(OUT, "kohya.safetensors")
  save_file({k: v.contiguous() for k, v in out.items()}, path)
  return path


def run(pipe, x, t, context, ids):
  with torch.no_grad():
    return pipe.unet(x, t, encoder_hidden_states=context).sample, pipe.text_encoder(ids).last_hidden_state


def main():
  torch.manual_seed(0)
  gen = torch.Generator().manual_seed(0)
  rng = np.random.default_rng(0)
  shutil.rmtree(OUT, ignore_errors=True)
  os.makedirs(OUT)
  pipe = pipeline()
  files = diffusers_lora(pipe, gen), kohya_lora(pipe, gen)
  x = torch.from_numpy(rng.standard_normal((2, 4, 8, 8)).astype(np.float32))
  t = torch.tensor([3.0, 617.25])
  context = torch.from_numpy(rng.standard_normal((2, 5, 12)).astype(np.float32))
  ids = torch.from_numpy(rng.integers(0, 1000, (2, 16)))
  unet_base, text_base = run(pipe, x, t, context, ids)
  for name, f in zip("ab", files):
    pipe.load_lora_weights(f, adapter_name=name)
  pipe.set_adapters(["a", "b"], adapter_weights=list(SCALES))
  unet_active, text_active = run(pipe, x, t, context, ids)
  pipe.fuse_lora(adapter_names=["a", "b"])
  pipe.unload_lora_weights()  # fused weights stay
  unet, text = run(pipe, x, t, context, ids)
  for a, b, what in ((unet, unet_active, "unet"), (text, text_active, "text")):
    err = float((a - b).abs().max() / b.abs().max())
    print(f"{what}: fused vs active adapters rel err {err:.2e}")
    assert err < 1e-5, what
  np.savez_compressed(os.path.join(OUT, "reference.npz"), x=nhwc(x), t=t.numpy(), context=context.numpy(),
                      unet=nhwc(unet), unet_base=nhwc(unet_base), ids=ids.numpy().astype(np.int32),
                      text=text.numpy(), text_base=text_base.numpy(), scales=np.asarray(SCALES))
  size_kb = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT)) / 1024
  print(f"{size_kb:.0f} KiB; LoRAs change the U-Net output by up to {float((unet - unet_base).abs().max()):.3f} "
        f"(|out| max {float(unet.abs().max()):.3f}), the text states by up to "
        f"{float((text - text_base).abs().max()):.3f} (|text| max {float(text.abs().max()):.3f})")


if __name__ == "__main__":
  main()
