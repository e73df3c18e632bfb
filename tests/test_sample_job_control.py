"""ControlNet and IP-Adapter in text-to-image jobs (sample.py --controlnet / --control_image / --ip_adapter /
--image_encoder / --ip_adapter_image, and the prompts-file fields control_image, controlnet_conditioning_scale,
control_guidance_start / end, ip_adapter_image, ip_adapter_scale, high_noise_frac): the images equal the Python API's
(pipelines.txt2img / img2img with control= and Prompt.ip_adapter, themselves tested against diffusers in
tests/test_controlnet.py and tests/test_ip_adapter.py) for the same seeds, per-line fields override the flags, the
records name every setting, a resumed job writes the same files, and bad settings are refused before anything
renders. Tiny random SD 1.x pipeline (seed 0: the one tests/fixtures/controlnet's pipe_sd1_* and
tests/fixtures/ip_adapter's pipe_sd1 fit), 32 px, DDIM 3 steps."""
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

from sdjax import control as control_lib
from sdjax import ip_adapter, jobs, pipelines
from sdjax.convert import load_controlnet
from sdjax.convert import random as random_pipeline
from sdjax.convert.clip_vision import load_clip_vision

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
TOKENIZER = os.path.join(FIXTURES, "models", "tokenizer")
NETS = [os.path.join(FIXTURES, "controlnet", f"pipe_sd1_{k}") for k in "ab"]
ADAPTER = os.path.join(FIXTURES, "ip_adapter", "pipe_sd1.safetensors")
ENCODER = os.path.join(FIXTURES, "clip_vision_tiny_tower")
SIZE, STEPS, GUIDANCE = 32, 3, 5.0
# How errors name the settings: as sample.py's flags do (its FLAG_OF).
NAMES = {"controlnet": "--controlnet", "control_image": "--control_image", "ip_adapter": "--ip_adapter",
         "image_encoder": "--image_encoder", "ip_adapter_image": "--ip_adapter_image", "refiner": "--refiner",
         "controlnet_conditioning_scale": "--controlnet", "control_guidance_start": "--control_guidance_start",
         "control_guidance_end": "--control_guidance_end", "outdir": "--outdir", "overwrite": "--overwrite"}
QUIET = dict(progress=False, echo=lambda s: None)


def write_png(path, shape, seed):
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(path)
  return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """The tiny sd1 pipeline folder and images: control images (one 40x24, resized to 32x32), an init image, two
  48x40 IP-Adapter image prompts (one batched image-encoder call)."""
  root = tmp_path_factory.mktemp("control_job")
  folder = str(root / "sd1")
  random_pipeline.write_random_pipeline(folder, "sd1", tokenizer=TOKENIZER)
  return {"model": folder, "root": root, "c1": write_png(root / "c1.png", (32, 32, 3), 1),
          "c2": write_png(root / "c2.png", (24, 40, 3), 2), "init": write_png(root / "init.png", (32, 32, 3), 3),
          "ip1": write_png(root / "ip1.png", (40, 48, 3), 4), "ip2": write_png(root / "ip2.png", (40, 48, 3), 5)}


@pytest.fixture(scope="module")
def sd1(files):
  return jobs.load_model(files["model"], safety_checker=False, echo=lambda s: None)


