"""Sample from a trained run: a PNG grid (one row per class) and individual PNGs.

  python sample.py --workdir runs/default --num 8 --seed 0 --steps 50
"""
import sys

from absl import app, flags
from absl import logging as absl_logging

from sdjax.cli import parse_flags

flags.DEFINE_string("workdir", None, "Training run directory (holds config.json and checkpoints/).", required=True)
flags.DEFINE_string("outdir", None, "Output directory (default: <workdir>/generated/step_<N>_seed<S>).")
flags.DEFINE_integer("seed", 0, "Seed; image i's noise depends only on (seed, i).")
flags.DEFINE_integer("num", 8, "Images per class.")
flags.DEFINE_integer("steps", None, "Sampler steps (default: the config's sample.num_steps).")
flags.DEFINE_string("sampler", None, "Sampler name (default: the config's sample.sampler).")
flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default: the config's).")
flags.DEFINE_integer("batch_size", 100, "Images per jitted batch.")
FLAGS = flags.FLAGS


def main(argv):
  absl_logging.set_verbosity(absl_logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from sdjax.sampling import sample_run
  try:
    s = sample_run(FLAGS.workdir, outdir=FLAGS.outdir, seed=FLAGS.seed, num=FLAGS.num, steps=FLAGS.steps,
                   sampler=FLAGS.sampler, guidance_scale=FLAGS.guidance, batch_size=FLAGS.batch_size)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(f"wrote {s['num_images']} images to {s['outdir']} (checkpoint step {s['checkpoint_step']}, "
        f"{s['sampler']} {s['steps']} steps, guidance {s['guidance_scale']}); "
        f"compile {s['compile_s']:.1f}s, {s['images_per_s']:.1f} images/s")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
