"""Convert a folder of images with captions into sdjax's sharded record format, once.

  python -m sdjax.data.prepare --input photos/ --output data/photos
  python -m sdjax.data.prepare --manifest captions.jsonl --output data/photos --max_size 1024

Captions come from a sidecar next to each image (`cat.png` + `cat.txt`, or `cat.json` with a "caption" or
"text" field), or from a manifest: CSV with a header, or JSONL, with an image column (`file_name`, `image`,
`path` or `--image_column`; relative to the manifest's folder) and a caption column (`caption`, `text` or
`--caption_column`). A folder holding `metadata.jsonl` / `metadata.csv` (Hugging Face's imagefolder layout)
uses it automatically.

Every image is decoded completely before it is written. The original file bytes are stored unless
`--max_size` asks for a downscale (the original size is kept for SDXL's micro-conditioning).

One bad file never aborts the job: whatever goes wrong with one example (any exception reading or decoding
it) skips it, counted by reason in dataset.json and listed in `<output>/skipped.txt`. Images and caption
sidecars are read only under these rules, each breach a skip with its reason:
- only regular files (after symlinks) are read: a FIFO, device, socket or directory is never opened;
- a file whose real path (symlinks resolved; for a manifest also `../` and absolute paths) lies outside the
  input folder, or the manifest's folder, is not read unless `--allow_outside_input`;
- at most `--max_file_bytes` (default 256 MiB) are read from one file, whatever its size claims;
- an image whose header declares more than `--max_pixels` is skipped before its pixels are decoded. The
  default and the maximum are PIL's own limit (2 * PIL.Image.MAX_IMAGE_PIXELS, 178956970: ~13377^2, 150 MP
  cameras included), which training applies when it decodes the stored bytes; PIL's
  DecompressionBombWarning below it is silenced, the cap deciding instead;
- a .txt caption that is not UTF-8 keeps its text with U+FFFD for the bad bytes; a .json one is skipped.
skipped.txt has one line per skipped file, `path<TAB>reason`; in both fields a backslash and every
character that str.isprintable() rejects (newline, tab, other control characters, a file name's undecodable
bytes) is written as its Python escape (`\\n`, `\\t`, `\\x1b`, `\\udcff`, as repr() writes them), so
`field.encode("latin-1", "backslashreplace").decode("unicode_escape")` gives it back. Shards, skipped.txt
and dataset.json are written under a temporary `.tmp` name and renamed when complete; a failure or an
interrupt removes the temporary file.
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
import re
import stat
import sys
import time
import warnings
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
MAX_FILE_BYTES = 256 << 20
# PIL refuses images above twice Image.MAX_IMAGE_PIXELS (DecompressionBombError), training's decode included.
MAX_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)
_READ_CHUNK = 1 << 20
_TMP_NAMES = re.compile(r"(images-\d{5}-of-\d{5}\.array_record|dataset\.json|skipped\.txt)\.tmp")


class Skip(Exception):
  """An example that is left out (reason in the message); counted, never fatal."""


def escape(text: str) -> str:
  """`text` on one line: a backslash and what str.isprintable() rejects as Python escapes (as repr())."""
  return "".join(c if c.isprintable() and c != "\\" else repr(c)[1:-1] for c in text)


def _kind(mode: int) -> str:
  for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                     (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
    if test(mode):
      return name
  return f"file type {stat.S_IFMT(mode):o}"


def read_file(path: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
  """The bytes of `path` if it is a regular file (after symlinks) of at most `max_bytes`; raises Skip otherwise.

  Anything else (FIFO, device, socket, directory) is never opened, and the read stops after `max_bytes` + 1
  bytes whatever the size stat reported: no file can make it block or exhaust memory."""
  try:
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
      raise Skip(f"not a regular file ({_kind(st.st_mode)})")
    if st.st_size > max_bytes:
      raise Skip(f"file too large ({st.st_size} bytes > --max_file_bytes {max_bytes})")
    # O_NONBLOCK: had it become a FIFO since the stat, the open would still not wait for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
  except OSError as e:
    raise Skip(f"cannot read ({e.strerror or e})") from e
  parts, n = [], 0
  try:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
      raise Skip(f"not a regular file ({_kind(st.st_mode)})")
    want = min(st.st_size, max_bytes) + 1  # normally one read of the whole file, then an empty one
    while n <= max_bytes:
      part = os.read(fd, min(want, max_bytes + 1 - n))
      if not part:
        break
      parts.append(part)
      n += len(part)
      want = _READ_CHUNK
  except OSError as e:
    raise Skip(f"cannot read ({e.strerror or e})") from e
  finally:
    os.close(fd)
  if n > max_bytes:
    raise Skip(f"file too large (more than --max_file_bytes {max_bytes} bytes)")
  return b"".join(parts)


def _outside(path: str, root: str) -> str | None:
  """`path`'s real path (symlinks resolved) when it is not inside the real folder `root`, else None."""
  real, root = os.path.realpath(path), os.path.realpath(root)
  return None if real == root or real.startswith(root.rstrip(os.sep) + os.sep) else real


