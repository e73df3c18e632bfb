"""Evaluate generated images: FID (+ KID, precision/recall) against real images or stats, and CLIP score.

  # Inception FID of a sampling job's output folder against reference statistics
  python eval.py --real ref_stats.npz --fake out/bikes --inception_weights pt_inception-2015-12-05-6726825d.pth
  # compute the reference statistics once from a folder of real images
  python eval.py --real photos/ --save_real_stats ref_stats.npz --inception_weights W.pth
  # FID (MNIST classifier features) of the default run: renders --num images per class from its checkpoint
  python eval.py --real bundled:test --fake runs/default --features digits --num 100

--real: a stats file (.npz with mu/sigma), an image folder or bundled:train / bundled:test (the bundled digits).
--fake: an image folder, a sampling output folder (a text-to-image job's, with index.jsonl and its prompts, or
sample.py's, with samples.npz), or a run workdir (has checkpoints/: its latest checkpoint renders the images
first, into --render_dir or a temporary folder). Prints a table and writes JSON (--out; default next to the fake
images). The logic is sdjax.eval.run's; this file is the command line, at the top level with train.py and
sample.py because rendering from a workdir needs sdjax.sampling, a layer above sdjax.eval.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Sequence

from absl import flags

from sdjax import cli

# How errors from sdjax.sampling / sdjax.prompts name a setting given here.
FLAG_OF = {"num": "--num", "seed": "--seed", "steps": "--steps", "sampler": "--sampler",
           "guidance_scale": "--guidance", "outdir": "--render_dir"}
RENDER_BATCH = 100  # images per jitted sampling batch (sample.py's default)


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("real", None, "Real side: a stats .npz (mu/sigma), an image folder, or bundled:train / "
                      "bundled:test.", flag_values=fv)
  flags.DEFINE_string("fake", None, "Generated side: an image folder, a sampling output folder (index.jsonl or "
                      "samples.npz), or a run workdir (renders --num images per class). Without it, "
                      "--save_real_stats only computes the real side's statistics.", flag_values=fv)
  flags.DEFINE_enum("features", "inception", ["inception", "digits"], "Feature network: inception (FID; needs "
                    "--inception_weights) or digits (the shipped MNIST classifier: 'FID (MNIST classifier "
                    "features)', not comparable with Inception FID).", flag_values=fv)
  flags.DEFINE_string("inception_weights", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or "
                      "torch-fidelity's; .safetensors/.npz with the same keys).", flag_values=fv)
  flags.DEFINE_list("metrics", ["fid"], "Comma-separated: fid, kid, precision, recall (fid is always computed; "
                    "the others keep all features of both sides in memory and need real images).", flag_values=fv)
  flags.DEFINE_string("clip_model", None, "A transformers CLIPModel folder: adds CLIP score (the fake side must "
                      "be a text-to-image job's output, which has prompts).", flag_values=fv)
  flags.DEFINE_string("clip_tokenizer", None, "CLIP tokenizer folder (default: --clip_model).", flag_values=fv)
  flags.DEFINE_string("save_real_stats", None, "Write the real side's mu/sigma here (.npz) for reuse as --real.",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "JSON results file (default: eval_<features>.json in the fake folder, or "
                      "eval_<features>_step<N>.json in a run workdir).", flag_values=fv)
  flags.DEFINE_integer("batch_size", None, "Images per feature batch (default 64 inception, 500 digits); a batch "
                       "is split over the devices when their number divides it, else replicated.", flag_values=fv)
  flags.DEFINE_bool("progress", True, "Show progress bars.", flag_values=fv)
  # Rendering from a run workdir (sdjax.sampling.sample_run; defaults are the run config's).
  flags.DEFINE_integer("num", 100, "Run workdir: images per class to render.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Run workdir: sampling seed.", flag_values=fv)
  flags.DEFINE_integer("steps", None, "Run workdir: sampler steps.", flag_values=fv)
  flags.DEFINE_string("sampler", None, "Run workdir: sampler name.", flag_values=fv)
  flags.DEFINE_float("guidance", None, "Run workdir: guidance scale.", flag_values=fv)
  flags.DEFINE_string("render_dir", None, "Run workdir: keep the rendered images here (default: a temporary "
                      "folder, removed afterwards).", flag_values=fv)


def is_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints"))


def evaluate(f: flags.FlagValues) -> dict:
  """The command's work: check everything cheap (weights, real side, CLIP model), then render if --fake is a
  workdir, then the feature passes. Raises ValueError/OSError for the user."""
  from sdjax.eval import run as ev
  if not f.real or not (f.fake or f.save_real_stats):
    raise ev.EvalError("give --real (stats .npz, image folder or bundled:train/test) and --fake (image folder, "
                       "sampling output folder or run workdir), or --real and --save_real_stats")
  if f.batch_size is not None and f.batch_size < 1:
    raise ev.EvalError(f"--batch_size must be >= 1, got {f.batch_size}")
  unknown = [m for m in f.metrics if m not in ev.METRICS]
  if unknown:
    raise ev.EvalError(f"--metrics: unknown metric {unknown[0]!r}; available: {', '.join(ev.METRICS)}")
  extractor = ev.make_extractor(f.features, inception_weights=f.inception_weights)  # weights errors first
  real = ev.open_real(f.real)
  if not f.fake:  # reference statistics only
    if f.clip_model or f.metrics != ["fid"]:
      raise ev.EvalError("--clip_model and --metrics need --fake: without it, only --save_real_stats is computed")
    if not isinstance(real, ev.ImageSet):
      raise ev.EvalError("--real is already a stats file; --save_real_stats computes one from images")
    stats = ev.feature_pass(real, extractor, f.batch_size or ev.DEFAULT_BATCH[f.features], progress=f.progress,
                            desc="real").stats
    from sdjax.eval import fid
    fid.save_stats(f.save_real_stats, stats.mu, stats.sigma)
    print(f"wrote the {extractor.dim}-d {f.features} feature statistics of {real.description} ({len(real)} images) "
          f"to {f.save_real_stats}")
    return {"real": real.description, "num_real": len(real), "real_stats_saved_to": f.save_real_stats}
  clip = ev.make_clip_scorer(f.clip_model, f.clip_tokenizer) if f.clip_model else None
  temp, render = None, None
  try:
    if is_workdir(f.fake):
      if f.clip_model:
        raise ev.EvalError("--clip_model: a class-conditional run's samples have no prompts")
      from sdjax.sampling import sample_run  # checks its settings before it loads the run
      outdir = f.render_dir or (temp := tempfile.mkdtemp(prefix="sdjax-eval-"))
      render = sample_run(f.fake, outdir=outdir, seed=f.seed, num=f.num, steps=f.steps, sampler=f.sampler,
                          guidance_scale=f.guidance, batch_size=RENDER_BATCH,
                          write_pngs=False, names=FLAG_OF, watermark=False)  # score the model's own pixels
      fake = ev.open_folder(outdir, "--fake")
      fake = ev.ImageSet(f"{f.fake} (step {render['checkpoint_step']}, {render['sampler']} {render['steps']} "
                         f"steps, guidance {render['guidance_scale']}, seed {f.seed})", array=fake.array)
    else:
      fake = ev.open_folder(f.fake, "--fake")
    result = ev.evaluate(real, fake, extractor, metrics=f.metrics, batch_size=f.batch_size, clip=clip,
                         save_real_stats=f.save_real_stats, progress=f.progress)
  finally:
    if temp:
      shutil.rmtree(temp, ignore_errors=True)
  if render is not None:
    result["render"] = {k: render[k] for k in ("checkpoint_step", "seed", "sampler", "steps", "guidance_scale",
                                               "num_images")}
    default_out = os.path.join(f.fake, f"eval_{f.features}_step{render['checkpoint_step']:07d}.json")
  else:
    default_out = os.path.join(f.fake, f"eval_{f.features}.json")
  result["out"] = f.out or default_out
  ev.write_json(result["out"], result)
  print(ev.format_table(result))
  print(f"wrote {result['out']}")
  return result


def run(f: flags.FlagValues, args: list[str]) -> int:
  """The exit status: 0, 2 for a usage or input error (one line on stderr), 1 for an I/O failure."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  try:
    evaluate(f)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


def main(argv: Sequence[str]) -> int:
  """`python eval.py ARGV...` in-process: the exit status."""
  return cli.module_main(define_flags, run, argv)


if __name__ == "__main__":
  cli.module_app_run(define_flags, run)
