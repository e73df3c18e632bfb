"""The safety checker (diffusers' StableDiffusionSafetyChecker) against diffusers, its loader's errors, and its run
inside the jitted txt2img.

Fixture: tests/fixtures/safety_checker/ from tools/make_safety_checker_fixtures.py (a tiny random checker whose
concept embeddings and thresholds are set so that diffusers' score loop takes every branch: flagged directly,
flagged only through the special-care adjustment, a near miss, special care alone, a score of +0.0003 that rounds
to 0). No torch here. Tolerances (float32 throughout): preprocessing within 1e-6 (measured <= 2.4e-7); cosine
similarities within 2e-6 absolute (measured <= 3e-7); rounded scores within 1e-6 (the same float32 ops as
diffusers' numpy; XLA's float32 division by 1000 may be one ulp off numpy's: measured <= 3e-8); flags equal.
"""
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import io, pipelines
from sdjax.convert import WeightMismatchError, safetensors_io
from sdjax.convert.random import random_pipeline, tiny_configs
from sdjax.convert.safety_checker import load_safety_checker, no_safety_checker_message
from sdjax.models import clip
from sdjax.models import safety_checker as sc

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FOLDER = os.path.join(FIXTURES, "safety_checker")
BATCHES = ("square", "wide")
COS_ATOL = 2e-6
SCORE_ATOL = 1e-6
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture(scope="module")
def checker():
  return load_safety_checker(FOLDER)


@pytest.fixture(scope="module")
def reference():
  return dict(np.load(os.path.join(FOLDER, "reference.npz")))


@functools.partial(jit, static_argnums=(0, 1))
def _check(module, feature_extractor, params, images):
  pixels = pipelines.safety_checker_input(images, feature_extractor)
  return pixels, module.apply({"params": params}, pixels)


def test_loaded_config(checker):
  module, params, fe = checker
  cfg = module.config
  assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.image_size, cfg.patch_size, cfg.projection_dim) == (32, 2, 16,
                                                                                                          4, 16)
  assert cfg.hidden_act == "quick_gelu"
  assert fe == sc.FeatureExtractorConfig(size=16, crop_size=16)
  assert params["concept_embeds"]["embedding"].shape == (17, 16)
  assert params["special_care_embeds_weights"]["embedding"].shape == (3,)