def write_jsonl(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def to_uint8(x):
  return np.asarray(np.clip(np.round((np.asarray(x, np.float64) + 1.0) * 127.5), 0, 255), np.uint8)


def png(path):
  return np.asarray(Image.open(path).convert("RGB"))


def assert_close_images(got, want):
  """Job PNGs vs the Python API's images: the same to one level of 255 (different batch shapes and shardings
  compile to programs whose float32 roundings differ by ~1e-6)."""
  diff = np.abs(got.astype(int) - want.astype(int))
  assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def api_prompt(sd, model, texts):
  b = len(texts)
  return pipelines.Prompt(pipelines.tokenize(model.tokenizers, sd.text_encoders, texts),
                          pipelines.tokenize(model.tokenizers, sd.text_encoders, [""] * b),
                          np.full((b,), GUIDANCE, np.float32))


API_STATIC = ("height", "width", "sampler", "num_steps", "strength", "controlnets", "guess_mode")
# (compiled at XLA's backend optimisation level 0, as tests/test_controlnet.py: a fraction of the compile time)
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
TXT2IMG = jit(pipelines.txt2img, static_argnums=0, static_argnames=API_STATIC)
IMG2IMG = jit(pipelines.img2img, static_argnums=0, static_argnames=API_STATIC)
ENCODE = jit(ip_adapter.encode_image, static_argnums=0, static_argnames="output_hidden_states")


def test_controlnet_job_matches_the_python_api_and_resumes(files, sd1, tmp_path):
  """sample.py with two ControlNets (MultiControlNet): line 0 takes the flags' control images, scales (0.8, 0.5) and
  window (0, 0.8); line 1 its own images (a relative path, resized from 40x24), scales and window; line 2 is img2img
  with the flags' control. Every image equals pipelines.txt2img / img2img with the same ControlInputs and seeds."""
  prompts = write_jsonl(files["root"] / "control.jsonl", [
      {"prompt": "a red cat", "seed": 5},
      {"prompt": "a blue dog", "seed": 9, "control_image": ["c2.png", files["c1"]],
       "controlnet_conditioning_scale": [1.3, 0.2], "control_guidance_start": 0.34, "control_guidance_end": 1.0},
      {"prompt": "a green bird", "seed": 11, "init_image": files["init"], "strength": 0.7}])
  outdir = tmp_path / "cli"
  args = ["--model", files["model"], "--prompts", prompts, "--outdir", str(outdir), "--steps", str(STEPS),
          "--sampler", "ddim", "--height", str(SIZE), "--width", str(SIZE), "--guidance", str(GUIDANCE),
          "--controlnet", f"{NETS[0]}:0.8", "--controlnet", f"{NETS[1]}:0.5", "--control_image", files["c1"],
          "--control_image", files["c2"], "--control_guidance_end", "0.8", "--no_watermark", "--no_safety_checker"]
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(outdir / "index.jsonl") as f:
    recs = [json.loads(line) for line in f]
  assert [r["file"] for r in recs] == ["00000_000.png", "00001_000.png", "00002_000.png"]
  r0, r1, r2 = recs
  assert r0["control_image"] == [files["c1"], files["c2"]] and r0["controlnet_conditioning_scale"] == [0.8, 0.5]
  assert (r0["control_guidance_start"], r0["control_guidance_end"], r0["guess_mode"]) == (0.0, 0.8, False)
  assert r1["control_image"] == [files["c2"], files["c1"]] and r1["controlnet_conditioning_scale"] == [1.3, 0.2]
  assert (r1["control_guidance_start"], r1["control_guidance_end"]) == (0.34, 1.0)
  assert r1["control_image_hash"] == [jobs.file_hash(files["c2"]), jobs.file_hash(files["c1"])]
  assert r0["controlnet"] == [os.path.abspath(n) for n in NETS] and len(set(r0["controlnet_hash"])) == 2
  assert r2["mode"] == "img2img" and r2["control_image"] == r0["control_image"]
  meta = Image.open(outdir / "00001_000.png").text
  assert meta["control_image_hash"] == str(r1["control_image_hash"])
  assert meta["controlnet_hash"] == str(r0["controlnet_hash"])
  info = json.load(open(outdir / "job.json"))
  assert info["controlnet"] == {"controlnets": r0["controlnet"], "controlnet_hashes": r0["controlnet_hash"],
                                "guess_mode": False}
  assert info["prompts"][1]["control_image_hash"] == r1["control_image_hash"]

  # The Python API, same seeds and inputs.
  sd = sd1.sd
  nets = [load_controlnet(n) for n in NETS]
  params = {**sd1.params, "controlnets": tuple(p for _, p in nets)}
  modules = tuple(m for m, _ in nets)
  c1, c2 = (np.asarray(Image.open(files[k]).convert("RGB").resize((SIZE, SIZE), Image.LANCZOS), np.float32) / 255
            for k in ("c1", "c2"))
  control = (control_lib.control_input(np.stack([c1, c2]), [0.8, 1.3], [0.0, 0.34], [0.8, 1.0]),
             control_lib.control_input(np.stack([c2, c1]), [0.5, 0.2], [0.0, 0.34], [0.8, 1.0]))
  keys = jax.vmap(jax.random.key)(np.asarray([5, 9], np.int32))
  got = TXT2IMG(sd, params, api_prompt(sd, sd1, ["a red cat", "a blue dog"]), keys, height=SIZE, width=SIZE,
                sampler="ddim", num_steps=STEPS, control=control, controlnets=modules)
  for i in range(2):
    assert_close_images(png(outdir / recs[i]["file"]), to_uint8(got[i]))
  init = np.asarray(Image.open(files["init"]).convert("RGB"), np.float32)[None] / 255 * 2 - 1
  got = IMG2IMG(sd, params, api_prompt(sd, sd1, ["a green bird"]), jax.vmap(jax.random.key)(np.asarray([11], np.int32)),
                init, strength=0.7, sampler="ddim", num_steps=STEPS, controlnets=modules,
                control=tuple(control_lib.control_input(np.stack([c]), s, 0.0, 0.8) for c, s in ((c1, 0.8), (c2, 0.5))))
  assert_close_images(png(outdir / "00002_000.png"), to_uint8(got[0]))

  # In-process, stopped after one image (as a killed run leaves it) and resumed: the same files.
  model = jobs.load_controlnets(sd1, [(NETS[0], 0.8), (NETS[1], 0.5)], names=NAMES, echo=QUIET["echo"])
  defaults = jobs.Defaults(steps=STEPS, sampler="ddim", height=SIZE, width=SIZE, guidance_scale=GUIDANCE,
                           control_image=(files["c1"], files["c2"]), control_guidance_end=0.8)
  job = jobs.Job(str(tmp_path / "resumed"), tuple(jobs.read_prompts(prompts)), defaults, watermark=False,
                 names=NAMES, max_images=1)
  assert jobs.run(job, model, **QUIET)["remaining"] == 2
  (tmp_path / "resumed" / "00001_000.png.tmp").write_bytes(b"half a png")
  s = jobs.run(dataclasses.replace(job, max_images=None), model, **QUIET)
  assert (s["rendered"], s["skipped"], s["remaining"]) == (2, 1, 0)
  for r in recs:
    assert np.array_equal(png(tmp_path / "resumed" / r["file"]), png(outdir / r["file"]))
  with open(tmp_path / "resumed" / "index.jsonl") as f:
    assert [json.loads(line) for line in f] == recs

  # A changed control setting is refused (and re-rendered with --overwrite), as any image-changing field.
  rows = [json.loads(line) for line in open(prompts)]
  rows[1]["controlnet_conditioning_scale"] = [1.3, 0.3]
  changed = write_jsonl(files["root"] / "changed.jsonl", rows)
  with pytest.raises(jobs.JobError, match=r"prompts\[1\].controlnet_conditioning_scale=\[1.3, 0.2\], this one has "
                                          r"\[1.3, 0.3\]"):
    jobs.run(jobs.Job(str(tmp_path / "resumed"), tuple(jobs.read_prompts(changed)), defaults, watermark=False,
                     names=NAMES), model, **QUIET)
  with pytest.raises(jobs.JobError, match=r"holds a job with controlnet="):
    jobs.run(jobs.Job(str(tmp_path / "resumed"), tuple(jobs.read_prompts(prompts)), defaults, watermark=False,
                     names=NAMES), jobs.load_controlnets(sd1, [(NETS[0], 0.8), (NETS[1], 0.5)], guess_mode=True,
                                                         echo=QUIET["echo"]), **QUIET)


def test_ip_adapter_job_matches_the_python_api(files, sd1, tmp_path):
  """jobs.load_ip_adapters (sample.py --ip_adapter FILE:0.6 --image_encoder DIR --ip_adapter_image IMG): line 0 takes
  the job's image and scale, line 1 its own (ip_adapter_image, ip_adapter_scale); the images equal txt2img with
  Prompt.ip_adapter from ip_adapter.encode_image's embeddings."""
  model = jobs.load_ip_adapters(sd1, [(ADAPTER, 0.6)], ENCODER, names=NAMES, echo=QUIET["echo"])
  prompts = write_jsonl(tmp_path / "ip.jsonl", [
      {"prompt": "a red cat", "seed": 5},
      {"prompt": "a blue dog", "seed": 9, "ip_adapter_image": files["ip2"], "ip_adapter_scale": 0.3}])
  defaults = jobs.Defaults(steps=STEPS, sampler="ddim", height=SIZE, width=SIZE, guidance_scale=GUIDANCE,
                           ip_adapter_image=str(shutil.copy(files["ip1"], tmp_path / "ip_job.png")))
  outdir = tmp_path / "ip"
  job = jobs.Job(str(outdir), tuple(jobs.read_prompts(prompts)), defaults, watermark=False, names=NAMES)
  assert jobs.run(job, model, **QUIET)["rendered"] == 2
  with open(outdir / "index.jsonl") as f:
    r0, r1 = (json.loads(line) for line in f)
  assert (r0["ip_adapter_image"], r0["ip_adapter_scale"]) == ([str(tmp_path / "ip_job.png")], [0.6])
  assert (r1["ip_adapter_image"], r1["ip_adapter_scale"]) == ([files["ip2"]], [0.3])
  assert r1["ip_adapter_image_hash"] == [jobs.file_hash(files["ip2"])] and r0["ip_adapter"] == [ADAPTER]
  assert r0["image_encoder"] == os.path.abspath(ENCODER) and r0["image_encoder_hash"] == model.ip_adapters.encoder_hash
  assert json.load(open(outdir / "job.json"))["ip_adapter"]["ip_adapter_hashes"] == r0["ip_adapter_hash"]

  sd = sd1.sd
  encoder, encoder_params = load_clip_vision(ENCODER)
  adapter = ip_adapter.load(ADAPTER, sd.unet.config)
  embeds, negative = ENCODE(encoder, encoder_params, np.stack([np.asarray(Image.open(files[k]).convert("RGB"))
                                                                for k in ("ip1", "ip2")]))
  prompt = api_prompt(sd, sd1, ["a red cat", "a blue dog"])._replace(ip_adapter=ip_adapter.IPAdapterInput(
      (embeds,), (negative,), (np.asarray([0.6, 0.3], np.float32),)))
  got = TXT2IMG(sd, {**sd1.params, "ip_adapter": (adapter,)}, prompt,
                jax.vmap(jax.random.key)(np.asarray([5, 9], np.int32)), height=SIZE, width=SIZE, sampler="ddim",
                num_steps=STEPS)
  for i, r in enumerate((r0, r1)):
    assert_close_images(png(outdir / r["file"]), to_uint8(got[i]))
  # A changed image prompt (same path, other pixels) is a changed setting.
  write_png(tmp_path / "ip_job.png", (40, 48, 3), 99)
  with pytest.raises(jobs.JobError, match=r"prompts\[0\].ip_adapter_image_hash="):
    jobs.run(job, model, **QUIET)


def resolve(model, rows, tmp_path, **defaults):
  path = write_jsonl(tmp_path / "prompts.jsonl", rows)
  d = jobs.Defaults(**{"steps": STEPS, "sampler": "ddim", "height": SIZE, "width": SIZE, **defaults})
  return jobs.resolve(jobs.read_prompts(path), d, model, names=NAMES)


def test_bad_settings_are_refused_before_rendering(files, sd1, tmp_path):
  echo = QUIET["echo"]
  one = jobs.load_controlnets(sd1, [(NETS[0], 1.0)], names=NAMES, echo=echo)
  two = jobs.load_controlnets(sd1, [(NETS[0], 1.0), (NETS[1], 1.0)], names=NAMES, echo=echo)
  with pytest.raises(jobs.JobError, match=r"^--controlnet: .*absent does not exist"):
    jobs.load_controlnets(sd1, [(str(tmp_path / "absent"), 1.0)], names=NAMES, echo=echo)
  with pytest.raises(jobs.JobError, match=r"^--controlnet: .*pipe_sdxl does not fit .*: controlnets\[0\] does not fit "
                                          r"the U-Net: its addition_embed_type"):
    jobs.load_controlnets(sd1, [(os.path.join(FIXTURES, "controlnet", "pipe_sdxl"), 1.0)], names=NAMES, echo=echo)
  with pytest.raises(jobs.JobError, match=r"^--ip_adapter needs --image_encoder"):
    jobs.load_ip_adapters(sd1, [(ADAPTER, 1.0)], None, names=NAMES, echo=echo)
  with pytest.raises(jobs.JobError, match=r"^--ip_adapter: .*unet_sdxl.safetensors: "):
    jobs.load_ip_adapters(sd1, [(os.path.join(FIXTURES, "ip_adapter", "unet_sdxl.safetensors"), 1.0)], ENCODER,
                          names=NAMES, echo=echo)
  fifo = str(tmp_path / "fifo.png")
  os.mkfifo(fifo)
  zero = str(tmp_path / "zero.png")
  os.symlink("/dev/zero", zero)
  text = str(tmp_path / "text.png")
  with open(text, "w") as f:
    f.write("not an image")
  c1 = files["c1"]
  where = r"^.*prompts.jsonl:1: field "
  cases = [
      (two, {"control_image": c1}, where + r"'control_image': 1 control image\(s\) for the job's 2 ControlNet"),
      (two, {"control_image": [c1, c1], "controlnet_conditioning_scale": [1, 2, 3]},
       where + r"'controlnet_conditioning_scale': 3 value\(s\) for the job's 2 ControlNet"),
      (one, {"control_image": fifo}, where + r"'control_image': .*fifo.png is not a regular file"),
      (one, {"control_image": zero}, where + r"'control_image': .*zero.png is not a regular file"),
      (one, {"control_image": text}, where + r"'control_image': cannot read image .*text.png"),
      (one, {"control_image": str(tmp_path / "absent.png")}, where + r"'control_image': image file .* does not exist"),
      (one, {"control_image": c1, "control_guidance_start": 0.5, "control_guidance_end": 0.5},
       where + r"'control_guidance_end': control_guidance_start 0.5 must be below"),
      (one, {"control_image": c1, "control_guidance_end": 1.5}, where + r"'control_guidance_end': must be in \[0, 1\]"),
      (one, {"control_image": c1, "controlnet_conditioning_scale": -1},
       where + r"'controlnet_conditioning_scale': must be >= 0"),
      (one, {}, r"^--control_image: the job has 1 ControlNet\(s\): every prompt needs a control image"),
      (sd1, {"control_image": c1}, where + r"'control_image': the job has no ControlNet \(pass --controlnet PATH\)"),
      (sd1, {"ip_adapter_scale": 0.5}, where + r"'ip_adapter_scale': the job has no IP-Adapter"),
      (sd1, {"high_noise_frac": 0.5}, where + r"'high_noise_frac': the job has no refiner"),
  ]
  for model, fields, match in cases:
    with pytest.raises(jobs.JobError, match=match):
      resolve(model, [{"prompt": "x", **fields}], tmp_path)
  with pytest.raises(jobs.JobError, match=where + r"'control_image' must be str or a non-empty list of strs"):
    resolve(one, [{"prompt": "x", "control_image": [1]}], tmp_path)
  with pytest.raises(jobs.JobError, match=r"^--control_image: .*fifo.png is not a regular file"):
    resolve(one, [{"prompt": "x"}], tmp_path, control_image=(fifo,))
  ip = jobs.load_ip_adapters(sd1, [(ADAPTER, 1.0)], ENCODER, names=NAMES, echo=echo)
  with pytest.raises(jobs.JobError, match=r"^--ip_adapter_image: the job has 1 IP-Adapter"):
    resolve(ip, [{"prompt": "x"}], tmp_path)
  with pytest.raises(jobs.JobError, match=where + r"'ip_adapter_image': .*zero.png is not a regular file"):
    resolve(ip, [{"prompt": "x", "ip_adapter_image": zero}], tmp_path)
  # sample.py's own checks: one line, naming the flag, before the model loads.
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  base = [sys.executable, os.path.join(ROOT, "sample.py"), "--model", files["model"], "--prompt", "x", "--outdir",
          str(tmp_path / "o")]
  for extra, words in ((["--ip_adapter", ADAPTER], "error: --ip_adapter needs --image_encoder"),
                       (["--controlnet", NETS[0], "--control_image", c1, "--control_image", c1],
                        "error: --control_image: 2 given for 1 --controlnet"),
                       (["--control_image", c1], "error: --control_image applies with --controlnet")):
    proc = subprocess.run(base + extra, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(words), proc.stderr[-1500:]


def test_high_noise_frac_per_line_with_a_refiner(sd1, tmp_path):
  """A refiner job's txt2img lines may set their own high_noise_frac (default: --high_noise_frac): it is part of the
  compile group (the step split is static), recorded per image and checked per line; img2img lines have none.
  (Resolution only, nothing renders: the sd1 model stands in as its own refiner; a real SDXL base + refiner job is
  tests/test_refiner.py's.)"""
  model = dataclasses.replace(sd1, refiner=jobs.Refiner(sd1.sd, sd1.params, sd1.tokenizers, "refiner", 0.8))
  init = write_png(tmp_path / "init.png", (32, 32, 3), 0)
  specs = resolve(model, [{"prompt": "a"}, {"prompt": "b", "high_noise_frac": 0.5},
                          {"prompt": "c", "init_image": init, "strength": 0.5}], tmp_path, sampler="euler", steps=4)
  assert [s.high_noise_frac for s in specs] == [0.8, 0.5, None]
  assert specs[0].group[:-1] == specs[1].group[:-1] and specs[0].group != specs[1].group
  jobs.check_refiner(model, specs)
  assert jobs.record(jobs.items(specs, 0)[1], model)["high_noise_frac"] == 0.5
  assert "high_noise_frac" not in jobs.record(jobs.items(specs, 0)[2], model)
  where = r"^.*prompts.jsonl:1: field 'high_noise_frac': "
  for value, match in ((1.0, where + r"must be in \(0, 1\), got 1.0"), (0.0, where + r"must be in \(0, 1\]"),
                       ("0.5", r"^.*prompts.jsonl:1: field 'high_noise_frac' must be a number")):
    with pytest.raises(jobs.JobError, match=match):
      resolve(model, [{"prompt": "a", "high_noise_frac": value}], tmp_path, sampler="euler", steps=4)
  with pytest.raises(jobs.JobError, match=r"with a refiner at high_noise_frac 0.1: "):
    jobs.check_refiner(model, resolve(model, [{"prompt": "a", "high_noise_frac": 0.1}], tmp_path, sampler="euler",
                                      steps=4))
