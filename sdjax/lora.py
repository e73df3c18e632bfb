"""LoRA (low-rank adaptation) of Dense layers as pure functions on parameter pytrees.

A LoRA replaces a Dense kernel W [in, out] by W + (alpha / rank) * down @ up, with down [in, rank] and
up [rank, out] (Hu et al. 2021, eq. 3, in Flax's x @ W layout). Nothing in the model changes: `merge`
folds the low-rank update into the kernels, so any module (U-Net, text encoder) takes LoRA weights and
the product stays a pure, jittable function of the small `lora_params` tree, which is what one trains:

  lora = lora_lib.init(params, LoraConfig(rank=4), rng)
  loss = lambda lora: loss_fn(lora_lib.merge(params, lora, config))   # grads for `lora` only

`lora_params` mirrors the base tree down to each adapted layer, holding {"down", "up"} where the base
holds {"kernel", "bias"}: `params[...]["attn1"]["to_q"]["kernel"]` <-> `lora[...]["attn1"]["to_q"]["down"|"up"]`.

Files use diffusers' LoRA format, so `pipe.load_lora_weights(folder)` reads what `save` writes and
`load` reads what diffusers/peft training scripts save: `pytorch_lora_weights.safetensors` with keys
`unet.<module>.lora_A.weight` [rank, in] (= down.T) and `unet.<module>.lora_B.weight` [out, rank] (= up.T),
and alpha in the safetensors metadata `lora_adapter_metadata`, a JSON of peft `LoraConfig` fields
prefixed by the component (`{"unet.r": 4, "unet.lora_alpha": 8.0, "unet.target_modules": [...]}`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sdjax.convert import safetensors_io
from sdjax.convert.tree import torch_key

FILE_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
INITS = ("kaiming_uniform", "gaussian")
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """rank: inner dimension r. alpha: the update is scaled by alpha / rank (None: alpha = rank, scale 1).

  targets: Dense layers to adapt, by Flax name: a target matches a layer whose parameter path ends with
  it, so "to_q" adapts every query projection and "attn2/to_k" only the cross-attention keys.
  init: how `down` starts (`up` starts at zero, so a new LoRA leaves the model unchanged):
  "kaiming_uniform" is peft's default (uniform in +-1/sqrt(in), as torch's Linear), "gaussian" is
  peft's init_lora_weights="gaussian" and diffusers' former LoRALinearLayer (normal, std 1/rank).
  """
  rank: int
  alpha: float | None = None
  targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out_0")
  init: str = "kaiming_uniform"

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
      raise ValueError(f"LoraConfig.rank must be a positive integer, got {self.rank!r}")
    if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                                   or not math.isfinite(self.alpha) or self.alpha <= 0):
      raise ValueError(f"LoraConfig.alpha must be a positive number or None (= rank), got {self.alpha!r}")
    if isinstance(self.targets, str):
      raise ValueError(f"LoraConfig.targets must be a tuple of layer names, got the string {self.targets!r}; "
                       f"write ({self.targets!r},)")
    targets = tuple(self.targets)
    if not targets or not all(isinstance(t, str) and t.strip("/") for t in targets):
      raise ValueError(f"LoraConfig.targets must be a non-empty tuple of layer names, got {self.targets!r}")
    object.__setattr__(self, "targets", targets)
    if self.init not in INITS:
      raise ValueError(f"LoraConfig.init must be one of {INITS}, got {self.init!r}")

  @property
  def scale(self) -> float:
    """alpha / rank, the factor on down @ up."""
    return (self.rank if self.alpha is None else self.alpha) / self.rank


def dense_layers(params: Any) -> dict[tuple[str, ...], tuple[int, int]]:
  """{module path: kernel shape (in, out)} of every Dense layer (2-D `kernel`) in a parameter tree."""
  flat = traverse_util.flatten_dict(params)
  return {path[:-1]: tuple(a.shape) for path, a in flat.items() if path[-1] == "kernel" and len(a.shape) == 2}


def targeted_layers(params: Any, config: LoraConfig) -> dict[tuple[str, ...], tuple[int, int]]:
  """The Dense layers of `params` that `config.targets` select, in path order; every target must match."""
  layers = dense_layers(params)
  chosen, unmatched = {}, []
  for target in config.targets:
    parts = tuple(target.strip("/").split("/"))
    hits = [p for p in layers if p[-len(parts):] == parts]
    if not hits:
      unmatched.append(target)
    chosen.update((p, layers[p]) for p in hits)
  if unmatched:
    names = sorted({p[-1] for p in layers})
    raise ValueError(f"LoRA targets {unmatched} match no Dense layer (2-D kernel) of the parameters; searched "
                     f"{len(layers)} Dense layers for targets {config.targets}. Layer names there include: "
                     f"{', '.join(names[:12])}{' ...' if len(names) > 12 else ''} (Flax names: to_out_0, not "
                     f"to_out.0; a path suffix such as attn2/to_k selects fewer layers)")
  return dict(sorted(chosen.items()))


def init(base_params: Any, config: LoraConfig, rng: jax.Array) -> dict:
  """A new LoRA for the targeted layers of `base_params`: `down` random, `up` zero, float32.

  merge(base_params, init(...), config) equals base_params exactly.
  """
  layers = targeted_layers(base_params, config)
  keys = jax.random.split(rng, len(layers))
  flat = {}
  for key, (path, (fan_in, fan_out)) in zip(keys, layers.items()):
    shape = (fan_in, config.rank)
    if config.init == "kaiming_uniform":  # torch kaiming_uniform_(a=sqrt(5)) on lora_A [r, in]: bound 1/sqrt(in)
      bound = 1.0 / math.sqrt(fan_in)
      down = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    else:
      down = jax.random.normal(key, shape, jnp.float32) / config.rank
    flat[path + ("down",)] = down
    flat[path + ("up",)] = jnp.zeros((config.rank, fan_out), jnp.float32)
  return traverse_util.unflatten_dict(flat)


def _pairs(lora_params: Any) -> dict[tuple[str, ...], tuple[Any, Any]]:
  """{module path: (down, up)} of a LoRA tree, checking that each layer holds exactly down and up."""
  layers: dict[tuple[str, ...], dict[str, Any]] = {}
  for path, a in traverse_util.flatten_dict(lora_params).items():
    layers.setdefault(path[:-1], {})[path[-1]] = a
  out = {}
  for path, leaves in layers.items():
    if set(leaves) != {"down", "up"}:
      raise ValueError(f"LoRA layer {'/'.join(path)} must hold exactly 'down' and 'up', got {sorted(leaves)}")
    out[path] = (leaves["down"], leaves["up"])
  return out


def merge(base_params: Any, lora_params: Any, config: LoraConfig) -> dict:
  """base_params with kernel + (alpha / rank) * down @ up for every layer in `lora_params`.

  The update is computed in float32 at full matmul precision and cast back to the kernel's dtype. Pure
  and jittable; differentiate it with respect to `lora_params` (the base stays out of the gradient tree).
  """
  flat = traverse_util.flatten_dict(base_params)
  for path, (down, up) in _pairs(lora_params).items():
    name = "/".join(path)
    kernel = flat.get(path + ("kernel",))
    if kernel is None or kernel.ndim != 2:
      raise ValueError(f"LoRA layer {name} has no Dense kernel in the base parameters")
    if down.shape != (kernel.shape[0], config.rank) or up.shape != (config.rank, kernel.shape[1]):
      raise ValueError(f"LoRA layer {name}: down {tuple(down.shape)} and up {tuple(up.shape)} do not fit kernel "
                       f"{tuple(kernel.shape)} at rank {config.rank}; expected down "
                       f"{(kernel.shape[0], config.rank)} and up {(config.rank, kernel.shape[1])}")
    delta = jnp.matmul(down.astype(jnp.float32), up.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    flat[path + ("kernel",)] = (kernel.astype(jnp.float32) + config.scale * delta).astype(kernel.dtype)
  return traverse_util.unflatten_dict(flat)


def count(lora_params: Any) -> int:
  """Number of LoRA parameters."""
  return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(lora_params)))


def _module_name(path: tuple[str, ...]) -> str:
  """Flax module path -> PyTorch module name (down_blocks_0/.../to_out_0 -> down_blocks.0....to_out.0)."""
  return torch_key(path + ("kernel",)).removesuffix(".weight")


def save(folder: str, lora_params: Any, config: LoraConfig, *, prefix: str = "unet",
         fold_alpha: bool = False) -> str:
  """Write `lora_params` to folder/pytorch_lora_weights.safetensors in diffusers' format; returns the path.

  prefix: the pipeline component the LoRA belongs to ("unet", "text_encoder", ...). fold_alpha: multiply
  `up` by alpha / rank and record alpha = rank, for loaders that ignore the metadata (older diffusers,
  which assume alpha = rank); the merged weights are the same either way.
  """
  tensors, modules = {}, []
  scale = config.scale if fold_alpha else 1.0
  for path, (down, up) in _pairs(lora_params).items():
    down, up = np.asarray(jax.device_get(down), np.float32), np.asarray(jax.device_get(up), np.float32)
    if down.ndim != 2 or up.ndim != 2 or down.shape[1] != config.rank or up.shape[0] != config.rank:
      raise ValueError(f"LoRA layer {'/'.join(path)}: down {down.shape} and up {up.shape} are not rank "
                       f"{config.rank} factors")
    module = _module_name(path)
    modules.append(module)
    tensors[f"{prefix}.{module}.lora_A.weight"] = down.T
    tensors[f"{prefix}.{module}.lora_B.weight"] = (up * np.float32(scale)).T
  if not tensors:
    raise ValueError("save: lora_params holds no LoRA layers")
  alpha = config.rank if fold_alpha or config.alpha is None else config.alpha
  peft_config = {"r": config.rank, "lora_alpha": alpha, "target_modules": sorted(modules)}
  metadata = {"format": "pt",
              METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in peft_config.items()}, indent=2,
                                       sort_keys=True)}
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, FILE_NAME)
  safetensors_io.save(path, tensors, metadata)
  return path


def _weights_file(path: str) -> str:
  if os.path.isdir(path):
    file = os.path.join(path, FILE_NAME)
    if not os.path.isfile(file):
      found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
      raise FileNotFoundError(f"{path}: no {FILE_NAME} (safetensors files there: {found or 'none'}); pass the "
                              f"file's path to load another name")
    return file
  if not os.path.isfile(path):
    raise FileNotFoundError(f"LoRA weights not found: {path}")
  return path


def _strip_prefix(keys: list[str], prefix: str, file: str) -> dict[str, str]:
  """{key without the component prefix: key}, for files with (save_lora_weights) or without it (save_lora_adapter)."""
  if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
    raise ValueError(f"{file}: kohya/A1111-format LoRA keys (lora_unet_..., lora_te...); sdjax reads diffusers/peft "
                     f"keys only; convert it with diffusers (pipe.load_lora_weights, then save_lora_weights)")
  ours = [k for k in keys if k.startswith(prefix + ".")]
  if len(ours) == len(keys):
    return {k[len(prefix) + 1:]: k for k in keys}
  others = [k for k in keys if k.split(".", 1)[0] in _COMPONENTS and not k.startswith(prefix + ".")]
  if others or ours:
    rest = [k for k in keys if k not in ours]
    components = sorted({k.split(".", 1)[0] for k in rest})
    raise ValueError(f"{file}: holds LoRA weights of {components}, not only of {prefix!r} (e.g. {rest[0]}); "
                     f"sdjax.lora.load reads one component at a time (prefix=...) and would drop the others")
  return {k: k for k in keys}


def _alpha(metadata: dict[str, str], prefix: str, rank: int, file: str) -> float | None:
  """alpha from diffusers' `lora_adapter_metadata` (peft LoraConfig fields); None (= rank) when absent."""
  raw = metadata.get(METADATA_KEY)
  if not raw:
    return None  # diffusers' convention for files without alphas: W + lora_B @ lora_A, scale 1
  try:
    fields = json.loads(raw)
  except json.JSONDecodeError as e:
    raise ValueError(f"{file}: corrupt {METADATA_KEY} metadata ({e})") from None
  if any(k.startswith(prefix + ".") for k in fields):
    fields = {k[len(prefix) + 1:]: v for k, v in fields.items() if k.startswith(prefix + ".")}
  if fields.get("use_dora"):
    raise ValueError(f"{file}: DoRA adapters (use_dora) are not supported")
  alpha = float(fields.get("lora_alpha", 8))  # peft's LoraConfig default, which diffusers would use
  patterns = {float(v) for v in (fields.get("alpha_pattern") or {}).values()}
  if patterns - {alpha}:
    raise ValueError(f"{file}: per-layer alphas (alpha_pattern {fields['alpha_pattern']}) are not supported; "
                     f"LoraConfig has one alpha")
  if fields.get("use_rslora"):
    alpha *= math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r) = (alpha * sqrt(r)) / r
  return alpha


