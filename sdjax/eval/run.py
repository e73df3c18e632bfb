"""The evaluation command's library side (eval.py is its command line): image sets in, metrics out.

  real  = a stats file (.npz with pytorch-fid's mu/sigma), an image folder, or bundled digits (`bundled:train`,
          `bundled:test`);
  fake  = an image folder, a text-to-image job's output folder (index.jsonl lists its PNGs and their prompts),
          or a class-conditional sampling folder (samples.npz, what sdjax.sampling.sample_run writes; eval.py
          renders one from a run workdir first: this module does not import sdjax.sampling, which sits above it).

Features are "inception" (the FID InceptionV3, sdjax.eval.inception, weights from the user's file: Inception FID)
or "digits" (sdjax.eval.digits' shipped MNIST classifier: "FID (MNIST classifier features)", not comparable with
Inception FID). Each set is read in fixed-size batches (the last one zero-padded, then trimmed: one compile per
image shape), put on the devices with sdjax.parallel.rows_sharding (split over the batch devices when the batch
divides by them, else replicated), and its features are folded into a float64 sdjax.eval.fid.FeatureStats as they
come back, so FID alone holds O(D^2) memory whatever the number of images. KID and precision/recall need every
feature of both sides ([N, D] float32 each: 8 KiB per image with Inception): they are kept only when asked for.
CLIP score runs in the same pass over the fake images, on their prompts, when a CLIP model folder is given.

Folders are read as pytorch-fid reads them: the image files (png, jpg, jpeg, webp, bmp) directly inside, sorted,
not recursing; only regular files are opened (sdjax.data.prepare.read_file: a FIFO or device never is), other
entries are skipped and counted. Every image must decode (a broken file is an error, not a skip: a metric on a
silently smaller set would mislead), and all images of one set must share one size.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import os
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from sdjax import parallel
from sdjax.eval import fid

log = logging.getLogger("sdjax")
FEATURES = ("inception", "digits")
METRICS = ("fid", "kid", "precision", "recall")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BUNDLED_SPLITS = ("train", "test")
DEFAULT_BATCH = {"inception": 64, "digits": 500}
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torch-fidelity's defaults; the size shrinks to the smaller set


class EvalError(ValueError):
  """An evaluation that cannot run as given; the message is one line for the user."""


def _shorten(e: Exception, limit: int = 300) -> str:
  """An error's message on one line, cut at `limit` characters (a foreign .npz's key list can be thousands)."""
  text = " ".join(str(e).split())
  return text if len(text) <= limit else text[:limit] + " ..."


# --- feature extractors -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Extractor:
  """`fn(device images uint8 [B, H, W, channels]) -> features [B, dim]` float32, jitted; `label` names the FID."""
  name: str
  label: str
  dim: int
  channels: int
  fn: Callable[[jax.Array], jax.Array]
  mesh: jax.sharding.Mesh


def make_extractor(features: str, *, inception_weights: str | None = None,
                   mesh: jax.sharding.Mesh | None = None) -> Extractor:
  """The feature network, its weights loaded and replicated on `mesh` (default: all devices on "data").

  Inception needs `inception_weights` (a .pth/.safetensors/.npz file, sdjax.eval.inception.load_params); a
  missing or unreadable file is an EvalError here, before any image is read or rendered."""
  if features not in FEATURES:
    raise EvalError(f"--features: unknown feature network {features!r}; available: {', '.join(FEATURES)}")
  mesh = parallel.make_mesh({"data": -1}) if mesh is None else mesh
  repl = parallel.replicated(mesh)
  if features == "inception":
    if not inception_weights:
      raise EvalError("--features inception needs --inception_weights FILE (pytorch-fid's "
                      "pt_inception-2015-12-05-6726825d.pth, or torch-fidelity's equivalent; no weights are bundled)")
    from sdjax.eval import inception
    try:
      params = inception.load_params(inception_weights)
    except (OSError, ValueError, KeyError) as e:  # a missing file, a corrupt one, a foreign state dict
      where = "" if inception_weights in str(e) else f"{inception_weights}: not a readable weights file: "
      raise EvalError(f"--inception_weights: {where}{_shorten(e)}") from None
    params = jax.device_put(params, repl)
    return Extractor("inception", "FID (Inception)", inception.FEATURE_DIM, 3,
                     lambda x: inception.features(params, x)["pool"], mesh)
  if inception_weights:
    raise EvalError("--inception_weights applies to --features inception only")
  from sdjax.eval import digits
  params = jax.device_put(digits.load_params(), repl)
  return Extractor("digits", "FID (MNIST classifier features)", digits.FEATURE_DIM, 1,
                   lambda x: digits.apply(params, x)[0], mesh)


# --- image sets ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ImageSet:
  """Images to evaluate, read lazily: `files` (decoded one batch at a time) or `array` uint8 [N, H, W, C];
  `prompts` [N] when the set has them (a text-to-image job's index.jsonl), else None."""
  description: str
  folder: str | None = None
  files: tuple[str, ...] = ()
  array: np.ndarray | None = None
  prompts: tuple[str, ...] | None = None

  def __len__(self) -> int:
    return len(self.array) if self.array is not None else len(self.files)

  def batches(self, batch_size: int, channels: int) -> Iterator[np.ndarray]:
    """uint8 [b <= batch_size, H, W, channels] batches in order; all of one size or an EvalError."""
    shape = None
    for start in range(0, len(self), batch_size):
      if self.array is not None:
        batch = [_channels(self.array[start:start + batch_size], channels)]
      else:
        batch = [_decode(p, channels)[None] for p in self.files[start:start + batch_size]]
      for i, b in enumerate(batch):
        shape = shape or b.shape[1:]
        if b.shape[1:] != shape:
          where = f" ({self.files[start + i]})" if self.array is None else ""
          raise EvalError(f"{self.description}: images differ in size ({shape[1]}x{shape[0]} and "
                          f"{b.shape[2]}x{b.shape[1]}{where}); resize them to one size first")
      yield np.concatenate(batch)


def _decode(path: str, channels: int) -> np.ndarray:
  from sdjax.data.prepare import Skip, read_file
  try:
    with Image.open(io.BytesIO(read_file(path))) as im:
      im = im.convert("RGB" if channels == 3 else "L")
      a = np.asarray(im, np.uint8)
  except Skip as e:
    raise EvalError(f"{path}: {e}") from None
  except Exception as e:  # PIL's UnidentifiedImageError, truncated files, decompression bombs, ...
    raise EvalError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
  return a if channels == 3 else a[..., None]


def _channels(images: np.ndarray, channels: int) -> np.ndarray:
  """uint8 [B, H, W, C] (C = 1, 3 or 4) as [B, H, W, channels]: gray repeated to RGB, RGB to PIL's luminance."""
  c = images.shape[-1]
  if c == channels:
    return images
  if channels == 3:
    return np.repeat(images, 3, axis=-1) if c == 1 else images[..., :3]
  return np.stack([np.asarray(Image.fromarray(im[..., :3]).convert("L"))[..., None] for im in images])


def _image_files(folder: str) -> tuple[list[str], int]:
  """(sorted paths of the image files directly inside `folder`, number of image-named entries skipped as not
  regular files)."""
  paths, skipped = [], 0
  for entry in sorted(os.scandir(folder), key=lambda e: e.name):
    if not entry.name.lower().endswith(IMAGE_EXTENSIONS):
      continue
    if entry.is_file(follow_symlinks=True):  # regular files only (symlinks to them too), as prepare.read_file
      paths.append(entry.path)
    else:
      skipped += 1
  return paths, skipped


def _read_index(folder: str) -> tuple[list[str], list[str]]:
  """(paths, prompts) of the images a text-to-image job's index.jsonl lists, each file checked to exist."""
  index = os.path.join(folder, "index.jsonl")
  paths, prompts = [], []
  with open(index, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
        name, prompt = rec["file"], rec["prompt"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise EvalError(f"{index}:{n}: not a job index record with 'file' and 'prompt' ({e})") from None
      path = os.path.join(folder, name)
      if os.path.basename(name) != name or not os.path.isfile(path):
        raise EvalError(f"{index}:{n}: lists {name!r}, which is not an image file in {folder}")
      paths.append(path)
      prompts.append(str(prompt))
  return paths, prompts


def open_folder(folder: str, what: str) -> ImageSet:
  """The images of `folder`: a job's (index.jsonl), a class-conditional sampling's (samples.npz) or all image
  files directly inside. `what` ("--real", "--fake") prefixes the errors; an empty set is an error."""
  if not os.path.isdir(folder):
    raise EvalError(f"{what}: {folder} does not exist" if not os.path.exists(folder)
                    else f"{what}: {folder} is not a folder or a stats file")
  if os.path.isfile(os.path.join(folder, "index.jsonl")):
    paths, prompts = _read_index(folder)
    images = ImageSet(f"{folder} (job output)", folder, tuple(paths), prompts=tuple(prompts))
  elif os.path.isfile(os.path.join(folder, "samples.npz")):
    path = os.path.join(folder, "samples.npz")
    try:
      with np.load(path, allow_pickle=False) as z:
        array = z["images"]
    except (OSError, KeyError, ValueError) as e:
      raise EvalError(f"{what}: {path}: not a readable samples.npz with 'images' ({e})") from None
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
      raise EvalError(f"{what}: {path}: 'images' must be uint8 [N, H, W, 1|3|4], got {array.dtype} {array.shape}")
    images = ImageSet(f"{folder} (samples.npz)", folder, array=array)
  else:
    paths, skipped = _image_files(folder)
    if skipped:
      log.warning("%s: skipped %d entries that are not regular files", folder, skipped)
    images = ImageSet(folder, folder, tuple(paths))
  if len(images) < 2:
    raise EvalError(f"{what}: {folder} holds {len(images)} images (of {', '.join(IMAGE_EXTENSIONS)}); "
                    "FID needs at least 2")
  return images


@functools.cache
def _bundled(split: str) -> np.ndarray:
  """uint8 [N, 28, 28, 1] bundled digits of `split`, read once per process (read-only: shared by every caller)."""
  from sdjax.data import load_bundled
  images = load_bundled(split)[0]
  images.flags.writeable = False
  return images


def open_real(spec: str, what: str = "--real") -> ImageSet | tuple[np.ndarray, np.ndarray]:
  """The real side: (mu, sigma) of a stats file, or an ImageSet of bundled digits or a folder."""
  if spec.startswith("bundled:"):
    split = spec.partition(":")[2]
    if split not in BUNDLED_SPLITS:
      raise EvalError(f"{what}: unknown bundled split {split!r}; use bundled:train or bundled:test")
    return ImageSet(f"bundled digits ({split})", array=_bundled(split))
  if os.path.isfile(spec):
    try:
      return fid.load_stats(spec)
    except ValueError as e:
      raise EvalError(f"{what}: {_shorten(e)}") from None
  return open_folder(spec, what)


# --- CLIP score ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ClipScorer:
  """`scores(images uint8 [B, H, W, 3], prompts) -> [B]` per-pair CLIP scores (torchmetrics', unclamped)."""
  folder: str
  scores: Callable[[jax.Array, Sequence[str]], np.ndarray]


def make_clip_scorer(folder: str, tokenizer_folder: str | None = None) -> ClipScorer:
  """Both towers of a transformers CLIPModel folder and its tokenizer (`tokenizer_folder`, default the model
  folder itself, where transformers' CLIP downloads keep vocab.json/merges.txt)."""
  from sdjax.convert.clip_vision import load_clip_model
  from sdjax.eval import clip_score
  from sdjax.models import clip
  try:
    model = load_clip_model(folder)
    tokenizer = clip.load_tokenizer(tokenizer_folder or folder)
  except (OSError, ValueError) as e:
    raise EvalError(f"--clip_model: {e}") from None
  (vision, vparams), (text, tparams) = model.vision, model.text
  size, length = vision.config.image_size, text.config.max_position_embeddings

  @jax.jit
  def fn(vp, tp, images, ids):
    return clip_score.clip_scores(vp, tp, clip_score.preprocess(images, size), ids, vision_model=vision,
                                  text_model=text)

  def scores(images, prompts):
    ids = clip.tokenize(tokenizer, list(prompts), max_length=length)
    return np.asarray(fn(vparams, tparams, images, jax.device_put(ids, images.sharding)))

  return ClipScorer(folder, scores)


# --- the passes and the metrics -----------------------------------------------------------------------------

@dataclasses.dataclass
class Pass:
  """What one pass over an image set gives: streaming stats, all features if kept, CLIP score sums."""
  stats: fid.FeatureStats
  features: np.ndarray | None = None
  clip_sum: float = 0.0
  clip_count: int = 0


def feature_pass(images: ImageSet, extractor: Extractor, batch_size: int, *, keep: bool = False,
                 clip: ClipScorer | None = None, progress: bool = True, desc: str = "features") -> Pass:
  """Features of every image of `images` in fixed-size batches (zero-padded, trimmed), folded into float64 stats;
  `keep` also returns them all [N, D] float32 (KID, precision/recall); `clip` scores the images against their
  prompts in the same pass."""
  mesh = extractor.mesh
  sharding = parallel.rows_sharding(mesh, batch_size)
  out = Pass(fid.FeatureStats.empty(extractor.dim))
  kept = []
  with tqdm(total=len(images), desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
    for start, batch in zip(range(0, len(images), batch_size), images.batches(batch_size, extractor.channels)):
      n = len(batch)
      if extractor.name == "digits" and batch.shape[1:3] != (28, 28):
        raise EvalError(f"{images.description}: digit features need 28x28 images, got "
                        f"{batch.shape[2]}x{batch.shape[1]}")
      padded = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), np.uint8)]) \
          if n < batch_size else batch
      x = jax.device_put(padded, sharding)
      feats = np.asarray(jax.device_get(extractor.fn(x)), np.float32)[:n]
      out.stats = out.stats.update(feats)
      if keep:
        kept.append(feats)
      if clip is not None:
        rgb = padded if padded.shape[-1] == 3 else _channels(padded, 3)
        prompts = list(images.prompts[start:start + n]) + [""] * (batch_size - n)
        s = clip.scores(jax.device_put(rgb, sharding), prompts)[:n]
        out.clip_sum += float(np.sum(s, dtype=np.float64))
        out.clip_count += n
      bar.update(n)
  if keep:
    out.features = np.concatenate(kept)
  return out


