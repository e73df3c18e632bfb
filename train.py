"""Train a model from a config (config.task: diffusion, ldm or vae).

  python train.py                                   # configs/default.py into runs/default
  python train.py --config configs/default.py:tiny --workdir runs/tiny
  python train.py --config configs/default.py --config.optim.lr=3e-4 --workdir runs/x

Re-running with the same --workdir resumes from its latest checkpoint.

Multi-host: on a Cloud TPU pod, SLURM or Open MPI job run the same command on every host. Elsewhere give
each process --coordinator_address=HOST:PORT --num_processes=N --process_id=I (or $SDJAX_COORDINATOR_ADDRESS,
$SDJAX_NUM_PROCESSES, $SDJAX_PROCESS_ID) and a --workdir that all hosts share.
"""
import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging

from sdjax import cli
from sdjax.cli import parse_flags
from ml_collections import config_flags

HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file("config", os.path.join(HERE, "configs", "default.py"),
                                "Config file (configs/NAME.py[:variant]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config name>[_<variant>]).")
cli.define_multihost_flags()
FLAGS = flags.FLAGS


def default_workdir(config_arg: str) -> str:
  path, _, variant = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("runs", f"{name}_{variant}" if variant else name)


def main(argv):
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from sdjax.lock import LockedError
  from sdjax.train import run
  cli.initialize_multihost(FLAGS)
  config_arg = FLAGS["config"].serialize().partition("=")[2] or "configs/default.py"
  workdir = FLAGS.workdir or default_workdir(config_arg)
  try:
    summary = run(FLAGS.config, workdir)
  except (ValueError, FileNotFoundError, FloatingPointError, LockedError) as e:
    sys.exit(f"error: {e}")
  print(f"done: step {summary['final_step']} in {workdir}")
  if "digit_fid" in summary:
    print(f"quality ({summary['digit_eval_images']} samples, sdjax's digit classifier): accuracy "
          f"{summary['digit_accuracy']:.3f}, FID (MNIST classifier features, not Inception FID) "
          f"{summary['digit_fid']:.2f}")


if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  app.run(main, flags_parser=parse_flags)
