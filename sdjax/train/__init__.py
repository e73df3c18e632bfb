"""Training: state, optimizer, losses, the pure train step and the driver loops.

`run(config, workdir)` picks the driver from `config.task`:
  diffusion  pixel-space class-conditional / unconditional U-Net (sdjax.train.loop; the default job)
  ldm        text-conditioned latent diffusion from a frozen VAE and text encoder(s), trained from scratch or
             fine-tuned from a diffusers checkpoint, fully or with LoRA (sdjax.train.loop)
  vae        an AutoencoderKL: reconstruction + KL, optional patch-GAN (sdjax.train.autoencoder)
"""
from __future__ import annotations

from typing import Any

TASKS = ("diffusion", "ldm", "vae")


def run(config, workdir: str) -> dict[str, Any]:
  """Train (or resume) `config` in `workdir` with the driver its `task` names; returns the run's summary."""
  task = config.get("task", "diffusion")
  if task not in TASKS:
    raise ValueError(f"config.task: unknown task {task!r}; expected one of {TASKS}")
  if task == "vae":
    from sdjax.train import autoencoder
    return autoencoder.train(config, workdir)
  from sdjax.train import loop
  return loop.train(config, workdir)
