"""diffusers' SDXL invisible watermark (sdjax.watermark): bit-identical to diffusers + invisible-watermark on the
fixtures of tools/make_watermark_fixtures.py (no torch, OpenCV or PyWavelets here), read back by `detect`, and
written by text-to-image jobs (sdjax.jobs) and sample.py unless turned off."""
import hashlib
import importlib.util
import io
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

from sdjax import jobs, watermark
from sdjax.convert import random as random_pipeline

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "watermark", "sdxl.npz")
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "models", "tokenizer")
CASES = ("noise", "smooth", "odd")  # 256 x 256 noise; a batch of two smooth 256 x 256; 261 x 298


@pytest.fixture(scope="module")
def fx():
  return dict(np.load(FIXTURE))


def case(fx, name):
  """(input uint8 [B, H, W, 3], diffusers' output) of a fixture case."""
  stacked = np.asarray(Image.open(io.BytesIO(fx[f"{name}_in"].tobytes())))
  u = stacked.reshape(len(fx[f"{name}_bits_in"]), -1, *stacked.shape[1:])
  return u, (u.astype(np.int16) + fx[f"{name}_delta"]).astype(np.uint8)


def sha(a):
  return hashlib.sha256(np.ascontiguousarray(a, np.float32).tobytes()).hexdigest()


