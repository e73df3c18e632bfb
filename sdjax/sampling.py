"""Sampling from a trained sdjax run: restore EMA params from the workdir's latest checkpoint, render
class-conditional images in fixed-size jitted batches, write a grid (one row per class) and PNGs, watermarked
(sdjax.watermark: RGB images of at least 256 px) unless turned off."""
from __future__ import annotations

import json
import os
import time
from typing import Mapping

import jax
import numpy as np
from tqdm.auto import tqdm

from sdjax import io, parallel, pipelines, runs, samplers, watermark as wm


def load_run(workdir: str) -> tuple[runs.Run, pipelines.ClassConditionalModel]:
  """(run, model) of the latest checkpoint (EMA params) of a class-conditional run in `workdir`."""
  run = runs.load(workdir, task="diffusion")
  return run, run.model


def generate(model: pipelines.ClassConditionalModel, mesh: jax.sharding.Mesh, labels: np.ndarray, *, seed: int,
             sampler: str, num_steps: int, guidance_scale: float, batch_size: int,
             progress: bool = True) -> tuple[np.ndarray, dict]:
  """Images uint8 [N, H, W, C] for `labels` [N]; image i's noise depends only on (seed, i). Not watermarked:
  `sample_run`, which writes them, watermarks them."""
  n = len(labels)
  batch_size = min(batch_size, n)
  fn = pipelines.class_conditional_fn(model.unet, model.schedule, model.image_shape, sampler=sampler,
                                      num_steps=num_steps, guidance_scale=guidance_scale)
  sharding = parallel.rows_sharding(mesh, batch_size)
  params = model.params
  padded = -(-n // batch_size) * batch_size
  all_labels = np.concatenate([labels, np.zeros(padded - n, np.int32)]).astype(np.int32)
  all_indices = np.arange(padded, dtype=np.int32)

  def put(i):
    return (jax.device_put(all_labels[i:i + batch_size], sharding),
            jax.device_put(all_indices[i:i + batch_size], sharding))

  t0 = time.perf_counter()
  compiled = fn.lower(params, *put(0)[:1], np.int32(seed), put(0)[1]).compile()
  compile_s = time.perf_counter() - t0
  out = []
  t0 = time.perf_counter()
  for i in tqdm(range(0, padded, batch_size), disable=not progress, desc="sample", unit="batch"):
    y, idx = put(i)
    out.append(io.to_uint8(np.asarray(jax.device_get(compiled(params, y, np.int32(seed), idx)))))
  wall = time.perf_counter() - t0
  images = np.concatenate(out)[:n]
  return images, {"compile_s": compile_s, "wall_s": wall, "images_per_s": padded / wall}


def sample_run(workdir: str, *, outdir: str | None = None, seed: int = 0, num: int = 8, steps: int | None = None,
               sampler: str | None = None, guidance_scale: float | None = None, batch_size: int = 100,
               write_pngs: bool = True, names: Mapping[str, str] | None = None, watermark: bool = True) -> dict:
  """Render `num` images per class from `workdir`'s latest checkpoint into `outdir`; every setting is
  checked before the run is loaded (errors name each setting as `names` says, e.g. by the CLI's flags).
  `watermark`: give the images (PNGs, samples.npz) and the grid diffusers' SDXL invisible watermark where they
  can carry it (sdjax.watermark.mark); their metadata and the summary's `watermark` say whether they do."""
  from sdjax import prompts
  prompts.check_settings({"num": num, "seed": seed, "steps": steps, "guidance_scale": guidance_scale,
                          "batch_size": batch_size}, names)
  if outdir is not None:
    prompts.check_outdir(outdir, names)
  run, model = load_run(workdir)
  step, sc = run.step, run.config.sample
  sampler = sampler or sc.sampler
  steps = int(sc.num_steps if steps is None else steps)
  guidance_scale = float(sc.guidance_scale if guidance_scale is None else guidance_scale)
  if sampler not in samplers.SAMPLERS:
    raise prompts.JobError(f"{prompts.name_of(names, 'sampler')}: unknown sampler {sampler!r}; "
                           f"available: {sorted(samplers.SAMPLERS)}")
  prompts.check_settings({"steps": steps, "guidance_scale": guidance_scale}, names)  # the config's own
  msg = prompts.check_steps(sampler, steps, model.schedule)
  if msg:
    raise prompts.JobError(f"{prompts.name_of(names, 'steps')}: {msg}")
  outdir = outdir or os.path.join(workdir, "generated", f"step_{step:07d}_seed{seed}")
  prompts.check_outdir(outdir, names)
  labels = pipelines.class_grid_labels(model.num_classes, num)
  images, stats = generate(model, run.mesh, labels, seed=seed, sampler=sampler, num_steps=steps,
                           guidance_scale=guidance_scale, batch_size=batch_size)
  os.makedirs(outdir, exist_ok=True)
  grid, grid_mark = wm.mark(io.make_grid(images, nrow=num), watermark)  # host-side, after the jitted sampler
  images, mark = wm.mark(images, watermark)
  meta = {"workdir": os.path.abspath(workdir), "checkpoint_step": step, "seed": seed, "sampler": sampler,
          "steps": steps, "guidance_scale": guidance_scale, "watermark": mark}
  io.save_png(os.path.join(outdir, "grid.png"), grid, {**meta, "watermark": grid_mark})
  if write_pngs:
    for i, (img, y) in enumerate(zip(images, labels)):
      io.save_png(os.path.join(outdir, f"class{y}_{i % num:04d}.png"), img, {**meta, "class": int(y), "index": i})
  np.savez_compressed(os.path.join(outdir, "samples.npz"), images=images, labels=labels)
  summary = {**meta, "outdir": outdir, "num_images": len(images), **stats}
  with open(os.path.join(outdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary
