"""Model-FLOPs mode: trace a model as plain XLA ops so that XLA's cost analysis counts its FLOPs exactly.

XLA's cost analysis cannot see inside custom kernels (Pallas, cuDNN: custom calls count 0 FLOPs) and counts a
`while` loop's body once (the chunked attention's scan over key blocks), and it counts rematerialised work
again. Inside `model_flops()`, `sdjax.models.attention` uses its "xla" implementation (the same softmax
attention as plain dots) and `sdjax.models.remat` wraps nothing, so a program traced there has exactly the
model's FLOPs, the convention of MFU (model FLOPs utilisation: recomputation is not useful work). The
training driver lowers (never compiles or runs) its step once in this mode to count FLOPs per step
(sdjax.train.mfu).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

_ACTIVE = contextvars.ContextVar("sdjax_model_flops", default=False)


@contextlib.contextmanager
def model_flops() -> Iterator[None]:
  """Within this block, models trace with XLA attention and without rematerialisation."""
  token = _ACTIVE.set(True)
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active() -> bool:
  return _ACTIVE.get()
