"""Regenerate tests/fixtures/ip_adapter/ (IP-Adapter parity references) from diffusers 0.42.

  pip install torch==2.13.0 diffusers transformers && python tools/make_ip_adapter_fixtures.py

Tiny random IP-Adapter files in diffusers' format (safetensors, flat "image_proj.*" / "ip_adapter.*" keys; the
attention ids "1", "3", ... numbered by diffusers itself, over `unet.attn_processors` in order, skipping attn1 as
`_convert_ip_adapter_attn_to_diffusers` does), image embeddings 16 wide: the projection width of the tiny CLIP
vision tower tests/fixtures/clip_vision_tiny_tower (the image encoder). Every weight is random (LayerNorm scales
and biases too), so every part of the projection matters.

U-Net level (UNet2DConditionModel with `_load_ip_adapter_weights`, scales set by `set_ip_adapter_scale`):
  unet_sd1   tests/fixtures/models/unet_sd1 with two adapters (unet_sd1_a, unet_sd1_b), scales [0.6, 0.3]
  unet_sdxl  tests/fixtures/models/unet_sdxl with one adapter and a per-block scale SDXL_SCALE
  each: C.x / C.t / C.context / C.image_embeds_i (one [B, 1, 16] per adapter) / C.text_embeds / C.time_ids, the
  output C.out (NHWC) and C.out_plain, the same U-Net's output before the adapters were loaded.
Pipeline level (the tiny random pipelines of sdjax.convert.random, seed 0, `load_ip_adapter` from this folder,
image_encoder = clip_vision_tiny_tower, the CLIPImageProcessor load_ip_adapter creates; set_ip_adapter_scale(0.6),
for sd1's two adapters [0.6, 0.8] (diffusers 0.42 refuses one float for two adapters), 32x32, 4 steps, guidance 5,
given latents):
  sd1   StableDiffusionPipeline + DDIMScheduler, two adapters: pipe_sd1 (IP-Adapter) and pipe_sd1_plus (IP-Adapter
        Plus: a random Resampler of depth 4, 4 queries, width 16, 2 heads of 64, over the encoder's hidden states)
  sdxl  StableDiffusionXLPipeline + its EulerDiscreteScheduler, adapter pipe_sdxl
  each two calls, batch 1: `ip_adapter_image` = C.ip_image (uint8 [40, 52, 3], resize and crop both matter; sd1's
  Plus adapter: C.plus_ip_image [48, 36, 3]) -> C.out_image, with C.image_embeds_ref the embeddings diffusers'
  encode_image gave (Plus: C.plus_hidden_ref and, from zero pixels, C.plus_uncond_hidden_ref); and
  `ip_adapter_image_embeds` = [concat(C.negative_embeds, C.positive_embeds)] (random [1, 1, 16] each; Plus: random
  C.plus_negative_embeds / C.plus_positive_embeds [1, 1, 17, 32]) -> C.out_embeds. C.noise (NHWC), C.prompt,
  C.negative, C.out_* (NHWC in [-1, 1]), C.scheduler (JSON).
"""
import json
import os
import sys
import tempfile
import types

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.ip_adapter import IPAdapterMixin
from safetensors.torch import save_file
from transformers import CLIPVisionModelWithProjection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from sdjax.convert.random import write_random_pipeline  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
TOKENIZER = os.path.join(FIXTURES, "models", "tokenizer")
ENCODER = os.path.join(FIXTURES, "clip_vision_tiny_tower")
OUT = os.path.join(FIXTURES, "ip_adapter")
EMBED = 16  # the tiny image encoder's projection_dim
VISION_HIDDEN = 32  # its hidden size (IP-Adapter Plus's input width)
SIZE, STEPS, GUIDANCE, SCALE, PLUS_SCALE = 32, 4, 5.0, 0.6, 0.8
SDXL_SCALE = {"down": {"block_1": [0.0, 1.0]}, "mid": 0.8, "up": {"block_0": [0.5, 1.0, 0.25]}}