def test_flags_and_scores_match_diffusers(checker, reference):
  module, params, fe = checker
  for name in BATCHES:
    pixels, out = _check(module, fe, params, reference[name])
    np.testing.assert_allclose(pixels, reference[f"{name}_pixel_values"], rtol=0, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(out.has_nsfw_concept, reference[f"{name}_has_nsfw"], err_msg=name)
    np.testing.assert_allclose(out.concept_cos, reference[f"{name}_cos"], rtol=0, atol=COS_ATOL, err_msg=name)
    np.testing.assert_allclose(out.special_cos, reference[f"{name}_special_cos"], rtol=0, atol=COS_ATOL, err_msg=name)
    np.testing.assert_allclose(out.concept_scores, reference[f"{name}_concept_scores"], rtol=0, atol=SCORE_ATOL,
                               err_msg=name)
    np.testing.assert_allclose(out.special_scores, reference[f"{name}_special_scores"], rtol=0, atol=SCORE_ATOL,
                               err_msg=name)
    # Flagged images: diffusers zeroes its [-1, 1] tensor and skips their denormalisation (a black PNG); sdjax
    # writes -1, which sdjax.io.to_uint8 makes the same black PNG. The others pass through unchanged.
    flags = reference[f"{name}_has_nsfw"]
    assert flags.any() and np.all(reference[f"{name}_images_out"][flags] == 0)
    replaced = np.asarray(sc.replace_flagged(jnp.asarray(reference[name]), out.has_nsfw_concept))
    assert np.all(io.to_uint8(replaced[flags]) == 0)
    np.testing.assert_array_equal(replaced[~flags], reference[f"{name}_images_out"][~flags])
    # The module on diffusers' own pixel values: the same verdicts (the tower alone, without preprocessing).
    direct = _apply(module, params, reference[f"{name}_pixel_values"])
    np.testing.assert_array_equal(direct.has_nsfw_concept, reference[f"{name}_has_nsfw"])
    np.testing.assert_allclose(direct.concept_cos, reference[f"{name}_cos"], rtol=0, atol=COS_ATOL)
  # The fixture's cases: flagged directly, through the special-care adjustment, near miss, special care only, clean.
  _, square = _check(module, fe, params, reference["square"])
  assert np.asarray(square.has_nsfw_concept).tolist() == [True, True, False, False, False]
  assert np.asarray(square.special_care).tolist() == [False, True, False, True, False]
  # wide[1]: concept 4 is above its threshold by 0.0003, which diffusers' round(score, 3) makes 0.0: not flagged.
  assert float(reference["wide_concept_scores"][1, 4]) == 0.0 and not reference["wide_has_nsfw"][1]


@functools.partial(jit, static_argnums=0)
def _apply(module, params, pixels):
  return module.apply({"params": params}, pixels)


def test_replace_flagged():
  images = jnp.linspace(-1, 1, 3 * 2 * 2 * 3).reshape(3, 2, 2, 3)
  out = sc.replace_flagged(images, jnp.array([False, True, False]))
  np.testing.assert_array_equal(out[1], -1.0)
  np.testing.assert_array_equal(out[::2], images[::2])
  u8 = sc.replace_flagged(jnp.full((2, 2, 2, 3), 200, jnp.uint8), jnp.array([True, False]), black=0)
  assert u8.dtype == jnp.uint8 and int(u8[0].max()) == 0 and int(u8[1].min()) == 200


def _copy(tmp_path):
  folder = str(tmp_path / "pipe")
  shutil.copytree(FOLDER, folder)
  return folder


def test_loader_errors(tmp_path):
  folder = _copy(tmp_path)
  weights = os.path.join(folder, "safety_checker", "model.safetensors")
  state = safetensors_io.load(weights)
  state.pop("concept_embeds")
  state["special_care_embeds"] = state["special_care_embeds"][:, :8]
  safetensors_io.save(weights, state, {"format": "pt"})
  with pytest.raises(WeightMismatchError, match=r"1 missing: concept_embeds \(shape \(17, 16\)\).*1 wrong shape: "
                                                r"special_care_embeds: checkpoint \(3, 8\)"):
    load_safety_checker(folder)
  os.remove(weights)
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    load_safety_checker(folder)
  shutil.rmtree(os.path.join(folder, "feature_extractor"))
  with pytest.raises(FileNotFoundError, match="no preprocessor_config.json"):
    load_safety_checker(folder)
  # A pipeline without a checker: None, and the message that says so.
  with open(os.path.join(folder, "model_index.json"), "w") as f:
    json.dump({"_class_name": "StableDiffusionPipeline", "safety_checker": [None, None],
               "feature_extractor": [None, None]}, f)
  assert load_safety_checker(folder) is None
  assert "has no safety_checker" in no_safety_checker_message(folder)


def test_feature_extractor_config_errors():
  with pytest.raises(ValueError, match="resample"):
    sc.FeatureExtractorConfig.from_preprocessor_config({"resample": 2})
  with pytest.raises(ValueError, match="crop_size"):
    sc.FeatureExtractorConfig.from_preprocessor_config({"crop_size": {"height": 16, "width": 20}})
  old = sc.FeatureExtractorConfig.from_preprocessor_config(  # SD 1.x's CLIPFeatureExtractor layout
      {"crop_size": 224, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_resize": True,
       "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(sc.OPENAI_CLIP_MEAN),
       "image_std": list(sc.OPENAI_CLIP_STD), "resample": 3, "size": 224})
  assert old == sc.FeatureExtractorConfig()


@functools.partial(jit, static_argnums=0, static_argnames=("sampler", "num_steps", "safety_check"))
def _txt2img(sd, params, prompt, keys, *, sampler, num_steps, safety_check):
  return pipelines.txt2img(sd, params, prompt, keys, height=32, width=32, sampler=sampler, num_steps=num_steps,
                           safety_check=safety_check)


def test_txt2img_replaces_flagged_images_inside_jit(checker):
  tokenizer = clip.load_tokenizer(os.path.join(FIXTURES, "models", "tokenizer"))
  pipe = random_pipeline(tiny_configs("sd1"), seed=0, tokenizers={"tokenizer": tokenizer}, model_type="sd1")
  sd, params = pipelines.from_components(pipe.models, pipe.schedule, model_type="sd1", safety_checker=checker)
  prompt = pipelines.Prompt(ids=pipelines.tokenize([tokenizer], sd.text_encoders, ["a cat", "a red car"]))
  keys = jax.random.split(jax.random.key(0), 2)
  run = functools.partial(_txt2img, sd, prompt=prompt, keys=keys, sampler="ddim", num_steps=2, safety_check=True)

  def with_thresholds(concept, special):
    p = dict(params, safety_checker=dict(params["safety_checker"]))
    p["safety_checker"]["concept_embeds_weights"] = {"embedding": jnp.asarray(concept, jnp.float32)}
    p["safety_checker"]["special_care_embeds_weights"] = {"embedding": jnp.asarray(special, jnp.float32)}
    return p

  # Thresholds above any cosine: nothing flagged, the images come back as rendered.
  images, flags = run(with_thresholds(np.full(17, 2.0), np.full(3, 2.0)))
  assert images.shape == (2, 32, 32, 3) and flags.dtype == jnp.bool_
  assert not np.asarray(flags).any() and np.all(np.asarray(jnp.max(images, axis=(1, 2, 3))) > -1.0)
  # One concept's threshold between the two images' similarities: only the closer image is flagged and blacked
  # out, by the same compiled function (thresholds are parameters).
  cos = np.asarray(jax.jit(pipelines.check_images, static_argnums=0)(sd, params, images).concept_cos)
  k = int(np.argmax(np.abs(cos[0] - cos[1])))
  assert abs(cos[0, k] - cos[1, k]) > 0.005, cos
  concept = np.full(17, 2.0)
  concept[k] = (cos[0, k] + cos[1, k]) / 2
  flagged = int(np.argmax(cos[:, k]))
  images2, flags2 = run(with_thresholds(concept, np.full(3, 2.0)))
  assert np.asarray(flags2).tolist() == [i == flagged for i in range(2)]
  np.testing.assert_array_equal(images2[flagged], -1.0)
  np.testing.assert_array_equal(images2[1 - flagged], images[1 - flagged])
  # A pipeline built without a checker cannot be asked to check.
  sd_plain, params_plain = pipelines.from_components(pipe.models, pipe.schedule, model_type="sd1")
  assert sd_plain.safety_checker is None and "safety_checker" not in params_plain
  with pytest.raises(ValueError, match="no safety checker"):
    pipelines.check_images(sd_plain, params_plain, images)


def test_a_job_checks_every_image_and_records_the_verdict(tmp_path):
  """A pipeline folder with a safety_checker/: jobs.load_model loads it (on by default), every PNG and index line
  says nsfw_content_detected, flagged images are black, job.json records checking; --no_safety_checker's path
  (safety_checker=False) and a folder without one say so through echo."""
  import json

  from PIL import Image

  from sdjax import jobs
  from sdjax.convert.random import write_random_pipeline
  folder = str(tmp_path / "sd1")
  write_random_pipeline(folder, "sd1", tokenizer=os.path.join(FIXTURES, "models", "tokenizer"))
  notes = []
  plain = jobs.load_model(folder, echo=notes.append)
  assert plain.sd.safety_checker is None and "has no safety_checker" in notes[0]
  for name in ("safety_checker", "feature_extractor"):
    shutil.copytree(os.path.join(FOLDER, name), os.path.join(folder, name))
  with open(os.path.join(folder, "model_index.json")) as f:
    index = json.load(f)
  with open(os.path.join(folder, "model_index.json"), "w") as f:
    json.dump({**index, "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
               "feature_extractor": ["transformers", "CLIPImageProcessor"]}, f)
  model = jobs.load_model(folder, echo=notes.append)
  assert model.sd.safety_checker is not None and len(notes) == 1 and model.hash == plain.hash
  off = jobs.load_model(folder, safety_checker=False, echo=notes.append)
  assert off.sd.safety_checker is None and len(notes) == 1  # turned off on purpose: no note
  # Every concept threshold below any cosine: every image is flagged (the checker's params are the model's).
  sc = dict(model.params["safety_checker"])
  sc["concept_embeds_weights"] = {"embedding": jnp.full((17,), -2.0)}
  model.params = dict(model.params, safety_checker=sc)
  defaults = jobs.Defaults(steps=2, sampler="ddim", height=32, width=32, seed=1)
  s = jobs.run(jobs.Job(str(tmp_path / "out"), (({"prompt": "a cat", "num_images": 2}, "#0"),), defaults,
                        batch_size=2), model, progress=False, echo=lambda m: None)
  assert s["safety_checker"] is True and s["nsfw_flagged"] == 2
  with open(tmp_path / "out" / "index.jsonl") as f:
    lines = [json.loads(line) for line in f]
  assert [r["nsfw_content_detected"] for r in lines] == [True, True]
  for r in lines:
    with Image.open(tmp_path / "out" / r["file"]) as im:
      assert im.text["nsfw_content_detected"] == "True" and not np.asarray(im).any()  # black
  with open(tmp_path / "out" / "job.json") as f:
    assert json.load(f)["safety_checker"] is True
  # A re-run finds every image done (the verdict is an outcome, not a setting that would make them stale).
  again = jobs.run(jobs.Job(str(tmp_path / "out"), (({"prompt": "a cat", "num_images": 2}, "#0"),), defaults,
                            batch_size=2, overwrite=True), model, progress=False, echo=lambda m: None)
  assert again["skipped"] == 2 and again["rendered"] == 0
