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

from sdjax import checkpoint, convert, parallel
from sdjax.data import input_pipeline
from sdjax.models import layers
from sdjax.models.vae import AutoencoderKL, VAEConfig, sample_latent
from sdjax.train import optim
from sdjax.train.loop import SampleGrid, check_batch_size
from sdjax.train.step import StepConfig, ema_decay

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


def make_train_step(vae: AutoencoderKL, disc: PatchDiscriminator, optimizer: optax.GradientTransformation,
                    disc_optimizer: optax.GradientTransformation, cfg: AEConfig, ema: StepConfig,
                    lr_schedule: optax.Schedule | None = None):
  """train_step(state, batch) -> (state, metrics); batch = {"image": float [B, H, W, C] in [-1, 1]}.

  D is updated on the same batch with the reconstructions of the params before this step's update
  (as LDM's alternating optimizers). A non-finite loss or gradient leaves everything but the step unchanged.
  """

  def vae_loss(params, disc_params, x, rng, adv_weight):
    mean, logvar = vae.apply({"params": params}, x, method="encode")              # [B, h, w, c]
    recon = vae.apply({"params": params}, sample_latent(mean, logvar, rng), method="decode")  # [B, H, W, C]
    rec, kl = recon_loss(x, recon, cfg.recon), kl_loss(mean, logvar, math.prod(x.shape[1:]))
    g_adv = generator_loss(disc.apply({"params": disc_params}, recon)) if cfg.gan else jnp.float32(0)
    loss = rec + cfg.kl_weight * kl + adv_weight * g_adv
    return loss, ({"recon": rec, "kl": kl, "g_adv": g_adv}, recon)

  def disc_update(state, x, recon):
    def d_loss(dp):
      real, fake = disc.apply({"params": dp}, x), disc.apply({"params": dp}, recon)
      return hinge_d_loss(real, fake), (jnp.mean(real), jnp.mean(fake))

    (loss, (real, fake)), grads = jax.value_and_grad(d_loss, has_aux=True)(state.disc_params)
    updates, opt_state = disc_optimizer.update(grads, state.disc_opt_state, state.disc_params)
    return optax.apply_updates(state.disc_params, updates), opt_state, {"d_loss": loss, "d_real": real,
                                                                         "d_fake": fake}

  def train_step(state: AEState, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    x = batch["image"].astype(jnp.float32)
    gan_on = jnp.logical_and(cfg.gan, state.step >= cfg.gan_start_step)
    adv_weight = jnp.where(gan_on, jnp.float32(cfg.gan_weight), jnp.float32(0))
    (loss, (m, recon)), grads = jax.value_and_grad(vae_loss, has_aux=True)(state.params, state.disc_params, x,
                                                                           rng, adv_weight)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(state.step, ema)
    ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    off = (state.disc_params, state.disc_opt_state, {k: jnp.float32(0) for k in ("d_loss", "d_real", "d_fake")})
    disc_params, disc_opt_state, d_metrics = off if not cfg.gan else jax.lax.cond(
        gan_on & ok, lambda: disc_update(state, x, jax.lax.stop_gradient(recon)), lambda: off)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state),
                              ema_params=keep(ema_params, state.ema_params), disc_params=disc_params,
                              disc_opt_state=disc_opt_state)
    metrics = {"loss": loss, **m, **d_metrics, "grad_norm": grad_norm, "skipped": 1 - ok.astype(jnp.int32)}
    if lr_schedule is not None:
      metrics["lr"] = lr_schedule(state.step)
    return new_state, metrics

  return train_step


