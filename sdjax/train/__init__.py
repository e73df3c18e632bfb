"""Training: state, optimizer, losses, the pure train step and the driver loops.

`run(config, workdir)` trains the experiment `config.task` names with one driver (sdjax.train.loop.train:
sharded jitted steps, checkpoints with the data position, SIGTERM, metrics, sample grids, export):
  diffusion  pixel-space class-conditional / unconditional U-Net (sdjax.train.loop.Experiment; the default job)
  ldm        text-conditioned latent diffusion from a frozen VAE and text encoder(s), trained from scratch or
             fine-tuned from a diffusers checkpoint, fully or with LoRA (sdjax.train.ldm)
  vae        an AutoencoderKL: reconstruction + KL, optional patch-GAN (sdjax.train.autoencoder)
"""
from __future__ import annotations

from typing import Any

TASKS = ("diffusion", "ldm", "vae")


def run(config, workdir: str) -> dict[str, Any]:
  """Train (or resume) `config` in `workdir` with the experiment its `task` names; returns the run's summary."""
  task = config.get("task", "diffusion")
  if task not in TASKS:
    raise ValueError(f"config.task: unknown task {task!r}; expected one of {TASKS}")
  from sdjax.train import loop
  return loop.train(config, workdir)
