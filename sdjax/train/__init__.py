"""Training: one driver (trainer.py) for every task (task.py: the contract and registry; tasks/: the built-in
diffusion, ldm and vae tasks), one train-step core (step.py), state, optimizers, losses and metrics.

`run(config, workdir)` trains (or resumes) the task `config.task` names; see docs/architecture.md.
"""
from __future__ import annotations

from typing import Any


def run(config, workdir: str) -> dict[str, Any]:
  """Train (or resume) `config` in `workdir` with the task its `task` names; returns the run's summary."""
  from sdjax.train import task, trainer
  task.get(task.task_name(config))  # an unknown task name fails before anything is built
  return trainer.train(config, workdir)
