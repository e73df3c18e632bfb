"""Encode a dataset with the VAE (and optionally the text encoders) once; LDM training then reads the latents.

  python -m sdjax.data.cache_latents --data data/photos --vae sd15/vae --resolution 512 --output data/photos-z
  python -m sdjax.data.cache_latents --source colored_digits --vae runs/vae_digits/vae --resolution 32 \\
      --output runs/colored_digits_z
  python -m sdjax.data.cache_latents --tfds oxford_flowers102 --split train --caption_key label \\
      --vae sd15/vae --resolution 512 --batch_size 64 --output data/flowers-z
  # SDXL, prompt embeddings cached too (the text encoders are then not needed at training time):
  python -m sdjax.data.cache_latents --data data/photos --vae sdxl/vae --resolution 1024 --micro_conditioning \\
      --text_encoder sdxl/text_encoder --tokenizer sdxl/tokenizer \\
      --text_encoder_2 sdxl/text_encoder_2 --tokenizer_2 sdxl/tokenizer_2 --output data/photos-xl

Images are resized (shorter side to `--resolution`) and center-cropped as `preprocess.process_image` does
at training time, never flipped: an augmentation cached once would be the same every epoch.

Output: records of kind "latents" (see sdjax.data.records), one per source example in source order, holding
`mean` and `logvar` of the posterior (`--store dist`; the training pipeline draws a fresh z per epoch) or a
single draw `latent` (`--store sample`; example i's noise comes from (--seed, i) alone, whatever the batch
size or device count), in `--dtype`, plus `caption`, `path`, `index`, `time_ids` (`--micro_conditioning`)
and `prompt_embeds` (+ `pooled_prompt_embeds` for SDXL). `dataset.json` records `shift` and `scale`, with
which the diffusion model's input is `(z - shift) * scale` (= `vae.scale_latents(z)`), and with text
encoders `empty_prompt` names a .npz of the empty caption's embeddings, used for caption dropout.

Devices and hosts: one mesh over every device; the global batch is split over it and the encoders'
parameters are replicated. Each process encodes its own contiguous share of the examples and writes its own
shards (`latents-p<process>-*`); process 0 writes `dataset.json` once all are done.

Resuming: shards are written atomically and listed in `progress-p<process>.json` as they finish; a re-run
with the same settings skips them, and one on a finished cache does nothing.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import os
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np
from absl import flags

from sdjax import cli
from sdjax.data import preprocess, records, sources
from sdjax.data.latent_shards import ShardWriter, finished_cache, local_rows, resume_state, shard_plan

log = logging.getLogger("sdjax")
STORES = ("dist", "sample")
DTYPES = ("float16", "float32")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
EMPTY_PROMPT = "empty_prompt.npz"


@dataclasses.dataclass(frozen=True)
class CacheOptions:
  vae: str                       # diffusers AutoencoderKL folder
  resolution: int
  batch_size: int = 64           # global, over all devices
  store: str = "dist"            # dist: mean + logvar | sample: one draw "latent"
  dtype: str = "float16"         # of the stored arrays
  micro_conditioning: bool = False
  seed: int = 0                  # for --store sample
  examples_per_shard: int = 1000
  text_encoder: str = ""
  tokenizer: str = ""
  text_encoder_2: str = ""       # SDXL's second encoder (CLIPTextModelWithProjection)
  tokenizer_2: str = ""
  compute_dtype: str = "float32"
  num_threads: int = 8           # image decoding threads

  def __post_init__(self):
    for name, value, allowed in (("store", self.store, STORES), ("dtype", self.dtype, DTYPES),
                                 ("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)):
      if value not in allowed:
        raise ValueError(f"--{name} must be one of {allowed}, got {value!r}")
    for name in ("resolution", "batch_size", "examples_per_shard", "num_threads"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
    for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
      if bool(getattr(self, enc)) != bool(getattr(self, tok)):
        raise ValueError(f"--{enc} and --{tok} go together; got only one of them")
    if self.text_encoder_2 and not self.text_encoder:
      raise ValueError("--text_encoder_2 (SDXL) needs --text_encoder as well")

  @property
  def encoders(self) -> list[tuple[str, str]]:
    return [(e, t) for e, t in ((self.text_encoder, self.tokenizer), (self.text_encoder_2, self.tokenizer_2)) if e]

  def settings(self) -> dict[str, Any]:
    """What decides the cache's content (not batch size or threads): a re-run must match it to resume."""
    def path(p: str) -> str:
      return os.path.abspath(os.path.expanduser(p)) if p else ""

    return {"vae": path(self.vae), "resolution": self.resolution, "store": self.store, "dtype": self.dtype,
            "micro_conditioning": self.micro_conditioning, "seed": self.seed if self.store == "sample" else None,
            "examples_per_shard": self.examples_per_shard, "compute_dtype": self.compute_dtype,
            "text_encoders": [[path(e), path(t)] for e, t in self.encoders]}