def random_adapter(unet, seed):
  """A diffusers-format IP-Adapter state dict for `unet`, keys numbered as diffusers' loader reads them."""
  g = torch.Generator().manual_seed(seed)
  rnd = lambda *shape, s=1.0: torch.randn(*shape, generator=g) * s
  c = unet.config.cross_attention_dim
  sd = {"image_proj.proj.weight": rnd(4 * c, EMBED, s=EMBED ** -0.5), "image_proj.proj.bias": rnd(4 * c, s=0.1),
        "image_proj.norm.weight": 1 + rnd(c, s=0.1), "image_proj.norm.bias": rnd(c, s=0.1)}
  key_id = 1
  for name in unet.attn_processors:
    if name.endswith("attn1.processor"):
      continue
    if name.startswith("mid_block"):
      hidden = unet.config.block_out_channels[-1]
    elif name.startswith("up_blocks"):
      hidden = list(reversed(unet.config.block_out_channels))[int(name[len("up_blocks.")])]
    else:
      hidden = unet.config.block_out_channels[int(name[len("down_blocks.")])]
    for k in ("to_k_ip", "to_v_ip"):
      sd[f"ip_adapter.{key_id}.{k}.weight"] = rnd(hidden, c, s=c ** -0.5)
    key_id += 2
  return {k: v.contiguous() for k, v in sd.items()}


def grouped(sd):
  return {g: {k[len(g) + 1:]: v for k, v in sd.items() if k.startswith(g + ".")} for g in ("image_proj", "ip_adapter")}


def nhwc(x):
  return np.asarray(x, np.float32).transpose(0, 2, 3, 1)


def unet_case(name, folder, n_adapters, scale, seed):
  unet = UNet2DConditionModel.from_pretrained(folder).eval()
  rng = np.random.default_rng(seed)
  b, cfg = 2, unet.config
  x = rng.standard_normal((b, cfg.in_channels, 8, 8)).astype(np.float32)
  t = np.asarray([10.0, 700.0], np.float32)
  context = rng.standard_normal((b, 5, cfg.cross_attention_dim)).astype(np.float32)
  embeds = [rng.standard_normal((b, 1, EMBED)).astype(np.float32) for _ in range(n_adapters)]
  added = {}
  out = {f"{name}.x": nhwc(x), f"{name}.t": t, f"{name}.context": context}
  if cfg.addition_embed_type == "text_time":
    text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    text_embeds = rng.standard_normal((b, text)).astype(np.float32)
    time_ids = np.asarray([[32, 32, 0, 0, 32, 32], [40, 24, 2, 1, 32, 32]], np.float32)
    added.update(text_embeds=torch.from_numpy(text_embeds), time_ids=torch.from_numpy(time_ids))
    out.update({f"{name}.text_embeds": text_embeds, f"{name}.time_ids": time_ids})
  run = lambda cond: unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context),
                          added_cond_kwargs=cond).sample
  with torch.no_grad():
    plain = run(dict(added))  # before the adapters are loaded
  files = []
  for i in range(n_adapters):
    sd = random_adapter(unet, seed + i)
    fname = f"{name}_{'ab'[i]}.safetensors" if n_adapters > 1 else f"{name}.safetensors"
    save_file(sd, os.path.join(OUT, fname))
    files.append(grouped(sd))
  unet._load_ip_adapter_weights(files)
  IPAdapterMixin.set_ip_adapter_scale(types.SimpleNamespace(unet=unet), scale)
  with torch.no_grad():
    y = run({**added, "image_embeds": [torch.from_numpy(e) for e in embeds]})
  for i, e in enumerate(embeds):
    out[f"{name}.image_embeds_{i}"] = e
  out[f"{name}.out"] = nhwc(y)
  out[f"{name}.out_plain"] = nhwc(plain)
  print(f"{name}: {n_adapters} adapter(s), out std {float(y.std()):.3f}, max change by the adapters "
        f"{float((y - plain).abs().max()):.3f}")
  return out


