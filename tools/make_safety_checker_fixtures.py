"""Regenerate tests/fixtures/safety_checker/ from diffusers' StableDiffusionSafetyChecker.

  pip install torch==2.13.0 diffusers==0.42.1 transformers && python tools/make_safety_checker_fixtures.py

Writes, deterministically, a minimal pipeline folder holding only what the safety checker needs:
  model_index.json     safety_checker + feature_extractor entries (as StableDiffusionPipeline's)
  safety_checker/      a tiny random StableDiffusionSafetyChecker (save_pretrained: config.json, model.safetensors);
                       vision tower hidden 32, 2 layers, 4 heads, quick_gelu (as SD's ViT-L/14 checker), image_size
                       16, patch 4 (16 patches + CLS), projection_dim 16
  feature_extractor/   transformers' PIL-backend CLIPImageProcessor, shortest edge 16, crop 16 (OpenAI mean/std)
  reference.npz        inputs and diffusers' outputs, see below

The concept embeddings and thresholds are set from the images' own embeddings, so that every branch of diffusers'
score loop is taken: for target image t the embedding v_t is e_t's component orthogonal to every other image's
embedding (so it scores ~0 on the others), and its threshold is placed relative to cos(e_t, v_t):
  square[0]  concept 0 above its threshold by 0.05                               -> flagged
  square[1]  special-care concept 0 above (+0.05); concept 1 below by 0.004,
             lifted over by the 0.01 special-care adjustment                     -> flagged
  square[2]  concept 2 below by 0.004, no special care                           -> not flagged
  square[3]  special-care concept 1 above, no concept near its threshold         -> not flagged (special care only)
  square[4]  nothing near a threshold                                            -> not flagged
  wide[0]    concept 3 above by 0.05                                             -> flagged
  wide[1]    concept 4 above by 0.0003, which rounds to 0.0 (diffusers compares round(score, 3) > 0)
                                                                                 -> not flagged
  wide[2]    nothing                                                             -> not flagged
The other concepts get random embeddings and thresholds 0.02..0.2 above every image's similarity.

reference.npz: `square` float32 [5, 32, 32, 3] and `wide` [3, 24, 40, 3] images in [-1, 1] (NHWC; what a VAE
decodes; `wide` makes the resize and the crop matter); for each batch X: `X_pixel_values` [B, 16, 16, 3] (the
feature extractor's output in diffusers' `run_safety_checker`: postprocess to PIL, then the processor),
`X_has_nsfw` [B] bool and `X_images_out` (the images diffusers' `run_safety_checker` returns: flagged ones zeroed,
NHWC), and, read from the locals of diffusers' `forward` when it returns, `X_cos` [B, 17] / `X_special_cos` [B, 3]
(its `cos_dist` / `special_cos_dist`) and `X_concept_scores` / `X_special_scores` (the rounded values of its
`result_img` dicts). Every output comes from the folder reloaded with `from_pretrained`. torch is needed only here.
"""
import json
import os
import shutil
import sys
import types

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion import safety_checker as sc_module
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_clip_vision_fixtures import perturb  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                    "safety_checker")
SIZE, PROJ = 16, 16


def make_images(seed: int, n: int, h: int, w: int) -> np.ndarray:
  """n float32 NHWC images in [-1, 1]: smooth random waves plus noise, a little beyond [-1, 1] in places (VAE
  outputs are not clipped before diffusers' postprocess clamps them)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
  out = []
  for i in range(n):
    f = rng.uniform(0.5, 3.0, (2, 3))
    phase = rng.uniform(0, 2 * np.pi, 3)
    base = np.sin(2 * np.pi * (f[0] * xx[..., None] + f[1] * yy[..., None]) + phase)
    out.append(1.05 * base * rng.uniform(0.3, 1.0) + rng.normal(0, 0.1 * (i % 3), (h, w, 3)))
  return np.clip(np.stack(out), -1.1, 1.1).astype(np.float32)


class ForwardLocals:
  """Records the locals of diffusers' StableDiffusionSafetyChecker.forward when it returns (sys.setprofile)."""

  def __init__(self):
    self.seen = []

  def __enter__(self):
    def hook(frame, event, arg):
      if event == "return" and frame.f_code.co_name == "forward" and frame.f_code.co_filename == sc_module.__file__:
        self.seen.append(dict(frame.f_locals))
    sys.setprofile(hook)
    return self

  def __exit__(self, *exc):
    sys.setprofile(None)