# --- models -------------------------------------------------------------------------------------------

def read_vae_config(path: str, resolution: int):
  """The VAE's config (no weights yet), checked against `resolution`."""
  from sdjax.convert import diffusers
  from sdjax.models.vae import VAEConfig

  if not os.path.isdir(path):
    raise FileNotFoundError(f"--vae: VAE folder {path!r} does not exist (expected a diffusers AutoencoderKL "
                            f"folder with config.json and diffusion_pytorch_model.safetensors)")
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"--vae: {path!r} is not a diffusers AutoencoderKL folder (no config.json)")
  try:
    cfg: VAEConfig = diffusers.config_from_dict("vae", diffusers._read_config(path))
  except ValueError as e:
    raise ValueError(f"--vae: {e}" if "config.json" in str(e) else f"--vae: {path}/config.json: {e}") from None
  if resolution % cfg.downscale:
    raise ValueError(f"--resolution {resolution} is not divisible by the VAE's downscale factor "
                     f"{cfg.downscale} (try {max(1, round(resolution / cfg.downscale)) * cfg.downscale})")
  return cfg


def latent_normalization(cfg) -> tuple[Any, Any]:
  """(shift, scale), JSON-able, with which `(z - shift) * scale` is `vae.scale_latents(z, cfg)`."""
  from sdjax.models.vae import _latent_stats

  shift, std = _latent_stats(cfg)
  shift, scale = np.asarray(shift, np.float64), cfg.scaling_factor / np.asarray(std, np.float64)
  as_json = lambda a: float(a) if a.ndim == 0 else [float(v) for v in a]
  return as_json(shift), as_json(scale)


def text_embeddings(encoders: Sequence[Any], params: Sequence[Any], ids: Sequence[Any]) -> dict[str, Any]:
  """Prompt embeddings as diffusers' pipelines make them (`sdjax.pipelines.encode_prompt`), under the
  cache's names: "prompt_embeds" [B, L, C] and, with two encoders (SDXL), "pooled_prompt_embeds" [B, C2]."""
  from sdjax.pipelines import encode_prompt

  e = encode_prompt(encoders, params, ids)
  out = {"prompt_embeds": e["context"]}
  if "pooled" in e:
    out["pooled_prompt_embeds"] = e["pooled"]
  return out


def make_encode(vae, encoders: Sequence[Any], store: str, seed: int, dtype: str):
  """(params, batch) -> stored arrays. batch: "image" [B, H, W, C] in [-1, 1], "index" [B] int32 (the
  examples' indices, which with `seed` alone decide a sample's noise), "input_ids_<k>" [B, L] int32."""
  import jax
  import jax.numpy as jnp
  from sdjax.models.vae import sample_latent

  def encode(params, batch):
    mean, logvar = vae.apply({"params": params["vae"]}, batch["image"], method="encode")  # [B, h, w, c]
    if store == "dist":
      out = {"mean": mean, "logvar": logvar}
    else:
      keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(batch["index"])
      out = {"latent": jax.vmap(sample_latent)(mean, logvar, keys)}
    if encoders:
      ids = [batch[f"input_ids_{k}"] for k in range(len(encoders))]
      out.update(text_embeddings(encoders, params["text"], ids))
    return {k: v.astype(jnp.dtype(dtype)) for k, v in out.items()}

  return encode


def max_length(tokenizer, encoder) -> int:
  """Tokens per prompt: the tokenizer's length (77 for SD), at most the encoder's positions."""
  n = encoder.config.max_position_embeddings
  return min(int(tokenizer.model_max_length), n) if 2 <= tokenizer.model_max_length else n


def load_models(opts: CacheOptions):
  """(vae, text encoders, tokenizers, tokens per prompt, params {"vae", "text": [...]}) on the host."""
  from sdjax.convert import diffusers
  from sdjax.models import clip

  vae, vae_params = diffusers.load_vae(opts.vae, dtype=opts.compute_dtype)
  encoders, text_params, tokenizers = [], [], []
  for enc_path, tok_path in opts.encoders:
    enc, p = diffusers.load_text_encoder(enc_path, dtype=opts.compute_dtype)
    encoders.append(enc)
    text_params.append(p)
    tokenizers.append(clip.load_tokenizer(tok_path))
  lengths = [max_length(t, e) for t, e in zip(tokenizers, encoders)]
  return vae, encoders, tokenizers, lengths, {"vae": vae_params, "text": text_params}