class AutoencoderExperiment:
  """Model, discriminator, optimizers and sharded abstract state from a config (no arrays materialised)."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None):
    check_config(config)
    self.config = config
    self.vae_config = vae_config(config)
    self.vae = AutoencoderKL(self.vae_config)
    g = config.gan
    self.disc = PatchDiscriminator(int(g.disc_channels), int(g.disc_layers))
    self.loss = AEConfig(recon=config.loss.recon, kl_weight=float(config.loss.kl_weight), gan=bool(g.enabled),
                         gan_start_step=int(g.start_step), gan_weight=float(g.weight))
    self.ema = StepConfig(ema_decay=float(config.train.ema_decay),
                          ema_warmup=bool(config.train.get("ema_warmup", True)))
    self.optimizer, self.lr_schedule = optim.make_optimizer(config.optim, int(config.train.num_steps))
    self.disc_optimizer = optax.adam(float(g.lr), b1=float(g.b1), b2=float(g.b2))
    size = input_pipeline.image_size(config.data)
    self.image_shape = (size, size, self.vae_config.in_channels)
    self.mesh = mesh if mesh is not None else parallel.mesh_from_config(config.mesh)
    rules = parallel.rules_from_config(config.mesh)
    min_size = int(config.mesh.get("fsdp_min_size", parallel.FSDP_MIN_SIZE))

    boxed = jax.eval_shape(self._init_params, jax.random.key(0))
    abstract = jax.eval_shape(lambda p: self._create(*p, 0), nn.meta.unbox(boxed))
    shardings = parallel.state_shardings(abstract, boxed[0], self.mesh, rules, min_size)
    disc = parallel.state_shardings((abstract.disc_params, abstract.disc_opt_state), boxed[1], self.mesh, rules,
                                    min_size)
    self.state_shardings = shardings.replace(disc_params=disc[0], disc_opt_state=disc[1])
    self.abstract_state = checkpoint.abstract_with_shardings(abstract, self.state_shardings)
    self.batch_sharding = parallel.batch_sharding(self.mesh)
    self.replicated = parallel.replicated(self.mesh)

  def _init_params(self, rng):
    x = jnp.zeros((1,) + self.image_shape, jnp.float32)
    return (self.vae.init(rng, x)["params"], self.disc.init(jax.random.fold_in(rng, 1), x)["params"])

  def _create(self, params, disc_params, seed: int) -> AEState:
    return AEState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params),
                   ema_params=jax.tree.map(jnp.copy, params), disc_params=disc_params,
                   disc_opt_state=self.disc_optimizer.init(disc_params),
                   rng=jax.random.key_data(jax.random.key(seed)))

  def init_state(self) -> AEState:
    seed = int(self.config.seed)
    init = jax.jit(lambda rng: self._create(*nn.meta.unbox(self._init_params(rng)), seed),
                   out_shardings=self.state_shardings)
    return init(jax.random.key(seed))

  def train_step(self, *, donate: bool = True):
    check_batch_size(self.config, self.mesh)
    fn = make_train_step(self.vae, self.disc, self.optimizer, self.disc_optimizer, self.loss, self.ema,
                         self.lr_schedule)
    return jax.jit(fn, in_shardings=(self.state_shardings, self.batch_sharding),
                   out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,) if donate else ())

  def autoencode_fn(self):
    """jitted (params, images) -> (posterior means, their decodings): for grids and the exported scale."""

    def autoencode(params, x):
      mean, _ = self.vae.apply({"params": params}, x, method="encode")
      return mean, self.vae.apply({"params": params}, mean, method="decode")

    return jax.jit(autoencode)

  def export_params(self, state: AEState):
    return state.ema_params if self.ema.ema_decay > 0 else state.params


  # --- the driver (sdjax.train.loop.train) hooks ---------------------------------------------------------

  frozen = None  # nothing frozen: the step is (state, batch)

  def input_pipeline(self, process_index: int, process_count: int):
    self._data = input_pipeline.pipeline_from_config(
        self.config.data, channels=self.vae_config.in_channels, global_batch_size=int(self.config.train.batch_size),
        seed=int(self.config.seed), label=False, process_index=process_index, process_count=process_count)
    return self._data

  def sample_grid(self):
    """Originals (first row) and reconstructions (second) of the first images of step 0's batch, the same on
    every resume."""
    n = int(self.config.sample.num_images)
    val = images_at(self._data, 0, self.batch_sharding)
    autoencode = self.autoencode_fn()
    fn = jax.jit(lambda params, x: jnp.concatenate([x[:n], autoencode(params, x)[1][:n]]))
    return SampleGrid(fn, (val,), n, {"rows": "originals, reconstructions"})

  def export(self, state: AEState, workdir: str, *, write: bool = True) -> dict[str, Any]:
    """Write `workdir/vae` (diffusers AutoencoderKL, float32) with scaling_factor = 1 / std of the posterior
    means of the first export.scaling_batches training batches (SD's recipe: unit-variance latents)."""
    params, autoencode = self.export_params(state), self.autoencode_fn()
    means = [multihost_utils.process_allgather(autoencode(params, images_at(self._data, i, self.batch_sharding))[0],
                                               tiled=True) for i in range(int(self.config.export.scaling_batches))]
    std = float(np.std(np.asarray(means, np.float64)))
    host_params = multihost_utils.process_allgather(params, tiled=True)  # every process joins
    folder = os.path.join(workdir, "vae")
    if write:
      convert.save_component(folder, "vae", dataclasses.replace(self.vae_config, scaling_factor=1.0 / std),
                             host_params)
    return {"scaling_factor": 1.0 / std, "latent_std": std, "exported": folder}


def images_at(data, step: int, sharding) -> jax.Array:
  """The global batch of images the pipeline gives at `step` (random access: the same on every resume)."""
  return parallel.global_batch({"image": data.batch(step)["image"]}, sharding)["image"]


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train (or resume) the autoencoder of `config` in `workdir` with the shared driver; returns its summary."""
  from sdjax.train import loop
  return loop.train(config, workdir)
