"""CLIP vision tower, CLIPModel loading, CLIPImageProcessor preprocessing and CLIP score against transformers.

Fixtures from tools/make_clip_vision_fixtures.py (tiny random transformers CLIPModels, quick_gelu and gelu). No
torch here. Tolerances: vision outputs and embeddings within 1e-5 relative to the tensor's scale (float32),
CLIP scores within 1e-4 absolute, preprocessing bit-exact up to float32 rounding of the normalisation.
"""
import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest

from sdjax.convert import WeightMismatchError, safetensors_io
from sdjax.convert.clip_vision import load_clip_model, load_clip_vision
from sdjax.eval import clip_score as cs
from sdjax.models import clip_vision

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
MODELS = ("clip_vision_tiny", "clip_vision_tiny_gelu")


def reference(name):
  return dict(np.load(os.path.join(FIXTURES, name, "reference.npz")))


def rel_err(actual, expected, rtol=1e-5):
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  scale = float(np.abs(expected).max())
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)
  return float(np.abs(actual - expected).max() / scale)


def test_preprocess_matches_clip_image_processor():
  ref = reference("clip_vision_tiny")
  pixels = np.asarray(jax.jit(cs.preprocess, static_argnums=1)(ref["images"], 32))
  assert ref["images"].shape == (4, 45, 37, 3) and pixels.shape == ref["pixel_values"].shape == (4, 32, 32, 3)
  np.testing.assert_allclose(pixels, ref["pixel_values"], rtol=0, atol=1e-6)
  # The uint8 image after Pillow's resize and the crop, recovered from the processor's output: equal exactly.
  mean, std = np.float32(cs.CLIP_MEAN), np.float32(cs.CLIP_STD)
  processor_u8 = np.round((ref["pixel_values"] * std + mean) * 255).astype(np.uint8)
  resized = np.asarray(cs.resize_shortest_side(ref["images"], 32))  # [4, 38, 32, 3], crop rows 3..35
  assert resized.shape == (4, 38, 32, 3)
  np.testing.assert_array_equal(resized[:, 3:35], processor_u8)
  with pytest.raises(ValueError, match="uint8"):
    cs.preprocess(ref["images"].astype(np.float32), 32)


def test_pil_bicubic_matrix_rows_sum_to_one():
  for n_in, n_out in ((45, 32), (37, 32), (512, 224), (20, 32)):
    rows = cs.pil_bicubic_matrix(n_in, n_out).astype(np.int64).sum(axis=1)
    assert np.all(np.abs(rows - (1 << 22)) <= 8), (n_in, n_out, rows.min(), rows.max())


@pytest.mark.parametrize("name", MODELS)
def test_clip_model_matches_transformers(name):
  ref = reference(name)
  model = load_clip_model(os.path.join(FIXTURES, name))
  (vision, vparams), (text, tparams) = model.vision, model.text
  assert vision.config.hidden_act == text.config.hidden_act == ("gelu" if "gelu" in name else "quick_gelu")
  assert model.logit_scale == pytest.approx(2.6592, abs=1e-6)

  @jax.jit
  def run(vp, tp, images, pixel_values, ids):
    last, image_embeds = vision.apply({"params": vp}, pixel_values)
    _, text_embeds = text.apply({"params": tp}, ids)
    score_fn = functools.partial(cs.clip_scores, vision_model=vision, text_model=text)
    pixels = cs.preprocess(images, vision.config.image_size)
    return last, image_embeds, text_embeds, score_fn(vp, tp, pixels, ids)

  last, image_embeds, text_embeds, scores = run(vparams, tparams, ref["images"], ref["pixel_values"],
                                                ref["input_ids_max_length"])
  errors = {"last_hidden_state": rel_err(last, ref["last_hidden_state"]),
            "image_embeds": rel_err(image_embeds, ref["image_embeds"]),
            "text_embeds": rel_err(text_embeds, ref["text_embeds"])}
  np.testing.assert_allclose(scores, ref["scores"], rtol=0, atol=1e-4)
  score = cs.from_sums(np.sum(scores), len(scores))
  assert abs(score - float(ref["clip_score"])) <= 1e-4
  errors["scores"] = float(np.abs(np.asarray(scores) - ref["scores"]).max())
  print(name, errors)


def test_clip_score_jits_with_bound_modules_and_clamps_the_mean():
  ref = reference("clip_vision_tiny_gelu")
  model = load_clip_model(os.path.join(FIXTURES, "clip_vision_tiny_gelu"))
  fn = jax.jit(functools.partial(cs.clip_score, vision_model=model.vision[0], text_model=model.text[0]))
  score = fn(model.vision[1], model.text[1], ref["pixel_values"], ref["input_ids_max_length"])
  assert abs(float(score) - float(ref["clip_score"])) <= 1e-4
  per_pair_clamp = float(np.mean(np.maximum(ref["scores"], 0)))
  assert float(ref["clip_score"]) > 1 and abs(float(score) - per_pair_clamp) > 1  # the mean is clamped, not pairs
  assert cs.from_sums(-12.0, 4) == 0.0 and cs.from_sums(10.0, 4) == 2.5
  with pytest.raises(ValueError, match="no pairs"):
    cs.from_sums(0.0, 0)


