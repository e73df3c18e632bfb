"""Sample from a trained run or a Stable Diffusion checkpoint.

Class-conditional pixel-space runs (the default job): a PNG grid (one row per class) and individual PNGs.
  python sample.py --workdir runs/default --num 8 --seed 0 --steps 50

Text-to-image (a diffusers folder, a single-file checkpoint, or a `task: ldm` training run): a resumable
job, one PNG per image with its generation metadata; re-run the same command to finish an interrupted one.
Images get diffusers' SDXL invisible watermark (sdjax.watermark; RGB, at least 256 px) unless --no_watermark.
  python sample.py --model path/to/sd15 --prompt "a red bicycle" --num_per_prompt 4 --outdir out/bikes
  python sample.py --model sd15.safetensors --tokenizer path/to/tokenizer --prompts prompts.jsonl --outdir out/p
ControlNet (one control image per --controlnet; several: MultiControlNet) and IP-Adapter (an image prompt):
  python sample.py --model path/to/sd15 --controlnet path/to/sd-controlnet-canny:0.8 --control_image edges.png \
      --prompt "a bird" --outdir out/bird
  python sample.py --model path/to/sd15 --ip_adapter ip-adapter_sd15.safetensors:0.6 \
      --image_encoder path/to/IP-Adapter/models/image_encoder --ip_adapter_image style.png --prompt "a cat"
SDXL base + refiner (the ensemble of expert denoisers: the base runs the first --high_noise_frac of every txt2img
schedule, the refiner the rest):
  python sample.py --model path/to/sdxl-base --refiner sd_xl_refiner_1.0.safetensors --high_noise_frac 0.8 \
      --prompt "a lion" --sampler euler --steps 40 --outdir out/lion

Multi-host text-to-image jobs: run the same command on every host (with --coordinator_address,
--num_processes and --process_id, or their $SDJAX_... variables, as train.py); the hosts split each batch and
process 0 writes the images to an --outdir they share.
"""
import dataclasses
import os
import sys

from absl import app, flags
from absl import logging as absl_logging

from sdjax import cli
from sdjax.cli import parse_flags

flags.DEFINE_string("workdir", None, "Training run directory (holds config.json and checkpoints/).")
flags.DEFINE_string("outdir", None, "Output directory (default: <workdir>/generated/..., or "
                    "generated/<model name> for --model).")
flags.DEFINE_integer("seed", 0, "Seed; image i's noise depends only on (seed, i) (text jobs: on (seed, prompt, i)).")
flags.DEFINE_integer("num", 8, "Class-conditional runs: images per class.")
flags.DEFINE_integer("steps", None, "Sampler steps (default: the config's sample.num_steps; text jobs 25).")
flags.DEFINE_string("sampler", None, "Sampler name (default: the config's sample.sampler, or the model's scheduler).")
flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default: the config's; text jobs 7.5; "
                   "<= 1 turns guidance off).")
flags.DEFINE_integer("batch_size", None, "Images per jitted batch (default 100; text jobs 8, rounded up to a "
                     "multiple of the device count).")
flags.DEFINE_string("c2pa_key", None, "PEM private key: sign C2PA content credentials into each image of a text "
                    "job (needs c2pa-python; sdjax.provenance).")
flags.DEFINE_string("c2pa_cert", None, "PEM certificate chain of --c2pa_key, signing certificate first.")
flags.DEFINE_enum("c2pa_prompt", "hash", ["hash", "text"], "Prompts in the C2PA manifest: their SHA-256 or text.")
flags.DEFINE_multi_string("lora", [], "PATH[:SCALE]: a LoRA file (diffusers or kohya naming) fused into the model "
                          "at SCALE (default 1); repeatable (sdjax.lora_loading).")
flags.DEFINE_string("preset", None, "Few-step model settings (sampler, steps, guidance, timestep spacing) from "
                    "sdjax.presets: sdxl_turbo, sdxl_lightning, lcm, lcm_lora; --sampler/--steps/--guidance "
                    "given explicitly win.")
flags.DEFINE_bool("no_safety_checker", False, "Do not run the pipeline folder's NSFW safety checker (on by default "
                  "when its model_index.json names one: flagged images are written black and recorded).")
flags.DEFINE_bool("no_watermark", False, "Write images without diffusers' SDXL invisible watermark (sdjax.watermark; "
                  "on by default for RGB images of at least 256 px, recorded in each PNG's metadata).")
