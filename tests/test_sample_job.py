"""Text-to-image sampling jobs (sdjax.jobs, sample.py --model): resume after SIGKILL, batch/device
independence, per-prompt settings, errors, SDXL, img2img and inpainting. Tiny random pipelines, 2 steps."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

from sdjax import jobs
from sdjax.convert import random as random_pipeline

TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "models", "tokenizer")
# Two groups: 32x32 with guidance and rescale (5 images, one batch on 8 devices), 16x16 without guidance.
PROMPTS = [
    {"prompt": "a red cat", "seed": 42, "negative_prompt": "blurry", "num_images": 3, "guidance_scale": 5.0,
     "guidance_rescale": 0.7},
    {"prompt": "a blue dog", "num_images": 2, "guidance_rescale": 0.5},
    {"prompt": "a green bird", "height": 16, "width": 16, "guidance_scale": 1.0, "steps": 3},
]
FLAGS = dict(steps=2, sampler="ddim", height=32, width=32, seed=7, num_images=1)
# How errors name the job-wide settings: by sample.py's flags (its FLAG_OF), as when run through sample.py.
NAMES = {"sampler": "--sampler", "width": "--width", "mask": "--mask", "outdir": "--outdir", "overwrite": "--overwrite"}


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("job_models")
  out = {}
  for name, kind, inpainting in (("sd1", "sd1", False), ("inpaint", "sd1", True), ("sdxl", "sdxl", False)):
    out[name] = str(root / name)
    random_pipeline.write_random_pipeline(out[name], kind, tokenizer=TOKENIZER, inpainting=inpainting)
  return out


@pytest.fixture(scope="module")
def sd1(folders):
  return jobs.load_model(folders["sd1"])


def write_jsonl(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def make_job(outdir, prompts_file, **kw):
  flags = {**FLAGS, **kw.pop("defaults", {})}
  return jobs.Job(str(outdir), tuple(jobs.read_prompts(prompts_file)), jobs.Defaults(**flags), names=NAMES, **kw)


def cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return [sys.executable, os.path.join(ROOT, "sample.py"), *args], env


def job_args(model, prompts_file, outdir):
  return ["--model", model, "--prompts", prompts_file, "--outdir", str(outdir), "--steps", "2", "--sampler", "ddim",
          "--height", "32", "--width", "32", "--seed", "7", "--batch_size", "8"]


def pngs(outdir):
  return sorted(n for n in os.listdir(outdir) if n.endswith(".png"))


def pixels(path):
  return np.asarray(Image.open(path))


def read_index(outdir):
  with open(os.path.join(outdir, "index.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sd1):
  """An uninterrupted in-process run of PROMPTS on all 8 devices."""
  root = tmp_path_factory.mktemp("job_ref")
  prompts = write_jsonl(root / "prompts.jsonl", PROMPTS)
  outdir = root / "ref"
  summary = jobs.run(make_job(outdir, prompts, batch_size=8, grid=True), sd1, progress=False, echo=lambda s: None)
  return str(outdir), prompts, summary


def test_reference_outputs_and_metadata(reference):
  outdir, _, summary = reference
  assert summary["rendered"] == 6 and summary["skipped"] == 0 and summary["remaining"] == 0
  assert summary["groups"] == 2 and summary["images_per_s"] > 0
  assert pngs(outdir) == ["00000_000.png", "00000_001.png", "00000_002.png", "00001_000.png", "00001_001.png",
                          "00002_000.png"]
  assert not os.path.exists(os.path.join(outdir, "grid.png"))  # sizes differ
  index = read_index(outdir)
  assert [r["file"] for r in index] == pngs(outdir)
  cat, dog, bird = index[0], index[3], index[5]
  # Per-prompt fields override the job defaults; the prompt's own seed gives seeds 42, 43, 44.
  assert [r["seed"] for r in index[:3]] == [42, 43, 44]
  assert cat["negative_prompt"] == "blurry" and cat["guidance_scale"] == 5.0 and cat["steps"] == 2
  assert dog["guidance_rescale"] == 0.5 and dog["guidance_scale"] == 7.5 and dog["negative_prompt"] == ""
  assert bird["steps"] == 3 and bird["height"] == bird["width"] == 16 and bird["guidance_scale"] == 1.0
  assert pixels(os.path.join(outdir, "00002_000.png")).shape == (16, 16, 3)
  assert pixels(os.path.join(outdir, "00000_000.png")).shape == (32, 32, 3)
  derived = {r["seed"] for r in index[3:]}
  assert len(derived) == 3 and all(0 <= s < 2**31 for s in derived)
  meta = Image.open(os.path.join(outdir, "00000_001.png")).text
  assert meta["prompt"] == "a red cat" and meta["seed"] == "43" and meta["sampler"] == "ddim"
  assert meta["model_hash"] == cat["model_hash"] and meta["mode"] == "txt2img" and "sdjax_version" in meta
  with open(os.path.join(outdir, "job.json")) as f:
    job = json.load(f)
  assert job["seed"] == 7 and len(job["prompts"]) == 3 and job["prompts"][2]["steps"] == 3
  # Different pixels for different seeds.
  assert not np.array_equal(pixels(os.path.join(outdir, "00000_000.png")), pixels(os.path.join(outdir, "00000_001.png")))


def test_killed_job_resumes_to_the_same_files(reference, folders, sd1, tmp_path):
  ref_dir, prompts, _ = reference
  outdir = tmp_path / "run"
  argv, env = cli(*job_args(folders["sd1"], prompts, outdir))
  p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  # The first group's PNGs appear, then the second group compiles: the kill lands between them.
  while time.time() < deadline and p.poll() is None and not (os.path.isdir(outdir) and pngs(outdir)):
    time.sleep(0.02)
  p.send_signal(signal.SIGKILL)
  p.wait()
  partial = pngs(outdir)
  assert partial and len(partial) < 6, f"killed too late: {partial}"
  with open(outdir / "index.jsonl", "a") as f:  # what a kill mid-append leaves behind
    f.write('{"file": "00000_0')
  (outdir / "00002_000.png.tmp").write_bytes(b"half a png")

  # The same job again (in-process, where the reference's compiled functions are cached).
  s = jobs.run(make_job(outdir, prompts, batch_size=8), sd1, progress=False, echo=lambda s: None)
  assert s["skipped"] == len(partial) and s["rendered"] == 6 - len(partial) and s["remaining"] == 0
  assert sorted(os.listdir(outdir)) == sorted(os.listdir(ref_dir)), "same set of files"
  for name in pngs(ref_dir):  # pixels and metadata
    assert (outdir / name).read_bytes() == open(os.path.join(ref_dir, name), "rb").read(), name
  assert (outdir / "index.jsonl").read_text() == open(os.path.join(ref_dir, "index.jsonl")).read()


def test_max_images_then_resume_in_process(reference, sd1, tmp_path):
  ref_dir, prompts, _ = reference
  outdir = tmp_path / "part"
  s = jobs.run(make_job(outdir, prompts, batch_size=8, max_images=2), sd1, progress=False, echo=lambda s: None)
  assert s["rendered"] == 2 and s["remaining"] == 4 and len(read_index(outdir)) == 2
  s = jobs.run(make_job(outdir, prompts, batch_size=8), sd1, progress=False, echo=lambda s: None)
  assert s["rendered"] == 4 and s["skipped"] == 2 and s["remaining"] == 0
  assert (outdir / "index.jsonl").read_text() == open(os.path.join(ref_dir, "index.jsonl")).read()
  for name in pngs(ref_dir):
    assert (outdir / name).read_bytes() == open(os.path.join(ref_dir, name), "rb").read(), name
  s = jobs.run(make_job(outdir, prompts, batch_size=8), sd1, progress=False, echo=lambda s: None)
  assert s["rendered"] == 0 and s["skipped"] == 6 and len(read_index(outdir)) == 6


def test_batch_size_and_device_count_do_not_change_images(reference, sd1, tmp_path):
  """The reference ran one image per device on 8 devices; here 3 images per batch on 1 device."""
  ref_dir, _, _ = reference
  batch_size = 3
  # The cat prompt moved to another line of another file: its own seed still gives the same images.
  rows = [{"prompt": "a blue dog", "num_images": 2, "guidance_rescale": 0.5}, PROMPTS[0]]
  prompts = write_jsonl(tmp_path / "moved.jsonl", rows)
  outdir = tmp_path / f"bs{batch_size}"
  one_device = jax.devices()[:1]
  jobs.run(make_job(outdir, prompts, batch_size=batch_size, defaults={"seed": 7}), sd1, devices=one_device,
           progress=False, echo=lambda s: None)
  for j in range(3):
    np.testing.assert_array_equal(pixels(outdir / f"00001_{j:03d}.png"),
                                  pixels(os.path.join(ref_dir, f"00000_{j:03d}.png")), err_msg=f"cat {j}")
  # The dog's seeds are derived from its line number: same pixels only where (seed, p, j) match.
  index = {r["file"]: r for r in read_index(outdir)}
  ref_index = {r["file"]: r for r in read_index(ref_dir)}
  assert index["00001_002.png"]["seed"] == 44 and index["00000_000.png"]["seed"] != ref_index["00001_000.png"]["seed"]


def test_rerun_with_changed_settings_is_refused(reference, sd1):
  ref_dir, prompts, _ = reference
  with pytest.raises(jobs.JobError, match=r"seed=7.*8.*--overwrite"):
    jobs.run(make_job(ref_dir, prompts, defaults={"seed": 8}), sd1, progress=False)
  with pytest.raises(jobs.JobError, match=r"prompts\[0\]\.steps"):
    jobs.run(make_job(ref_dir, prompts, defaults={"steps": 4}), sd1, progress=False)


def test_overwrite_rerenders_only_changed_images(reference, sd1, tmp_path):
  ref_dir, prompts, _ = reference
  outdir = tmp_path / "copy"
  shutil.copytree(ref_dir, outdir)
  s = jobs.run(make_job(outdir, prompts, defaults={"seed": 8}, overwrite=True), sd1, progress=False,
               echo=lambda s: None)
  assert s["skipped"] == 3 and s["rendered"] == 3  # the cat has its own seed: unchanged
  for name in ("00000_000.png", "00001_000.png"):
    same = (outdir / name).read_bytes() == open(os.path.join(ref_dir, name), "rb").read()
    assert same == name.startswith("00000"), name
  with open(outdir / "job.json") as f:
    assert json.load(f)["seed"] == 8


@pytest.mark.parametrize("line, match", [
    ('{"prompt": "x", "guidance_scale": "high"}', r"bad\.jsonl:2: field 'guidance_scale' must be a number"),
    ('{"negative_prompt": "x"}', r"bad\.jsonl:2: field 'prompt' is required"),
    ('{"prompt": "x", "colour": 1}', r"bad\.jsonl:2: unknown field 'colour'"),
    ('{"prompt": "x"', r"bad\.jsonl:2: not valid JSON"),
    ('{"prompt": "x", "sampler": "magic"}', r"bad\.jsonl:2: field 'sampler': unknown sampler 'magic'"),
    ('{"prompt": "x", "height": 33}', r"bad\.jsonl:2: field 'height': 33 must be a positive multiple of 2"),
    ('{"prompt": "x", "guidance_scale": -1}', r"bad\.jsonl:2: field 'guidance_scale': must be >= 0"),
    ('{"prompt": "x", "init_image": "nope.png"}', r"bad\.jsonl:2: field 'init_image': image file .*nope.png"),
    ('{"prompt": "x", "init_image": "ok.png", "strength": 0}', r"bad\.jsonl:2: field 'strength': must be in"),
])
def test_bad_prompt_lines(sd1, tmp_path, line, match):
  Image.new("RGB", (32, 32)).save(tmp_path / "ok.png")
  path = tmp_path / "bad.jsonl"
  path.write_text('{"prompt": "fine"}\n' + line + "\n")
  with pytest.raises(jobs.JobError, match=match):
    jobs.resolve(jobs.read_prompts(str(path)), jobs.Defaults(**FLAGS), sd1)


def test_bad_flags(sd1):
  raw = [({"prompt": "x"}, "--prompt #0")]
  with pytest.raises(jobs.JobError, match=r"--sampler: unknown sampler 'nope'"):
    jobs.resolve(raw, jobs.Defaults(**{**FLAGS, "sampler": "nope"}), sd1, names=NAMES)
  with pytest.raises(jobs.JobError, match=r"--width: 31 must be a positive multiple of 2"):
    jobs.resolve(raw, jobs.Defaults(**{**FLAGS, "width": 31}), sd1, names=NAMES)
  with pytest.raises(jobs.JobError, match=r"--mask: a mask needs an init_image"):
    jobs.resolve(raw, jobs.Defaults(**{**FLAGS, "mask": __file__}), sd1, names=NAMES)


def test_cli_errors_are_one_line(folders, tmp_path):
  path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}, {"prompt": "y", "steps": "many"}])
  argv, env = cli("--model", folders["sd1"], "--prompts", path, "--outdir", str(tmp_path / "o"))
  r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1 and r.stderr.strip() == f"error: {path}:2: field 'steps' must be int, got 'many'"


def test_sdxl_img2img_and_inpainting(folders, sd1, tmp_path):
  quiet = dict(progress=False, echo=lambda s: None)
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(tmp_path / "init.png")
  mask = np.zeros((32, 32), np.uint8)
  mask[8:24, 8:24] = 255
  Image.fromarray(mask).save(tmp_path / "mask.png")

  sdxl = jobs.load_model(folders["sdxl"])
  prompts = write_jsonl(tmp_path / "xl.jsonl", [{"prompt": "a castle"}, {"prompt": "a boat", "negative_prompt": "fog"}])
  s = jobs.run(make_job(tmp_path / "xl", prompts, grid=True), sdxl, **quiet)
  assert s["rendered"] == 2 and os.path.exists(tmp_path / "xl" / "grid.png")
  assert pixels(tmp_path / "xl" / "00001_000.png").shape == (32, 32, 3)

  prompts = write_jsonl(tmp_path / "i2i.jsonl", [{"prompt": "a painting", "init_image": "init.png", "strength": 0.5,
                                                  "steps": 4}])
  s = jobs.run(make_job(tmp_path / "i2i", prompts), sd1, **quiet)
  rec = read_index(tmp_path / "i2i")[0]
  assert s["rendered"] == 1 and rec["mode"] == "img2img" and rec["strength"] == 0.5
  assert rec["init_image"] == str(tmp_path / "init.png")

  inpaint = jobs.load_model(folders["inpaint"])
  with pytest.raises(jobs.JobError, match=r"--mask: this model has an inpainting U-Net"):
    jobs.resolve([({"prompt": "x", "init_image": str(tmp_path / "init.png")}, "--prompt #0")], jobs.Defaults(**FLAGS),
                 inpaint, names=NAMES)
  prompts = write_jsonl(tmp_path / "inp.jsonl", [{"prompt": "a hole", "init_image": "init.png", "mask": "mask.png"}])
  s = jobs.run(make_job(tmp_path / "inp", prompts), inpaint, **quiet)
  rec = read_index(tmp_path / "inp")[0]
  assert s["rendered"] == 1 and rec["mode"] == "inpaint" and rec["strength"] == 1.0
  assert Image.open(tmp_path / "inp" / "00000_000.png").text["mask"] == str(tmp_path / "mask.png")