def run_pipeline_checker(checker, processor, images_nhwc: np.ndarray):
  """diffusers' StableDiffusionPipeline.run_safety_checker on a stand-in pipeline object (the method only uses
  safety_checker, feature_extractor and image_processor)."""
  pipe = types.SimpleNamespace(safety_checker=checker, feature_extractor=processor,
                               image_processor=VaeImageProcessor(vae_scale_factor=2))
  x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous()
  pil = pipe.image_processor.postprocess(x.clone(), output_type="pil")
  pixel_values = processor(pil, return_tensors="pt").pixel_values
  with ForwardLocals() as rec:
    out, flags = StableDiffusionPipeline.run_safety_checker(pipe, x.clone(), "cpu", torch.float32)
  assert len(rec.seen) == 1, len(rec.seen)
  loc = rec.seen[0]
  results = loc["result"]
  concept_scores = np.array([[r["concept_scores"][k] for k in range(17)] for r in results], np.float32)
  special_scores = np.array([[r["special_scores"][k] for k in range(3)] for r in results], np.float32)
  return dict(pixel_values=pixel_values.permute(0, 2, 3, 1).numpy(), has_nsfw=np.array(flags, bool),
              images_out=out.permute(0, 2, 3, 1).numpy(), cos=np.asarray(loc["cos_dist"], np.float32),
              special_cos=np.asarray(loc["special_cos_dist"], np.float32), concept_scores=concept_scores,
              special_scores=special_scores)


def embeddings(checker, processor, images_nhwc: np.ndarray) -> torch.Tensor:
  x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)
  pil = VaeImageProcessor(vae_scale_factor=2).postprocess(x, output_type="pil")
  pixel_values = processor(pil, return_tensors="pt").pixel_values
  with torch.no_grad():
    return checker.visual_projection(checker.vision_model(pixel_values)[1]).double()