# Text-to-image jobs.
flags.DEFINE_string("model", None, "A diffusers pipeline folder or a single-file checkpoint (.safetensors).")
flags.DEFINE_string("tokenizer", None, "CLIP tokenizer folder (single-file checkpoints carry none).")
flags.DEFINE_string("tokenizer_2", None, "SDXL's second tokenizer folder (default: --tokenizer; SDXL's own "
                    "second tokenizer pads with '!', so pass it for diffusers-identical prompts).")
flags.DEFINE_enum("model_type", None, ["sd1", "sd2", "sd2_v", "sdxl", "sdxl_refiner"], "A single file's model type "
                  "(default: detected from its keys; sd2_v must be named).")
flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
flags.DEFINE_string("prompts", None, "A prompts file: .txt (one a line, # comments) or .jsonl (objects with "
                    "prompt and optional negative_prompt, seed, guidance_scale, guidance_rescale, steps, height, "
                    "width, num_images, sampler, init_image, mask, strength, control_image, "
                    "controlnet_conditioning_scale, control_guidance_start, control_guidance_end, "
                    "ip_adapter_image, ip_adapter_scale, high_noise_frac).")
flags.DEFINE_string("negative_prompt", "", "Negative prompt for every prompt without its own.")
flags.DEFINE_integer("num_per_prompt", 1, "Images per prompt.")
flags.DEFINE_float("rescale", 0.0, "Guidance rescale in [0, 1].")
flags.DEFINE_integer("height", None, "Image height (default: the U-Net's sample_size x the VAE's downscale).")
flags.DEFINE_integer("width", None, "Image width (default: as height).")
flags.DEFINE_string("init_image", None, "img2img: the starting image for every prompt.")
flags.DEFINE_string("mask", None, "Inpainting: mask image (white = repaint), with --init_image.")
flags.DEFINE_float("strength", None, "img2img/inpainting strength in (0, 1] (default 0.8 img2img, 1.0 inpainting).")
flags.DEFINE_string("refiner", None, "An SDXL refiner (diffusers folder or single file, e.g. sd_xl_refiner_1.0"
                    ".safetensors) for an SDXL --model: every txt2img image is rendered by the base up to "
                    "--high_noise_frac of its schedule (denoising_end), then by the refiner (denoising_start).")
flags.DEFINE_float("high_noise_frac", 0.8, "With --refiner: the fraction of the schedule the base model runs, in "
                   "(0, 1).")
flags.DEFINE_multi_string("controlnet", [], "PATH[:SCALE]: a ControlNet (diffusers folder, or an original "
                          "control_*.safetensors single file) guiding every image at conditioning scale SCALE "
                          "(default 1); repeatable: several are diffusers' MultiControlNet (residuals summed).")
flags.DEFINE_string("controlnet_config", None, "A diffusers ControlNet config (folder or config.json) for single-file "
                    "--controlnet files whose architecture is not SD 1.5's / 2.1's default.")
flags.DEFINE_multi_string("control_image", [], "The control image of every prompt without its own control_image, "
                          "one per --controlnet in order (resized to the image size, RGB in [0, 1]).")
flags.DEFINE_float("control_guidance_start", 0.0, "With --controlnet: the fraction of the steps run before the "
                   "ControlNets start guiding, in [0, 1).")
flags.DEFINE_float("control_guidance_end", 1.0, "With --controlnet: the fraction of the steps run after which they "
                   "stop, in (start, 1].")
flags.DEFINE_bool("guess_mode", False, "With --controlnet: diffusers' guess mode (ControlNets on the conditional "
                  "branch only, residuals scaled 0.1 ... 1).")
flags.DEFINE_multi_string("ip_adapter", [], "PATH[:SCALE]: an IP-Adapter file (diffusers' format, e.g. "
                          "ip-adapter_sd15.safetensors) at SCALE (default 1); repeatable; needs --image_encoder.")
flags.DEFINE_string("image_encoder", None, "The CLIP vision folder (CLIPVisionModelWithProjection) that embeds the "
                    "IP-Adapter images, e.g. h94/IP-Adapter's models/image_encoder.")
flags.DEFINE_multi_string("ip_adapter_image", [], "The image prompt of every prompt without its own "
                          "ip_adapter_image: one for all --ip_adapter, or one per --ip_adapter in order.")
flags.DEFINE_bool("grid", False, "Also write grid.png, one row per prompt.")
flags.DEFINE_integer("fsdp", 1, "Shard the params over this many devices (mesh data x fsdp).")
flags.DEFINE_bool("overwrite", False, "Continue in an outdir whose job.json differs (changed images are re-rendered).")
flags.DEFINE_integer("max_images", None, "Render at most this many images, then stop (re-run to continue).")
cli.define_multihost_flags()
FLAGS = flags.FLAGS