# --- the job ------------------------------------------------------------------------------------------

def load_example(source, i: int, image: preprocess.ImageOptions, caption_key: str | None) -> dict[str, Any]:
  """Source example i, preprocessed: "image" as the VAE takes it (+ "time_ids"), and "meta", what is stored
  beside the latents (index, path, caption, label)."""
  ex = source[i]
  where = str(ex.get("path") or f"example {i}")
  if ex.get("image") is None:
    raise ValueError(f"{where}: no image")
  orig = (int(ex["orig_height"]), int(ex["orig_width"])) if "orig_height" in ex else None
  out = preprocess.process_image(ex["image"], image, np.random.default_rng(0), where, original_size=orig)
  out["meta"] = {"index": int(i), "path": where}
  if caption_key:
    out["meta"]["caption"] = preprocess.caption_of(ex, caption_key, where)
  if "label" in ex:
    out["meta"]["label"] = int(ex["label"])
  return out


def batch_arrays(loaded: list[dict[str, Any]], indices: list[int], size: int, image_shape: tuple[int, ...],
                 tokenizers: Sequence[Any], lengths: Sequence[int]) -> dict[str, np.ndarray]:
  """The encoder's input for `loaded` examples, padded with blank rows to `size`."""
  from sdjax.models.clip import tokenize

  pad = size - len(loaded)
  batch = {"image": np.stack([e["image"] for e in loaded] + [np.zeros(image_shape, np.float32)] * pad),
           "index": np.array(list(indices) + [0] * pad, np.int32)}  # [B, H, W, C], [B]
  for k, (tok, n) in enumerate(zip(tokenizers, lengths)):
    ids = np.zeros((size, n), np.int32)
    if loaded:
      ids[:len(loaded)] = tokenize(tok, [e["meta"]["caption"] for e in loaded], n)
    batch[f"input_ids_{k}"] = ids  # [B, L]
  return batch


def write_dataset(output: str, settings: Mapping[str, Any], vae_cfg, resolution: int, num_examples: int,
                  process_count: int, examples_per_shard: int, empty_prompt: Mapping[str, np.ndarray] | None
                  ) -> None:
  """dataset.json (every process's shards, in example order) and the empty prompt's embeddings."""
  shards = [{"file": s["file"], "num_examples": s["stop"] - s["start"]}
            for p in range(process_count) for s in shard_plan(num_examples, p, process_count, examples_per_shard)]
  shift, scale = latent_normalization(vae_cfg)
  h = resolution // vae_cfg.downscale
  meta = {"kind": "latents", **settings, "shards": shards, "scaling_factor": vae_cfg.scaling_factor,
          "shift": shift, "scale": scale, "latent_shape": [h, h, vae_cfg.latent_channels]}
  if empty_prompt is not None:
    path = os.path.join(output, EMPTY_PROMPT)
    with open(path + ".tmp", "wb") as f:
      np.savez(f, **empty_prompt)
    os.replace(path + ".tmp", path)
    meta["empty_prompt"] = EMPTY_PROMPT
  records.write_meta(output, meta)


