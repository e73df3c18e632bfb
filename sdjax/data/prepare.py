"""Convert a folder of images with captions into sdjax's sharded record format, once.

  python -m sdjax.data.prepare --input photos/ --output data/photos
  python -m sdjax.data.prepare --manifest captions.jsonl --output data/photos --max_size 1024

Captions come from a sidecar next to each image (`cat.png` + `cat.txt`, or `cat.json` with a "caption" or
"text" field), or from a manifest: CSV with a header, or JSONL, with an image column (`file_name`, `image`,
`path` or `--image_column`; relative to the manifest's folder) and a caption column (`caption`, `text` or
`--caption_column`). A folder holding `metadata.jsonl` / `metadata.csv` (Hugging Face's imagefolder layout)
uses it automatically.

Every image is decoded completely before it is written. Unreadable or truncated images, images without a
caption and empty captions are skipped, counted and listed with their paths in `<output>/skipped.txt`;
the job never aborts for one bad file. The original file bytes are stored unless `--max_size` asks for
a downscale (the original size is kept for SDXL's micro-conditioning).
"""
from __future__ import annotations

import collections
import concurrent.futures
import csv
import io
import json
import logging
import math
import os
import sys
import time
from typing import Any, Iterator, Sequence

from absl import flags
from PIL import Image

from sdjax import cli
from sdjax.data import records
from sdjax.data.preprocess import decode_image

log = logging.getLogger("sdjax")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_COLUMNS = ("file_name", "image", "path", "filename", "file")
CAPTION_COLUMNS = ("caption", "text", "prompt")
AUTO_MANIFESTS = ("metadata.jsonl", "metadata.csv")


class Skip(Exception):
  """An example that is left out (reason in the message); counted, never fatal."""


def _sidecar_caption(image_path: str, caption_key: str | None) -> str:
  stem = os.path.splitext(image_path)[0]
  if os.path.exists(stem + ".txt"):
    with open(stem + ".txt", encoding="utf-8", errors="replace") as f:
      return f.read().strip()
  if os.path.exists(stem + ".json"):
    try:
      with open(stem + ".json", encoding="utf-8") as f:
        d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise Skip(f"unreadable caption file ({stem}.json: {e})") from e
    keys = (caption_key,) if caption_key else CAPTION_COLUMNS
    for k in keys:
      if isinstance(d, dict) and k in d:
        return str(d[k]).strip()
    raise Skip(f"caption file without a caption field ({stem}.json has none of {list(keys)})")
  raise Skip("no caption (no .txt or .json sidecar)")


def scan_folder(folder: str, caption_key: str | None = None) -> Iterator[tuple[str, Any]]:
  """(image path, caption or a Skip) for every image under `folder`, sorted by path."""
  paths = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    paths += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
  for p in sorted(paths):
    try:
      yield p, _sidecar_caption(p, caption_key)
    except Skip as e:
      yield p, e


def _pick(columns, wanted: str | None, defaults: tuple[str, ...], what: str, manifest: str) -> str:
  if wanted:
    if wanted not in columns:
      raise ValueError(f"{manifest}: no {what} column {wanted!r}; columns are {sorted(columns)}")
    return wanted
  for c in defaults:
    if c in columns:
      return c
  raise ValueError(f"{manifest}: no {what} column; expected one of {list(defaults)} (or pass "
                   f"--{what}_column), columns are {sorted(columns)}")


