"""The SDXL refiner and the ensemble of expert denoisers (sdjax.pipelines.ensemble, samplers' denoising_start /
denoising_end) against diffusers 0.42's StableDiffusionXLImg2ImgPipeline / StableDiffusionXLPipeline
(tests/fixtures/refiner, written by tools/make_refiner_fixtures.py): a tiny random refiner as a diffusers folder and
as an SGM single file, its img2img (strength, aesthetic scores, negative size / crop, negative prompts) and the
base (tools/make_pipeline_fixtures.py's tiny SDXL) with denoising_end=0.7 followed by the refiner with
denoising_start=0.7, for DDIM and Euler; errors; a sample.py job with --refiner.

float32 throughout; max abs error on images in [-1, 1] (measured ~3e-6) and on the base's latents relative to their
largest value (measured ~1e-6). Every jitted function compiles at XLA's backend optimisation level 0, once per case.
"""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

from sdjax import convert, jobs, pipelines, samplers, schedules
from sdjax.convert import diffusers as dconv
from sdjax.convert import single_file
from sdjax.convert.random import random_pipeline, tiny_configs
from sdjax.models import clip
from sdjax.models import vae as vae_lib

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
FOLDER = os.path.join(FIXTURES, "refiner", "pipeline")
SINGLE = os.path.join(FIXTURES, "refiner", "refiner.safetensors")
TOKENIZER = os.path.join(FIXTURES, "models", "tokenizer")
TORCH_ATOL = 1e-4
FRAC, STEPS, GUIDANCE = 0.7, 5, 5.0

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.partial(jit, static_argnums=0, static_argnames=("sampler", "strength"))
def _img2img(sd, params, prompt, keys, image, posterior_noise, noise, *, sampler, strength):
  """img2img with diffusers' draws: the VAE posterior sample from `posterior_noise`, add_noise's `noise`."""
  mean, logvar = sd.vae.apply({"params": params["vae"]}, image, method="encode")
  latents = vae_lib.scale_latents(mean + jnp.exp(0.5 * logvar) * posterior_noise, sd.vae.config)
  return pipelines.img2img(sd, params, prompt, keys, latents=latents, noise=noise, strength=strength,
                           sampler=sampler, num_steps=STEPS)


@functools.partial(jit, static_argnums=(0, 2), static_argnames="sampler")
def _two_stage(base, base_params, refiner, refiner_params, prompt, refiner_prompt, keys, noise, *, sampler):
  """txt2img(denoising_end) -> latents, then img2img(latents, denoising_start): the ensemble's two halves."""
  latents = pipelines.txt2img(base, base_params, prompt, keys, height=16, width=16, sampler=sampler, num_steps=STEPS,
                              noise=noise, denoising_end=FRAC, output="latents")
  return latents, pipelines.img2img(refiner, refiner_params, refiner_prompt, keys, latents=latents, sampler=sampler,
                                    num_steps=STEPS, denoising_start=FRAC)


@functools.partial(jit, static_argnums=(0, 2), static_argnames="sampler")
def _ensemble(base, base_params, refiner, refiner_params, prompt, refiner_prompt, keys, noise, *, sampler):
  return pipelines.ensemble(base, base_params, refiner, refiner_params, prompt, refiner_prompt, keys, height=16,
                            width=16, sampler=sampler, num_steps=STEPS, high_noise_frac=FRAC, noise=noise)


@pytest.fixture(scope="module")
def reference():
  return dict(np.load(os.path.join(FIXTURES, "refiner", "reference.npz")))


@pytest.fixture(scope="module")
def folder():
  return convert.load_pipeline(FOLDER)


@pytest.fixture(scope="module")
def refiner(folder):
  sd, params = pipelines.from_components(folder.models, folder.schedule, model_type=folder.model_type,
                                         **folder.pipeline_config)
  return sd, params, folder.tokenizers["tokenizer_2"]


def with_schedule(sd, config_json):
  return pipelines.StableDiffusion(**{**vars(sd), "schedule": schedules.from_diffusers_config(json.loads(config_json))})


def strings(a):
  return [str(x) for x in a]


def refiner_prompt(sd, tok, prompts, negatives, size, score=6.0, negative_score=2.5, negative_size=None,
                   negative_crop=(0, 0)):
  b = len(prompts)
  return pipelines.Prompt(
      ids=pipelines.tokenize([tok], sd.text_encoders, prompts),
      negative_ids=pipelines.tokenize([tok], sd.text_encoders, negatives),
      guidance_scale=np.full(b, GUIDANCE, np.float32),
      time_ids=np.stack([pipelines.micro_conditioning(size, size, aesthetic_score=score)] * b),
      negative_time_ids=np.stack([pipelines.micro_conditioning(size, size, negative_size, negative_crop,
                                                                aesthetic_score=negative_score)] * b))