def test_vision_tower_folder_loads_alone():
  ref = reference("clip_vision_tiny")
  module, params = load_clip_vision(os.path.join(FIXTURES, "clip_vision_tiny_tower"))
  _, image_embeds = jax.jit(lambda p, x: module.apply({"params": p}, x))(params, ref["pixel_values"])
  rel_err(image_embeds, ref["image_embeds"])
  with pytest.raises(ValueError, match=r"expects pixel_values \[batch, 32, 32, 3\]"):
    module.apply({"params": params}, ref["pixel_values"][:, :16])


def _copy_with(tmp_path, edit):
  folder = tmp_path / "clip"
  shutil.copytree(os.path.join(FIXTURES, "clip_vision_tiny"), folder)
  path = folder / "model.safetensors"
  state = {k: np.array(v) for k, v in safetensors_io.load(str(path)).items()}
  edit(state)
  safetensors_io.save(str(path), state)
  return str(folder)


def test_loader_errors_are_one_line(tmp_path):
  folder = _copy_with(tmp_path, lambda s: s.pop("vision_model.post_layernorm.weight"))
  with pytest.raises(WeightMismatchError) as e:
    load_clip_model(folder)
  assert "\n" not in str(e.value) and "1 missing: vision_model.post_layernorm.weight (shape (32,))" in str(e.value)

  def wrong_shape(s):
    s["visual_projection.weight"] = np.zeros((8, 32), np.float32)
  shutil.rmtree(tmp_path / "clip")
  with pytest.raises(WeightMismatchError) as e:
    load_clip_model(_copy_with(tmp_path, wrong_shape))
  assert "\n" not in str(e.value)
  assert "1 wrong shape: visual_projection.weight: checkpoint (8, 32), model expects (16, 32)" in str(e.value)

  shutil.rmtree(tmp_path / "clip")
  with pytest.raises(WeightMismatchError, match="1 unexpected: extra.weight") as e:
    load_clip_model(_copy_with(tmp_path, lambda s: s.update({"extra.weight": np.zeros(2, np.float32)})))
  assert "\n" not in str(e.value)


def test_config_from_transformers_and_errors(tmp_path):
  with open(os.path.join(FIXTURES, "clip_vision_tiny", "config.json")) as f:
    d = json.load(f)
  config = clip_vision.CLIPVisionConfig.from_diffusers_config(d)
  assert (config.hidden_size, config.num_patches, config.projection_dim, config.hidden_act) == (32, 16, 16,
                                                                                                 "quick_gelu")
  assert clip_vision.CLIPVisionConfig.from_diffusers_config(config.to_diffusers_config()) == config
  bad = [({"hidden_act": "swish"}, "unsupported activation"), ({"num_attention_heads": 5}, "not divisible"),
         ({"patch_size": 64}, "larger than image_size"), ({"image_size": [32, 32]}, "wrong type list"),
         ({"hidden_size": 0}, "out of range"), ({"mystery": 1}, r"unknown field\(s\) \['mystery'\]"),
         ({"attention_dropout": 0.1}, "attention_dropout must be 0")]
  for change, message in bad:
    with pytest.raises(ValueError, match=message):
      clip_vision.CLIPVisionConfig.from_diffusers_config({**d["vision_config"], **change})
  # transformers 4.x CLIPConfig files (openai/clip-vit-large-patch14): generation defaults in every sub-config,
  # `vision_config_dict` overriding `vision_config`, the top-level projection_dim.
  generation = {"architectures": None, "bad_words_ids": None, "id2label": {"0": "LABEL_0"}, "num_beams": 1,
                "pruned_heads": {}, "torch_dtype": None, "use_bfloat16": False, "dropout": 0, "bos_token_id": None}
  legacy = {"model_type": "clip", "projection_dim": 768, "text_config_dict": None,
            "vision_config": {**generation, **clip_vision.CLIPVisionConfig(hidden_size=48).to_diffusers_config()},
            "vision_config_dict": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                                   "num_hidden_layers": 24, "patch_size": 14}}
  assert clip_vision.CLIPVisionConfig.from_diffusers_config(legacy) == clip_vision.CLIPVisionConfig(
      **RELEASED["L/14"][0])
  folder = tmp_path / "notclip"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(d["vision_config"]))
  with pytest.raises(ValueError, match="not a transformers CLIPModel config"):
    load_clip_model(str(folder))


# Parameter counts of transformers' CLIPVisionModelWithProjection (counted on the meta device, transformers 5.24).
RELEASED = {
    "B/32": (dict(patch_size=32, projection_dim=512), 87_849_216),
    "B/16": (dict(patch_size=16, projection_dim=512), 86_192_640),
    "L/14": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  patch_size=14, projection_dim=768), 303_966_208),
    "H/14": (dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                  patch_size=14, projection_dim=1024, hidden_act="gelu"), 632_076_800),
}


def test_released_shapes_match_transformers_parameter_counts():
  for name, (fields, count) in RELEASED.items():
    config = clip_vision.CLIPVisionConfig(**fields)
    module = clip_vision.CLIPVisionModelWithProjection(config)
    shapes = jax.eval_shape(lambda m=module, c=config: m.init(jax.random.key(0), *clip_vision.init_args(c)))
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert total == count, (name, total, count)