def read_manifest(path: str, image_column: str | None = None, caption_column: str | None = None
                  ) -> list[tuple[str, Any]]:
  """(image path, caption) rows of a CSV (with header) or JSONL manifest; paths relative to its folder."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"manifest {path!r} does not exist")
  with open(path, encoding="utf-8", newline="") as f:
    if path.lower().endswith((".jsonl", ".json")):
      rows = []
      for n, line in enumerate(f, 1):
        if line.strip():
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON object ({e})") from e
    else:
      rows = list(csv.DictReader(f))
  if not rows:
    raise ValueError(f"manifest {path} has no rows")
  columns = set().union(*(r.keys() for r in rows))
  ic = _pick(columns, image_column, IMAGE_COLUMNS, "image", path)
  cc = _pick(columns, caption_column, CAPTION_COLUMNS, "caption", path)
  base = os.path.dirname(os.path.abspath(path))
  out = []
  for r in rows:
    image = os.path.join(base, str(r.get(ic) or ""))
    caption = r.get(cc)
    out.append((image, Skip("no caption in the manifest") if caption is None else str(caption).strip()))
  return out


def load_example(path: str, caption: Any, *, max_size: int = 0, allow_empty_captions: bool = False
                 ) -> bytes:
  """Read, fully decode and encode one example; raises Skip with the reason."""
  if isinstance(caption, Skip):
    raise caption
  if not caption and not allow_empty_captions:
    raise Skip("empty caption")
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise Skip(f"cannot read ({e.strerror or e})") from e
  try:
    img = decode_image(data, path)
  except ValueError as e:
    raise Skip(f"unreadable or truncated image ({e.__cause__ or e})") from e
  width, height = img.size
  stored = (height, width)
  if max_size and min(width, height) > max_size:
    scale = max_size / min(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    img = img.resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    if img.format == "JPEG" or path.lower().endswith((".jpg", ".jpeg")):
      img.convert("RGB").save(buf, "JPEG", quality=95)
    else:
      img.save(buf, "PNG")
    data = buf.getvalue()
    stored = (size[1], size[0])
  return records.encode({"image": data, "caption": caption, "path": path, "height": stored[0],
                         "width": stored[1], "orig_height": height, "orig_width": width})


def prepare(output: str, items: list[tuple[str, Any]], *, examples_per_shard: int = 1000, max_size: int = 0,
            allow_empty_captions: bool = False, num_threads: int = 8, source: str = "",
            progress: bool = True) -> dict[str, Any]:
  """Write `items` ((path, caption) pairs) as shards under `output`; returns the dataset.json dict."""
  from tqdm.auto import tqdm

  os.makedirs(output, exist_ok=True)
  num_shards = max(1, math.ceil(len(items) / examples_per_shard))
  skipped: list[tuple[str, str]] = []
  shards = []
  t0 = time.perf_counter()
  bar = tqdm(total=len(items), desc="prepare", unit="img", disable=not progress, dynamic_ncols=True)

  def load(item):
    try:
      return load_example(*item, max_size=max_size, allow_empty_captions=allow_empty_captions), None
    except Skip as e:
      return None, str(e)

  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    for s in range(num_shards):
      chunk = items[s * examples_per_shard:(s + 1) * examples_per_shard]

      def good(chunk=chunk):
        for (path, _), (data, why) in zip(chunk, pool.map(load, chunk)):
          bar.update(1)
          if data is None:
            skipped.append((path, why))
            bar.set_postfix(skipped=len(skipped))
          else:
            yield data

      name = records.shard_name("images", s, num_shards)
      shards.append({"file": name, "num_examples": records.write_shard(os.path.join(output, name), good())})
  bar.close()
  with open(os.path.join(output, "skipped.txt"), "w") as f:
    f.writelines(f"{p}\t{why}\n" for p, why in skipped)
  reasons = collections.Counter(why.split(" (")[0] for _, why in skipped)
  meta = {"kind": "images", "num_examples": sum(s["num_examples"] for s in shards), "shards": shards,
          "num_skipped": len(skipped), "skipped_reasons": dict(reasons), "source": source,
          "max_size": max_size, "seconds": round(time.perf_counter() - t0, 2)}
  records.write_meta(output, meta)
  return meta


def collect(input_dir: str | None, manifest: str | None, *, image_column=None, caption_column=None,
            caption_key=None) -> tuple[list[tuple[str, Any]], str]:
  if bool(input_dir) == bool(manifest):
    raise ValueError("pass exactly one of --input (a folder) or --manifest (a CSV/JSONL file)")
  if input_dir:
    if not os.path.isdir(input_dir):
      raise FileNotFoundError(f"input folder {input_dir!r} does not exist")
    for name in AUTO_MANIFESTS:
      if os.path.exists(os.path.join(input_dir, name)):
        manifest = os.path.join(input_dir, name)
        log.info("using the manifest %s", manifest)
        break
    else:
      items = list(scan_folder(input_dir, caption_key))
      if not items:
        raise ValueError(f"input folder {input_dir!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
      return items, os.path.abspath(input_dir)
  return read_manifest(manifest, image_column, caption_column), os.path.abspath(manifest)


def define_flags(fv: flags.FlagValues) -> None:
  """The command line's flags, on `fv`."""
  flags.DEFINE_string("input", None, "folder of images with .txt/.json caption sidecars (or metadata.jsonl)",
                      flag_values=fv)
  flags.DEFINE_string("manifest", None, "CSV (with header) or JSONL file of image paths and captions", flag_values=fv)
  flags.DEFINE_string("output", None, "directory to write dataset.json and the shards to", flag_values=fv,
                      required=True)
  flags.DEFINE_string("image_column", None, "manifest column with the image path", flag_values=fv)
  flags.DEFINE_string("caption_column", None, "manifest column with the caption", flag_values=fv)
  flags.DEFINE_string("caption_key", None, "field of .json sidecars holding the caption (default: caption/text)",
                      flag_values=fv)
  flags.DEFINE_integer("examples_per_shard", 1000, "examples per shard", flag_values=fv)
  flags.DEFINE_integer("max_size", 0, "downscale so the shorter side is at most this", flag_values=fv)
  flags.DEFINE_bool("allow_empty_captions", False, "keep images whose caption is empty", flag_values=fv)
  flags.DEFINE_integer("num_threads", 8, "image reading threads", flag_values=fv)


def run(f: flags.FlagValues, args: list[str]) -> int:
  """The command line's work, from its parsed flags: the exit status."""
  try:
    items, source = collect(f.input, f.manifest, image_column=f.image_column, caption_column=f.caption_column,
                            caption_key=f.caption_key)
    if f.examples_per_shard < 1:
      raise ValueError("--examples_per_shard must be >= 1")
    meta = prepare(f.output, items, examples_per_shard=f.examples_per_shard, max_size=f.max_size,
                   allow_empty_captions=f.allow_empty_captions, num_threads=f.num_threads, source=source)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {meta['num_examples']} examples in {len(meta['shards'])} shards to {f.output} "
        f"({meta['seconds']:.1f} s); skipped {meta['num_skipped']}"
        + (f" {meta['skipped_reasons']}, listed in {os.path.join(f.output, 'skipped.txt')}"
           if meta["num_skipped"] else ""))
  return 0


def main(argv: Sequence[str]) -> int:
  """`python -m sdjax.data.prepare ARGV...` in-process: the exit status."""
  return cli.module_main(define_flags, run, argv)


if __name__ == "__main__":
  cli.module_app_run(define_flags, run)
