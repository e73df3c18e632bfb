"""diffusers scheduler classes as data: each class's defaults, and which of its settings sdjax implements.

A `scheduler_config.json` names its class (`_class_name`) and usually leaves fields out; diffusers then
applies that class's own defaults (e.g. EulerDiscreteScheduler's `timestep_spacing="linspace"`, DDIM's
`clip_sample=True`), and ignores fields the class does not take. `resolve` does the same, so that sdjax
samples a config exactly as diffusers would, and refuses a setting sdjax does not implement, naming it.

CLASS_DEFAULTS is every `__init__` argument of diffusers 0.42.1 with its default (tests check it against
`tests/fixtures/scheduler_defaults.npz`, written by tools/make_scheduler_default_fixtures.py). Each argument
has one rule, in exactly one of:
- SCHEDULE_FIELDS: read into `sdjax.schedules.Schedule` (CLASS_ONLY limits some values to classes whose
  sdjax sampler implements them);
- SUPPORTED: the values sdjax implements (anything else would sample differently, so it is refused);
- INERT_UNLESS: parameters of a feature that another field turns on; that field is limited to "off" by
  SUPPORTED, so these never change sampling and any value is accepted (e.g. `flow_shift` without flow
  sigmas, `time_shift_type` without dynamic shifting, which current diffusers writes into every config).
The EDM classes (EDM_CLASSES) are read with edm=True, their sigma_min / sigma_max (EDM_RANGE) going to the
Schedule's edm_sigma_min / edm_sigma_max ahead of the rules above.
"""
from __future__ import annotations

import logging
import math
from typing import Any

log = logging.getLogger("sdjax")

_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
          "trained_betas": None}
_THRESHOLDING = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
_SIGMA_KINDS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_FLOW = {"use_flow_sigmas": False, "flow_shift": 1.0}
# EDMEulerScheduler and EDMDPMSolverMultistepScheduler share these (in this order in their signatures).
_EDM = {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, "sigma_schedule": "karras",
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "rho": 7.0}
# LCMScheduler and TCDScheduler take the same arguments with the same defaults.
_LCM = {**_BETAS, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "original_inference_steps": 50, "clip_sample": False, "clip_sample_range": 1.0, "set_alpha_to_one": True,
        "steps_offset": 0, "prediction_type": "epsilon", **_THRESHOLDING, "timestep_spacing": "leading",
        "timestep_scaling": 10.0, "rescale_betas_zero_snr": False}

CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": {**_BETAS, "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0,
                      "prediction_type": "epsilon", **_THRESHOLDING, "clip_sample_range": 1.0,
                      "timestep_spacing": "leading", "rescale_betas_zero_snr": False},
    "DDPMScheduler": {**_BETAS, "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon",
                      **_THRESHOLDING, "clip_sample_range": 1.0, "timestep_spacing": "leading", "steps_offset": 0,
                      "rescale_betas_zero_snr": False},
    "PNDMScheduler": {**_BETAS, "skip_prk_steps": False, "set_alpha_to_one": False, "prediction_type": "epsilon",
                      "timestep_spacing": "leading", "steps_offset": 0},
    "LMSDiscreteScheduler": {**_BETAS, **_SIGMA_KINDS, "prediction_type": "epsilon", "timestep_spacing": "linspace",
                             "steps_offset": 0},
    "EulerDiscreteScheduler": {**_BETAS, "prediction_type": "epsilon", "interpolation_type": "linear",
                               **_SIGMA_KINDS, "sigma_min": None, "sigma_max": None, "timestep_spacing": "linspace",
                               "timestep_type": "discrete", "steps_offset": 0, "rescale_betas_zero_snr": False,
                               "final_sigmas_type": "zero"},
    "EulerAncestralDiscreteScheduler": {**_BETAS, "prediction_type": "epsilon", "timestep_spacing": "linspace",
                                        "steps_offset": 0, "rescale_betas_zero_snr": False},
    # (Heun's betas default differently from the others' in diffusers.)
    "HeunDiscreteScheduler": {**_BETAS, "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon",
                              **_SIGMA_KINDS, "clip_sample": False, "clip_sample_range": 1.0,
                              "timestep_spacing": "linspace", "steps_offset": 0},
    "DPMSolverMultistepScheduler": {**_BETAS, "solver_order": 2, "prediction_type": "epsilon", **_THRESHOLDING,
                                    "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
                                    "lower_order_final": True, "euler_at_final": False, **_SIGMA_KINDS,
                                    "use_lu_lambdas": False, **_FLOW, "final_sigmas_type": "zero",
                                    "lambda_min_clipped": -math.inf, "variance_type": None,
                                    "timestep_spacing": "linspace", "steps_offset": 0, "rescale_betas_zero_snr": False,
                                    "use_dynamic_shifting": False, "time_shift_type": "exponential"},
    "UniPCMultistepScheduler": {**_BETAS, "solver_order": 2, "prediction_type": "epsilon", **_THRESHOLDING,
                                "predict_x0": True, "solver_type": "bh2", "lower_order_final": True,
                                "disable_corrector": [], "solver_p": None, **_SIGMA_KINDS, **_FLOW,
                                "timestep_spacing": "linspace", "steps_offset": 0, "final_sigmas_type": "zero",
                                "rescale_betas_zero_snr": False, "use_dynamic_shifting": False,
                                "time_shift_type": "exponential", "sigma_min": None, "sigma_max": None,
                                "shift_terminal": None},
    "LCMScheduler": {**_LCM},
    "TCDScheduler": {**_LCM},
    # (lower_order_final=False is turned on by set_timesteps whenever final_sigmas_type is "zero".)
    "DPMSolverSinglestepScheduler": {**_BETAS, "solver_order": 2, "prediction_type": "epsilon", **_THRESHOLDING,
                                     "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
                                     "lower_order_final": False, **_SIGMA_KINDS, **_FLOW, "final_sigmas_type": "zero",
                                     "lambda_min_clipped": -math.inf, "variance_type": None,
                                     "use_dynamic_shifting": False, "time_shift_type": "exponential"},
    "KDPM2DiscreteScheduler": {**_BETAS, "beta_start": 0.00085, "beta_end": 0.012, **_SIGMA_KINDS,
                               "prediction_type": "epsilon", "timestep_spacing": "linspace", "steps_offset": 0},
    "KDPM2AncestralDiscreteScheduler": {**_BETAS, "beta_start": 0.00085, "beta_end": 0.012, **_SIGMA_KINDS,
                                        "prediction_type": "epsilon", "timestep_spacing": "linspace",
                                        "steps_offset": 0},
    # (DEIS rewrites algorithm_type "dpmsolver"/"dpmsolver++" to "deis" and solver_type "midpoint"/"heun"/"bh1"/
    # "bh2" to "logrho": SUPPORTED accepts those as diffusers does.)
    "DEISMultistepScheduler": {**_BETAS, "solver_order": 2, "prediction_type": "epsilon", **_THRESHOLDING,
                               "algorithm_type": "deis", "solver_type": "logrho", "lower_order_final": True,
                               **_SIGMA_KINDS, **_FLOW, "timestep_spacing": "linspace", "steps_offset": 0,
                               "use_dynamic_shifting": False, "time_shift_type": "exponential"},
    # EDM (sdjax.samplers.edm): no betas; sigma_min / sigma_max are the EDM sigma range here (EDM_CLASSES).
    "EDMEulerScheduler": {**_EDM, "final_sigmas_type": "zero"},
    # (EDMDPMSolverMultistepScheduler rewrites algorithm_type "deis" to "dpmsolver++" and solver_type "logrho"/"bh1"/
    # "bh2" to "midpoint": SUPPORTED accepts those as diffusers does.)
    "EDMDPMSolverMultistepScheduler": {**_EDM, "solver_order": 2, **_THRESHOLDING, "algorithm_type": "dpmsolver++",
                                       "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
                                       "final_sigmas_type": "zero"},
}
# The EDM classes: their sigma_min / sigma_max are read into the Schedule's edm_sigma_min / edm_sigma_max (with
# edm=True) rather than limited to None by SUPPORTED as for the classes where they override the training sigmas.
EDM_CLASSES = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
EDM_RANGE = ("sigma_min", "sigma_max")

# Read into the Schedule (make_schedule's arguments).
SCHEDULE_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                   "clip_sample", "clip_sample_range", "set_alpha_to_one", "steps_offset", "timestep_spacing",
                   "use_karras_sigmas", "rescale_betas_zero_snr", "original_inference_steps", "timestep_scaling",
                   "final_sigmas_type", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas", "thresholding",
                   "dynamic_thresholding_ratio", "sample_max_value", "lower_order_final", "euler_at_final",
                   "disable_corrector", "sigma_data", "sigma_schedule", "rho")
# Schedule values that only some classes' sdjax samplers implement: (field, value) -> those classes.
CLASS_ONLY = {("clip_sample", True): ("DDIMScheduler", "DDPMScheduler", "LCMScheduler", "TCDScheduler"),
              # sdjax.samplers.dpmpp; DPMSolverSinglestepScheduler's set_timesteps turns lower_order_final on itself
              # (a zero final sigma), so its False samples as True there, as in diffusers.
              **{(field, value): ("DPMSolverMultistepScheduler",)
                 for field, value in (("use_lu_lambdas", True), ("use_exponential_sigmas", True),
                                      ("use_beta_sigmas", True))},
              # (and sdjax.samplers.edm)
              **{(field, value): ("DPMSolverMultistepScheduler", "EDMDPMSolverMultistepScheduler")
                 for field, value in (("thresholding", True), ("euler_at_final", True))},
              # (and sdjax.samplers.unipc: the smallest sigma last, full orders to the end)
              ("final_sigmas_type", "sigma_min"): ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                                                   "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"),
              ("lower_order_final", False): ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                                             "UniPCMultistepScheduler", "EDMDPMSolverMultistepScheduler")}
