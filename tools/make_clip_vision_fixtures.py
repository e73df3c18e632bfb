"""Regenerate the CLIP vision / CLIP score fixtures under tests/fixtures/ from transformers.

  pip install torch==2.13.0 transformers && python tools/make_clip_vision_fixtures.py

Writes, deterministically, two tiny random transformers `CLIPModel` folders (config.json, model.safetensors,
saved with `save_pretrained`) and a `reference.npz` each:

  clip_vision_tiny       OpenAI-CLIP style: quick_gelu in both towers, legacy text eos_token_id 2 (pooled at
                         argmax(input_ids)), text padded with EOS
  clip_vision_tiny_gelu  OpenCLIP-ViT-H style: gelu in both towers, eos_token_id = the tokenizer's EOS id

The seeds are chosen so that clip_vision_tiny's pair scores are all negative (its CLIP score is the clamp's 0)
and clip_vision_tiny_gelu's have mixed signs with a positive mean (4.21), which tells torchmetrics' clamp of the
mean from a per-pair clamp (7.22).

Both: vision hidden 32, 2 layers, 4 heads, image_size 32, patch_size 8 (16 patches + CLS), projection_dim 16;
text hidden 32, 2 layers, 4 heads, 16 positions, the tiny tokenizer of tests/fixtures/models/tokenizer (written
by tools/make_clip_fixtures.py). Weights are perturbed so LayerNorms, biases and the class embedding are
nontrivial. `clip_vision_tiny_tower/` holds the vision tower of `clip_vision_tiny` alone, saved as a
`CLIPVisionModelWithProjection` folder (as an IP-Adapter `image_encoder/`).

reference.npz: `images` uint8 [4, 45, 37, 3] (odd, portrait: resize and crop both matter), `pixel_values`
[4, 32, 32, 3] NHWC from transformers' PIL-backend `CLIPImageProcessorPil` (what torchmetrics' processor call does
without torchvision; the CLIP mean/std, shortest edge and crop 32), `prompts`, `input_ids`/`attention_mask`
padded to the longest caption (torchmetrics' `padding=True`), `input_ids_max_length` (padded to 16, as
sdjax.models.clip.tokenize), `last_hidden_state` and `image_embeds` of the vision tower, `text_embeds`
(`get_text_features` with the attention mask), `scores` = 100 * cos per pair and `clip_score` = max(mean, 0).
torchmetrics is not installed in the fixture environment: its `_clip_score_update` and `CLIPScore.compute` are
computed here in torch line for line (normalise both embeddings by their L2 norm, 100 * sum of products, clamp
the mean at 0). Every folder is reloaded with `from_pretrained` and the references computed from the reloaded
model. torch/transformers are needed only here.
"""
import os
import shutil

import numpy as np
import torch
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig,
                          CLIPVisionModelWithProjection)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures")
TOKENIZER = os.path.join(ROOT, "models", "tokenizer")
IMAGE_SIZE, MAX_LEN = 32, 16
PROMPTS = ["a photograph of an astronaut riding a horse", "a red fox sleeping under a tree",
           "a cozy cabin at night", "an owl on a branch, ink drawing"]


def make_images(seed: int) -> np.ndarray:
  """Four 45x37 uint8 RGB images: smooth random fields plus noise, one flat, so clipping and edges are exercised."""
  rng = np.random.default_rng(seed)
  h, w = 45, 37
  yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
  out = []
  for i in range(4):
    phase = rng.uniform(0, 2 * np.pi, 3)
    base = 127.5 + 127.5 * np.sin(2 * np.pi * (i + 1) * (xx[..., None] + yy[..., None] * phase / 3) + phase)
    out.append(base + rng.normal(0, 25 * i, (h, w, 3)))
  out[3][:] = 200.0
  return np.clip(np.round(np.stack(out)), 0, 255).astype(np.uint8)


