"""Stable Diffusion pipelines with random weights: tiny ones for tests and the configs' `:tiny` variants,
full-size ones (the reference releases' configs) for benchmarks. No download.

  python -m sdjax.convert.random runs/tiny_sd1 --model_type sd1 --tokenizer tests/fixtures/models/tokenizer
"""
from __future__ import annotations

import os
import sys
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import flags

from sdjax import cli
from sdjax.convert import diffusers as dconv
from sdjax.convert import single_file

# Tiny components that fit together and take the real CLIP vocabulary (so the real tokenizer works):
# SD 1.x/2.x one 16-wide encoder; SDXL two 8-wide encoders (concatenated 16) + pooled 8 + 6 time ids.
TINY_TEXT = {"vocab_size": 49408, "hidden_size": 16, "intermediate_size": 32, "projection_dim": 16,
             "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 16,
             "hidden_act": "quick_gelu", "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
TINY_UNET = {"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": 2,
             "cross_attention_dim": 16, "in_channels": 4, "out_channels": 4, "sample_size": 8}
TINY_VAE = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "latent_channels": 4,
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
            "in_channels": 3, "out_channels": 3, "sample_size": 16}


def tiny_configs(model_type: str = "sd1", *, inpainting: bool = False) -> dict[str, dict[str, Any]]:
  """Diffusers configs of a tiny pipeline: {"unet", "vae", "text_encoder"[, "text_encoder_2"], "scheduler"}
  (the scheduler of the reference release of `model_type`)."""
  ref = single_file.default_configs(model_type)
  unet = {**ref["unet"], **TINY_UNET}
  unet.pop("transformer_layers_per_block", None)
  configs = {"vae": {**ref["vae"], **TINY_VAE}, "scheduler": ref["scheduler"]}
  if model_type == "sdxl":
    enc = {**TINY_TEXT, "hidden_size": 8, "intermediate_size": 16, "projection_dim": 8}
    configs["text_encoder"] = dict(enc, architectures=["CLIPTextModel"])
    configs["text_encoder_2"] = dict(enc, hidden_act="gelu", architectures=["CLIPTextModelWithProjection"])
    unet.update(addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4,
                attention_head_dim=[2, 2])
  else:
    act = "gelu" if model_type.startswith("sd2") else "quick_gelu"
    configs["text_encoder"] = dict(TINY_TEXT, hidden_act=act, architectures=["CLIPTextModel"])
  if inpainting:
    unet["in_channels"] = 2 * TINY_VAE["latent_channels"] + 1
  configs["unet"] = unet
  return configs


def random_params(shapes: Any, seed: int) -> Any:
  """Random params for a tree of shapes, by leaf name: kernels ~ N(0, 1/fan_in) (LeCun normal, as the
  modules' own initialisers), embeddings ~ N(0, 0.02^2), norm scales 1, biases 0. Numpy, so no compile."""
  rng = np.random.default_rng(seed)

  def one(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    shape = tuple(s.shape)
    if name == "scale":
      return np.ones(shape, np.float32)
    if name == "bias":
      return np.zeros(shape, np.float32)
    if name == "embedding":
      return (0.02 * rng.standard_normal(shape)).astype(np.float32)
    fan_in = int(np.prod(shape[:-1])) or 1
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(one, shapes)


def random_pipeline(configs: Mapping[str, Mapping[str, Any]], *, seed: int = 0, tokenizers: Mapping[str, Any] | None = None,
                    model_type: str = "sd1") -> dconv.Pipeline:
  """A `Pipeline` whose components' params are drawn by `random_params` from `seed`."""
  models = {}
  for i, name in enumerate(n for n in ("unet", "vae", "text_encoder", "text_encoder_2") if n in configs):
    kind = "text_encoder" if name.startswith("text_encoder") else name
    extra = {"with_projection": name == "text_encoder_2"} if kind == "text_encoder" else {}
    config = dconv.config_from_dict(kind, configs[name], **extra)
    module = dconv.KINDS[kind].module_cls(config)
    params = random_params(dconv.param_shapes(kind, config), seed * 16 + i)
    if kind == "vae" and config.use_quant_conv:
      # A near-deterministic posterior (std ~ e^-6), as a trained VAE's: with unit log-variances a posterior
      # sample would be mostly noise and a diffusion model trained on it could not learn anything.
      params["quant_conv"]["bias"][config.latent_channels:] = -12.0
    models[name] = (module, params)
  dconv.check_compatible(models, "random_pipeline")
  return dconv.Pipeline(models, dict(tokenizers or {}), dict(configs["scheduler"]), model_type, "random")


def write_random_pipeline(folder: str, model_type: str = "sd1", *, tokenizer: str, seed: int = 0,
                          inpainting: bool = False, full_size: bool = False) -> dconv.Pipeline:
  """Write a random-weight diffusers pipeline folder (tiny, or the reference release's sizes) that
  `sdjax.convert.load_pipeline` and diffusers' `from_pretrained` load; `tokenizer` is a CLIP tokenizer folder."""
  from sdjax.models import clip
  configs = single_file.default_configs(model_type) if full_size else tiny_configs(model_type, inpainting=inpainting)
  if full_size and inpainting:
    configs["unet"] = {**configs["unet"], "in_channels": 2 * configs["vae"]["latent_channels"] + 1}
  tok = clip.load_tokenizer(tokenizer)
  names = ("tokenizer", "tokenizer_2") if model_type == "sdxl" else ("tokenizer",)
  pipe = random_pipeline(configs, seed=seed, tokenizers={n: tok for n in names}, model_type=model_type)
  dconv.save_pipeline(folder, pipe)
  return pipe


def define_flags(fv: flags.FlagValues) -> None:
  """The command line's flags, on `fv` (and one argument: the folder to write)."""
  flags.DEFINE_enum("model_type", "sd1", ["sd1", "sd2", "sd2_v", "sdxl"], "the reference release to follow",
                    flag_values=fv)
  flags.DEFINE_string("tokenizer", None, "a CLIP tokenizer folder (vocab.json + merges.txt)", required=True,
                      flag_values=fv)
  flags.DEFINE_integer("seed", 0, "seed of the random weights", flag_values=fv)
  flags.DEFINE_bool("inpainting", False, "a 9-channel inpainting U-Net", flag_values=fv)
  flags.DEFINE_bool("full_size", False, "the reference release's sizes (GBs)", flag_values=fv)


def run(f: flags.FlagValues, args: list[str]) -> int:
  """The command line's work, from its parsed flags and [folder]: the exit status."""
  folder, = args
  try:
    pipe = write_random_pipeline(folder, f.model_type, tokenizer=f.tokenizer, seed=f.seed, inpainting=f.inpainting,
                                 full_size=f.full_size)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  n = sum(int(np.prod(a.shape)) for _, p in pipe.models.values() for a in jax.tree.leaves(p))
  print(f"wrote a random {f.model_type} pipeline ({n:,} parameters) to {os.path.abspath(folder)}")
  return 0


def main(argv: Sequence[str]) -> int:
  """`python -m sdjax.convert.random FOLDER ARGV...` in-process: the exit status."""
  return cli.module_main(define_flags, run, argv, positional=["folder"])


if __name__ == "__main__":
  cli.module_app_run(define_flags, run, positional=["folder"])