def keys_for(n):
  return jax.random.split(jax.random.key(0), n)


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# --- loading ---------------------------------------------------------------------------------------------------

def test_folder_and_single_file_load_the_same_refiner(folder):
  """model_index.json: text_encoder / tokenizer null, requires_aesthetics_score true, force_zeros false; the SGM
  single file (conditioner.embedders.0.model = the OpenCLIP tower alone) is detected as "sdxl_refiner" and converts
  to the same arrays with the folder's configs."""
  assert folder.model_type == "sdxl_refiner" and set(folder.models) == {"unet", "vae", "text_encoder_2"}
  assert folder.pipeline_config == {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}
  sd, _ = pipelines.from_components(folder.models, folder.schedule, model_type=folder.model_type,
                                    **folder.pipeline_config)
  assert sd.requires_aesthetics_score and not sd.force_zeros_for_empty_prompt and sd.num_time_ids == 5
  configs = {n: json.load(open(os.path.join(FOLDER, n, "config.json"))) for n in ("unet", "vae", "text_encoder_2")}
  configs["scheduler"] = json.load(open(os.path.join(FOLDER, "scheduler", "scheduler_config.json")))
  state = dconv.read_state_dict(SINGLE)
  assert single_file.detect_model_type(state) == "sdxl_refiner"
  one = convert.load_single_file(SINGLE, configs=configs)
  assert one.model_type == "sdxl_refiner" and set(one.models) == set(folder.models)
  assert "conditioner.embedders.0.model.logit_scale" in one.skipped
  for name, (module, params) in folder.models.items():
    assert one.models[name][0].config == module.config, name
    a, b = jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_flatten_with_path(one.models[name][1])[0]
    assert [p for p, _ in a] == [p for p, _ in b], name
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b)), name
  # The packaged full-size refiner configs: SGM sd_xl_refiner.yaml as diffusers reads it (2560 = 1280 + 5 x 256).
  full = single_file.default_configs("sdxl_refiner")
  assert set(full) == {"unet", "vae", "text_encoder_2", "scheduler"}
  u = full["unet"]
  assert (u["block_out_channels"], u["attention_head_dim"], u["cross_attention_dim"]) == (
      [384, 768, 1536, 1536], [6, 12, 24, 24], 1280)
  assert u["projection_class_embeddings_input_dim"] == full["text_encoder_2"]["projection_dim"] + 5 * 256
  assert schedules.sampler_from_diffusers_config(full["scheduler"]) == "euler"
  assert single_file.unet_rules(u) and single_file.vae_rules(full["vae"])


def test_model_index_disagreeing_with_the_unet_is_refused(tmp_path):
  import shutil
  bad = tmp_path / "bad"
  shutil.copytree(FOLDER, bad)
  index = json.load(open(bad / "model_index.json"))
  json.dump({**index, "requires_aesthetics_score": False}, open(bad / "model_index.json", "w"))
  with pytest.raises(ValueError, match="requires_aesthetics_score is false but the U-Net takes 5 time ids"):
    convert.load_pipeline(str(bad))


# --- samplers: denoising_start / denoising_end ---------------------------------------------------------------------

def test_split_points_follow_diffusers_cutoff():
  """cutoff = int(round(T - f T)); the base keeps timesteps >= cutoff, the refiner those below; together they are
  the whole schedule, and without a split the tables are the sampler's own (existing behaviour)."""
  schedule = schedules.from_diffusers_config(single_file.default_configs("sdxl")["scheduler"])
  assert samplers.timestep_cutoff(schedule, 0.7) == 300 and samplers.timestep_cutoff(schedule, 0.8) == 200
  for name in ("ddim", "euler", "dpmpp_2m", "unipc", "lms", "ddpm", "euler_a", "deis"):
    full = samplers.get(name).tables(schedule, 10)
    tables, n = samplers.step_tables(schedule, name, 10)
    assert n == 10 and all(np.array_equal(tables[k], full[k]) for k in full), name
    base, k = samplers.step_tables(schedule, name, 10, denoising_end=0.7)
    ref, m = samplers.step_tables(schedule, name, 10, denoising_start=0.7)
    assert np.array_equal(base["timesteps"], full["timesteps"]), name  # the base keeps its tables, runs k steps
    assert np.all(full["timesteps"][:k] >= 300) and np.all(ref["timesteps"][:m] < 300), name
    assert k + m == 10 and np.array_equal(ref["timesteps"], full["timesteps"][k:]), name
    assert samplers.scan_length(schedule, name, 10, denoising_end=0.7) == k, name
  # diffusers' leading spacing, 5 steps: [801, 601, 401, 201, 1] -> 3 base steps and 2 refiner steps.
  assert samplers.step_tables(schedule, "euler", 5, denoising_end=0.7)[1] == 3
  assert list(samplers.step_tables(schedule, "ddim", 5, denoising_start=0.7)[0]["timesteps"]) == [201, 1]
  mid, n = samplers.step_tables(schedule, "ddim", 10, denoising_start=0.3, denoising_end=0.7)
  assert n == 4 and list(mid["timesteps"][:n]) == [601, 501, 401, 301]