def smooth_image(seed, h, w):
  """A photo-like uint8 [H, W, 3] image: a few colour waves, a hard edge."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  f = rng.uniform(0.5, 6, (3, 4, 2))
  img = 128 + sum(rng.uniform(20, 40) * np.sin(2 * np.pi * (f[:, k, :1, None] * yy + f[:, k, 1:, None] * xx) + k)
                  for k in range(4))
  img[:, : h // 3, w // 2:] += 40
  return np.clip(np.round(img), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def test_message_is_diffusers(fx):
  np.testing.assert_array_equal(watermark.BITS, fx["message_bits"])
  assert len(watermark.BITS) == 48


@pytest.mark.parametrize("name", CASES)
def test_apply_is_bit_identical_to_diffusers(fx, name):
  u, want = case(fx, name)
  np.testing.assert_array_equal(watermark.apply(u), want)
  np.testing.assert_array_equal(watermark.apply(u[0]), want[0])  # one image [H, W, 3]
  # The float path, diffusers' apply_watermark itself: the same float32 input, every output bit the same.
  x = np.float32(2.0) * (u.astype(np.float32) / np.float32(255.0)) - np.float32(1.0)
  assert sha(x) == str(fx[f"{name}_float_in_sha256"])
  assert sha(watermark.apply_float(x)) == str(fx[f"{name}_float_out_sha256"])


@pytest.mark.parametrize("name", CASES)
def test_imwatermark_bits_match_its_decoder(fx, name):
  u, out = case(fx, name)
  np.testing.assert_array_equal(np.stack([watermark.imwatermark_bits(i) for i in u]), fx[f"{name}_bits_in"])
  np.testing.assert_array_equal(np.stack([watermark.imwatermark_bits(i) for i in out]), fx[f"{name}_bits_out"])


def test_size_rules_follow_diffusers(fx):
  # diffusers returns a batch narrower than 256 px unchanged; imwatermark raises under 256 x 256 pixels.
  assert bool(fx["narrow_unchanged"]) and bool(fx["small_raises"])
  assert watermark.applies(256, 256) and watermark.applies(261, 298) and watermark.applies(1024, 256)
  assert not watermark.applies(320, 200) and not watermark.applies(128, 320) and not watermark.applies(255, 256)
  for h, w in ((256, 200), (128, 320)):
    img = smooth_image(0, h, w)
    np.testing.assert_array_equal(watermark.apply(img[None]), img[None])
    marked, label = watermark.mark(img)
    assert marked is img and label == "none"
  with pytest.raises(ValueError, match="too small"):
    watermark.detect(np.zeros((128, 320, 3), np.uint8))
  assert watermark.label(512, 512) == watermark.LABEL == "sdxl-dwtDct-48bit"
  assert watermark.label(512, 512, enabled=False) == watermark.label(64, 64) == "none"
  gray = np.zeros((2, 256, 256, 1), np.uint8)
  assert watermark.mark(gray)[0] is gray and watermark.mark(gray)[1] == "none"
  with pytest.raises(ValueError, match="uint8"):
    watermark.apply(np.zeros((256, 256, 3), np.float32))


def test_fma_rounds_once():
  # 2^-24 (1 + 2^-23) (1 - 2^-23) + (1 + 2^-23) lies just below a float32 tie, which its float64 sum rounds to.
  a, b, c = np.float32(2.0**-24 * (1 + 2.0**-23)), np.float32(1 - 2.0**-23), np.float32(1 + 2.0**-23)
  assert np.float32(np.float64(a) * np.float64(b) + np.float64(c)) == np.float32(1 + 2.0**-22)  # rounded twice
  assert watermark._fma32(np.array([a, -a]), b, np.array([c, -c])).tolist() == [1 + 2.0**-23, -(1 + 2.0**-23)]


def test_detect_reads_the_message_back(fx):
  for name in CASES:
    u, out = case(fx, name)
    for marked, plain in zip(out, u):
      d = watermark.detect(marked)
      assert d.match and d.errors <= 6, (name, d.errors)
      assert not watermark.detect(plain).match
      assert watermark.detect(plain).errors >= 16, name
  # Larger images (more blocks per bit) read it back more surely.
  img = np.stack([smooth_image(s, 512, 512) for s in (1, 2)])
  for marked, plain in zip(watermark.apply(img), img):
    assert watermark.detect(marked).errors <= 2 and not watermark.detect(plain).match
  # imwatermark's own reader does far worse on the same images (its 8-bit U channel: see imwatermark_bits).
  wrong = [int(np.sum(watermark.imwatermark_bits(m) != watermark.BITS)) for m in watermark.apply(img)]
  assert min(wrong) >= 8, wrong


# --- jobs and sample.py --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("wm_model") / "sd1")
  random_pipeline.write_random_pipeline(folder, "sd1", tokenizer=TOKENIZER)
  return jobs.load_model(folder)


def fake_renderer(monkeypatch):
  """Replace the compiled pipeline by smooth images from each image's seed: at 256 px a tiny U-Net's
  attention over 16k latent tokens is too slow for a test, and the watermark is applied after it anyway."""
  def compiled_for(model, params, group, args, mesh, names=None):
    _, h, w = group[:3]
    return (lambda params, prompt, seeds, image, mask, control: (np.stack(
        [smooth_image(int(s), h, w) for s in np.asarray(seeds)]), np.zeros(len(seeds), bool))), 0.0
  monkeypatch.setattr(jobs, "compiled_for", compiled_for)


def run_job(sd1, outdir, **kw):
  prompts = (({"prompt": "a red cat", "num_images": 2}, "#0"), ({"prompt": "a dot", "height": 64, "width": 64}, "#1"))
  defaults = jobs.Defaults(steps=2, sampler="ddim", height=256, width=256, seed=3)
  return jobs.run(jobs.Job(str(outdir), prompts, defaults, batch_size=8, **kw), sd1, progress=False,
                  echo=lambda s: None)


def test_job_writes_watermarked_pngs(sd1, tmp_path, monkeypatch):
  fake_renderer(monkeypatch)
  run_job(sd1, tmp_path / "on")
  run_job(sd1, tmp_path / "off", watermark=False)
  names = ["00000_000.png", "00000_001.png", "00001_000.png"]
  for folder, on in (("on", True), ("off", False)):
    with open(tmp_path / folder / "index.jsonl") as f:
      index = {r["file"]: r for r in map(json.loads, f)}
    with open(tmp_path / folder / "job.json") as f:
      assert json.load(f)["watermark"] is on
    for name in names:
      want = watermark.LABEL if on and name.startswith("00000") else "none"  # the 64 px image cannot carry it
      assert Image.open(tmp_path / folder / name).text["watermark"] == index[name]["watermark"] == want
  for name in names[:2]:
    marked = np.asarray(Image.open(tmp_path / "on" / name))
    plain = np.asarray(Image.open(tmp_path / "off" / name))
    np.testing.assert_array_equal(marked, watermark.apply(plain))  # the PNG read back: exactly apply's output
    assert watermark.detect(marked).match and not watermark.detect(plain).match
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "on" / names[2])),
                                np.asarray(Image.open(tmp_path / "off" / names[2])))
  # Watermarking changes the images: continuing the job without it is refused.
  with pytest.raises(jobs.JobError, match="watermark=True"):
    run_job(sd1, tmp_path / "on", watermark=False)


def test_job_grid_is_watermarked(sd1, tmp_path, monkeypatch):
  fake_renderer(monkeypatch)
  prompts = (({"prompt": "a", "num_images": 2}, "#0"),)
  defaults = jobs.Defaults(steps=2, sampler="ddim", height=256, width=256, seed=3)
  jobs.run(jobs.Job(str(tmp_path), prompts, defaults, grid=True), sd1, progress=False, echo=lambda s: None)
  grid = Image.open(tmp_path / "grid.png")
  assert grid.text["watermark"] == watermark.LABEL and watermark.detect(np.asarray(grid)).match


@pytest.fixture(scope="module")
def sample_cli():
  """sample.py loaded in-process (its flags on absl's global FLAGS, defined once per process: other test modules
  import this fixture, and a second load would define every flag again)."""
  module = sys.modules.get("sdjax_sample_cli")
  if module is None:
    spec = importlib.util.spec_from_file_location("sdjax_sample_cli", os.path.join(ROOT, "sample.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["sdjax_sample_cli"] = module
  yield module
  module.FLAGS.unparse_flags()


@pytest.mark.parametrize("flag", [[], ["--no_watermark"]])
def test_sample_py_no_watermark_flag(sample_cli, tmp_path, monkeypatch, capsys, flag):
  """--no_watermark reaches the text-to-image job and the class-conditional sampler (both stubbed)."""
  from sdjax import sampling
  seen = {}
  summary = {"num_images": 0, "outdir": "o", "checkpoint_step": 0, "sampler": "ddim", "steps": 1,
             "guidance_scale": 1.0, "compile_s": 0.0, "images_per_s": 0.0}
  monkeypatch.setattr(jobs, "load_model", lambda *a, **kw: "model")
  monkeypatch.setattr(jobs, "run", lambda job, model: seen.update(job=job))  # None: nothing to print
  monkeypatch.setattr(sampling, "sample_run", lambda wd, **kw: seen.update(run=kw) or summary)
  flags = sample_cli.FLAGS
  try:
    flags(["sample.py", "--model", str(tmp_path), "--prompt", "x", "--outdir", str(tmp_path / "o"), *flag])
    sample_cli.text_job()
    flags.unparse_flags()
    flags(["sample.py", "--workdir", str(tmp_path), *flag])
    sample_cli.sample_classes()
  finally:
    flags.unparse_flags()
  assert seen["job"].watermark is (not flag) and seen["run"]["watermark"] is (not flag)
  assert "wrote 0 images" in capsys.readouterr().out


def test_a_job_folder_from_before_the_watermark_continues_only_unwatermarked(tmp_path):
  # Its job.json has no "watermark": its images carry none, so continuing it needs --no_watermark (or a new
  # folder / --overwrite); with the watermark on, the refusal names the setting.
  from sdjax import jobs
  info = {"model_hash": "h", "seed": 0, "c2pa": False, "safety_checker": False, "preset": None, "prompts": []}
  (tmp_path / "job.json").write_text(json.dumps(info))
  jobs.check_job(str(tmp_path), {**info, "watermark": False})
  with pytest.raises(jobs.JobError, match="watermark=False, this one has True"):
    jobs.check_job(str(tmp_path), {**info, "watermark": True})