def orthogonal_targets(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
  """For each row t: e_t minus its projection on the span of the other rows, and cos(e_t, that vector)."""
  vs, cs = [], []
  for t in range(e.shape[0]):
    others = torch.cat([e[:t], e[t + 1:]]).T  # [D, n-1]
    q, _ = torch.linalg.qr(others)
    v = e[t] - q @ (q.T @ e[t])
    vs.append(v / v.norm())
    cs.append(float(e[t] @ v / (e[t].norm() * v.norm())))
  return torch.stack(vs), torch.tensor(cs, dtype=torch.float64)


def main():
  shutil.rmtree(ROOT, ignore_errors=True)
  os.makedirs(ROOT)
  text = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, max_position_embeddings=8, projection_dim=PROJ, pad_token_id=1,
                        bos_token_id=0, eos_token_id=2)
  vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=SIZE, patch_size=4, hidden_act="quick_gelu", projection_dim=PROJ)
  config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=PROJ)
  torch.manual_seed(3)
  checker = StableDiffusionSafetyChecker(config).eval()
  perturb(checker, 3)
  processor = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})

  square = make_images(1, 5, 32, 32)
  wide = make_images(2, 3, 24, 40)
  e = torch.cat([embeddings(checker, processor, square), embeddings(checker, processor, wide)])  # [8, D]
  v, c = orthogonal_targets(e)
  print("cos(e_t, v_t):", np.round(c.numpy(), 3))
  assert float(c.min()) > 0.1, "the image embeddings are too close to each other: change the seeds"

  gen = torch.Generator().manual_seed(5)
  concepts = torch.randn(17, PROJ, generator=gen, dtype=torch.float64)
  specials = torch.randn(3, PROJ, generator=gen, dtype=torch.float64)
  # (embedding row, target image, offset of the threshold from cos(e_t, v_t)); score = -offset
  concept_targets = [(0, 0, -0.05), (1, 1, 0.004), (2, 2, 0.004), (3, 5, -0.05), (4, 6, -0.0003)]
  special_targets = [(0, 1, -0.05), (1, 3, -0.05)]
  for rows, table in ((concept_targets, concepts), (special_targets, specials)):
    for row, t, _ in rows:
      table[row] = v[t]
  en = e / e.norm(dim=1, keepdim=True)
  cos_c = en @ (concepts / concepts.norm(dim=1, keepdim=True)).T  # [8, 17]
  cos_s = en @ (specials / specials.norm(dim=1, keepdim=True)).T
  w_c = cos_c.max(0).values + 0.02 + 0.18 * torch.rand(17, generator=gen, dtype=torch.float64)
  w_s = cos_s.max(0).values + 0.02 + 0.18 * torch.rand(3, generator=gen, dtype=torch.float64)
  for rows, w, cos in ((concept_targets, w_c, cos_c), (special_targets, w_s, cos_s)):
    for row, t, offset in rows:
      w[row] = cos[t, row] + offset
      others = torch.cat([cos[:t, row], cos[t + 1:, row]])
      assert float((others - w[row]).max()) < -0.02, (row, t, "another image is too close to this threshold")
  with torch.no_grad():
    checker.concept_embeds.copy_(concepts.float())
    checker.special_care_embeds.copy_(specials.float())
    checker.concept_embeds_weights.copy_(w_c.float())
    checker.special_care_embeds_weights.copy_(w_s.float())

  checker.save_pretrained(os.path.join(ROOT, "safety_checker"), safe_serialization=True)
  processor.save_pretrained(os.path.join(ROOT, "feature_extractor"))
  path = os.path.join(ROOT, "feature_extractor", "preprocessor_config.json")
  with open(path) as f:
    pre = json.load(f)
  pre["image_processor_type"] = "CLIPImageProcessor"  # as a released pipeline names it
  with open(path, "w") as f:
    json.dump(pre, f, indent=2, sort_keys=True)
  with open(os.path.join(ROOT, "model_index.json"), "w") as f:
    json.dump({"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
               "feature_extractor": ["transformers", "CLIPImageProcessor"],
               "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"]}, f, indent=2)

  loaded = StableDiffusionSafetyChecker.from_pretrained(os.path.join(ROOT, "safety_checker")).eval()
  reloaded_processor = CLIPImageProcessorPil.from_pretrained(os.path.join(ROOT, "feature_extractor"))
  arrays = {"square": square, "wide": wide}
  expected = {"square": [True, True, False, False, False], "wide": [True, False, False]}
  for name, images in (("square", square), ("wide", wide)):
    ref = run_pipeline_checker(loaded, reloaded_processor, images)
    assert ref["has_nsfw"].tolist() == expected[name], (name, ref["has_nsfw"], ref["concept_scores"])
    flagged = ref["has_nsfw"]
    assert np.all(ref["images_out"][flagged] == 0) and np.array_equal(ref["images_out"][~flagged], images[~flagged])
    print(name, "flags", ref["has_nsfw"].tolist(), "max concept score per image", ref["concept_scores"].max(1),
          "special", ref["special_scores"].max(1))
    arrays.update({f"{name}_{k}": a for k, a in ref.items()})
  np.savez_compressed(os.path.join(ROOT, "reference.npz"), **arrays)
  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ROOT) for f in fs)
  print(f"{ROOT}: {total / 1024:.0f} KiB")


if __name__ == "__main__":
  main()
