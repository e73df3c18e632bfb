"""config.data -> source + transform -> `Pipeline` (what the training loop calls)."""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from sdjax.data import preprocess, sources
from sdjax.data.pipeline import Pipeline

BUNDLED_SIZE = 28


def _get(cfg: Mapping[str, Any], key: str, default: Any) -> Any:
  value = cfg.get(key, default)
  return default if value is None else value


def image_size(cfg: Mapping[str, Any]) -> int:
  """The side of the training images: data.resolution, or 28 for the bundled digits (32 for shapes and the
  coloured digits)."""
  res = int(_get(cfg, "resolution", 0))
  if res:
    return res
  if _get(cfg, "source", "bundled") == "bundled":
    return BUNDLED_SIZE
  if _get(cfg, "source", "bundled") == "shapes":
    from sdjax.data.shapes import SIZE
    return SIZE
  if _get(cfg, "source", "bundled") == "colored_digits":
    from sdjax.data.colored_digits import SIZE
    return SIZE
  raise ValueError(f"config.data.resolution must be set (> 0) for data.source={cfg.get('source')!r}: "
                   f"images are resized and cropped to resolution x resolution")


def check_config(cfg: Mapping[str, Any]) -> None:
  """Validate config.data without opening anything (so a typo fails before a long compile)."""
  kind = _get(cfg, "source", "bundled")
  if kind not in sources.SOURCES:
    raise ValueError(f"config.data.source: unknown source {kind!r}; expected one of {sources.SOURCES}")
  if kind == "bundled" and _get(cfg, "name", "mnist5k") not in ("mnist5k", ""):
    raise ValueError(f"config.data.name: the bundled dataset is 'mnist5k', got {cfg.get('name')!r} "
                     f"(other datasets: data.source='tfds' or 'records')")
  if kind == "tfds" and not _get(cfg, "name", ""):
    raise ValueError("config.data.name: the TFDS dataset name is empty (e.g. 'mnist' or 'mnist:3.0.1')")
  if kind in ("records", "latents") and not _get(cfg, "path", ""):
    raise ValueError(f"config.data.path: the {kind} directory is empty")
  if _get(cfg, "crop", "center") not in preprocess.CROPS:
    raise ValueError(f"config.data.crop must be one of {preprocess.CROPS}, got {cfg.get('crop')!r}")
  if not 0.0 <= float(_get(cfg, "caption_dropout", 0.0)) <= 1.0:
    raise ValueError(f"config.data.caption_dropout must be in [0, 1], got {cfg.get('caption_dropout')}")
  if kind != "latents":  # latents come at the size they were cached at
    image_size(cfg)


def open_source(cfg: Mapping[str, Any], *, label: bool):
  kind = _get(cfg, "source", "bundled")
  return sources.open_source(
      kind, name=_get(cfg, "name", ""), split=_get(cfg, "split", "train"), data_dir=cfg.get("data_dir") or None,
      path=_get(cfg, "path", ""), image_key=_get(cfg, "image_key", "image") or "image",
      caption_key=cfg.get("caption_key") or None, label_key=(cfg.get("label_key") or "label") if label else None)


def make_transform(cfg: Mapping[str, Any], *, channels: int, label: bool, source=None
                   ) -> preprocess.ExampleTransform:
  try:
    image = preprocess.ImageOptions(resolution=int(_get(cfg, "resolution", 0)), channels=channels,
                                    crop=_get(cfg, "crop", "center"), random_flip=bool(_get(cfg, "random_flip", False)),
                                    micro_conditioning=bool(_get(cfg, "micro_conditioning", False)))
  except ValueError as e:
    raise ValueError(f"config.data: {e}") from e
  tokenizer = None
  dropout = float(_get(cfg, "caption_dropout", 0.0))
  names = [n for n in (cfg.get("tokenizer"), cfg.get("tokenizer_2")) if n]
  if names:
    from sdjax.models.clip import load_tokenizer

    tokenizer = preprocess.CaptionTokenizer([load_tokenizer(os.path.expanduser(n)) for n in names],
                                            int(_get(cfg, "max_length", 77)), dropout)
  kwargs: dict[str, Any] = {}
  meta = getattr(source, "meta", {}) or {}
  if meta.get("kind") == "latents":
    kwargs.update(latent_shift=np.asarray(meta.get("shift", 0.0), np.float32),
                  latent_scale=np.asarray(meta.get("scale", 1.0), np.float32))
    if meta.get("empty_prompt"):
      with np.load(os.path.join(source.directory, meta["empty_prompt"])) as f:
        kwargs["empty_prompt"] = {k: f[k] for k in f.files}
  return preprocess.ExampleTransform(image=image, tokenizer=tokenizer, label=label, caption_dropout=dropout,
                                     **kwargs)


def pipeline_from_config(cfg: Mapping[str, Any], *, channels: int, global_batch_size: int, seed: int,
                         label: bool = False, process_index: int = 0, process_count: int = 1) -> Pipeline:
  """The training input pipeline config.data describes, for this process of `process_count`."""
  source = open_source(cfg, label=label)
  transform = make_transform(cfg, channels=channels, label=label, source=source)
  name = f"{_get(cfg, 'source', 'bundled')}:{cfg.get('name') or cfg.get('path')}"
  return Pipeline(source, transform, global_batch_size, seed, process_index=process_index,
                  process_count=process_count, num_threads=int(_get(cfg, "num_threads", 8)),
                  prefetch=int(_get(cfg, "prefetch", 2)), name=name)