def scheduler_config(scheduler):
  config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
  return {"_class_name": type(scheduler).__name__, **config}


def random_plus_adapter(unet, seed, depth=4, queries=4, hidden=16, heads=2, ff=64):
  """A random IP-Adapter Plus file (the original Resampler's keys, which diffusers' loader converts) over the
  image encoder's hidden states (width VISION_HIDDEN); diffusers fixes depth 4 and 64-channel heads."""
  base = random_adapter(unet, seed + 50)  # to_k_ip / to_v_ip unlike the other adapter's
  g = torch.Generator().manual_seed(seed + 100)
  rnd = lambda *shape, s=1.0: torch.randn(*shape, generator=g) * s
  c, inner = unet.config.cross_attention_dim, 64 * heads
  sd = {k: v for k, v in base.items() if k.startswith("ip_adapter.")}
  sd.update({"image_proj.latents": rnd(1, queries, hidden, s=hidden ** -0.5),
             "image_proj.proj_in.weight": rnd(hidden, VISION_HIDDEN, s=VISION_HIDDEN ** -0.5),
             "image_proj.proj_in.bias": rnd(hidden, s=0.1),
             "image_proj.proj_out.weight": rnd(c, hidden, s=hidden ** -0.5),
             "image_proj.proj_out.bias": rnd(c, s=0.1), "image_proj.norm_out.weight": 1 + rnd(c, s=0.1),
             "image_proj.norm_out.bias": rnd(c, s=0.1)})
  for i in range(depth):
    p = f"image_proj.layers.{i}"
    for n in ("0.norm1", "0.norm2", "1.0"):
      sd[f"{p}.{n}.weight"], sd[f"{p}.{n}.bias"] = 1 + rnd(hidden, s=0.1), rnd(hidden, s=0.1)
    sd.update({f"{p}.0.to_q.weight": rnd(inner, hidden, s=hidden ** -0.5),
               f"{p}.0.to_kv.weight": rnd(2 * inner, hidden, s=hidden ** -0.5),
               f"{p}.0.to_out.weight": rnd(hidden, inner, s=inner ** -0.5),
               f"{p}.1.1.weight": rnd(ff, hidden, s=hidden ** -0.5), f"{p}.1.3.weight": rnd(hidden, ff, s=ff ** -0.5)})
  return {k: v.contiguous() for k, v in sd.items()}