def perturb(model: torch.nn.Module, seed: int) -> None:
  """Weights ~ N(0, 1/fan_in), biases and LayerNorm offsets ~ 0.1 N(0, 1), LayerNorm scales ~ 1 + 0.2 N(0, 1),
  embeddings (class, patch positions, tokens) ~ 0.5 N(0, 1); logit_scale is left at its initial value."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      if p.ndim == 0:
        continue
      z = torch.randn(p.shape, generator=gen)
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * z)
      elif name.endswith("bias") or "norm" in name:
        p.copy_(0.1 * z)
      elif "embedding" in name and "patch_embedding" not in name:
        p.copy_(0.5 * z)
      else:
        p.copy_(z / p[0].numel() ** 0.5)


def features(out) -> torch.Tensor:
  """get_*_features returns a tensor (transformers 4) or an output whose pooler_output is projected (5)."""
  return out if isinstance(out, torch.Tensor) else out.pooler_output


def make_model(name: str, *, act: str, eos_token_id: int, bos_token_id: int, seed: int, tokenizer,
               images: np.ndarray) -> CLIPModel:
  folder = os.path.join(ROOT, name)
  shutil.rmtree(folder, ignore_errors=True)
  text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=MAX_LEN, hidden_act=act,
                        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=1, projection_dim=16)
  vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=IMAGE_SIZE, patch_size=8, hidden_act=act, projection_dim=16)
  torch.manual_seed(seed)
  model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)).eval()
  perturb(model, seed)
  model.save_pretrained(folder, safe_serialization=True)
  loaded = CLIPModel.from_pretrained(folder, local_files_only=True).eval()

  processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                    crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
  pixel_values = processor(images=[torch.from_numpy(i).permute(2, 0, 1) for i in images],
                           return_tensors="pt")["pixel_values"]  # [B, 3, S, S], as torchmetrics passes CHW tensors
  enc = tokenizer(PROMPTS, padding=True, return_tensors="pt")  # torchmetrics' processor call: pad to longest
  assert enc["input_ids"].shape[1] <= MAX_LEN, "captions must fit the tiny text tower (no truncation case)"
  ids_max = tokenizer(PROMPTS, padding="max_length", max_length=MAX_LEN, truncation=True,
                      return_tensors="np")["input_ids"]
  with torch.no_grad():
    vision_out = loaded.vision_model(pixel_values=pixel_values)
    # torchmetrics' _clip_score_update, line for line
    img_features = features(loaded.get_image_features(pixel_values))
    img_features = img_features / img_features.norm(p=2, dim=-1, keepdim=True)
    txt_features = features(loaded.get_text_features(enc["input_ids"], enc["attention_mask"]))
    txt_features = txt_features / txt_features.norm(p=2, dim=-1, keepdim=True)
    score = 100 * (img_features * txt_features).sum(axis=-1)
    # CLIPScore.update / compute
    total, n = score.sum(0), len(PROMPTS)
    clip_score = torch.max(total / n, torch.zeros_like(total))
    image_embeds = features(loaded.get_image_features(pixel_values))
    text_embeds = features(loaded.get_text_features(enc["input_ids"], enc["attention_mask"]))
    check = features(model.get_image_features(pixel_values))
  np.testing.assert_array_equal(image_embeds.numpy(), check.numpy(), err_msg=f"{name}: reloaded model differs")
  np.savez(os.path.join(folder, "reference.npz"), images=images,
           pixel_values=pixel_values.permute(0, 2, 3, 1).numpy(), prompts=np.array(PROMPTS),
           input_ids=enc["input_ids"].numpy().astype(np.int32),
           attention_mask=enc["attention_mask"].numpy().astype(np.int32),
           input_ids_max_length=ids_max.astype(np.int32),
           last_hidden_state=vision_out.last_hidden_state.numpy(), image_embeds=image_embeds.numpy(),
           text_embeds=text_embeds.numpy(), scores=score.numpy(), clip_score=clip_score.numpy())
  size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
  print(f"{name}: {size / 1024:.0f} KiB, scores {np.round(score.numpy(), 3)}, clip score {float(clip_score):.4f}")
  return loaded


def save_vision_tower(model: CLIPModel, name: str) -> None:
  """The vision half of `model` as a CLIPVisionModelWithProjection folder; checked to give the same embeds."""
  folder = os.path.join(ROOT, name)
  shutil.rmtree(folder, ignore_errors=True)
  tower = CLIPVisionModelWithProjection(model.config.vision_config).eval()
  state = {k: v for k, v in model.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))}
  missing, unexpected = tower.load_state_dict(state, strict=False)
  assert not unexpected and not [k for k in missing if not k.endswith("position_ids")], (missing, unexpected)
  tower.save_pretrained(folder, safe_serialization=True)
  loaded = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True).eval()
  x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    np.testing.assert_array_equal(loaded(pixel_values=x).image_embeds.numpy(),
                                  features(model.get_image_features(x)).numpy())
  size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
  print(f"{name}: {size / 1024:.0f} KiB")


def main():
  tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER, local_files_only=True)
  eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
  images = make_images(0)
  quick = make_model("clip_vision_tiny", act="quick_gelu", eos_token_id=2, bos_token_id=0, seed=11,
                     tokenizer=tokenizer, images=images)
  make_model("clip_vision_tiny_gelu", act="gelu", eos_token_id=eos, bos_token_id=bos, seed=17,
             tokenizer=tokenizer, images=images)
  save_vision_tower(quick, "clip_vision_tiny_tower")


if __name__ == "__main__":
  main()
