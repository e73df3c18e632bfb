"""VAE training (config.task = "vae"): the losses against closed forms, a tiny MNIST run that learns with
the GAN joining at step k (the discriminator frozen before), exports a diffusers folder and resumes
exactly, and config errors."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import finished_checkpoints, losses
from configs import vae_folder, vae_mnist
from sdjax import checkpoint, convert
from sdjax.data import input_pipeline
from sdjax.train import run
from sdjax.train.tasks import autoencoder
from sdjax.train.trainer import Trainer


def tiny(**overrides):
  """configs/vae_mnist.py:tiny with `section__field=value` overrides."""
  c = vae_mnist.get_config("tiny").unlock()
  for key, value in overrides.items():
    section, field = key.split("__")
    c[section][field] = value
  return c.lock()


def test_kl_matches_float64_closed_form():
  rng = np.random.default_rng(0)
  mean, logvar = rng.normal(size=(2, 3, 4, 5, 4))
  sigma = np.exp(logvar / 2)
  # KL(N(mu, sigma^2) || N(0, 1)) = log(1 / sigma) + (sigma^2 + mu^2) / 2 - 1/2, per latent element.
  per_example = np.sum(np.log(1 / sigma) + (sigma ** 2 + mean ** 2) / 2 - 0.5, axis=(1, 2, 3))
  num_pixels = 12 * 16 * 3
  got = autoencoder.kl_loss(mean.astype(np.float32), logvar.astype(np.float32), num_pixels)
  np.testing.assert_allclose(got, per_example.mean() / num_pixels, rtol=1e-5)
  assert float(autoencoder.kl_loss(np.zeros((1, 2, 2, 4)), np.zeros((1, 2, 2, 4)), 10)) == 0.0


def test_gan_and_reconstruction_losses_on_hand_computed_values():
  real, fake = np.array([2.0, 0.5, -1.0]), np.array([-2.0, 0.0, 1.0])
  # relu(1 - real) = [0, .5, 2] (mean 5/6), relu(1 + fake) = [0, 1, 2] (mean 1).
  np.testing.assert_allclose(autoencoder.hinge_d_loss(real, fake), 0.5 * (5 / 6 + 1), rtol=1e-6)
  np.testing.assert_allclose(autoencoder.generator_loss(fake), 1 / 3, rtol=1e-6)
  x, y = np.zeros((1, 2, 2, 1)), np.array([1.0, -3.0, 0.0, 2.0]).reshape(1, 2, 2, 1)
  np.testing.assert_allclose(autoencoder.recon_loss(x, y, "l1"), 1.5)
  np.testing.assert_allclose(autoencoder.recon_loss(x, y, "l2"), 3.5)
  disc = autoencoder.PatchDiscriminator(8, 2)
  logits = jax.eval_shape(lambda: disc.init_with_output(jax.random.key(0), np.zeros((2, 32, 32, 3)))[0])
  assert logits.shape == (2, 6, 6, 1)  # 32 / 2**2 - 2 patches per side


def _digits(config):
  """8 digits the run has not seen first (another seed's first batch)."""
  data = input_pipeline.pipeline_from_config(config.data, channels=1, global_batch_size=8, seed=1)
  return data.batch(0)["image"]


def _restore(workdir, step):
  """(discriminator params, exported params) of the checkpoint at `step`."""
  exp = Trainer.from_config(tiny(gan__enabled=True))
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  state = ckpt.restore(exp.abstract_state, step)
  ckpt.close()
  return jax.device_get(state.disc_params), jax.device_get(exp.task.export_params(state))


def test_tiny_run_learns_gan_warmup_export_and_exact_resume(tmp_path, compilation_cache):
  n, k = 24, 12  # the discriminator and the adversarial term start at step k
  config = tiny(gan__enabled=True, gan__start_step=k, optim__schedule="constant", train__num_steps=n,
                train__log_every=1, train__checkpoint_every=k // 2, train__keep_checkpoints=10)
  ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
  summary = run(config, ref_dir)
  assert summary["final_step"] == n and finished_checkpoints(ref_dir) == [k // 2, k, 3 * k // 2, n]
  with open(os.path.join(ref_dir, "metrics.jsonl")) as f:
    records = {r["step"]: r for r in map(json.loads, f)}
  assert records[k]["recon"] < 0.7 * records[1]["recon"], (records[1]["recon"], records[k]["recon"])
  assert all(records[s]["d_loss"] == 0 and records[s]["g_adv"] != 0 for s in range(1, k + 1))  # D frozen
  assert all(records[s]["d_loss"] > 0 for s in range(k + 1, n + 1))

  # Before step k the discriminator does not move; after it does.
  (d_half, _), (d_k, _), (d_n, ema_n) = (_restore(ref_dir, s) for s in (k // 2, k, n))
  jax.tree.map(np.testing.assert_array_equal, d_half, d_k)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(d_k), jax.tree.leaves(d_n)))

  # The export: a diffusers AutoencoderKL folder with the EMA weights and the measured latent scale.
  vae, params = convert.load_vae(os.path.join(ref_dir, "vae"))
  assert vae.config.scaling_factor == pytest.approx(summary["scaling_factor"]) and summary["scaling_factor"] > 0
  jax.tree.map(np.testing.assert_array_equal, params, ema_n)
  assert os.path.exists(os.path.join(ref_dir, "samples", f"step_{n:07d}.png"))
  images = _digits(config)
  recon = jax.jit(lambda p, x: vae.apply({"params": p}, x))(params, images)
  assert recon.shape == images.shape
  assert np.mean(np.abs(recon - images)) < records[1]["recon"]

  # Resume from the checkpoint at step k of a copy (as if the run had died there): the same numbers.
  shutil.copytree(ref_dir, run_dir)
  for s in (3 * k // 2, n):
    shutil.rmtree(os.path.join(run_dir, "checkpoints", str(s)))
  assert run(config, run_dir)["start_step"] == k
  ref, resumed = losses(ref_dir), losses(run_dir)
  assert sorted(resumed) == list(range(1, n + 1))
  for s in range(k + 1, n + 1):
    np.testing.assert_allclose(resumed[s], ref[s], rtol=1e-5, err_msg=f"step {s}")
  assert convert.params_hash(convert.load_vae(os.path.join(run_dir, "vae"))[1]) == convert.params_hash(params)


@pytest.mark.parametrize("overrides, message", [
    ({"loss__recon": "l3"}, "config.loss.recon"),
    ({"gan__start_step": -1}, "config.gan.start_step"),
    ({"data__resolution": 30}, "not divisible by the VAE's downscale factor 4"),
    ({"vae__norm_num_groups": 3}, "config.vae: "),
    ({"vae__out_channels": 3}, "config.vae.out_channels"),
    ({"gan__disc_layers": 4}, "config.gan.disc_layers"),
    ({"data__source": "latents", "data__path": "x"}, "config.data.source"),
    ({"sample__num_images": 0}, "config.sample.num_images"),
])
def test_config_errors_name_the_field(overrides, message):
  with pytest.raises(ValueError, match=message):
    Trainer.from_config(tiny(**overrides))


def test_batch_and_config_file_errors():
  with pytest.raises(ValueError, match="batch_size=12 is not divisible by the 8 devices"):
    Trainer.from_config(tiny(train__batch_size=12)).train_step()
  with pytest.raises(ValueError, match="config.data.path"):
    Trainer.from_config(vae_folder.get_config("tiny"))
  for module in (vae_mnist, vae_folder):
    assert module.get_config().task == "vae"
    with pytest.raises(ValueError, match="unknown variant"):
      module.get_config("huge")
