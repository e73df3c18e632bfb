"""Metrics to `metrics.jsonl` (one JSON object per logged step) and TensorBoard (tensorboardX)."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np


class MetricsWriter:
  """Appends to `<workdir>/metrics.jsonl` and writes TensorBoard events to `<workdir>/tensorboard`.

  Only the process that is `active` writes (process 0 in a multi-host run).
  """

  def __init__(self, workdir: str, *, active: bool = True, resume_step: int | None = None):
    self.active = active
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if not active:
      return
    if resume_step is not None:  # 0: a fresh start, which drops what a run killed before its first checkpoint logged
      self._truncate_after(resume_step)
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def _truncate_after(self, step: int) -> None:
    """Drop records logged after `step` by a run that died before its next checkpoint."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(self.path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(self.path + ".tmp", self.path)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.active:
      return
    record = {"step": int(step)}
    record.update({k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if k != "step" and isinstance(v, float):
        self.tb.add_scalar(k, v, step)

  def image(self, tag: str, step: int, image: np.ndarray) -> None:
    if self.active:
      self.tb.add_image(tag, image, step, dataformats="HWC")

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
