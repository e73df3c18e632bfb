"""The evaluation command (eval.py, logic in sdjax.eval.run) in-process: Inception FID with random weights
(sdjax.eval.inception.random_state_dict saved as .npz) on two small PNG folders, digit features on the bundled
digits (a folder against itself, a stats file round trip, KID and precision/recall), a job folder's prompts scored
by a tiny CLIP, a run workdir (its rendering replaced by a stub: a real training run is test_e2e's cost), and the
one-line errors. No torch.

One Inception FID only ([8, 32, 32, 3] batches over the 8 fake devices): its 2048-d Fréchet distance (two float64
eigendecompositions) takes ~10 s on a shared CI core; the folder/stats logic is the same for both feature networks
and is checked with the 128-d digit features.
"""
import functools
import importlib.resources
import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

from sdjax.eval import fid, inception

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def _load_cli():
  spec = importlib.util.spec_from_file_location("sdjax_eval_cli", os.path.join(ROOT, "eval.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


CLI = _load_cli()


def _write_pngs(folder, images, names=None):
  os.makedirs(folder, exist_ok=True)
  for i, img in enumerate(images):
    Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(
        os.path.join(folder, names[i] if names else f"{i:03d}.png"))
  return str(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("eval")
  weights = str(tmp / "inception.npz")
  np.savez(weights, **inception.random_state_dict(0))
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  ramp = np.linspace(0, 255, 32)[None, :, None, None] * rng.random((8, 1, 1, 3))
  smooth = np.broadcast_to(ramp.transpose(0, 2, 1, 3), (8, 32, 32, 3)).astype(np.uint8)
  return {"weights": weights, "a": _write_pngs(tmp / "a", noise), "b": _write_pngs(tmp / "b", smooth), "tmp": tmp}


def _main(capsys, *args):
  status = CLI.main(["--noprogress", *args])
  out = capsys.readouterr()
  return status, out.out, out.err


def test_inception_fid_of_two_folders_saves_reference_stats(setup, capsys):
  w, a, b, tmp = setup["weights"], setup["a"], setup["b"], setup["tmp"]
  stats = str(tmp / "a_stats.npz")
  status, out, err = _main(capsys, "--real", a, "--fake", b, "--inception_weights", w, "--batch_size", "8",
                           "--save_real_stats", stats)
  assert status == 0, err
  r = json.load(open(os.path.join(b, "eval_inception.json")))  # default: next to the fake images
  assert "FID (Inception)" in out and r["num_real"] == r["num_fake"] == 8 and r["fid"] > 1.0
  mu, sigma = fid.load_stats(stats)
  assert mu.shape == (inception.FEATURE_DIM,) and sigma.shape == (inception.FEATURE_DIM,) * 2


def test_digit_features_bundled_and_extra_metrics(tmp_path, capsys):
  from sdjax.data import load_bundled
  from sdjax.eval import digits, precision_recall
  train = load_bundled("train")[0][:40]
  fake = _write_pngs(tmp_path / "digits", train)
  status, out, err = _main(capsys, "--real", "bundled:test", "--fake", fake, "--features", "digits",
                           "--metrics", "fid,kid,precision,recall")
  assert status == 0, err
  r = json.load(open(os.path.join(fake, "eval_digits.json")))
  assert "FID (MNIST classifier features)" in out and r["num_real"] == 500 and r["num_fake"] == 40
  assert r["fid"] == pytest.approx(digits.digit_fid(train), rel=1e-6)  # the shipped test-split stats
  test = load_bundled("test")[0]
  real_f, fake_f = np.asarray(digits.features(digits.load_params(), test)), np.asarray(
      digits.features(digits.load_params(), train))
  assert (r["precision"], r["recall"]) == pytest.approx(precision_recall.precision_recall(real_f, fake_f), abs=1e-6)
  assert r["kid"] == pytest.approx(fid.kid(real_f, fake_f, subset_size=40)[0], rel=1e-4, abs=1e-6)
  assert r["kid_subset_size"] == 40
  # A folder against itself: 0; its saved statistics against another folder: the folders' FID. (With the 128-d
  # digit features: the path is the same for Inception, whose 2048-d Fréchet distance costs ~10 s on a CI core.)
  other = _write_pngs(tmp_path / "other", load_bundled("train")[0][100:116])
  stats = str(tmp_path / "stats.npz")
  runs = {}
  for name, args in (("self", ["--real", fake, "--fake", fake]),
                     ("folders", ["--real", fake, "--fake", other, "--save_real_stats", stats]),
                     ("stats", ["--real", stats, "--fake", other])):
    status, out, err = _main(capsys, *args, "--features", "digits", "--out", str(tmp_path / f"{name}.json"))
    assert status == 0, err
    runs[name] = json.load(open(tmp_path / f"{name}.json"))["fid"]
  assert runs["folders"] > 0.1 and abs(runs["self"]) < 1e-6 * runs["folders"]
  assert abs(runs["stats"] - runs["folders"]) < 1e-9 * runs["folders"]
  status, out, err = _main(capsys, "--real", fake, "--save_real_stats", str(tmp_path / "only.npz"), "--features",
                           "digits")  # no --fake: the reference statistics only
  assert status == 0 and "wrote the 128-d digits feature statistics" in out, err
  for x, y in zip(fid.load_stats(str(tmp_path / "only.npz")), fid.load_stats(stats)):
    np.testing.assert_array_equal(x, y)


def test_job_folder_clip_score_and_workdir(tmp_path, capsys, monkeypatch):
  import jax
  from sdjax import sampling
  from sdjax.convert.clip_vision import load_clip_model
  from sdjax.data import load_bundled
  from sdjax.eval import clip_score, digits
  from sdjax.models import clip
  images = load_bundled("train")[0][:16]
  prompts = [f"a handwritten digit {i}" for i in range(16)]
  job = _write_pngs(tmp_path / "job", images, [f"{i:05d}_000.png" for i in range(16)])
  with open(os.path.join(job, "index.jsonl"), "w") as f:
    f.writelines(json.dumps({"file": f"{i:05d}_000.png", "prompt": p}) + "\n" for i, p in enumerate(prompts))
  model_dir = os.path.join(FIXTURES, "clip_vision_tiny")
  tok_dir = os.path.join(FIXTURES, "models", "tokenizer")
  shipped = str(importlib.resources.files("sdjax.eval").joinpath(digits.TEST_STATS_FILE))  # bundled:test's stats
  status, out, err = _main(capsys, "--real", shipped, "--fake", job, "--features", "digits",
                           "--clip_model", model_dir, "--clip_tokenizer", tok_dir)
  assert status == 0, err
  r = json.load(open(os.path.join(job, "eval_digits.json")))
  model = load_clip_model(model_dir)
  (vision, vp), (text, tp) = model.vision, model.text
  ids = clip.tokenize(clip.load_tokenizer(tok_dir), prompts, max_length=text.config.max_position_embeddings)
  pixels = clip_score.preprocess(np.repeat(images, 3, axis=-1), vision.config.image_size)
  want = jax.jit(functools.partial(clip_score.clip_score, vision_model=vision, text_model=text))(vp, tp, pixels, ids)
  assert "CLIP score" in out and r["clip_score"] == pytest.approx(float(jax.device_get(want)), abs=1e-4)

  # A run workdir: eval.py renders through sdjax.sampling.sample_run (stubbed: writes samples.npz as it does).
  workdir = tmp_path / "run"
  os.makedirs(workdir / "checkpoints")
  calls = []

  def fake_sample_run(wd, *, outdir, num, **kw):
    calls.append((wd, num, kw))
    np.savez_compressed(os.path.join(outdir, "samples.npz"), images=images, labels=np.zeros(16, np.int32))
    return {"checkpoint_step": 7, "seed": kw["seed"], "sampler": "ddim", "steps": 4, "guidance_scale": 1.0,
            "num_images": 16}

  monkeypatch.setattr(sampling, "sample_run", fake_sample_run)
  status, out, err = _main(capsys, "--real", shipped, "--fake", str(workdir), "--features", "digits",
                           "--num", "2")
  assert status == 0, err
  w = json.load(open(workdir / "eval_digits_step0000007.json"))
  assert calls[0][1] == 2 and w["render"]["checkpoint_step"] == 7
  assert w["fid"] == pytest.approx(r["fid"], rel=1e-9)  # the same 16 images as the job folder
  assert not [n for n in os.listdir(workdir) if n.startswith("sdjax-eval")]


def test_one_line_errors(setup, tmp_path, capsys):
  a, w = setup["a"], setup["weights"]
  empty = tmp_path / "empty"
  empty.mkdir()
  corrupt = tmp_path / "corrupt.npz"
  corrupt.write_bytes(b"not a zip file")
  cases = [
      (["--real", a, "--fake", a, "--inception_weights", str(tmp_path / "missing.pth")], "does not exist"),
      (["--real", a, "--fake", a, "--inception_weights", str(corrupt)], "corrupt.npz"),
      (["--real", a, "--fake", a], "needs --inception_weights"),
      (["--real", "bundled:test", "--fake", str(empty), "--features", "digits"], "holds 0 images"),
      (["--real", "bundled:nope", "--fake", a, "--features", "digits"], "unknown bundled split"),
      (["--real", "bundled:test", "--fake", a, "--features", "digits", "--metrics", "fid,is"], "unknown metric"),
      (["--real", "bundled:test", "--fake", a, "--features", "digits", "--clip_model", str(tmp_path)], "--clip_model"),
      (["--real", "bundled:test", "--fake", a, "--features", "digits"], "need 28x28 images"),
  ]
  for args, message in cases:
    status, out, err = _main(capsys, *args)
    assert status == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1, (args, err)
    assert "Traceback" not in err
  with pytest.raises(SystemExit) as e:
    CLI.main(["--real", a, "--fake", a, "--features", "vgg"])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.startswith("error: ") and "--features" in err and "Traceback" not in err
