"""config.eval: evaluation inside training runs (sdjax.eval.evaluator, called by sdjax.train.trainer).

A tiny digit run evaluating every 2 steps logs finite eval/* metrics; config errors stop a run before its first
step, naming the key; the evaluator's numbers are sdjax.eval's functions on the same features."""
import json
import os

import jax
import numpy as np
import pytest

from conftest import ROOT
from test_config import load


def _tiny(**eval_overrides):
  c = load(os.path.join(ROOT, "configs", "default.py")).get_config("tiny")
  c.sample.eval_per_class = 0  # the end-of-run digit quality is not what is tested here
  for k, v in eval_overrides.items():
    setattr(c.eval, k, v)
  return c


def _records(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_a_tiny_run_logs_finite_eval_metrics_every_two_steps(tmp_path):
  from sdjax.train.trainer import train
  c = _tiny(every_steps=2, metrics=("fid", "precision", "recall", "digit_accuracy"))
  c.train.num_steps, c.train.checkpoint_every = 4, 4
  # a U-Net without attention: a third less compile time than the tiny one (what is tested is the loop)
  c.model.down_block_types, c.model.up_block_types = ("DownBlock2D",) * 2, ("UpBlock2D",) * 2
  c.model.mid_block_attention = False
  workdir = str(tmp_path / "run")
  summary = train(c, workdir)
  assert summary["final_step"] == 4
  records = _records(workdir)
  evals = [r for r in records if any(k.startswith("eval/") for k in r)]
  assert [r["step"] for r in evals] == [2, 4]
  for r in evals:
    assert set(r) == {"step", "eval/digit_fid", "eval/precision", "eval/recall", "eval/digit_accuracy",
                      "eval/seconds"}, r
    assert all(np.isfinite(v) for v in r.values()), r
    assert r["eval/digit_fid"] > 0 and 0 <= r["eval/precision"] <= 1 and 0 <= r["eval/digit_accuracy"] <= 1
  assert [r["step"] for r in records if "loss" in r] == [2, 4]  # the train records are untouched
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert events and all(os.path.getsize(os.path.join(workdir, "tensorboard", e)) for e in events)


def _fifo(tmp_path):
  path = str(tmp_path / "fifo.pth")
  os.mkfifo(path)
  return path


@pytest.mark.parametrize("overrides, error, match", [
    ({"metrics": ("fid", "sharpness")}, ValueError, r"config\.eval\.metrics: unknown metric 'sharpness'"),
    ({"features": "inception", "inception_weights": "/nonexistent/pt_inception.pth", "reference_stats": "x.npz"},
     FileNotFoundError, r"config\.eval\.inception_weights: /nonexistent/pt_inception\.pth does not exist"),
    ({"features": "inception", "inception_weights": _fifo, "reference_stats": "x.npz"},
     ValueError, r"config\.eval\.inception_weights: .*fifo\.pth is not a regular file"),
    ({"reference_stats": lambda tmp_path: str(tmp_path)}, ValueError,
     r"config\.eval\.reference_stats: .* is not a regular file"),
    ({"num_samples": 1}, ValueError, r"config\.eval\.num_samples must be >= 2"),
    ({"sampler": "nope"}, ValueError, r"config\.eval\.sampler: unknown sampler"),
    ({"metrics": ("fid", "clip_score"), "clip_model": lambda tmp_path: str(tmp_path)}, ValueError,
     r"config\.eval\.metrics: clip_score needs prompts"),  # the task's check, also before the first step
], ids=["unknown_metric", "missing_weights", "fifo_weights", "stats_folder", "one_sample", "sampler", "clip_digits"])
def test_config_errors_stop_the_run_before_its_first_step(tmp_path, overrides, error, match):
  from sdjax.train.trainer import train
  overrides = {k: (v(tmp_path) if callable(v) else v) for k, v in overrides.items()}
  c = _tiny(every_steps=2, **overrides)
  workdir = str(tmp_path / "run")
  with pytest.raises(error, match=match):
    train(c, workdir)
  assert not _records(workdir) and not os.path.exists(os.path.join(workdir, "checkpoints"))


def test_the_evaluators_numbers_are_sdjax_evals_on_the_same_features():
  from sdjax import parallel
  from sdjax.eval import digits, fid, precision_recall, run
  from sdjax.eval.evaluator import Batch, EvalConfig, Evaluator
  mesh = parallel.make_mesh({"data": -1})
  ec = EvalConfig.from_config({"every_steps": 1, "num_samples": 40, "batch_size": 16,
                               "metrics": "fid,precision,recall,digit_accuracy"})
  evaluator = Evaluator(ec, mesh)
  images = np.asarray(run._bundled("test")[:40])  # uint8 [40, 28, 28, 1]
  labels = np.arange(40) % 10
  floats = images.astype(np.float32) / 127.5 - 1.0  # what a sampler returns; to_uint8 gives `images` back
  sharding = parallel.rows_sharding(mesh, 16)

  def batches():  # 16 + 16 + 8, the last one padded as the trainer pads it
    for lo in range(0, 40, 16):
      chunk = floats[lo:lo + 16]
      padded = np.concatenate([chunk, np.zeros((16 - len(chunk), 28, 28, 1), np.float32)])
      yield Batch(jax.device_put(padded, sharding), len(chunk), labels[lo:lo + 16])

  result = evaluator.evaluate(batches())
  params = digits.load_params()
  fake = np.asarray(digits.features(params, images), np.float64)
  stats = fid.FeatureStats.of(fake)
  expected = fid.frechet_distance(stats.mu, stats.sigma, *digits.reference_stats())
  np.testing.assert_allclose(result["digit_fid"], expected, rtol=1e-5)
  assert result["digit_accuracy"] == digits.digit_accuracy(images, labels)
  real = np.asarray(digits.features(params, run._bundled("test")))
  p, r = precision_recall.precision_recall(real, fake)
  np.testing.assert_allclose([result["precision"], result["recall"]], [p, r], atol=1 / 40)


def test_a_preemption_notice_abandons_the_evaluation_and_batches_fill_the_mesh():
  from sdjax.eval.evaluator import EvalConfig
  from sdjax.train import trainer as trainer_lib
  trainer = trainer_lib.Trainer.from_config(_tiny())
  evaluation = trainer_lib.make_eval(trainer, EvalConfig(every_steps=1, num_samples=20, batch_size=12))
  assert evaluation.label == "FID (MNIST classifier features)"
  with pytest.raises(trainer_lib._EvalInterrupted):  # before anything is rendered: nothing to write
    evaluation.run(None, stop=lambda: True)
  samples = trainer.task.eval_samples(EvalConfig(num_samples=20, batch_size=16), trainer.frozen)
  labels, seed, indices = samples.args(1)  # the last batch: 4 images and 12 rows of padding
  assert samples.num_batches == 2 and list(np.asarray(indices)) == list(range(16, 32))
  assert list(np.asarray(labels)) == [6, 7, 8, 9] + [0] * 12 and labels.sharding.spec[0] is not None
  assert trainer_lib.make_eval(trainer, EvalConfig(every_steps=7)) is None  # after train.num_steps=6: not built