def evaluate(real: ImageSet | tuple[np.ndarray, np.ndarray], fake: ImageSet, extractor: Extractor, *,
             metrics: Sequence[str] = ("fid",), batch_size: int | None = None, clip: ClipScorer | None = None,
             save_real_stats: str | None = None, progress: bool = True) -> dict[str, Any]:
  """The metrics of `fake` against `real` (an ImageSet, or (mu, sigma) of a stats file) as a JSON-able dict.

  fid is always computed (metrics may add kid, precision, recall, which need real images, not a stats file);
  clip_score when `clip` is given (the fake set must have prompts). `save_real_stats` writes the real side's
  (mu, sigma) in pytorch-fid's .npz format for reuse as a later `real`."""
  unknown = [m for m in metrics if m not in METRICS]
  if unknown:
    raise EvalError(f"--metrics: unknown metric {unknown[0]!r}; available: {', '.join(METRICS)}")
  keep = any(m in metrics for m in ("kid", "precision", "recall"))
  if keep and not isinstance(real, ImageSet):
    raise EvalError("--metrics kid/precision/recall need real images (a folder or bundled digits), not a stats "
                    "file: they compare individual features")
  if clip is not None and fake.prompts is None:
    raise EvalError(f"--clip_model: {fake.description} has no prompts (only a text-to-image job's output folder, "
                    "with index.jsonl, has them)")
  batch_size = batch_size or DEFAULT_BATCH[extractor.name]
  result: dict[str, Any] = {"features": extractor.name, "fid_name": extractor.label, "fake": fake.description,
                            "num_fake": len(fake)}
  if isinstance(real, ImageSet):
    real_pass = feature_pass(real, extractor, batch_size, keep=keep, progress=progress, desc="real")
    mu_r, sigma_r = real_pass.stats.mu, real_pass.stats.sigma
    result.update(real=real.description, num_real=len(real))
  else:
    real_pass, (mu_r, sigma_r) = None, real
    if mu_r.shape != (extractor.dim,):
      raise EvalError(f"--real: the stats file has {mu_r.shape[0]}-d features; --features {extractor.name} gives "
                      f"{extractor.dim}-d ones (stats from another feature network?)")
    result.update(real="stats file", num_real=None)
  if save_real_stats:
    fid.save_stats(save_real_stats, mu_r, sigma_r)
    result["real_stats_saved_to"] = save_real_stats
  fake_pass = feature_pass(fake, extractor, batch_size, keep=keep, clip=clip, progress=progress, desc="fake")
  result["fid"] = fid.frechet_distance(fake_pass.stats.mu, fake_pass.stats.sigma, mu_r, sigma_r)
  if "kid" in metrics:
    size = min(KID_SUBSET_SIZE, len(real_pass.features), len(fake_pass.features))
    mean, std = fid.kid(real_pass.features, fake_pass.features, num_subsets=KID_SUBSETS, subset_size=size)
    result.update(kid=mean, kid_std=std, kid_subset_size=size)
  if "precision" in metrics or "recall" in metrics:
    from sdjax.eval import precision_recall
    try:
      p, r = precision_recall.precision_recall(real_pass.features, fake_pass.features)
    except ValueError as e:
      raise EvalError(f"--metrics precision/recall: {e}") from None
    result.update({k: v for k, v in (("precision", p), ("recall", r)) if k in metrics})
  if clip is not None:
    from sdjax.eval import clip_score
    result.update(clip_score=clip_score.from_sums(fake_pass.clip_sum, fake_pass.clip_count), clip_model=clip.folder)
  return result


def format_table(result: dict[str, Any]) -> str:
  """The metrics as a small two-column table."""
  rows = [(result["fid_name"], result["fid"])]
  if "kid" in result:
    rows.append((f"KID (subsets of {result['kid_subset_size']})", f"{result['kid']:.6g} ± {result['kid_std']:.2g}"))
  rows += [(name, result[key]) for key, name in (("precision", "precision (k=3)"), ("recall", "recall (k=3)"),
                                                 ("clip_score", "CLIP score")) if key in result]
  rows = [(k, f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in rows]
  real = result["real"] + (f", {result['num_real']} images" if result["num_real"] is not None else "")
  width = max(len(k) for k, _ in rows)
  return "\n".join([f"real: {real}", f"fake: {result['fake']}, {result['num_fake']} images"]
                   + [f"  {k:<{width}}  {v}" for k, v in rows])


def write_json(path: str, result: dict[str, Any]) -> None:
  """`result` as indented JSON, written to a temporary name and renamed."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=2)
  os.replace(tmp, path)
