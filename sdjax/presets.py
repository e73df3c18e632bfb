"""Named sampling presets for few-step (distilled) models: the sampler, step count, guidance scale and schedule
settings each model family is meant to be sampled with.

  preset = presets.get("sdxl_turbo")
  spec_defaults = presets.apply("sdxl_turbo", {"sampler": "ddim", "steps": 30, "guidance_scale": 7.5})
  schedule = presets.schedule_for("sdxl_turbo", pipe.schedule)   # trailing timestep spacing

The settings are those of the models' cards and diffusers' documentation:

  sdxl_turbo      SDXL-Turbo (adversarial diffusion distillation): EulerAncestralDiscreteScheduler with
                  "trailing" spacing (its scheduler_config.json), 1 step (up to 4), guidance_scale 0 (no
                  classifier-free guidance: the model was distilled without it).
  sdxl_lightning  SDXL-Lightning: EulerDiscreteScheduler with timestep_spacing="trailing", guidance 0, the step
                  count of the checkpoint (2, 4 or 8; default 4). The 1-step checkpoint predicts x0
                  (prediction_type="sample"), a property of its scheduler config, not of this preset.
  lcm             an LCM-distilled U-Net (`time_cond_proj_dim`, e.g. LCM_Dreamshaper_v7): LCMScheduler, 4 steps,
                  guidance 8.0, which the U-Net receives as an embedding (one U-Net call per step; see
                  `sdjax.pipelines.denoise`).
  lcm_lora        a base model with an LCM-LoRA merged: LCMScheduler, 4 steps, guidance 1.0 (diffusers' LCM-LoRA
                  guide: 1.0 to 2.0; above 1 is ordinary classifier-free guidance, two U-Net calls per step).

Guidance 0 and 1 both mean "no classifier-free guidance" in sdjax's jobs, as in diffusers (guidance > 1 enables it).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from sdjax import samplers, schedules
from sdjax.schedules import Schedule


@dataclasses.dataclass(frozen=True)
class Preset:
  """sampler: an `sdjax.samplers` name; steps: the default step count; step_counts: the counts the model was
  distilled for (any other is allowed, but off the model's training); guidance_scale: the job's guidance scale;
  schedule_options: `Schedule` sampler settings (`schedules.SAMPLER_SETTINGS`) to set on the model's schedule."""
  sampler: str
  steps: int
  step_counts: tuple[int, ...]
  guidance_scale: float
  schedule_options: tuple[tuple[str, Any], ...] = ()
  description: str = ""


PRESETS: dict[str, Preset] = {
    "sdxl_turbo": Preset("euler_a", 1, (1, 2, 3, 4), 0.0, (("timestep_spacing", "trailing"),),
                         "SDXL-Turbo: Euler ancestral, trailing spacing, 1-4 steps, no guidance"),
    "sdxl_lightning": Preset("euler", 4, (2, 4, 8), 0.0, (("timestep_spacing", "trailing"),),
                             "SDXL-Lightning: Euler, trailing spacing, the checkpoint's 2/4/8 steps, no guidance"),
    "lcm": Preset("lcm", 4, (1, 2, 3, 4, 5, 6, 7, 8), 8.0, (),
                  "LCM-distilled U-Net: LCM sampler, 4 steps, guidance 8 embedded in the U-Net"),
    "lcm_lora": Preset("lcm", 4, (1, 2, 3, 4, 5, 6, 7, 8), 1.0, (),
                       "LCM-LoRA: LCM sampler, 4 steps, guidance 1 (1-2)"),
}


def get(name: str) -> Preset:
  """The preset `name`; a ValueError lists the known ones."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
  return PRESETS[name]


def apply(name: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
  """`defaults` (job/spec defaults with keys "sampler", "steps", "guidance_scale", and any others, kept) with
  the preset's sampler, steps and guidance_scale put in. Settings given explicitly by the user should be laid
  over the result, so that they win over the preset."""
  p = get(name)
  return {**defaults, "sampler": p.sampler, "steps": p.steps, "guidance_scale": p.guidance_scale}


def schedule_for(name: str, schedule: Schedule) -> Schedule:
  """`schedule` with the preset's sampler settings (e.g. trailing timestep spacing) set, checked against the
  preset's sampler (`samplers.check_schedule`: a setting of the model's schedule that the sampler does not
  implement is a ValueError)."""
  p = get(name)
  out = schedule.replace(**dict(p.schedule_options)) if p.schedule_options else schedule
  samplers.check_schedule(out, p.sampler)
  return out


def check(name: str) -> None:
  """ValueError unless preset `name` names a registered sampler and known schedule settings of valid values."""
  p = get(name)
  samplers.get(p.sampler)
  unknown = sorted(k for k, _ in p.schedule_options if k not in schedules.SAMPLER_SETTINGS)
  if unknown:
    raise ValueError(f"preset {name!r}: unknown schedule setting(s) {unknown}")
  if p.steps not in p.step_counts or any(not isinstance(n, int) or n < 1 for n in p.step_counts):
    raise ValueError(f"preset {name!r}: steps={p.steps} is not one of its step counts {p.step_counts}")
  if not p.guidance_scale >= 0.0:
    raise ValueError(f"preset {name!r}: guidance_scale={p.guidance_scale} must be >= 0")