def cache(output: str, source, opts: CacheOptions, *, source_name: str = "", caption_key: str | None = "caption",
          devices: Sequence[Any] | None = None, progress: bool = True) -> dict[str, Any]:
  """Encode every example of `source` (len + [i], sdjax.data.sources vocabulary) into `output`; returns the
  dataset.json dict. `caption_key`: the captions' field (None: none); `devices`: the mesh's (default all)."""
  import jax
  from jax.experimental import multihost_utils
  from tqdm.auto import tqdm

  from sdjax import parallel
  from sdjax.models import clip

  vae_cfg = read_vae_config(opts.vae, opts.resolution)
  num_examples = len(source)
  if num_examples == 0:
    raise ValueError(f"the dataset {source_name or source!r} has no examples")
  if opts.encoders and not caption_key:
    raise ValueError("text encoders need captions, but the source has no caption field (--caption_key)")
  pid, nproc = jax.process_index(), jax.process_count()
  settings = {**opts.settings(), "source": source_name, "num_examples": num_examples, "process_count": nproc}
  os.makedirs(output, exist_ok=True)
  finished = finished_cache(output, settings)
  if finished is not None:
    log.info("%s is complete (%d examples): nothing to do", output, finished["num_examples"])
    return finished

  progress_path = os.path.join(output, f"progress-p{pid}.json")
  done = resume_state(progress_path, settings)
  plan = shard_plan(num_examples, pid, nproc, opts.examples_per_shard)
  todo = [s for s in plan if s["file"] not in done]
  rows = [i for s in todo for i in range(s["start"], s["stop"])]
  if done:
    log.info("resuming: %d of this process's %d shards are done, %d examples to go", len(done), len(plan),
             len(rows))

  mesh = parallel.make_mesh({"data": -1}, devices)  # the batch split over every device
  if opts.batch_size % parallel.batch_devices(mesh) or opts.batch_size % nproc:
    raise ValueError(f"--batch_size {opts.batch_size} is not divisible by the {parallel.batch_devices(mesh)} "
                     f"devices ({nproc} processes)")
  local_batch = opts.batch_size // nproc
  data_sharding, repl = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  vae, encoders, tokenizers, lengths, params = load_models(opts)
  params = jax.device_put(params, repl)
  encode = jax.jit(make_encode(vae, encoders, opts.store, opts.seed, opts.dtype), out_shardings=data_sharding)

  empty = None
  if encoders:  # every process joins (the computation spans the mesh); process 0 writes it
    ids = [jax.device_put(clip.tokenize(t, [""], n), repl) for t, n in zip(tokenizers, lengths)]
    out = jax.jit(lambda p, i: text_embeddings(encoders, p, i))(params["text"], ids)
    empty = {k: np.asarray(v.addressable_data(0))[0].astype(opts.dtype) for k, v in out.items()}

  # Every process runs as many steps as the busiest one (the steps are collective); idle ones feed padding.
  steps = math.ceil(len(rows) / local_batch)
  if nproc > 1:
    steps = int(np.max(multihost_utils.process_allgather(np.int64(steps))))
  image_opts = preprocess.ImageOptions(resolution=opts.resolution, channels=vae_cfg.in_channels, crop="center",
                                       micro_conditioning=opts.micro_conditioning)
  image_shape = (opts.resolution, opts.resolution, vae_cfg.in_channels)
  writer = ShardWriter(output, todo, progress_path, settings, done)
  bar = tqdm(total=len(rows), desc="cache_latents", unit="img", disable=not progress or pid != 0,
             dynamic_ncols=True)

  def finish(out: Mapping[str, Any], loaded: list[dict[str, Any]]) -> None:
    arrays = {k: local_rows(v)[:len(loaded)] for k, v in out.items()}  # this process's rows, padding dropped
    for r, e in enumerate(loaded):
      writer.add({**e["meta"], **{k: v[r] for k, v in arrays.items()},
                  **({"time_ids": e["time_ids"]} if "time_ids" in e else {})})
    bar.update(len(loaded))

  t0 = time.perf_counter()
  previous = None
  with concurrent.futures.ThreadPoolExecutor(opts.num_threads) as pool:
    for step in range(steps):
      chunk = rows[step * local_batch:(step + 1) * local_batch]
      loaded = list(pool.map(lambda i: load_example(source, i, image_opts, caption_key), chunk))
      batch = batch_arrays(loaded, chunk, local_batch, image_shape, tokenizers, lengths)
      out = encode(params, parallel.global_batch(batch, data_sharding))  # dispatched, not waited for
      if previous is not None:
        finish(*previous)  # the previous batch's host work overlaps this one's encoding
      previous = (out, loaded)
    if previous is not None:
      finish(*previous)
  bar.close()
  writer.close()
  seconds = time.perf_counter() - t0
  log.info("encoded %d examples in %.1f s (%.1f images/s)", len(rows), seconds, len(rows) / max(seconds, 1e-9))

  if nproc > 1:
    multihost_utils.sync_global_devices("sdjax.cache_latents: shards written")
  if pid == 0:
    write_dataset(output, settings, vae_cfg, opts.resolution, num_examples, nproc, opts.examples_per_shard, empty)
  if nproc > 1:
    multihost_utils.sync_global_devices("sdjax.cache_latents: dataset.json written")
  if os.path.exists(progress_path):
    os.remove(progress_path)
  return records.read_meta(output)


# --- command line -------------------------------------------------------------------------------------

