"""ControlNet guidance in the sampling pipelines, as diffusers' StableDiffusion[XL]ControlNet[Img2Img|Inpaint]Pipeline.

`pipelines.denoise` (and so txt2img / img2img / inpaint, which pass it their options) takes
  controlnets: a tuple of `sdjax.models.controlnet.ControlNet` modules (static, like the StableDiffusion),
  control: a tuple of `ControlInput` pytrees, one per ControlNet, with per-image leaves [B, ...],
  guess_mode: bool (static),
with the ControlNets' params as the tuple params["controlnets"]. Several ControlNets are diffusers'
MultiControlNetModel: their residuals are summed.

At every model call (latents x, timestep t), ControlNet k sees the U-Net's input latents (before an inpainting U-Net's
extra channels), the text conditioning and its control image, and its residuals are scaled by
scale_k * keep_k(step), with diffusers' `controlnet_keep`: keep = 0 where i / n < start or (i + 1) / n > end, else
1, for step i of the n steps run (after img2img's strength). The step index of a call is the number of the run's
timesteps greater than its t (float32 arithmetic): exact for the samplers that call the model once per step at the
step's timestep (ddim, euler, dpmpp_2m, ...); a sampler's extra calls between steps count as the step they reach.
Guess mode (diffusers' `guess_mode`, also on when the first ControlNet has global_pool_conditions): with
classifier-free guidance the ControlNets run on the conditional rows only and the unconditional rows get no
residuals; the residuals are scaled by 0.1 ... 1 (`controlnet.guess_mode_scales`).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.models.controlnet import ControlNet


class ControlInput(NamedTuple):
  """One ControlNet's per-image inputs (a pytree, leading axis B): image [B, H, W, C] in [0, 1] at the output image's
  size (diffusers' `control_image` after its VaeImageProcessor: do_normalize=False); scale [B]
  (`controlnet_conditioning_scale`); start, end [B] (`control_guidance_start` / `control_guidance_end`, fractions
  of the steps run, 0 <= start < end <= 1)."""
  image: jax.Array
  scale: jax.Array
  start: jax.Array
  end: jax.Array


def control_input(image: Any, scale: Any = 1.0, start: Any = 0.0, end: Any = 1.0) -> ControlInput:
  """A ControlInput for `image` [B, H, W, C] in [0, 1], scalars (or [B] values) broadcast to [B] float32 numpy."""
  image = np.asarray(image, np.float32)
  if image.ndim != 4:
    raise ValueError(f"control image must be [B, H, W, C] in [0, 1], got shape {image.shape}")
  b = image.shape[0]
  row = lambda v, name: _row(v, b, name)
  return ControlInput(image, row(scale, "scale"), row(start, "start"), row(end, "end"))


def _row(v, b, name):
  a = np.asarray(v, np.float32)
  if a.ndim > 1 or (a.ndim == 1 and a.shape[0] != b):
    raise ValueError(f"control {name} must be a scalar or [{b}], got shape {a.shape}")
  return np.broadcast_to(a, (b,)).copy()


def _concrete(x) -> np.ndarray | None:
  """x as numpy when it is a concrete value (not traced under jit), else None."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def check(sd, params: Any, controlnets: Sequence[ControlNet], control: Sequence[ControlInput],
          latent_shape: Sequence[int], batch: int) -> None:
  """Refuse, naming the problem: counts that differ (ControlNets, inputs, params["controlnets"]), a ControlNet that
  does not fit the U-Net (text width, SDXL embedding, encoder structure, latent channels) or the VAE (image
  downscale), a control image not at the output size, and (where the values are concrete) scales that are NaN,
  infinite or negative and guidance windows outside 0 <= start < end <= 1."""
  controlnets, control = tuple(controlnets), tuple(control)
  if not controlnets:
    raise ValueError("control given, but no controlnets (a tuple of sdjax.models.controlnet.ControlNet modules)")
  if len(control) != len(controlnets):
    raise ValueError(f"{len(controlnets)} ControlNet(s) but {len(control)} control input(s): one ControlInput each")
  if not isinstance(params, dict) or "controlnets" not in params:
    raise ValueError('ControlNets given, but params has no "controlnets" entry (a tuple of their params)')
  if len(params["controlnets"]) != len(controlnets):
    raise ValueError(f"{len(controlnets)} ControlNet(s) but params['controlnets'] has {len(params['controlnets'])}")
  ucfg = sd.unet.config
  h, w, c = latent_shape
  f = sd.downscale
  for k, (cn, ci) in enumerate(zip(controlnets, control)):
    if not isinstance(cn, ControlNet):
      raise ValueError(f"controlnets[{k}] is a {type(cn).__name__}, not a sdjax.models.controlnet.ControlNet")
    if not isinstance(ci, ControlInput):
      raise ValueError(f"control[{k}] is a {type(ci).__name__}, not a ControlInput")
    ccfg = cn.config.unet
    for field in ("cross_attention_dim", "addition_embed_type", "addition_time_embed_dim",
                  "projection_class_embeddings_input_dim", "block_out_channels", "layers_per_block"):
      if getattr(ccfg, field) != getattr(ucfg, field):
        sdxl = " (an SDXL ControlNet needs an SDXL U-Net and the reverse)" if field == "addition_embed_type" else ""
        raise ValueError(f"controlnets[{k}] does not fit the U-Net: its {field} is {getattr(ccfg, field)!r}, the "
                         f"U-Net's {getattr(ucfg, field)!r}{sdxl}")
    if ccfg.in_channels != c:
      raise ValueError(f"controlnets[{k}] takes {ccfg.in_channels} latent channels, the latents have {c}")
    if cn.config.image_downscale != f:
      raise ValueError(f"controlnets[{k}]'s control-image encoder downsamples {cn.config.image_downscale}x "
                       f"(conditioning_embedding_out_channels), the VAE {f}x")
    want = (batch, h * f, w * f, cn.config.conditioning_channels)
    if tuple(ci.image.shape) != want:
      raise ValueError(f"control[{k}].image has shape {tuple(ci.image.shape)}, expected {want} (the output image "
                       f"size {h * f}x{w * f}, {cn.config.conditioning_channels} channels in [0, 1])")
    for name in ("scale", "start", "end"):
      if tuple(jnp.shape(getattr(ci, name))) != (batch,):
        raise ValueError(f"control[{k}].{name} must be [{batch}], got shape {tuple(jnp.shape(getattr(ci, name)))}")
    scale, start, end = (_concrete(v) for v in (ci.scale, ci.start, ci.end))
    if scale is not None and not (np.all(np.isfinite(scale)) and np.all(scale >= 0)):
      raise ValueError(f"control[{k}].scale must be finite and >= 0, got {scale.tolist()}")
    if start is not None and end is not None:
      if not (np.all(start >= 0) and np.all(end <= 1) and np.all(start < end)):
        raise ValueError(f"control[{k}]: guidance start {start.tolist()} and end {end.tolist()} must satisfy "
                         "0 <= start < end <= 1")