@pytest.mark.parametrize("kwargs, match", [
    ({"denoising_end": 1.0}, r"denoising_end must be a fraction in \(0, 1\)"),
    ({"denoising_end": 0.0}, r"denoising_end must be a fraction in \(0, 1\)"),
    ({"denoising_start": -0.2}, r"denoising_start must be a fraction in \(0, 1\)"),
    ({"denoising_start": True}, r"denoising_start must be a fraction"),
    ({"denoising_start": 0.7, "denoising_end": 0.5}, "must be below denoising_end"),
    ({"denoising_end": 0.0001}, "leave no steps"),
    ({"denoising_start": 0.7, "sampler": "heun"}, "does not support denoising_start / denoising_end"),
    ({"denoising_end": 0.7, "sampler": "lcm"}, "does not support denoising_start / denoising_end"),
])
def test_split_errors(kwargs, match):
  schedule = schedules.from_diffusers_config(single_file.default_configs("sdxl")["scheduler"])
  sampler = kwargs.pop("sampler", "euler")
  with pytest.raises(ValueError, match=match):
    samplers.step_tables(schedule, sampler, 10, **kwargs)


# --- parity with diffusers --------------------------------------------------------------------------------------

def test_refiner_img2img_matches_diffusers(refiner, reference):
  """StableDiffusionXLImg2ImgPipeline, text_encoder None: strength 0.6 of 5 Euler steps, aesthetic_score 7,
  negative_aesthetic_score 2, negative_original_size (24, 24) and crop (2, 0), negative prompts ["blurry", ""] ("" is
  encoded: no force_zeros). The generator's posterior sample and add_noise noise are replayed."""
  sd, params, tok = refiner
  r = {k[len("img2img."):]: v for k, v in reference.items() if k.startswith("img2img.")}
  sd = with_schedule(sd, str(r["scheduler"]))
  prompt = refiner_prompt(sd, tok, strings(r["prompt"]), strings(r["negative"]), 32, 7.0, 2.0, (24, 24), (2, 0))
  got = _img2img(sd, params, prompt, keys_for(2), r["image01"] * 2 - 1, r["posterior_noise"], r["noise"],
                 sampler="euler", strength=0.6)
  assert max_err(got, r["output"]) < TORCH_ATOL


@pytest.fixture(scope="module")
def base():
  """tools/make_pipeline_fixtures.py's tiny SDXL base (write_random_pipeline seed 0), rebuilt in memory."""
  pipe = random_pipeline(tiny_configs("sdxl"), seed=0, model_type="sdxl")
  return pipe, clip.load_tokenizer(TOKENIZER)


def base_prompt(sd, tok, prompts, negatives):
  b = len(prompts)
  return pipelines.Prompt(ids=pipelines.tokenize([tok, tok], sd.text_encoders, prompts),
                          negative_ids=pipelines.tokenize([tok, tok], sd.text_encoders, negatives),
                          guidance_scale=np.full(b, GUIDANCE, np.float32),
                          time_ids=np.stack([pipelines.micro_conditioning(16, 16)] * b),
                          zero_negative=np.zeros(b, bool))


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_ensemble_matches_diffusers(base, refiner, reference, sampler):
  """Base (16x16, 5 steps) with denoising_end=0.7 -> output_type="latent", then the refiner with denoising_start=0.7
  on those latents (no noise added). DDIM: the two halves, checking the handed-over latents too; Euler:
  pipelines.ensemble."""
  pipe, tok = base
  r = {k.split(".", 1)[1]: v for k, v in reference.items() if k.startswith(f"ensemble_{sampler}.")}
  schedule = schedules.from_diffusers_config(json.loads(str(r["scheduler"])))
  bsd, bparams = pipelines.from_components(pipe.models, schedule, model_type="sdxl")
  rsd, rparams, rtok = refiner
  rsd = with_schedule(rsd, str(r["refiner_scheduler"]))
  prompts = strings(r["prompt"])
  bprompt = base_prompt(bsd, tok, prompts, strings(r["base_negative"]))
  rprompt = refiner_prompt(rsd, rtok, prompts, strings(r["negative"]), 32)
  args = (bsd, bparams, rsd, rparams, bprompt, rprompt, keys_for(2), r["noise"])
  if sampler == "ddim":
    latents, images = _two_stage(*args, sampler=sampler)
    scale = float(np.max(np.abs(r["base_latents"])))
    assert max_err(latents, r["base_latents"]) / scale < 1e-5
  else:
    images = _ensemble(*args, sampler=sampler)
  assert images.shape == r["image"].shape == (2, 32, 32, 3)
  assert max_err(images, r["image"]) < TORCH_ATOL