TEXT_ONLY = ("model", "tokenizer", "tokenizer_2", "model_type", "prompt", "prompts", "negative_prompt",
             "num_per_prompt", "rescale", "height", "width", "init_image", "mask", "strength", "grid", "fsdp",
             "overwrite", "max_images", "c2pa_key", "c2pa_cert", "c2pa_prompt", "no_safety_checker", "lora", "preset",
             "refiner", "high_noise_frac", "controlnet", "controlnet_config", "control_image",
             "control_guidance_start", "control_guidance_end", "guess_mode", "ip_adapter", "image_encoder",
             "ip_adapter_image")
# How text-to-image job errors name a setting given here: by its flag (a prompts-file field by its line).
FLAG_OF = {"prompts": "--prompts", "model": "--model", "tokenizer": "--tokenizer", "tokenizer_2": "--tokenizer_2",
           "seed": "--seed", "outdir": "--outdir", "overwrite": "--overwrite", "negative_prompt": "--negative_prompt",
           "guidance_scale": "--guidance", "guidance_rescale": "--rescale", "steps": "--steps", "height": "--height",
           "width": "--width", "num_images": "--num_per_prompt", "sampler": "--sampler", "init_image": "--init_image",
           "mask": "--mask", "strength": "--strength", "batch_size": "--batch_size", "num": "--num",
           "c2pa_key": "--c2pa_key", "c2pa_cert": "--c2pa_cert", "c2pa_prompt": "--c2pa_prompt", "lora": "--lora",
           "preset": "--preset", "refiner": "--refiner", "high_noise_frac": "--high_noise_frac",
           "controlnet": "--controlnet", "controlnet_config": "--controlnet_config", "control_image": "--control_image",
           "controlnet_conditioning_scale": "--controlnet", "control_guidance_start": "--control_guidance_start",
           "control_guidance_end": "--control_guidance_end", "guess_mode": "--guess_mode", "ip_adapter": "--ip_adapter",
           "image_encoder": "--image_encoder", "ip_adapter_image": "--ip_adapter_image",
           "ip_adapter_scale": "--ip_adapter"}


def check_flags():
  """Refuse out-of-range or non-finite flags before anything is loaded, rendered or written (the checks of
  a prompts file's fields, sdjax.prompts.check_settings)."""
  from sdjax import prompts
  prompts.check_settings({"seed": FLAGS.seed, "num": FLAGS.num, "steps": FLAGS.steps, "guidance_scale": FLAGS.guidance,
                          "batch_size": FLAGS.batch_size, "num_images": FLAGS.num_per_prompt,
                          "guidance_rescale": FLAGS.rescale, "height": FLAGS.height, "width": FLAGS.width,
                          "strength": FLAGS.strength, "control_guidance_start": FLAGS.control_guidance_start,
                          "control_guidance_end": FLAGS.control_guidance_end}, FLAG_OF)
  if FLAGS.outdir:
    prompts.check_outdir(FLAGS.outdir, FLAG_OF)


def sample_classes():
  from sdjax.sampling import sample_run
  s = sample_run(FLAGS.workdir, outdir=FLAGS.outdir, seed=FLAGS.seed, num=FLAGS.num, steps=FLAGS.steps,
                 sampler=FLAGS.sampler, guidance_scale=FLAGS.guidance,
                 batch_size=100 if FLAGS.batch_size is None else FLAGS.batch_size, names=FLAG_OF,
                 watermark=not FLAGS.no_watermark)
  print(f"wrote {s['num_images']} images to {s['outdir']} (checkpoint step {s['checkpoint_step']}, "
        f"{s['sampler']} {s['steps']} steps, guidance {s['guidance_scale']}); "
        f"compile {s['compile_s']:.1f}s, {s['images_per_s']:.1f} images/s")


def scaled_paths(name: str, setting: str) -> list[tuple[str, float]]:
  """--NAME PATH[:SCALE] flags -> (path, scale) pairs, each path existing and each scale a valid `setting`."""
  from sdjax import jobs, lora_loading, prompts
  out = []
  for spec in FLAGS[name].value:
    try:
      path, scale = lora_loading.parse_spec(spec)
    except ValueError:
      raise jobs.JobError(f"--{name} {spec!r}: expected PATH or PATH:SCALE with a finite number SCALE") from None
    msg = prompts.check_value(setting, scale)
    if msg:
      raise jobs.JobError(f"--{name} {spec!r}: the scale {msg}")
    if not os.path.exists(path):
      raise jobs.JobError(f"--{name}: {path} does not exist")
    out.append((path, scale))
  return out