# The values sdjax implements for the rest (a dict: per class).
SUPPORTED: dict[str, Any] = {
    "trained_betas": (None,), "interpolation_type": ("linear",), "timestep_type": ("discrete",),
    "use_flow_sigmas": (False,), "sigma_min": (None,), "sigma_max": (None,),
    "variance_type": {"DDPMScheduler": ("fixed_small",), "DPMSolverMultistepScheduler": (None,),
                      "DPMSolverSinglestepScheduler": (None,)},
    "algorithm_type": {"DPMSolverMultistepScheduler": ("dpmsolver++", "sde-dpmsolver++"),
                       "EDMDPMSolverMultistepScheduler": ("dpmsolver++", "sde-dpmsolver++", "deis"),
                       "DPMSolverSinglestepScheduler": ("dpmsolver++",),
                       "DEISMultistepScheduler": ("deis", "dpmsolver", "dpmsolver++")},
    "solver_order": {"DPMSolverMultistepScheduler": (1, 2, 3), "UniPCMultistepScheduler": (1, 2, 3),
                     "DPMSolverSinglestepScheduler": (2, 3), "DEISMultistepScheduler": (1, 2, 3),
                     "EDMDPMSolverMultistepScheduler": (1, 2, 3)},
    "solver_type": {"DPMSolverMultistepScheduler": ("midpoint",),
                    "UniPCMultistepScheduler": ("bh2", "bh1", "midpoint", "heun", "logrho"),  # (the last 3: bh2)
                    "DPMSolverSinglestepScheduler": ("midpoint",),
                    "DEISMultistepScheduler": ("logrho", "midpoint", "heun", "bh1", "bh2"),
                    "EDMDPMSolverMultistepScheduler": ("midpoint", "logrho", "bh1", "bh2")},
    "lambda_min_clipped": (-math.inf,), "skip_prk_steps": (True, False), "predict_x0": (True, False),
    "solver_p": (None,), "use_dynamic_shifting": (False,),
}
# Parameters of a feature that the named field(s) turn on (all limited to off above).
INERT_UNLESS = {"flow_shift": ("use_flow_sigmas", "use_dynamic_shifting"),
                "time_shift_type": ("use_dynamic_shifting",), "shift_terminal": ("use_flow_sigmas",)}
METADATA = ("_class_name", "_diffusers_version")


def all_fields() -> set[str]:
  return set().union(*CLASS_DEFAULTS.values())


def _refuse(cls: str, field: str, value: Any, given: bool, allowed) -> ValueError:
  origin = "" if given else f" ({cls}'s default; the config leaves it out)"
  return ValueError(f"scheduler config: {field}={value!r}{origin} is not supported by sdjax (supported: "
                    f"{', '.join(map(repr, allowed))})")


def resolve(config: dict[str, Any]) -> dict[str, Any]:
  """make_schedule's arguments for a diffusers scheduler config of a known `_class_name`: the class's
  defaults for every field left out, fields the class does not take ignored (as diffusers ignores them,
  with a log line), and every setting checked against what sdjax implements (ValueError naming it)."""
  cls = config["_class_name"]
  if cls not in CLASS_DEFAULTS:
    raise ValueError(f"scheduler config: no sdjax sampler for _class_name={cls!r}; known: {sorted(CLASS_DEFAULTS)}")
  defaults = CLASS_DEFAULTS[cls]
  ignored = sorted(k for k in config if k not in defaults and k not in METADATA)
  if ignored:
    log.info("scheduler config: %s ignores %s (as diffusers does)", cls, ignored)
  full = {**defaults, **{k: v for k, v in config.items() if k in defaults}}
  edm = cls in EDM_CLASSES
  for field, value in full.items():
    given = field in config
    if edm and field in EDM_RANGE:
      continue  # (make_schedule checks them)
    if field in SCHEDULE_FIELDS:
      classes = None if isinstance(value, list) else CLASS_ONLY.get((field, value))
      if classes is not None and cls not in classes:
        raise ValueError(f"scheduler config: {field}={value!r} is not supported by sdjax for {cls} (only for "
                         f"{', '.join(classes)})")
    elif field in SUPPORTED:
      allowed = SUPPORTED[field]
      allowed = allowed.get(cls, ()) if isinstance(allowed, dict) else allowed
      if value not in allowed:
        raise _refuse(cls, field, value, given, allowed)
    elif field not in INERT_UNLESS:  # a class field without a rule: this table is incomplete
      raise ValueError(f"scheduler config: sdjax has no rule for {cls}.{field}")
  out = {k: full[k] for k in SCHEDULE_FIELDS if k in full}
  if edm:
    out.update(edm=True, edm_sigma_min=full["sigma_min"], edm_sigma_max=full["sigma_max"])
  return out
