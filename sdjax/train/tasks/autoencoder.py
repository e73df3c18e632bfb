"""Train the KL autoencoder of Stable Diffusion (config.task = "vae"): reconstruction + KL, optional patch-GAN.

For images x in [-1, 1] with posterior q(z|x) = N(mean, exp(logvar)) and z ~ q(z|x) drawn from the state's rng:
  recon  mean over pixels of |x - dec(z)| (loss.recon = "l1") or (x - dec(z))^2 ("l2")
  kl     KL(q(z|x) || N(0, I)) summed over an example's latent elements, divided by its pixel count H*W*C,
         averaged over the batch. LDM sums both terms over pixels; dividing both by H*W*C keeps their
         ratio, so LDM's kl_weight (1e-6) means the same trade-off here.
  g_adv  -mean(D(dec(z))) for a PatchGAN discriminator D trained with the hinge loss (gan.enabled).
  loss   recon + loss.kl_weight * kl + [step >= gan.start_step] * gan.weight * g_adv
Before gan.start_step neither the adversarial term nor D's update is active (one compiled step: lax.cond).
Not implemented from LDM: the LPIPS perceptual term and the adaptive (gradient-norm ratio) GAN weight.

At the end the EMA weights (the params when train.ema_decay = 0) are exported as a diffusers AutoencoderKL
folder `workdir/vae` whose scaling_factor is 1 / std of the posterior means of the first training batches.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn, struct
from jax.experimental import multihost_utils

from sdjax import convert, parallel
from sdjax.data import input_pipeline
from sdjax.models import layers
from sdjax.models.vae import AutoencoderKL, VAEConfig, sample_latent
from sdjax.train import task as task_lib
from sdjax.train.step import apply_update

RECON_LOSSES = ("l1", "l2")


# --- losses and the discriminator -------------------------------------------------------------------

def recon_loss(x: jax.Array, y: jax.Array, kind: str) -> jax.Array:
  d = y - x
  return jnp.mean(jnp.abs(d)) if kind == "l1" else jnp.mean(jnp.square(d))


def kl_loss(mean: jax.Array, logvar: jax.Array, num_pixels: int) -> jax.Array:
  """Batch mean of KL(N(mean, exp(logvar)) || N(0, I)) summed over latent elements, / num_pixels."""
  kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=tuple(range(1, mean.ndim)))
  return jnp.mean(kl) / num_pixels


def hinge_d_loss(real: jax.Array, fake: jax.Array) -> jax.Array:
  """The discriminator's hinge loss on logits: (mean relu(1 - D(x)) + mean relu(1 + D(recon))) / 2."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake)))


def generator_loss(fake: jax.Array) -> jax.Array:
  return -jnp.mean(fake)


class PatchDiscriminator(nn.Module):
  """pix2pix's NLayerDiscriminator with GroupNorm for BatchNorm: [B, H, W, C] -> logits [B, h, w, 1].

  4x4 stride-2 conv + leaky ReLU; num_layers - 1 stride-2 and one stride-1 4x4 conv + norm + leaky ReLU
  (channels doubling up to 8x); a 4x4 conv to one logit per patch. h = H / 2**num_layers - 2.
  """
  channels: int = 64
  num_layers: int = 3

  @nn.compact
  def __call__(self, x):
    pad = ((1, 1), (1, 1))
    h = nn.leaky_relu(layers.conv(self.channels, 4, stride=2, padding=pad, name="conv_in")(x), 0.2)
    for i in range(1, self.num_layers + 1):
      c = self.channels * min(2 ** i, 8)
      h = layers.conv(c, 4, stride=2 if i < self.num_layers else 1, padding=pad, name=f"convs_{i}")(h)
      h = nn.leaky_relu(layers.group_norm(math.gcd(32, c), 1e-5, name=f"norms_{i}")(h), 0.2)
    return layers.conv(1, 4, padding=pad, name="conv_out")(h)


# --- config, state and the step --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AEConfig:
  recon: str = "l1"
  kl_weight: float = 1e-6
  gan: bool = False
  gan_start_step: int = 0
  gan_weight: float = 0.5


