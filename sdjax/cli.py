"""Helpers shared by the CLIs: train.py and sample.py, and the library modules run as `python -m sdjax...`."""
from __future__ import annotations

import logging
import re
import sys
from typing import Callable, Sequence

from absl import app, flags

Define = Callable[[flags.FlagValues], None]  # defines a CLI's flags on the given FlagValues
Run = Callable[[flags.FlagValues, list[str]], int]  # (parsed flags, positional arguments) -> exit status


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS, *, status: int = 1) -> list[str]:
  """absl flag parsing whose errors are one line naming the flag or config key, never a traceback; they
  exit with `status`."""
  try:
    return flag_values(argv)
  except flags.Error as e:
    _exit(f"error: {e}\nPass --helpshort or --helpfull to see help on flags.", status)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections raises these for an override of a config key that does not exist.
    text = str(e).replace("\\n", " ").replace("\\'", "'")
    match = re.search(r"'(\w+)'", text)
    key = match.group(1) if match else None
    hint = re.search(r'Did you mean "(\w+)"', text)
    culprit = next((a.split("=")[0] for a in argv[1:] if key and a.startswith("--config.")
                    and key in a.split("=")[0].split(".")), None)
    _exit(f"error: unknown config key {key!r}" + (f" in {culprit}" if culprit else "")
          + (f" (did you mean {hint.group(1)!r}?)" if hint else ""), status)


def _exit(message: str, status: int):
  print(message, file=sys.stderr)
  sys.exit(status)


def define_multihost_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """--coordinator_address/--num_processes/--process_id (see sdjax.parallel.initialize), on `fv`."""
  flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0's coordinator.", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "Multi-host: this process's index in [0, num_processes).", flag_values=fv)


def initialize_multihost(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Start jax's multi-process runtime from the flags of `define_multihost_flags` (or the environment, or a
  detected cluster); a bad combination exits with one line. Call before anything touches devices."""
  from sdjax import parallel  # imports jax: only when a CLI runs
  try:
    parallel.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
  except ValueError as e:
    _exit(f"error: {e}", 1)


# A library module's command line (`python -m sdjax.data.prepare ...`) defines its flags only when it runs:
# absl flags are global, and defining them at import would collide with another CLI's in the same process.
# Usage errors exit 2 and runtime errors are the module's to report.

def module_main(define: Define, run: Run, argv: Sequence[str], *, positional: Sequence[str] = ()) -> int:
  """The module's CLI in-process: `argv` (the arguments, no program name) parsed into fresh FlagValues."""
  flag_values = flags.FlagValues()
  define(flag_values)
  args = _positional(parse_flags(["sdjax", *argv], flag_values, status=2), positional)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  return run(flag_values, args)


def module_app_run(define: Define, run: Run, *, positional: Sequence[str] = ()) -> None:
  """`python -m`: the module's flags on flags.FLAGS under absl's app.run (--help, --helpshort, --helpfull)."""
  define(flags.FLAGS)

  def main(argv: list[str]) -> int:
    # app.run installed absl's log handler: INFO records as bare lines on stderr instead, as in-process.
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    return run(flags.FLAGS, _positional(argv, positional))

  app.run(main, flags_parser=lambda argv: parse_flags(argv, status=2))


def _positional(argv: list[str], names: Sequence[str]) -> list[str]:
  args = argv[1:]
  if len(args) != len(names):
    want = " ".join(n.upper() for n in names) or "no positional arguments"
    _exit(f"error: expected {want}, got {args}", 2)
  return args