def _sidecar_caption(image_path: str, caption_key: str | None, root: str, max_bytes: int,
                     allow_outside: bool) -> str:
  stem = os.path.splitext(image_path)[0]
  for ext in (".txt", ".json"):
    name = stem + ext
    if not os.path.lexists(name):
      continue
    try:
      real = None if allow_outside else _outside(name, root)
      if real:
        raise Skip(f"outside the input folder, links to {real}; --allow_outside_input reads it")
      data = read_file(name, max_bytes)
      if ext == ".txt":
        return data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n").strip()
      d = json.loads(data.decode("utf-8"))
    except Skip as e:
      raise Skip(f"unreadable caption file ({name}: {e})") from e
    except UnicodeDecodeError as e:
      raise Skip(f"unreadable caption file ({name}: not UTF-8: {e})") from e
    except (ValueError, RecursionError) as e:
      raise Skip(f"unreadable caption file ({name}: {e})") from e
    keys = (caption_key,) if caption_key else CAPTION_COLUMNS
    for k in keys:
      if isinstance(d, dict) and k in d:
        return str(d[k]).strip()
    raise Skip(f"caption file without a caption field ({name} has none of {list(keys)})")
  raise Skip("no caption (no .txt or .json sidecar)")


def scan_folder(folder: str, caption_key: str | None = None, *, max_file_bytes: int = MAX_FILE_BYTES,
                allow_outside: bool = False) -> Iterator[tuple[str, Any]]:
  """(image path, caption or a Skip) for every image under `folder`, sorted by path; an image or sidecar
  resolving outside `folder` is a Skip unless `allow_outside`."""
  paths = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    paths += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
  for p in sorted(paths):
    real = None if allow_outside else _outside(p, folder)
    if real:
      caption = Skip(f"outside the input folder (links to {real}; --allow_outside_input reads it)")
    else:
      try:
        caption = _sidecar_caption(p, caption_key, folder, max_file_bytes, allow_outside)
      except Skip as e:
        caption = e
      except Exception as e:  # anything else about one caption file still skips only its image
        caption = Skip(f"unreadable caption file ({type(e).__name__}: {e})")
    yield p, caption


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


def read_manifest(path: str, image_column: str | None = None, caption_column: str | None = None, *,
                  allow_outside: bool = False) -> list[tuple[str, Any]]:
  """(image path, caption) rows of a CSV (with header) or JSONL manifest; paths relative to its folder. A
  path resolving outside that folder gets a Skip for its caption unless `allow_outside`."""
  if not os.path.isfile(path):
    if os.path.exists(path):
      raise ValueError(f"manifest {path!r} is not a regular file")
    raise FileNotFoundError(f"manifest {path!r} does not exist")
  try:
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
  except UnicodeDecodeError as e:
    raise ValueError(f"manifest {path} is not UTF-8 text ({e})") from e
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
    real = None if allow_outside else _outside(image, base)
    if real:
      out.append((image, Skip(f"outside the manifest's folder ({real}; --allow_outside_input reads it)")))
    else:
      out.append((image, Skip("no caption in the manifest") if caption is None else str(caption).strip()))
  return out


def load_example(path: str, caption: Any, *, max_size: int = 0, allow_empty_captions: bool = False,
                 max_pixels: int = MAX_PIXELS, max_file_bytes: int = MAX_FILE_BYTES) -> bytes:
  """Read, fully decode and encode one example; raises Skip with the reason."""
  if isinstance(caption, Skip):
    raise caption
  if not caption and not allow_empty_captions:
    raise Skip("empty caption")
  data = read_file(path, max_file_bytes)
  try:
    width, height = Image.open(io.BytesIO(data)).size  # the header only: no pixel is decoded yet
  except Image.DecompressionBombError as e:  # beyond PIL's own limit
    raise Skip(f"too many pixels ({e})") from e
  except Exception:  # not an image: decode_image says why
    width = height = 0
  if width * height > max_pixels:
    raise Skip(f"too many pixels ({width}x{height} > --max_pixels {max_pixels})")
  try:
    img = decode_image(data, path)
  except Image.DecompressionBombError as e:  # a later frame's or tile's size
    raise Skip(f"too many pixels ({e})") from e
  except Exception as e:  # decode_image's ValueError, or what PIL raises beyond it (struct.error, ...)
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
  # A file name that is not UTF-8 is stored with its bad bytes as \xNN (msgpack needs UTF-8).
  shown = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
  return records.encode({"image": data, "caption": caption, "path": shown, "height": stored[0],
                         "width": stored[1], "orig_height": height, "orig_width": width})