# --- errors -------------------------------------------------------------------------------------------------------

def test_pipeline_errors(refiner, base):
  sd, params, tok = refiner
  pipe, btok = base
  bsd, bparams = pipelines.from_components(pipe.models, sd.schedule, model_type="sdxl")
  prompt = refiner_prompt(sd, tok, ["a cat"], ["ugly"], 32)
  keys, latents = keys_for(1), jnp.zeros((1, 8, 8, 4))
  shape = lambda f: jax.eval_shape(f)  # trace only: the errors come before any computation
  with pytest.raises(ValueError, match="this is an SDXL refiner .* use img2img"):
    shape(lambda: pipelines.txt2img(sd, params, prompt, keys, height=32, width=32, sampler="euler", num_steps=5))
  with pytest.raises(ValueError, match=r"needs Prompt.time_ids \[B, 5\] .* aesthetic score.*got shape \(1, 6\)"):
    six = prompt._replace(time_ids=np.stack([pipelines.micro_conditioning(32, 32)]))
    shape(lambda: pipelines.img2img(sd, params, six, keys, latents=latents, sampler="euler", num_steps=5,
                                    denoising_start=FRAC))
  with pytest.raises(ValueError, match=r"needs Prompt.negative_time_ids \[B, 5\]"):
    shape(lambda: pipelines.img2img(sd, params, prompt._replace(negative_time_ids=np.zeros((1, 6))), keys,
                                    latents=latents, sampler="euler", num_steps=5, denoising_start=FRAC))
  with pytest.raises(ValueError, match="denoising_start continues from latents"):
    shape(lambda: pipelines.img2img(sd, params, prompt, keys, jnp.zeros((1, 32, 32, 3)), sampler="euler",
                                    num_steps=5, denoising_start=FRAC))
  with pytest.raises(ValueError, match="an image or latents"):
    shape(lambda: pipelines.img2img(sd, params, prompt, keys, sampler="euler", num_steps=5, strength=0.5))
  with pytest.raises(ValueError, match="needs strength"):
    shape(lambda: pipelines.img2img(sd, params, prompt, keys, latents=latents, sampler="euler", num_steps=5))
  with pytest.raises(ValueError, match=r"denoising_start must be a fraction in \(0, 1\)"):
    shape(lambda: pipelines.img2img(sd, params, prompt, keys, latents=latents, sampler="euler", num_steps=5,
                                    denoising_start=1.5))
  bprompt = base_prompt(bsd, btok, ["a cat"], ["ugly"])
  with pytest.raises(ValueError, match=r"denoising_end must be a fraction in \(0, 1\)"):
    shape(lambda: pipelines.txt2img(bsd, bparams, bprompt, keys, height=16, width=16, sampler="euler", num_steps=5,
                                    denoising_end=0.0, output="latents"))
  with pytest.raises(ValueError, match="output must be one of"):
    shape(lambda: pipelines.txt2img(bsd, bparams, bprompt, keys, height=16, width=16, sampler="euler", num_steps=5,
                                    output="latent"))
  with pytest.raises(ValueError, match="safety_check needs images"):
    shape(lambda: pipelines.txt2img(bsd, bparams, bprompt, keys, height=16, width=16, sampler="euler", num_steps=5,
                                    output="latents", safety_check=True))
  with pytest.raises(ValueError, match=r"an SDXL U-Net needs Prompt.time_ids \[B, 6\]"):
    shape(lambda: pipelines.txt2img(bsd, bparams, bprompt._replace(time_ids=np.zeros((1, 5))), keys, height=16,
                                    width=16, sampler="euler", num_steps=5))


