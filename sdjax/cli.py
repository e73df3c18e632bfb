"""Helpers shared by the thin CLIs (train.py, sample.py)."""
from __future__ import annotations

import re
import sys

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing whose errors are one line naming the flag or config key, never a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}\nPass --helpshort or --helpfull to see help on flags.")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections raises these for an override of a config key that does not exist.
    text = str(e).replace("\\n", " ").replace("\\'", "'")
    match = re.search(r"'(\w+)'", text)
    key = match.group(1) if match else None
    hint = re.search(r'Did you mean "(\w+)"', text)
    culprit = next((a.split("=")[0] for a in argv[1:] if key and a.startswith("--config.")
                    and key in a.split("=")[0].split(".")), None)
    sys.exit(f"error: unknown config key {key!r}" + (f" in {culprit}" if culprit else "")
             + (f" (did you mean {hint.group(1)!r}?)" if hint else ""))