@struct.dataclass
class AEState:
  step: jax.Array          # int32 []
  params: Any              # the autoencoder's
  opt_state: optax.OptState
  ema_params: Any
  disc_params: Any         # the discriminator's (present even with gan.enabled = False: resumable either way)
  disc_opt_state: optax.OptState
  rng: jax.Array           # uint32 raw key data; the step's key is fold_in(rng, step)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Validate the fields this driver reads (before anything is compiled), naming the field."""
  input_pipeline.check_config(config.data)
  if config.data.get("source") == "latents":
    raise ValueError("config.data.source='latents': an autoencoder trains on images (bundled, tfds or records)")
  if config.loss.recon not in RECON_LOSSES:
    raise ValueError(f"config.loss.recon: unknown {config.loss.recon!r}; expected one of {RECON_LOSSES}")
  if float(config.loss.kl_weight) < 0:
    raise ValueError(f"config.loss.kl_weight must be >= 0, got {config.loss.kl_weight}")
  g = config.gan
  for field, value, low in (("start_step", g.start_step, 0), ("weight", g.weight, 0), ("lr", g.lr, 0),
                            ("disc_channels", g.disc_channels, 1), ("disc_layers", g.disc_layers, 1)):
    if value < low:
      raise ValueError(f"config.gan.{field} must be >= {low}, got {value}")
  size = input_pipeline.image_size(config.data)
  if size < 3 * 2 ** g.disc_layers:  # the discriminator is built (not trained) even with gan.enabled = False
    raise ValueError(f"config.gan.disc_layers={g.disc_layers} halves {size}px images to nothing "
                     f"(needs resolution >= 3 * 2**disc_layers)")
  if not 0.0 <= float(config.train.ema_decay) < 1.0:
    raise ValueError(f"config.train.ema_decay must be in [0, 1), got {config.train.ema_decay}")
  if not 0 < int(config.sample.num_images) <= int(config.train.batch_size):
    raise ValueError(f"config.sample.num_images must be in [1, train.batch_size], got {config.sample.num_images}")


def vae_config(config: ml_collections.ConfigDict) -> VAEConfig:
  try:
    cfg = VAEConfig.from_diffusers_config(config.vae.to_dict())
  except (ValueError, TypeError) as e:
    raise ValueError(f"config.vae: {e}") from e
  size = input_pipeline.image_size(config.data)
  if size % cfg.downscale:
    raise ValueError(f"config.data.resolution: {size}px images are not divisible by the VAE's downscale factor "
                     f"{cfg.downscale} (2 ** (len(config.vae.block_out_channels) - 1))")
  if cfg.in_channels != cfg.out_channels:
    raise ValueError(f"config.vae.out_channels={cfg.out_channels} must equal in_channels={cfg.in_channels} "
                     f"to reconstruct the input")
  return cfg


