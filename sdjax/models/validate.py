"""Type and range checks of model config fields, run by each config's `__post_init__` before anything is built.

Every config (built in Python, loaded from a config.json, or `dataclasses.replace`d) goes through `check`,
which raises one-line ValueErrors such as "UNetConfig.layers_per_block: 10000000 is out of range (expected an
int in [1, 1000])". Ints must be ints (not bools, not floats such as 4.0: diffusers and transformers would fail
on those too); floats may be given as ints and must be finite.

The upper bounds are sanity caps, far above any released model, that stop a corrupt or hostile config from
making model construction run for hours or exhaust memory:
  MAX_WIDTH   65536   channels, hidden/intermediate/projection widths, heads (SDXL: 1280 channels; CLIP bigG:
                      1280 wide, 5120 intermediate; SDXL's 2816-wide pooled+time input)
  MAX_LAYERS  1000    layers_per_block (released: <= 3), transformer_layers_per_block (<= 10),
                      num_hidden_layers (<= 32)
  MAX_LEVELS  32      resolution levels (entries of block_out_channels and other per-block tuples; released: <= 4)
  MAX_COUNT   10**7   vocab_size (CLIP: 49408), num_class_embeds, max_position_embeddings (77), token ids
  MAX_SIZE    2**20   sample_size (released: <= 1024)
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, NamedTuple

MAX_WIDTH = 65536
MAX_LAYERS = 1000
MAX_LEVELS = 32
MAX_COUNT = 10**7
MAX_SIZE = 2**20


class Field(NamedTuple):
  """One field's rule. `kind`: "int", "float", "bool" or "str". Ints and floats lie in [lo, hi] (None: no
  bound; floats exclude `lo` where `open_lo`, `hi` where `open_hi`). `shape`: "scalar", "tuple" (a non-empty
  tuple or list of at most `max_len` valid entries) or "either". `optional`: None is allowed."""
  kind: str
  lo: float | None = None
  hi: float | None = None
  shape: str = "scalar"
  optional: bool = False
  open_lo: bool = False
  open_hi: bool = False
  max_len: int = MAX_LEVELS


def ints(lo: int, hi: int, **kw) -> Field:
  return Field("int", lo, hi, **kw)


def floats(lo: float | None = None, hi: float | None = None, **kw) -> Field:
  return Field("float", lo, hi, **kw)


BOOL = Field("bool")
OPTIONAL_BOOL = Field("bool", optional=True)  # diffusers configs may hold null for false (upcast_attention)
STR = Field("str")
OPTIONAL_STR = Field("str", optional=True)
STRS = Field("str", shape="tuple")


def _describe(f: Field, many: bool = False) -> str:
  """The expected value of one entry (of each entry where `many`), e.g. "an int in [1, 1000]"."""
  if f.kind == "int":
    return f"{'ints' if many else 'an int'} in [{f.lo}, {f.hi}]"
  if f.kind == "float":
    if f.lo is not None and f.hi is not None:
      return (f"{'numbers' if many else 'a number'} in {'(' if f.open_lo else '['}{f.lo:g}, "
              f"{f.hi:g}{')' if f.open_hi else ']'}")
    noun = "finite numbers" if many else "a finite number"
    if f.lo is not None:
      return f"{noun} {'>' if f.open_lo else '>='} {f.lo:g}"
    if f.hi is not None:
      return f"{noun} {'<' if f.open_hi else '<='} {f.hi:g}"
    return noun
  if f.kind == "bool":
    return "bools" if many else "a bool"
  return "strings" if many else "a string"


def expected(f: Field) -> str:
  """The whole field's expected value, for messages."""
  text = {"scalar": _describe(f),
          "tuple": f"a non-empty list of at most {f.max_len} {_describe(f, many=True)}",
          "either": f"{_describe(f)}, or a non-empty list of at most {f.max_len} of them"}[f.shape]
  return text + (", or None" if f.optional else "")


def _show(value: Any, limit: int = 60) -> str:
  try:
    text = repr(value)
  except ValueError:  # an int beyond Python's str-conversion limit
    return f"<{type(value).__name__} too large to print>"
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _entry_error(f: Field, value: Any) -> str | None:
  """Why `value` is not a valid entry of `f` ("has the wrong type ..." / "is out of range"), or None."""
  wrong = f"has the wrong type {type(value).__name__}"
  if f.kind == "bool":
    return None if isinstance(value, bool) else wrong
  if f.kind == "str":
    return None if isinstance(value, str) else wrong
  if isinstance(value, bool) or not isinstance(value, numbers.Integral if f.kind == "int" else numbers.Real):
    return wrong
  if f.kind == "float":
    try:
      if not math.isfinite(float(value)):
        return "is out of range"
    except OverflowError:  # an int beyond float's range
      return "is out of range"
  below = f.lo is not None and (value <= f.lo if f.open_lo else value < f.lo)
  above = f.hi is not None and (value >= f.hi if f.open_hi else value > f.hi)
  return "is out of range" if below or above else None


def check_field(where: str, value: Any, f: Field) -> None:
  """Raise a one-line ValueError unless `value` satisfies `f`; `where` is "Class.field"."""
  if value is None:
    if f.optional:
      return
    raise ValueError(f"{where}: None is not allowed (expected {expected(f)})")
  if isinstance(value, (tuple, list)):
    if f.shape == "scalar":
      raise ValueError(f"{where}: {_show(value)} has the wrong type {type(value).__name__} (expected {expected(f)})")
    if not value:
      raise ValueError(f"{where}: {_show(value)} is empty (expected {expected(f)})")
    if len(value) > f.max_len:
      raise ValueError(f"{where}: {len(value)} entries are too many (expected {expected(f)})")
    for i, entry in enumerate(value):
      error = _entry_error(f, entry)
      if error:
        raise ValueError(f"{where}[{i}]: {_show(entry)} {error} (expected {_describe(f)})")
    return
  error = "has the wrong type " + type(value).__name__ if f.shape == "tuple" else _entry_error(f, value)
  if error:
    raise ValueError(f"{where}: {_show(value)} {error} (expected {expected(f)})")


def check(config: Any, fields: Mapping[str, Field]) -> None:
  """Check each field of `config` named in `fields` (in order); the first violation raises a ValueError."""
  name = type(config).__name__
  for field, rule in fields.items():
    check_field(f"{name}.{field}", getattr(config, field), rule)
