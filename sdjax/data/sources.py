"""Random-access data sources, each `len(src)` + `src[i]` -> a raw example dict (grain's source protocol).

Raw examples use one vocabulary whatever the source: `image` (encoded bytes or a uint8 HWC array),
optionally `caption` (str), `label` (int), `path` (for error messages) and `orig_height`/`orig_width`;
latent records carry `mean`/`logvar` (or `latent`) instead of `image`.

- `bundled`: the default job's MNIST digits (sdjax.data.bundled), through TFDS's ArrayRecord data source.
- `tfds`: any TensorFlow-Datasets dataset prepared in ArrayRecord format in a TFDS data dir. sdjax never
  downloads: an unprepared dataset is an error that says which command prepares it.
- `records`: a directory written by `python -m sdjax.data.prepare` (image-caption folders and manifests).
- `latents`: a directory written by `python -m sdjax.data.cache_latents`.
- `shapes`: procedural captioned shapes ("a red circle", sdjax.data.shapes), no files.
- `colored_digits`: the bundled digits painted and captioned ("a red 7 on a black background",
  sdjax.data.colored_digits), no files beyond the bundled ones.
"""
from __future__ import annotations

import os
from typing import Any

from sdjax.data import bundled, records

SOURCES = ("bundled", "tfds", "records", "latents", "shapes", "colored_digits")


class TfdsSource:
  """A prepared TFDS dataset with its feature names mapped to sdjax's (`image_key` -> "image", ...)."""

  def __init__(self, name: str, split: str, data_dir: str | None = None, *, image_key: str = "image",
               caption_key: str | None = None, label_key: str | None = None):
    import tensorflow_datasets as tfds

    data_dir = bundled.data_dir(data_dir)
    self.where = f"tfds:{name}[{split}] in {data_dir}"
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise FileNotFoundError(
          f"TFDS dataset {name!r} is neither a registered TFDS builder nor prepared in {data_dir}. Prepare it "
          f"on a machine with internet access (`tfds build {name} --data_dir DIR --file_format array_record`) "
          f"and copy DIR/{name.split(':')[0]} into {data_dir}, or point config.data.data_dir at it") from None
    if not builder.is_prepared():
      raise FileNotFoundError(
          f"TFDS dataset {name!r} is not prepared in {data_dir}, and sdjax does not download at run time. "
          f"Manual step: on a machine with internet access run `pip install tensorflow-datasets tensorflow` and "
          f"`tfds build {name} --data_dir DIR --file_format array_record` (datasets with manual downloads "
          f"want their files in DIR/downloads/manual first), then copy DIR/{builder.name} into {data_dir} "
          f"(or set config.data.data_dir / $SDJAX_DATA_DIR to DIR)")
    formats = [str(getattr(f, "value", f)) for f in (builder.info.file_format,)]
    if "array_record" not in formats:
      raise ValueError(
          f"TFDS dataset {name!r} in {data_dir} is prepared as {formats[0]}, which has no random access; "
          f"rebuild it with `tfds build {name} --data_dir {data_dir} --file_format array_record` "
          f"(or convert it: `tfds convert_format --root_data_dir {data_dir} --out_file_format array_record`)")
    if split not in builder.info.splits:
      raise ValueError(f"TFDS dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}")
    self._source = builder.as_data_source(split)
    features = set(builder.info.features.keys())
    for what, key in (("image", image_key), ("caption", caption_key), ("label", label_key)):
      if key and key not in features:
        raise ValueError(f"{self.where}: no feature {key!r} for the {what} (config.data.{what}_key); "
                         f"features are {sorted(features)}")
    self.keys = {"image": image_key, "caption": caption_key, "label": label_key}

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict[str, Any]:
    ex = self._source[i]
    out = {"path": f"{self.where} example {i}"}
    for ours, theirs in self.keys.items():
      if theirs:
        out[ours] = ex[theirs]
    if "caption" in out and isinstance(out["caption"], bytes):
      out["caption"] = out["caption"].decode("utf-8")
    if "label" in out:
      out["label"] = int(out["label"])
    return out


class BundledSource(TfdsSource):
  """The bundled MNIST digits (prepared on first use), as a TFDS ArrayRecord source."""

  def __init__(self, split: str = "train", data_dir: str | None = None):
    bundled.prepared_builder(split, data_dir)
    super().__init__("mnist5k", split, data_dir, image_key="image", label_key="label")


def open_source(kind: str, *, name: str = "", split: str = "train", data_dir: str | None = None,
                path: str = "", image_key: str = "image", caption_key: str | None = None,
                label_key: str | None = None):
  """The random-access source that config.data describes."""
  if kind == "bundled":
    if name not in ("mnist5k", ""):
      raise ValueError(f"config.data.name: the bundled dataset is 'mnist5k', got {name!r}")
    return BundledSource(split, data_dir)
  if kind == "tfds":
    if not name:
      raise ValueError("config.data.name: the TFDS dataset name is empty (e.g. 'mnist' or 'mnist:3.0.1')")
    return TfdsSource(name, split, data_dir, image_key=image_key, caption_key=caption_key, label_key=label_key)
  if kind == "shapes":
    from sdjax.data.shapes import ShapesSource
    return ShapesSource(split)
  if kind == "colored_digits":
    from sdjax.data.colored_digits import ColoredDigitsSource
    return ColoredDigitsSource(split)
  if kind in ("records", "latents"):
    if not path:
      raise ValueError(f"config.data.path: the {kind} directory is empty")
    return records.RecordSource(os.path.expanduser(path), kind="images" if kind == "records" else "latents")
  raise ValueError(f"config.data.source: unknown source {kind!r}; expected one of {SOURCES}")