def load(path: str, base_params: Any, *, prefix: str = "unet") -> tuple[dict, LoraConfig]:
  """Read a diffusers/peft LoRA file (or a folder holding pytorch_lora_weights.safetensors) for `base_params`.

  Returns (lora_params, config) with float32 arrays; `config.targets` names the adapted layers' Flax names.
  Raises ValueError naming keys that match no Dense layer of `base_params`, shapes that do not fit, and
  contents sdjax does not support (other components' keys, kohya keys, DoRA, per-layer ranks or alphas).
  """
  file = _weights_file(path)
  tensors = safetensors_io.load(file)
  if not tensors:
    raise ValueError(f"{file}: holds no tensors")
  keys = _strip_prefix(sorted(tensors), prefix, file)
  modules = {_module_name(p): (p, shape) for p, shape in dense_layers(base_params).items()}
  factors: dict[str, dict[str, np.ndarray]] = {}
  unsupported, unknown = [], []
  for key, full_key in keys.items():
    m = _PEFT_KEY.match(key)
    if not m:
      unsupported.append(full_key)
    elif m["module"] not in modules:
      unknown.append(full_key)
    else:
      factors.setdefault(m["module"], {})[m["which"]] = np.asarray(tensors[full_key])
  if unsupported:
    raise ValueError(f"{file}: {len(unsupported)} keys are not LoRA A/B weights (lora_A.weight, lora_B.weight), "
                     f"e.g. {unsupported[:3]}; biases, DoRA magnitudes and .alpha tensors are not supported")
  if unknown:
    raise ValueError(f"{file}: {len(unknown)} LoRA keys match no Dense layer of the model, e.g. {unknown[:3]}; "
                     f"model layers look like {sorted(modules)[:2]}")
  flat, ranks, problems = {}, set(), []
  for module, ab in sorted(factors.items()):
    flax_path, (fan_in, fan_out) = modules[module]
    if set(ab) != {"A", "B"}:
      problems.append(f"{module}: has lora_{''.join(ab)} but not lora_{({'A', 'B'} - set(ab)).pop()}")
      continue
    a, b = ab["A"], ab["B"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != fan_in or b.shape[0] != fan_out or a.shape[0] != b.shape[1]:
      problems.append(f"{module}: lora_A {a.shape} and lora_B {b.shape} do not fit a Linear {fan_in} -> {fan_out} "
                      f"(expected lora_A [r, {fan_in}] and lora_B [{fan_out}, r])")
      continue
    ranks.add(a.shape[0])
    flat[flax_path + ("down",)] = jnp.asarray(a.T.astype(np.float32))
    flat[flax_path + ("up",)] = jnp.asarray(b.T.astype(np.float32))
  if problems:
    raise ValueError(f"{file}: LoRA weights do not fit the model:\n  " + "\n  ".join(problems[:25]))
  if len(ranks) != 1:
    raise ValueError(f"{file}: layers have different ranks {sorted(ranks)}; LoraConfig has one rank")
  rank = ranks.pop()
  alpha = _alpha(safetensors_io.read_metadata(file), prefix, rank, file)
  targets = tuple(sorted({p[-2] for p in flat}))
  return traverse_util.unflatten_dict(flat), LoraConfig(rank=rank, alpha=alpha, targets=targets)