def define_flags(fv: flags.FlagValues) -> None:
  """The command line's flags, on `fv`."""
  d = {"flag_values": fv}
  flags.DEFINE_string("data", None, "a directory written by `python -m sdjax.data.prepare`", **d)
  flags.DEFINE_string("tfds", None, "a TFDS dataset prepared in ArrayRecord format (instead of --data)", **d)
  flags.DEFINE_enum("source", None, ["shapes", "colored_digits"], "a built-in captioned source that needs no "
                    "files (instead of --data / --tfds)", **d)
  flags.DEFINE_string("split", "train", "TFDS split (and --source's)", **d)
  flags.DEFINE_string("data_dir", None, "TFDS data dir (default: $SDJAX_DATA_DIR)", **d)
  flags.DEFINE_string("image_key", "image", "TFDS feature holding the image", **d)
  flags.DEFINE_string("caption_key", None, "field holding the caption (records: caption; TFDS: none unless given)",
                      **d)
  flags.DEFINE_string("label_key", None, "TFDS feature holding a class label, stored as `label`", **d)
  flags.DEFINE_string("output", None, "directory to write the latent records and dataset.json to", required=True,
                      **d)
  flags.DEFINE_string("vae", None, "diffusers AutoencoderKL folder", required=True, **d)
  flags.DEFINE_integer("resolution", None, "resize the shorter side and center-crop to this", required=True, **d)
  flags.DEFINE_integer("batch_size", 64, "global batch size (divisible by the devices)", **d)
  flags.DEFINE_enum("store", "dist", STORES, "dist: the posterior's mean and logvar (a fresh draw every epoch); "
                    "sample: one draw", **d)
  flags.DEFINE_enum("dtype", "float16", DTYPES, "of the stored arrays", **d)
  flags.DEFINE_enum("compute_dtype", "float32", COMPUTE_DTYPES, "of the encoders", **d)
  flags.DEFINE_bool("micro_conditioning", False, "store SDXL's time_ids", **d)
  flags.DEFINE_integer("seed", 0, "noise of --store sample (example i: from (seed, i))", **d)
  flags.DEFINE_string("text_encoder", "", "CLIP text encoder folder: cache prompt embeddings too", **d)
  flags.DEFINE_string("tokenizer", "", "its tokenizer folder", **d)
  flags.DEFINE_string("text_encoder_2", "", "SDXL's second text encoder folder", **d)
  flags.DEFINE_string("tokenizer_2", "", "its tokenizer folder", **d)
  flags.DEFINE_integer("examples_per_shard", 1000, "examples per shard", **d)
  flags.DEFINE_integer("num_threads", 8, "image decoding threads", **d)


def open_input(f: flags.FlagValues) -> tuple[Any, str, str | None]:
  """(source, its description, caption field or None) from --data, --tfds or --source."""
  if sum(map(bool, (f.data, f.tfds, f.source))) != 1:
    raise ValueError("pass exactly one of --data (a directory written by sdjax.data.prepare), --tfds NAME or "
                     "--source shapes|colored_digits")
  if f.source:
    return sources.open_source(f.source, split=f.split), f"{f.source}:{f.split}", "caption"
  if f.data:
    path = os.path.abspath(os.path.expanduser(f.data))
    return sources.open_source("records", path=path), f"records:{path}", f.caption_key or "caption"
  src = sources.open_source("tfds", name=f.tfds, split=f.split, data_dir=f.data_dir, image_key=f.image_key,
                            caption_key=f.caption_key, label_key=f.label_key)
  return src, src.where, "caption" if f.caption_key else None


def run(f: flags.FlagValues, args: list[str]) -> int:
  """The command line's work, from its parsed flags: the exit status."""
  from sdjax import parallel

  try:
    parallel.initialize()
    opts = CacheOptions(
        vae=f.vae, resolution=f.resolution, batch_size=f.batch_size, store=f.store, dtype=f.dtype,
        micro_conditioning=f.micro_conditioning, seed=f.seed, examples_per_shard=f.examples_per_shard,
        text_encoder=f.text_encoder, tokenizer=f.tokenizer, text_encoder_2=f.text_encoder_2,
        tokenizer_2=f.tokenizer_2, compute_dtype=f.compute_dtype, num_threads=f.num_threads)
    read_vae_config(opts.vae, opts.resolution)  # fail fast, before the source is opened
    source, name, caption_key = open_input(f)
    t0 = time.perf_counter()
    meta = cache(f.output, source, opts, source_name=name, caption_key=caption_key)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{f.output}: {meta['num_examples']} examples in {len(meta['shards'])} shards, latents "
        f"{meta['latent_shape']} ({meta['store']}, {meta['dtype']}) ({time.perf_counter() - t0:.1f} s)")
  return 0


def main(argv: Sequence[str]) -> int:
  """`python -m sdjax.data.cache_latents ARGV...` in-process: the exit status."""
  return cli.module_main(define_flags, run, argv)


if __name__ == "__main__":
  cli.module_app_run(define_flags, run)
