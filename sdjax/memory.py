"""Device memory, checked before a computation instead of discovered by it.

Two checks guard a sampling job (`sdjax.jobs`), so that an image size the machine cannot hold is one line
naming the sizes and the memory, never an XLA abort, a 20-minute compile or a RESOURCE_EXHAUSTED traceback:

- `render_lower_bound`, before compiling: bytes that must be live at once whatever XLA does (the VAE
  decoder's full-resolution activations, the U-Net's first-level skip connections). It is a lower bound, so
  it never refuses a size that fits; it catches the sizes that are far out of reach (`--height 65536`), for
  which compiling alone can exhaust the host.
- `compiled_bytes`, after compiling: XLA's own memory analysis of the program (temporaries + outputs),
  exact for the program that is about to run.

`available` is what the devices have free: `MemAvailable` of /proc/meminfo on CPU (every CPU device of the
process shares it), `bytes_limit - bytes_in_use` of each accelerator.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Budget:
  """Free bytes per device and where the number comes from; `shared`: one pool for all devices (CPU)."""
  bytes: int | None
  source: str
  shared: bool

  def need(self, per_device: int, num_devices: int) -> int:
    """Bytes this budget must hold for `per_device` bytes on each of `num_devices` devices."""
    return per_device * num_devices if self.shared else per_device


def _host_available() -> int | None:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def available(devices: Sequence[jax.Device]) -> Budget:
  """Free memory for one computation over this process's `devices` (None bytes: unknown)."""
  local = [d for d in devices if d.process_index == jax.process_index()] or list(devices)
  if all(d.platform == "cpu" for d in local):
    return Budget(_host_available(), "host memory available (MemAvailable)", True)
  free = []
  for d in local:
    stats = d.memory_stats() or {}
    if "bytes_limit" in stats:
      free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  if not free:
    return Budget(None, f"{local[0].platform} memory (unknown)", False)
  return Budget(min(free), f"free on each {local[0].device_kind}", False)


def _itemsize(dtype: str) -> int:
  return jnp.dtype(dtype).itemsize


def render_lower_bound(sd: Any, batch: int, height: int, width: int, guidance: bool) -> tuple[int, str]:
  """(bytes, the stage that needs them): a lower bound of the memory that rendering `batch` images of
  `height` x `width` with the `StableDiffusion` `sd` holds at one time.

  Counted: the VAE decoder's last block (its input and output, `block_out_channels[0]` channels at the full
  image size) and the U-Net's first level on the way up (its `layers_per_block + 1` skip connections plus
  one working activation, `block_out_channels[0]` channels at the latent size; twice the batch with
  classifier-free guidance). The stages do not overlap, so the larger one is the bound.
  """
  vae, unet = sd.vae.config, sd.unet.config
  decoder = 2 * batch * height * width * vae.block_out_channels[0] * _itemsize(vae.dtype)
  f = vae.downscale
  rows = batch * (2 if guidance else 1)
  skips = unet.layers_per_block + 2
  first_level = skips * rows * (height // f) * (width // f) * unet.block_out_channels[0] * _itemsize(unet.dtype)
  if decoder >= first_level:
    return decoder, f"the VAE decoder's activations at {height}x{width}"
  return first_level, f"the U-Net's first-level activations at {height // f}x{width // f} latents"


def compiled_bytes(compiled: Any) -> int | None:
  """Bytes per device a compiled program allocates when it runs (temporaries + outputs), by XLA's memory
  analysis; None where the backend does not report it."""
  try:
    ma = compiled.memory_analysis()
  except (NotImplementedError, jax.errors.JaxRuntimeError):
    return None
  if ma is None:
    return None
  return int(ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes)


def gib(n: int) -> str:
  return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / 2 ** 20:.1f} MiB"
