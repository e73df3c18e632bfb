"""Model FLOPs utilisation (MFU): FLOPs per train step, the chips' peak, and the two metrics every run logs.

FLOPs per step are XLA's cost analysis of the train step as the model defines it: the step is lowered (not
compiled, not run) once, inside `sdjax.models.flops.model_flops()` (attention as plain XLA dots, no
rematerialisation) and without gradient accumulation (the same FLOPs as the micro-batch loop, which XLA would
count once). That is how kernels XLA cannot see are counted: Pallas / cuDNN attention is counted as the XLA
attention it computes, and the chunked attention's scan is not undercounted. Recomputation is not counted
(MFU, not hardware FLOPs utilisation). The count is global (the unpartitioned program); per device it is
divided by the device count.

  tflops_per_device = flops_per_step * steps_per_s / num_devices / 1e12
  mfu               = tflops_per_device / peak bf16 dense TFLOP/s of the device

The peak comes from `PEAK_BF16_TFLOPS` by jax's `device_kind`, or from config.train.peak_tflops (for a device
not in the table, or to compare against another number); CPUs have none, and a run without a peak logs no mfu.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import jax

from sdjax.models import flops as model_flops

# Dense (no sparsity) bf16 peak TFLOP/s per chip, from the vendors' data sheets. Matched in order against the
# lower-cased `device_kind` (TPU v5p reports "TPU v5", v5e "TPU v5 lite", v6e "TPU v6 lite").
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("tpu v6", 918.0),        # v6e (Trillium)
    ("tpu v5 lite", 197.0),   # v5e
    ("tpu v5e", 197.0),
    ("tpu v5p", 459.0),
    ("tpu v5", 459.0),        # v5p
    ("tpu v4", 275.0),
    ("b200", 2250.0),
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100", 989.0),          # SXM
    ("a100", 312.0),
)


def peak_tflops(device: jax.Device | None = None) -> float | None:
  """The device's peak dense bf16 TFLOP/s from the table, or None (CPU, or a kind the table lacks)."""
  device = device if device is not None else jax.devices()[0]
  if device.platform == "cpu":
    return None
  kind = device.device_kind.lower()
  return next((peak for key, peak in PEAK_BF16_TFLOPS if key in kind), None)


def lowered_flops(fn: Callable, *args: Any) -> float:
  """XLA's FLOP count of `jax.jit(fn)(*args)` (arrays or ShapeDtypeStructs) from its lowering, in model-FLOPs
  mode; global, i.e. over all devices. Nothing is compiled or run."""
  # A fresh function to trace: jax caches traces by function, and the model-FLOPs trace (XLA attention, no
  # remat) must neither reuse nor become the trace that a later jax.jit(fn) of the same `fn` compiles.
  with model_flops.model_flops():
    count = _flops(jax.jit(lambda *a: fn(*a)).lower(*args).cost_analysis())
    if not count:
      # Some backends count nothing before compiling (jax 0.11's GPU client: 0 FLOPs, seen on an H200).
      # The same program lowered for the CPU has the same dots and convolutions: count it there, on
      # unsharded shapes (the count is global either way). No compile; the CPU client always exists.
      shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
      try:
        count = _flops(jax.jit(lambda *a: fn(*a)).trace(*shapes).lower(lowering_platforms=("cpu",))
                       .cost_analysis())
      except Exception as e:  # noqa: BLE001 - MFU is a report; a failure here must not stop training
        logging.warning("no FLOP count for MFU: the lowering has no cost analysis here (%s: %s)",
                        type(e).__name__, e)
  return count


def _flops(cost: Any) -> float:
  cost = [cost] if isinstance(cost, dict) else (cost or [])
  return float(sum(c.get("flops", 0.0) for c in cost if c))


@dataclasses.dataclass(frozen=True)
class Throughput:
  """Turns steps/s into the logged `tflops_per_device` and `mfu` (None where there is no peak)."""
  flops_per_step: float
  num_devices: int
  peak_tflops: float | None

  def metrics(self, steps_per_s: float) -> dict[str, float]:
    tflops = self.flops_per_step * steps_per_s / self.num_devices / 1e12
    out = {"tflops_per_device": tflops}
    if self.peak_tflops:
      out["mfu"] = tflops / self.peak_tflops
    return out