def pipeline_case(name, tmp, seed, plus=False):
  folder = os.path.join(tmp, name)
  write_random_pipeline(folder, name, tokenizer=TOKENIZER, seed=0)
  encoder = CLIPVisionModelWithProjection.from_pretrained(ENCODER).eval()
  cls = StableDiffusionXLPipeline if name == "sdxl" else StableDiffusionPipeline
  extra = {} if name == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
  pipe = cls.from_pretrained(folder, image_encoder=encoder, local_files_only=True, **extra)
  if name == "sd1":
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
  pipe.set_progress_bar_config(disable=True)
  fnames = [f"pipe_{name}.safetensors"]
  save_file(random_adapter(pipe.unet, seed), os.path.join(OUT, fnames[0]))
  if plus:
    fnames.append(f"pipe_{name}_plus.safetensors")
    save_file(random_plus_adapter(pipe.unet, seed), os.path.join(OUT, fnames[1]))
  pipe.load_ip_adapter(OUT, subfolder="", weight_name=fnames, image_encoder_folder=None, local_files_only=True)
  pipe.set_ip_adapter_scale([SCALE, PLUS_SCALE] if plus else SCALE)
  print(f"{name}: adapters {[type(p).__name__ for p in pipe.unet.encoder_hid_proj.image_projection_layers]}, "
        f"feature extractor {type(pipe.feature_extractor).__name__} size {pipe.feature_extractor.size} "
        f"crop {pipe.feature_extractor.crop_size}")
  rng = np.random.default_rng(seed)
  latent = SIZE // pipe.vae_scale_factor
  noise = rng.standard_normal((1, pipe.unet.config.in_channels, latent, latent)).astype(np.float32)
  image = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
  negative, positive = (rng.standard_normal((1, 1, EMBED)).astype(np.float32) for _ in range(2))
  prompt, negative_prompt = "a photo of a cat", "blurry"
  common = dict(prompt=prompt, negative_prompt=negative_prompt, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                guidance_scale=GUIDANCE, output_type="np")
  out = {}
  images = [PIL.Image.fromarray(image)]
  embeds = [torch.from_numpy(np.concatenate([negative, positive]))]
  with torch.no_grad():
    embeds_ref, _ = pipe.encode_image(images[0], "cpu", 1)
    if plus:
      plus_image = rng.integers(0, 256, (48, 36, 3), dtype=np.uint8)
      plus_neg, plus_pos = (rng.standard_normal((1, 1, 1 + 16, VISION_HIDDEN)).astype(np.float32) for _ in range(2))
      hidden, uncond_hidden = pipe.encode_image(PIL.Image.fromarray(plus_image), "cpu", 1, output_hidden_states=True)
      images.append(PIL.Image.fromarray(plus_image))
      embeds.append(torch.from_numpy(np.concatenate([plus_neg, plus_pos])))
      out.update({f"{name}.plus_ip_image": plus_image, f"{name}.plus_hidden_ref": hidden.numpy(),
                  f"{name}.plus_uncond_hidden_ref": uncond_hidden.numpy(), f"{name}.plus_negative_embeds": plus_neg,
                  f"{name}.plus_positive_embeds": plus_pos})
    out_image = pipe(ip_adapter_image=images if plus else images[0], latents=torch.from_numpy(noise), **common).images
    out_embeds = pipe(ip_adapter_image_embeds=embeds, latents=torch.from_numpy(noise), **common).images
  to_pm1 = lambda a: np.asarray(a, np.float32) * 2 - 1
  print(f"{name}: images {out_image.shape}, image-path vs embeds-path max diff "
        f"{np.abs(out_image - out_embeds).max():.3f}")
  out.update({f"{name}.noise": nhwc(noise), f"{name}.ip_image": image, f"{name}.image_embeds_ref": embeds_ref.numpy(),
              f"{name}.negative_embeds": negative, f"{name}.positive_embeds": positive, f"{name}.prompt": prompt,
              f"{name}.negative": negative_prompt, f"{name}.out_image": to_pm1(out_image),
              f"{name}.out_embeds": to_pm1(out_embeds),
              f"{name}.scheduler": np.asarray(json.dumps(scheduler_config(pipe.scheduler)))})
  return out


def main():
  torch.manual_seed(0)
  os.makedirs(OUT, exist_ok=True)
  out = {}
  out.update(unet_case("unet_sd1", os.path.join(FIXTURES, "models", "unet_sd1"), 2, [0.6, 0.3], seed=1))
  out.update(unet_case("unet_sdxl", os.path.join(FIXTURES, "models", "unet_sdxl"), 1, SDXL_SCALE, seed=3))
  out["unet_sdxl.scale"] = np.asarray(json.dumps(SDXL_SCALE))
  with tempfile.TemporaryDirectory() as tmp:
    out.update(pipeline_case("sd1", tmp, seed=5, plus=True))
    out.update(pipeline_case("sdxl", tmp, seed=6))
  path = os.path.join(OUT, "reference.npz")
  np.savez_compressed(path, **out)
  total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
  print(f"wrote {OUT}: {sorted(os.listdir(OUT))}, {total / 1024:.0f} KiB")


if __name__ == "__main__":
  main()