@task_lib.register("vae")
class Autoencoder(task_lib.Task):
  """config sections: data, vae (VAEConfig), loss, gan, train.ema_decay, sample.num_images, export."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    check_config(config)
    super().__init__(config, mesh)
    self.vae_config = vae_config(config)
    self.vae = AutoencoderKL(self.vae_config)
    g = config.gan
    self.disc = PatchDiscriminator(int(g.disc_channels), int(g.disc_layers))
    self.loss = AEConfig(recon=config.loss.recon, kl_weight=float(config.loss.kl_weight), gan=bool(g.enabled),
                         gan_start_step=int(g.start_step), gan_weight=float(g.weight))
    self.ema_decay = float(config.train.ema_decay)
    self.disc_optimizer = optax.adam(float(g.lr), b1=float(g.b1), b2=float(g.b2))
    size = input_pipeline.image_size(config.data)
    self.image_shape = (size, size, self.vae_config.in_channels)
    self.num_images = int(config.sample.num_images)
    self.scaling_batches = int(config.export.scaling_batches)

  # --- state: the autoencoder's params (trained by the core step) and the discriminator's ----------------

  def init(self, rng, frozen):
    x = jnp.zeros((1,) + self.image_shape, jnp.float32)
    return (self.vae.init(rng, x)["params"], self.disc.init(jax.random.fold_in(rng, 1), x)["params"])

  def create_state(self, params, optimizer, seed) -> AEState:
    params, disc_params = params
    return AEState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                   ema_params=jax.tree.map(jnp.copy, params), disc_params=disc_params,
                   disc_opt_state=self.disc_optimizer.init(disc_params),
                   rng=jax.random.key_data(jax.random.key(seed)))

  def state_shardings(self, abstract, boxed, shard):
    """The autoencoder's and the discriminator's leaves sharded by their own logical names."""
    vae = shard(abstract, boxed[0])
    disc = shard((abstract.disc_params, abstract.disc_opt_state), boxed[1])
    return vae.replace(disc_params=disc[0], disc_opt_state=disc[1])

  # --- the step ------------------------------------------------------------------------------------------

  def loss_fn(self, params, batch, rng, frozen, state):
    """recon + kl_weight * kl + [step >= gan.start_step] * gan.weight * g_adv; outputs: the reconstructions."""
    cfg = self.loss
    x = batch["image"].astype(jnp.float32)
    gan_on = jnp.logical_and(cfg.gan, state.step >= cfg.gan_start_step)
    adv_weight = jnp.where(gan_on, jnp.float32(cfg.gan_weight), jnp.float32(0))
    mean, logvar = self.vae.apply({"params": params}, x, method="encode")              # [B, h, w, c]
    recon = self.vae.apply({"params": params}, sample_latent(mean, logvar, rng), method="decode")  # [B, H, W, C]
    rec, kl = recon_loss(x, recon, cfg.recon), kl_loss(mean, logvar, math.prod(x.shape[1:]))
    g_adv = generator_loss(self.disc.apply({"params": state.disc_params}, recon)) if cfg.gan else jnp.float32(0)
    loss = rec + cfg.kl_weight * kl + adv_weight * g_adv
    return loss, {"recon": rec, "kl": kl, "g_adv": g_adv}, recon

  def after_update(self, old, new, batch, recon, rng, ok):
    """D's update on the same batch with the reconstructions of the params before this step's update (as
    LDM's alternating optimizers), once the GAN is on and only if the autoencoder's update was kept."""
    cfg = self.loss
    off = {k: jnp.float32(0) for k in ("d_loss", "d_real", "d_fake")}
    if not cfg.gan:
      return new, off
    x, recon = batch["image"].astype(jnp.float32), jax.lax.stop_gradient(recon)

    def d_loss(dp):
      real, fake = self.disc.apply({"params": dp}, x), self.disc.apply({"params": dp}, recon)
      return hinge_d_loss(real, fake), (jnp.mean(real), jnp.mean(fake))

    def update():
      (loss, (real, fake)), grads = jax.value_and_grad(d_loss, has_aux=True)(old.disc_params)
      state, _ = apply_update(new, grads, loss, self.disc_optimizer, params="disc_params",
                              opt_state="disc_opt_state", ema_params=None)
      return state, {"d_loss": loss, "d_real": real, "d_fake": fake}

    gan_on = old.step >= cfg.gan_start_step
    return jax.lax.cond(gan_on & ok, update, lambda: (new, off))

  # --- data, grids, export, inference --------------------------------------------------------------------

  def input_pipeline(self, process_index, process_count):
    return input_pipeline.pipeline_from_config(
        self.config.data, channels=self.vae_config.in_channels, global_batch_size=self.config.train.batch_size,
        seed=self.config.seed, label=False, process_index=process_index, process_count=process_count)

  def autoencode_fn(self):
    """jitted (params, images) -> (posterior means, their decodings): for grids and the exported scale."""

    def autoencode(params, x):
      mean, _ = self.vae.apply({"params": params}, x, method="encode")
      return mean, self.vae.apply({"params": params}, mean, method="decode")

    return jax.jit(autoencode)

  def export_params(self, state: AEState):
    return state.ema_params if self.ema_decay > 0 else state.params

  def sample_grid(self, data, frozen):
    """Originals (first row) and reconstructions (second) of the first images of step 0's batch, the same on
    every resume."""
    n = self.num_images
    val = images_at(data, 0, parallel.batch_sharding(self.mesh))
    autoencode = self.autoencode_fn()
    fn = jax.jit(lambda params, x: jnp.concatenate([x[:n], autoencode(params, x)[1][:n]]))
    return task_lib.SampleGrid(fn, (val,), n, {"rows": "originals, reconstructions"})

  def export(self, state, workdir, data, *, write):
    """Write `workdir/vae` (diffusers AutoencoderKL, float32) with scaling_factor = 1 / std of the posterior
    means of the first export.scaling_batches training batches (SD's recipe: unit-variance latents)."""
    params, autoencode = self.export_params(state), self.autoencode_fn()
    sharding = parallel.batch_sharding(self.mesh)
    means = [multihost_utils.process_allgather(autoencode(params, images_at(data, i, sharding))[0], tiled=True)
             for i in range(self.scaling_batches)]
    std = float(np.std(np.asarray(means, np.float64)))
    host_params = multihost_utils.process_allgather(params, tiled=True)  # every process joins
    folder = os.path.join(workdir, "vae")
    if write:
      convert.save_component(folder, "vae", dataclasses.replace(self.vae_config, scaling_factor=1.0 / std),
                             host_params)
    return {"scaling_factor": 1.0 / std, "latent_std": std, "exported": folder}

  def inference(self, state, frozen):
    """(AutoencoderKL module, its params: the EMA's, or the params when train.ema_decay = 0)."""
    return self.vae, self.export_params(state)


def images_at(data, step: int, sharding) -> jax.Array:
  """The global batch of images the pipeline gives at `step` (random access: the same on every resume)."""
  return parallel.global_batch({"image": data.batch(step)["image"]}, sharding)["image"]