def keep(timesteps: np.ndarray, t: jax.Array, start: jax.Array, end: jax.Array) -> jax.Array:
  """diffusers' controlnet_keep [B] at timesteps t [B] of a run over `timesteps` [n] (the run's step timesteps):
  step i = the number of timesteps > t (at most n - 1); 0 where i / n < start or (i + 1) / n > end, else 1."""
  ts = jnp.asarray(np.asarray(timesteps, np.float32))
  n = ts.shape[0]
  i = jnp.minimum(jnp.sum(ts[None, :] > jnp.asarray(t, jnp.float32)[:, None], axis=1), n - 1).astype(jnp.float32)
  drop = (i / n < start) | ((i + 1) / n > end)
  return jnp.where(drop, 0.0, 1.0).astype(jnp.float32)


def residuals(controlnets: Sequence[ControlNet], params: Sequence[Any], control: Sequence[ControlInput], x, t,
              cond: dict, timesteps: np.ndarray, guess_mode: bool, sdxl: bool) -> tuple[tuple, jax.Array]:
  """(down residuals, mid residual) of the ControlNets, summed (MultiControlNetModel), for latents x [B', ...] at
  timesteps t [B'] with the text conditioning `cond` and inputs `control` of the same B' rows."""
  added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]} if sdxl else None
  down_sum = mid_sum = None
  for cn, p, ci in zip(controlnets, params, control):
    scale = ci.scale.astype(jnp.float32) * keep(timesteps, t, ci.start, ci.end)
    down, mid = cn.apply({"params": p}, x, t, cond["context"], ci.image.astype(jnp.float32), scale,
                         added_cond=added, guess_mode=guess_mode)
    if down_sum is None:
      down_sum, mid_sum = down, mid
    else:
      down_sum = tuple(a + b for a, b in zip(down_sum, down))
      mid_sum = mid_sum + mid
  return down_sum, mid_sum


def controlled_model_fn(guide: Callable[[Callable, dict, dict | None], Callable], model: Callable, cond: dict,
                        uncond: dict | None, *, controlnets: Sequence[ControlNet], params: Sequence[Any],
                        control: Sequence[ControlInput], guess_mode: bool, timesteps: np.ndarray,
                        sdxl: bool) -> Callable:
  """model_fn(x, t) with ControlNet residuals. `model(x, t, c)` is the U-Net (`pipelines.unet_fn`: it adds
  c["down_residuals"] / c["mid_residual"]); `guide(model, cond, uncond)` makes the (guided) model_fn as without
  ControlNets. Outside guess mode the control inputs join the conditioning (both branches, as diffusers repeats the
  control image for classifier-free guidance); in guess mode with guidance the residuals come from the conditional
  branch and the unconditional one gets zeros."""
  guess_mode = bool(guess_mode or controlnets[0].config.global_pool_conditions)
  control = tuple(control)
  run = lambda x, t, c, ctl: residuals(controlnets, params, ctl, x, t, c, timesteps, guess_mode, sdxl)

  if not (guess_mode and uncond is not None):
    def with_residuals(x, t, c):
      down, mid = run(x, t, c, c["control"])
      return model(x, t, {**c, "down_residuals": down, "mid_residual": mid})

    add = lambda c: None if c is None else {**c, "control": control}
    return guide(with_residuals, add(cond), add(uncond))

  def model_fn(x, t):
    down, mid = run(x, t, cond, control)
    zeros = jax.tree.map(jnp.zeros_like, (down, mid))
    return guide(model, {**cond, "down_residuals": down, "mid_residual": mid},
                 {**uncond, "down_residuals": zeros[0], "mid_residual": zeros[1]})(x, t)

  return model_fn