def prepare(output: str, items: list[tuple[str, Any]], *, examples_per_shard: int = 1000, max_size: int = 0,
            allow_empty_captions: bool = False, num_threads: int = 8, source: str = "",
            progress: bool = True, max_pixels: int = MAX_PIXELS, max_file_bytes: int = MAX_FILE_BYTES
            ) -> dict[str, Any]:
  """Write `items` ((path, caption) pairs) as shards under `output`; returns the dataset.json dict."""
  from tqdm.auto import tqdm

  os.makedirs(output, exist_ok=True)
  for name in os.listdir(output):  # left by a run killed mid-write (SIGKILL, power loss)
    if _TMP_NAMES.fullmatch(name):
      os.remove(os.path.join(output, name))
  num_shards = max(1, math.ceil(len(items) / examples_per_shard))
  skipped: list[tuple[str, str]] = []
  shards = []
  t0 = time.perf_counter()
  bar = tqdm(total=len(items), desc="prepare", unit="img", disable=not progress, dynamic_ncols=True)

  def load(item):
    try:
      return load_example(*item, max_size=max_size, allow_empty_captions=allow_empty_captions,
                          max_pixels=max_pixels, max_file_bytes=max_file_bytes), None
    except Skip as e:
      return None, str(e)
    except Exception as e:  # whatever else goes wrong with one example is still only that example's
      return None, f"failed ({type(e).__name__}: {e})"

  # --max_pixels decides (from the header): PIL's warning below its own limit would only repeat it.
  with warnings.catch_warnings(), concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
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
  records.write_text(os.path.join(output, "skipped.txt"),
                     "".join(f"{escape(p)}\t{escape(why)}\n" for p, why in skipped))
  reasons = collections.Counter(why.split(" (")[0] for _, why in skipped)
  meta = {"kind": "images", "num_examples": sum(s["num_examples"] for s in shards), "shards": shards,
          "num_skipped": len(skipped), "skipped_reasons": dict(reasons), "source": source,
          "max_size": max_size, "seconds": round(time.perf_counter() - t0, 2)}
  records.write_meta(output, meta)
  return meta


def collect(input_dir: str | None, manifest: str | None, *, image_column=None, caption_column=None,
            caption_key=None, max_file_bytes: int = MAX_FILE_BYTES, allow_outside: bool = False
            ) -> tuple[list[tuple[str, Any]], str]:
  if bool(input_dir) == bool(manifest):
    raise ValueError("pass exactly one of --input (a folder) or --manifest (a CSV/JSONL file)")
  if input_dir:
    if not os.path.isdir(input_dir):
      raise FileNotFoundError(f"input folder {input_dir!r} does not exist")
    for name in AUTO_MANIFESTS:
      if os.path.lexists(os.path.join(input_dir, name)):
        manifest = os.path.join(input_dir, name)
        log.info("using the manifest %s", manifest)
        break
    else:
      items = list(scan_folder(input_dir, caption_key, max_file_bytes=max_file_bytes, allow_outside=allow_outside))
      if not items:
        raise ValueError(f"input folder {input_dir!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
      return items, os.path.abspath(input_dir)
  return (read_manifest(manifest, image_column, caption_column, allow_outside=allow_outside),
          os.path.abspath(manifest))


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
  flags.DEFINE_integer("max_file_bytes", MAX_FILE_BYTES, "skip an image or caption file larger than this",
                       flag_values=fv)
  flags.DEFINE_integer("max_pixels", MAX_PIXELS, "skip an image whose header declares more pixels, before "
                       "decoding it (at most PIL's limit, the default, which training decodes with)", flag_values=fv)
  flags.DEFINE_bool("allow_outside_input", False, "read images and captions whose real path (symlinks resolved; "
                    "a manifest's ../ or absolute paths) is outside the input folder or the manifest's folder",
                    flag_values=fv)


def check_flags(f: flags.FlagValues) -> None:
  """Raises ValueError (one line) for a flag value the job cannot run with."""
  pil_limit = math.inf if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS
  for name, low in (("examples_per_shard", 1), ("num_threads", 1), ("max_size", 0), ("max_file_bytes", 1),
                    ("max_pixels", 1)):
    if f[name].value < low:
      raise ValueError(f"--{name} must be >= {low}, got {f[name].value}")
  if f.max_pixels > pil_limit:
    raise ValueError(f"--max_pixels must be at most {pil_limit} (PIL's limit: training could not decode larger "
                     f"images), got {f.max_pixels}")
  if f.output and os.path.exists(f.output) and not os.path.isdir(f.output):
    raise ValueError(f"--output {f.output!r} exists and is not a folder")


def run(f: flags.FlagValues, args: list[str]) -> int:
  """The command line's work, from its parsed flags: the exit status."""
  try:
    check_flags(f)
    items, source = collect(f.input, f.manifest, image_column=f.image_column, caption_column=f.caption_column,
                            caption_key=f.caption_key, max_file_bytes=f.max_file_bytes,
                            allow_outside=f.allow_outside_input)
    meta = prepare(f.output, items, examples_per_shard=f.examples_per_shard, max_size=f.max_size,
                   allow_empty_captions=f.allow_empty_captions, num_threads=f.num_threads, source=source,
                   max_pixels=f.max_pixels, max_file_bytes=f.max_file_bytes)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {escape(str(e))}", file=sys.stderr)
    return 2
  except OSError as e:  # writing the output (disk full, permissions): the job's, not one file's
    print(f"error: {escape(str(e))}", file=sys.stderr)
    return 1
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
