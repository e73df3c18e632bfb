"""sdjax.presets: every preset names a registered sampler and schedule settings it implements, and resolves to the
timesteps diffusers' schedulers take for those models (EulerDiscreteScheduler / EulerAncestralDiscreteScheduler
with timestep_spacing="trailing", LCMScheduler; values printed by diffusers 0.42.1 for SDXL's scheduler config)."""
import numpy as np
import pytest

from sdjax import presets, samplers, schedules
from test_watermark import sample_cli  # noqa: F401 - sample.py loaded in-process (a fixture)

# SDXL's (and SD 1.x's) forward process; steps_offset 1 as in their scheduler configs (trailing spacing ignores it).
SCHEDULE = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012, steps_offset=1)
TRAILING = {1: [999], 2: [999, 499], 3: [999, 666, 332], 4: [999, 749, 499, 249],
            8: [999, 874, 749, 624, 499, 374, 249, 124]}
LCM = {1: [999], 2: [999, 499], 4: [999, 759, 499, 259], 8: [999, 879, 759, 639, 499, 379, 259, 139]}


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_preset_resolves_to_valid_sampler_settings(name):
  presets.check(name)
  p = presets.get(name)
  schedule = presets.schedule_for(name, SCHEDULE)
  want = TRAILING if p.sampler in ("euler", "euler_a") else LCM
  for steps in p.step_counts:
    assert samplers.scan_length(schedule, p.sampler, steps) == steps
    timesteps = samplers.get(p.sampler).tables(schedule, steps)["timesteps"]
    if steps in want:
      np.testing.assert_array_equal(timesteps, want[steps], err_msg=f"{name}, {steps} steps")
  job = presets.apply(name, {"sampler": "ddim", "steps": 50, "guidance_scale": 7.5, "height": 512})
  assert job == {"sampler": p.sampler, "steps": p.steps, "guidance_scale": p.guidance_scale, "height": 512}


def test_the_presets():
  assert {n: (p.sampler, p.steps, p.guidance_scale, dict(p.schedule_options)) for n, p in presets.PRESETS.items()} == {
      "sdxl_turbo": ("euler_a", 1, 0.0, {"timestep_spacing": "trailing"}),
      "sdxl_lightning": ("euler", 4, 0.0, {"timestep_spacing": "trailing"}),
      "lcm": ("lcm", 4, 8.0, {}),
      "lcm_lora": ("lcm", 4, 1.0, {})}
  assert presets.schedule_for("sdxl_turbo", SCHEDULE).timestep_spacing == "trailing"
  with pytest.raises(ValueError, match="unknown preset 'turbo'; available: lcm, lcm_lora, sdxl_lightning"):
    presets.get("turbo")
  # A schedule setting the preset's sampler does not implement is refused, not silently dropped.
  with pytest.raises(ValueError, match="does not implement the schedule option use_karras_sigmas"):
    presets.schedule_for("lcm", SCHEDULE.replace(use_karras_sigmas=True))


def test_sample_py_refuses_a_careless_preset_or_lora_before_loading_the_model(sample_cli, tmp_path, monkeypatch):
  """--preset bogus, --lora PATH:nan, a --lora file that does not exist and --lora on a training run are one
  error naming the flag, before any model is loaded."""
  from sdjax import jobs
  monkeypatch.setattr(jobs, "load_model", lambda *a, **kw: pytest.fail("loaded a model"))
  monkeypatch.setattr(jobs, "load_workdir", lambda *a, **kw: pytest.fail("loaded a run"))
  cases = [(["--model", str(tmp_path), "--preset", "bogus"], r"^--preset: unknown preset 'bogus'"),
           (["--model", str(tmp_path), "--lora", "x.safetensors:nan"], r"^--lora: .*finite number SCALE"),
           (["--model", str(tmp_path), "--lora", str(tmp_path / "none.safetensors")], r"^--lora: .* does not exist"),
           (["--workdir", str(tmp_path), "--lora", "x.safetensors"], r"^--lora applies to --model")]
  flags = sample_cli.FLAGS
  for argv, match in cases:
    try:
      flags(["sample.py", "--prompt", "x", "--outdir", str(tmp_path / "o"), *argv])
      with pytest.raises(jobs.JobError, match=match):
        sample_cli.text_job()
    finally:
      flags.unparse_flags()