# --- a sample.py job with --refiner ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
  """A tiny SDXL base whose VAE is the refiner's (tests/fixtures/models/vae_sdxl: downscale 4), random weights."""
  configs = tiny_configs("sdxl")
  configs["vae"] = json.load(open(os.path.join(FOLDER, "vae", "config.json")))
  tok = clip.load_tokenizer(TOKENIZER)
  pipe = random_pipeline(configs, seed=1, tokenizers={"tokenizer": tok, "tokenizer_2": tok}, model_type="sdxl")
  folder = str(tmp_path_factory.mktemp("refiner_job") / "base")
  dconv.save_pipeline(folder, pipe)
  return folder


def test_sample_job_with_a_refiner(base_folder, tmp_path):
  """sample.py --model BASE --refiner FOLDER --high_noise_frac 0.6 renders what jobs.run renders in-process with
  jobs.load_refiner (render_fn: pipelines.ensemble, tested against diffusers above); job.json and each image's
  metadata record the refiner; errors name the flags."""
  quiet = dict(progress=False, echo=lambda s: None)
  names = {"refiner": "--refiner", "high_noise_frac": "--high_noise_frac"}
  model = jobs.load_model(base_folder, safety_checker=False)
  with pytest.raises(jobs.JobError, match="--refiner: .* is not an SDXL refiner"):
    jobs.load_refiner(model, base_folder, names=names, echo=quiet["echo"])
  with pytest.raises(jobs.JobError, match=r"--high_noise_frac: high_noise_frac must be a fraction in \(0, 1\)"):
    jobs.load_refiner(model, FOLDER, high_noise_frac=1.0, names=names, echo=quiet["echo"])
  refiner_only = jobs.load_model(FOLDER, echo=quiet["echo"])
  with pytest.raises(jobs.JobError, match="is an SDXL refiner: its prompts need an init_image"):
    jobs.check_refiner(refiner_only, jobs.resolve([({"prompt": "x"}, "--prompt #0")],
                                                  jobs.Defaults(sampler="euler", height=32, width=32), refiner_only))
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "init.png")  # a refiner alone: img2img
  specs = jobs.resolve([({"prompt": "x", "init_image": str(tmp_path / "init.png")}, "--prompt #0")],
                       jobs.Defaults(sampler="euler", height=32, width=32), refiner_only)
  jobs.check_refiner(refiner_only, specs)
  prompt = jobs.batch_inputs(refiner_only, specs[0].group, jobs.items(specs, 0))[0]
  assert prompt.time_ids.tolist() == [[32, 32, 0, 0, 6.0]] and prompt.negative_time_ids.tolist() == [[32, 32, 0, 0, 2.5]]
  refined = jobs.load_refiner(model, FOLDER, high_noise_frac=0.6, names=names, echo=quiet["echo"])
  with pytest.raises(jobs.JobError, match="with a refiner at high_noise_frac 0.6: sampler 'heun' does not support"):
    jobs.check_refiner(refined, jobs.resolve([({"prompt": "x"}, "--prompt #0")],
                                             jobs.Defaults(sampler="heun", height=32, width=32), refined))
  defaults = jobs.Defaults(negative_prompt="blurry", seed=3, steps=4, guidance_scale=5.0, sampler="euler",
                           height=32, width=32)
  inproc = tmp_path / "inproc"
  jobs.run(jobs.Job(str(inproc), (({"prompt": "a red cat"}, "--prompt #0"),), defaults, watermark=False), refined,
           **quiet)

  outdir = tmp_path / "cli"
  args = ["--model", base_folder, "--refiner", FOLDER, "--high_noise_frac", "0.6", "--prompt", "a red cat",
          "--negative_prompt", "blurry", "--steps", "4", "--sampler", "euler", "--height", "32", "--width", "32",
          "--seed", "3", "--guidance", "5", "--outdir", str(outdir), "--no_watermark", "--no_safety_checker"]
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(outdir / "index.jsonl") as f:
    rec = json.loads(f.readline())
  assert rec["refiner"] == os.path.abspath(FOLDER) and rec["high_noise_frac"] == 0.6 and rec["mode"] == "txt2img"
  info = json.load(open(outdir / "job.json"))
  assert info["refiner"] == {"refiner": rec["refiner"], "refiner_hash": rec["refiner_hash"], "high_noise_frac": 0.6}
  got, want = (np.asarray(Image.open(d / rec["file"])) for d in (outdir, inproc))
  assert got.shape == (32, 32, 3) and np.array_equal(got, want)
  assert Image.open(outdir / rec["file"]).text["refiner_hash"] == refined.refiner.hash