def text_job():
  from sdjax import jobs
  if FLAGS.prompt and FLAGS.prompts:
    raise jobs.JobError("give --prompt or --prompts, not both")
  if not FLAGS.prompt and not FLAGS.prompts:
    raise jobs.JobError("a text-to-image job needs --prompt TEXT (repeatable) or --prompts FILE")
  raw = jobs.read_prompts(FLAGS.prompts, names=FLAG_OF) if FLAGS.prompts else [
      ({"prompt": p}, f"--prompt #{i}") for i, p in enumerate(FLAGS.prompt)]
  from sdjax import lora_loading, presets
  try:
    preset = presets.get(FLAGS.preset) if FLAGS.preset else None
  except ValueError as e:
    raise jobs.JobError(f"--preset: {e}") from None
  try:
    loras = [lora_loading.parse_spec(spec) for spec in FLAGS.lora]
  except ValueError as e:
    raise jobs.JobError(f"--lora: {e}") from None
  if loras and not FLAGS.model:
    raise jobs.JobError("--lora applies to --model (a pipeline folder or checkpoint), not to a training run")
  for path, _ in loras:
    if not os.path.exists(path):
      raise jobs.JobError(f"--lora: {path} does not exist")
  steps = FLAGS.steps if FLAGS.steps is not None else preset.steps if preset else 25
  guidance = FLAGS.guidance if FLAGS.guidance is not None else preset.guidance_scale if preset else 7.5
  defaults = jobs.Defaults(
      negative_prompt=FLAGS.negative_prompt, num_images=FLAGS.num_per_prompt, seed=FLAGS.seed,
      steps=steps, guidance_scale=guidance,
      guidance_rescale=FLAGS.rescale, sampler=FLAGS.sampler or (preset.sampler if preset else None),
      height=FLAGS.height or FLAGS.width, width=FLAGS.width or FLAGS.height, init_image=FLAGS.init_image,
      mask=FLAGS.mask, strength=FLAGS.strength, control_image=tuple(FLAGS.control_image) or None,
      control_guidance_start=FLAGS.control_guidance_start, control_guidance_end=FLAGS.control_guidance_end,
      ip_adapter_image=tuple(FLAGS.ip_adapter_image) or None)
  if FLAGS["high_noise_frac"].present and not FLAGS.refiner:
    raise jobs.JobError("--high_noise_frac applies with --refiner")
  for name, needs in (("controlnet_config", "controlnet"), ("control_image", "controlnet"),
                      ("control_guidance_start", "controlnet"), ("control_guidance_end", "controlnet"),
                      ("guess_mode", "controlnet"), ("image_encoder", "ip_adapter"),
                      ("ip_adapter_image", "ip_adapter")):
    if FLAGS[name].present and not FLAGS[needs].value:
      raise jobs.JobError(f"--{name} applies with --{needs}")
  if FLAGS.ip_adapter and not FLAGS.image_encoder:
    raise jobs.JobError("--ip_adapter needs --image_encoder DIR (the CLIP vision model that embeds the IP-Adapter "
                        "images, CLIPVisionModelWithProjection)")
  if FLAGS.refiner and (FLAGS.controlnet or FLAGS.ip_adapter):
    raise jobs.JobError(f"--{'controlnet' if FLAGS.controlnet else 'ip_adapter'} does not combine with --refiner")
  if FLAGS.control_guidance_start >= FLAGS.control_guidance_end:
    raise jobs.JobError(f"--control_guidance_start {FLAGS.control_guidance_start} must be below "
                        f"--control_guidance_end {FLAGS.control_guidance_end}")
  controlnets = scaled_paths("controlnet", "controlnet_conditioning_scale")
  ip_adapters = scaled_paths("ip_adapter", "ip_adapter_scale")
  if FLAGS.control_image and len(FLAGS.control_image) != len(controlnets):
    raise jobs.JobError(f"--control_image: {len(FLAGS.control_image)} given for {len(controlnets)} --controlnet: "
                        "give one per ControlNet, in order")
  if FLAGS.ip_adapter_image and len(FLAGS.ip_adapter_image) not in (1, len(ip_adapters)):
    raise jobs.JobError(f"--ip_adapter_image: {len(FLAGS.ip_adapter_image)} given for {len(ip_adapters)} "
                        "--ip_adapter: give one for all, or one per IP-Adapter")
  for name in ("init_image", "mask", "tokenizer", "tokenizer_2", "refiner", "controlnet_config", "image_encoder"):
    path = getattr(FLAGS, name)
    if path and not os.path.exists(path):
      raise jobs.JobError(f"--{name}: {path} does not exist")
  from sdjax import provenance
  signer = provenance.load_signer(FLAGS.c2pa_key, FLAGS.c2pa_cert, FLAGS.c2pa_prompt, names=FLAG_OF)  # up front
  if FLAGS.model:
    outdir = FLAGS.outdir or os.path.join("generated", os.path.splitext(os.path.basename(os.path.normpath(FLAGS.model)))[0])
    jobs.check_outdir(outdir, FLAG_OF)
    model = jobs.load_model(FLAGS.model, tokenizer=FLAGS.tokenizer, tokenizer_2=FLAGS.tokenizer_2,
                            model_type=FLAGS.model_type, names=FLAG_OF,
                            safety_checker=not FLAGS.no_safety_checker, loras=loras)
  else:
    outdir = FLAGS.outdir or os.path.join(FLAGS.workdir, "generated", "text")
    jobs.check_outdir(outdir, FLAG_OF)
    model = jobs.load_workdir(FLAGS.workdir)
  if preset:  # e.g. trailing timestep spacing, checked against the preset's sampler
    try:
      model.sd = dataclasses.replace(model.sd, schedule=presets.schedule_for(FLAGS.preset, model.sd.schedule))
    except ValueError as e:
      raise jobs.JobError(f"--preset {FLAGS.preset}: {e}") from None
  if FLAGS.refiner:
    model = jobs.load_refiner(model, FLAGS.refiner, high_noise_frac=FLAGS.high_noise_frac, names=FLAG_OF)
  if controlnets:
    model = jobs.load_controlnets(model, controlnets, config=FLAGS.controlnet_config, guess_mode=FLAGS.guess_mode,
                                  names=FLAG_OF)
  if ip_adapters:
    model = jobs.load_ip_adapters(model, ip_adapters, FLAGS.image_encoder, names=FLAG_OF)
  job = jobs.Job(outdir, tuple(raw), defaults, batch_size=8 if FLAGS.batch_size is None else FLAGS.batch_size,
                 fsdp=FLAGS.fsdp, grid=FLAGS.grid, overwrite=FLAGS.overwrite, max_images=FLAGS.max_images,
                 watermark=not FLAGS.no_watermark, c2pa=signer, preset=FLAGS.preset, names=FLAG_OF)
  try:
    s = jobs.run(job, model)
  except KeyboardInterrupt as e:
    sig = "SIGTERM" if isinstance(e, jobs.Interrupted) else "interrupt"
    print(f"{sig}: stopped; every file in {outdir} is complete. Re-run the same command to render the rest.",
          file=sys.stderr)
    sys.exit(143 if sig == "SIGTERM" else 130)
  except jobs.LostPeer as e:
    print(f"error: {e}. Every file in {outdir} is complete: re-run the same command on every host to render the "
          "rest.", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Not sys.exit: jax's exit handler would wait on the dead process (its heartbeat timeout, then an abort).
    os._exit(1)
  if s is None or s.get("remaining") is None:
    return
  print(f"{s['rendered']} images rendered, {s['skipped']} skipped as already done, {s['remaining']} remaining "
        f"({s['images']} in the job) -> {s['outdir']}; compile {s['compile_s']:.1f}s, "
        f"{s['images_per_s']:.2f} images/s, wall {s['wall_s']:.1f}s")
  if s.get("nsfw_flagged"):
    from sdjax.models.safety_checker import NSFW_WARNING
    print(f"{s['nsfw_flagged']} image(s) flagged by the safety checker (nsfw_content_detected in index.jsonl). "
          + NSFW_WARNING)


def main(argv):
  absl_logging.set_verbosity(absl_logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(FLAGS.model) == bool(FLAGS.workdir):
    sys.exit("error: give exactly one of --workdir DIR (a training run) or --model PATH (a Stable Diffusion checkpoint)")
  try:
    check_flags()
  except ValueError as e:
    sys.exit(f"error: {e}")
  cli.initialize_multihost(FLAGS)
  if FLAGS.model:
    text = True
  else:
    from sdjax import runs
    text = runs.task_of(FLAGS.workdir) == "ldm"
  try:
    if text:
      text_job()
    else:
      given = [f"--{n}" for n in TEXT_ONLY if FLAGS[n].present]
      if given:
        raise ValueError(f"{FLAGS.workdir} is a class-conditional run: {', '.join(given)} apply to text-to-image only")
      sample_classes()
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
