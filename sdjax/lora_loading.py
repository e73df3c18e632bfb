"""Read LoRA files of several formats and fuse several of them, each with its own scale, into pipeline params.

  from sdjax import lora_loading
  style = lora_loading.read("style.safetensors")            # diffusers/peft or kohya/A1111 keys
  detail = lora_loading.read("detail_lora_folder")          # a folder holding pytorch_lora_weights.safetensors
  params = lora_loading.fuse(params, [(style, 0.7), (detail, 0.4)])

`params` is a pipeline's params (sdjax.pipelines: {"unet", "vae", "text_encoders": (p1[, p2]), ...}) or a
dict of components {"unet", "text_encoder", "text_encoder_2"}; the result has the same structure. Every
adapted weight becomes W + sum_i scale_i * (alpha_i / rank_i) * up_i @ down_i, which is what diffusers'
`load_lora_weights(f_i, adapter_name=n_i)`, `set_adapters([n_i], adapter_weights=[scale_i])` and
`fuse_lora()` produce (diffusers 0.42; tests/test_lora_loading.py). The updates are summed with the weight in
float64, rounded once to float32, then cast to the weight's dtype. Each kohya layer uses its own `.alpha` (alpha =
rank without one), as kohya and A1111 do; diffusers 0.42 can differ on files whose layers mix alphas beyond one
value for linear and one for conv layers, or lack `.alpha` on only some layers (it uses the most common alpha).

Pipelines (sample.py jobs): fuse once after loading, before anything is compiled or hashed, e.g. in
sdjax.jobs.load_model: `params = lora_loading.fuse(params, [lora_loading.parse_spec(s) for s in specs])`. Fusing
works on host copies (np.asarray of every adapted kernel), so params must be fully addressable.

Formats (key layout, per layer):
  diffusers/peft   `<component>.<module>.lora_A.weight` [r, in(, kh, kw)] and `.lora_B.weight` [out, r(, 1, 1)]
                   (also `.lora.down/up.weight` and `.lora_down/up.weight`); component unet, text_encoder,
                   text_encoder_2, or none (a U-Net adapter saved by save_lora_adapter); alpha from the
                   `lora_adapter_metadata` JSON (sdjax.lora), or `<module>.alpha`, else alpha = rank.
  kohya/A1111      `lora_unet_<module with _ for .>.lora_down.weight`, `.lora_up.weight`, `.alpha` (scalar);
                   text encoders `lora_te_` (SD 1.x/2.x), `lora_te1_` / `lora_te2_` (SDXL). Modules must
                   use diffusers' U-Net names (as kohya's sd-scripts writes for SD 1.x/2.x); SDXL files in
                   the original LDM naming (`lora_unet_input_blocks_...`) are refused with the keys named.
                   The published LCM-LoRAs (latent-consistency/lcm-lora-sdv1-5, lcm-lora-sdxl) are such files:
                   float16, rank 64, alpha 8, on every attention, feed-forward, resnet and resampler conv and
                   Linear of the U-Net (tests/test_lcm_lora.py checks one against diffusers).
Linear layers and convolutions (LoCon: down [r, in, kh, kw], up [out, r, 1, 1]) are fused; LoHa/LoKr/DoRA
and other keys raise ValueError naming them, as do keys that match no layer of the params and factors whose
shapes do not fit. Module names come from sdjax.convert.tree.torch_key, the same mapping the weight converter uses.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sdjax import lora as lora_lib
from sdjax.convert import safetensors_io
from sdjax.convert.tree import torch_key

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}
# (suffix, factor): the down/A and up/B weights and the alpha of one layer, in every naming read here.
_SUFFIXES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora.down.weight", "down"),
             (".lora.up.weight", "up"), (".lora_down.weight", "down"), (".lora_up.weight", "up"),
             (".alpha", "alpha"))


@dataclasses.dataclass(frozen=True)
class Layer:
  """One adapted layer in PyTorch layout: down [r, in(, kh, kw)], up [out, r(, 1, 1)]; alpha None = rank."""
  down: np.ndarray
  up: np.ndarray
  alpha: float | None

  @property
  def rank(self) -> int:
    return int(self.down.shape[0])

  @property
  def scale(self) -> float:
    """alpha / rank."""
    return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class LoraFile:
  """A LoRA file read by `read`: its path, format ("diffusers" or "kohya") and, per component, the layers by
  module name: PyTorch module names (`down_blocks.0.attentions.0...to_q`) for diffusers files, kohya names
  (`down_blocks_0_attentions_0_..._to_q`, the prefix removed) for kohya files."""
  path: str
  format: str
  layers: dict[str, dict[str, Layer]]


def _file(path: str) -> str:
  if os.path.isdir(path):
    return lora_lib._weights_file(path)  # noqa: SLF001 (same folder convention as sdjax.lora.load)
  if not os.path.exists(path):
    raise FileNotFoundError(f"LoRA weights not found: {path}")
  if not os.path.isfile(path):  # a FIFO, a device (a link to /dev/zero), a socket: never read it
    raise ValueError(f"LoRA weights {path}: not a regular file")
  return path


def _split(key: str) -> tuple[str, str] | None:
  for suffix, factor in _SUFFIXES:
    if key.endswith(suffix):
      return key[:-len(suffix)], factor
  return None


def read(path: str) -> LoraFile:
  """Read a LoRA safetensors file (or a folder holding pytorch_lora_weights.safetensors), diffusers/peft or
  kohya/A1111 format, without a model. Raises ValueError naming keys that are not LoRA factors of a known
  format or component, and layers lacking a factor."""
  file = _file(path)
  tensors = safetensors_io.load(file)
  if not tensors:
    raise ValueError(f"{file}: holds no tensors")
  keys = sorted(tensors)
  kohya = any(k.startswith(tuple(_KOHYA_PREFIXES)) for k in keys)
  parts: dict[tuple[str, str], dict[str, Any]] = {}
  unsupported = []
  if kohya:
    for key in keys:
      prefix = next((p for p in sorted(_KOHYA_PREFIXES, key=len, reverse=True) if key.startswith(p)), None)
      split = _split(key) if prefix else None
      if split is None or split[0].count(".") or split[0] == prefix:
        unsupported.append(key)
        continue
      parts.setdefault((_KOHYA_PREFIXES[prefix], split[0][len(prefix):]), {})[split[1]] = tensors[key]
  else:
    prefixed = [k for k in keys if k.split(".", 1)[0] in COMPONENTS + ("transformer",)]
    bare = len(prefixed) == 0  # a U-Net adapter saved without the component prefix (save_lora_adapter)
    for key in keys:
      component, _, module = key.partition(".")
      if bare:
        component, module = "unet", key
      split = _split(module)
      if split is None or not split[0] or component not in COMPONENTS:
        unsupported.append(key)
        continue
      parts.setdefault((component, split[0]), {})[split[1]] = tensors[key]
  if unsupported:
    raise ValueError(f"{file}: {len(unsupported)} keys are not LoRA factors sdjax can fuse (down/up or lora_A/B "
                     f"weights and alphas of unet, text_encoder or text_encoder_2), e.g. {unsupported[:4]}; "
                     f"LoHa/LoKr (hada_*, lokr_*), DoRA magnitudes and LoRA biases are not supported")
  metadata = safetensors_io.read_metadata(file) if not kohya else {}
  layers: dict[str, dict[str, Layer]] = {}
  problems = []
  for (component, module), factors in sorted(parts.items()):
    if "down" not in factors or "up" not in factors:
      problems.append(f"{component} {module}: has {sorted(factors)} but not both down (lora_A) and up (lora_B)")
      continue
    down, up = np.asarray(factors["down"], np.float32), np.asarray(factors["up"], np.float32)
    alpha = float(np.asarray(factors["alpha"], np.float64).reshape(())) if "alpha" in factors else None
    if alpha is None and not kohya:
      alpha = lora_lib._alpha(metadata, component, down.shape[0], file)  # noqa: SLF001
    if not (np.isfinite(down).all() and np.isfinite(up).all() and (alpha is None or np.isfinite(alpha))):
      problems.append(f"{component} {module}: NaN or inf in its factors or alpha")
      continue
    layers.setdefault(component, {})[module] = Layer(down, up, alpha)
  if problems:
    raise ValueError(f"{file}: incomplete or non-finite LoRA layers:\n  " + "\n  ".join(problems[:10]))
  return LoraFile(file, "kohya" if kohya else "diffusers", layers)


def parse_spec(spec: str) -> tuple[str, float]:
  """"PATH[:SCALE]" (a --lora flag) -> (path, scale); the scale defaults to 1.0. A suffix after the last colon
  that is not a number is part of the path; an empty path or a non-finite scale raises ValueError."""
  path, sep, tail = spec.rpartition(":")
  try:
    scale = float(tail) if sep else 1.0
  except ValueError:
    path, scale = spec, 1.0
  if not sep:
    path = spec
  if not path or not np.isfinite(scale):
    raise ValueError(f"LoRA {spec!r}: expected PATH or PATH:SCALE with a finite number SCALE")
  return path, scale


def _components(params: Any) -> dict[str, Any]:
  """{component name: its params} of a pipeline params tree or a dict of components."""
  if "text_encoders" in params:
    out = {"unet": params["unet"]}
    out.update(zip(("text_encoder", "text_encoder_2"), params["text_encoders"]))
    return out
  return {name: params[name] for name in COMPONENTS if name in params}


def _replace(params: Any, fused: dict[str, Any]) -> Any:
  out = dict(params)
  if "text_encoders" in params:
    out["unet"] = fused["unet"]
    out["text_encoders"] = tuple(fused[n] for n in ("text_encoder", "text_encoder_2")[:len(params["text_encoders"])])
    return out
  out.update(fused)
  return out


def _kernels(component_params: Any) -> dict[str, tuple[str, ...]]:
  """{PyTorch module name: Flax kernel path} of every Dense (2-D) and Conv (4-D) kernel."""
  flat = traverse_util.flatten_dict(component_params)
  return {torch_key(p).removesuffix(".weight"): p for p, a in flat.items()
          if p[-1] == "kernel" and len(a.shape) in (2, 4)}


def _delta(layer: Layer, kernel_shape: tuple[int, ...], where: str) -> np.ndarray:
  """alpha/rank * up @ down in the Flax kernel's layout (float64); ValueError naming `where` if it does not fit."""
  down, up, r = layer.down, layer.up, layer.rank
  torch_shape = (kernel_shape[1], kernel_shape[0]) if len(kernel_shape) == 2 else \
      (kernel_shape[3], kernel_shape[2], kernel_shape[0], kernel_shape[1])
  up_ok = up.ndim in (2, 4) and up.shape[1] == r and all(s == 1 for s in up.shape[2:])
  if not (up_ok and down.ndim == up.ndim and down.size == r * int(np.prod(torch_shape[1:]))
          and up.shape[0] == torch_shape[0] and (down.ndim == 2 or down.shape[2:] == torch_shape[2:])):
    raise ValueError(f"LoRA {where}: down {down.shape} and up {up.shape} do not fit the weight of shape "
                     f"{torch_shape} (PyTorch layout [out, in(, kh, kw)]); expected down [r, "
                     f"{', '.join(map(str, torch_shape[1:]))}] and up [{torch_shape[0]}, r"
                     f"{', 1, 1' if len(torch_shape) == 4 else ''}]")
  delta = layer.scale * (up.reshape(up.shape[0], r).astype(np.float64) @ down.reshape(r, -1).astype(np.float64))
  delta = delta.reshape(torch_shape)
  return delta.T if delta.ndim == 2 else delta.transpose(2, 3, 1, 0)


def fuse(params: Any, loras: Sequence[tuple[LoraFile | str, float]]) -> Any:
  """params with every (lora, scale) of `loras` fused in: W + sum_i scale_i * alpha_i / rank_i * up_i @ down_i.

  `lora` is a LoraFile or a path for `read`. Raises ValueError, before changing anything, listing keys that
  match no layer of `params` (a few of them, with a component the params lack named as such) and naming any
  layer whose factors do not fit its weight."""
  components = _components(params)
  deltas: dict[tuple[str, tuple[str, ...]], np.ndarray] = {}
  unmatched = []
  for lora, scale in loras:
    lora = read(lora) if isinstance(lora, str) else lora
    for component, layers in lora.layers.items():
      if component not in components:
        unmatched.append(f"{lora.path}: {len(layers)} layers of {component}, which the params lack")
        continue
      names = _kernels(components[component])
      if component != "unet":  # transformers >= 5 names CLIP modules without the text_model. prefix
        names.update({n.removeprefix("text_model."): p for n, p in names.items() if n.startswith("text_model.")})
      if lora.format == "kohya":
        names = {name.replace(".", "_"): path for name, path in names.items()}
      flat = traverse_util.flatten_dict(components[component])
      for module, layer in layers.items():
        path = names.get(module)
        if path is None:
          unmatched.append(f"{lora.path}: {component} {module}")
          continue
        delta = _delta(layer, tuple(flat[path].shape), f"{lora.path}: {component} {module}")
        key = (component, path)
        deltas[key] = deltas.get(key, 0.0) + float(scale) * delta
  if unmatched:
    raise ValueError(f"{len(unmatched)} LoRA layers match no weight of the model, e.g.:\n  " +
                     "\n  ".join(unmatched[:6]) + "\n(kohya files must name diffusers U-Net modules, "
                     "lora_unet_down_blocks_0_...; original LDM names such as lora_unet_input_blocks_... are "
                     "not supported)")
  fused = {}
  for component, tree in components.items():
    flat = traverse_util.flatten_dict(tree)
    for (c, path), delta in deltas.items():
      if c == component:
        kernel = flat[path]
        flat[path] = jnp.asarray((np.asarray(kernel, np.float64) + delta).astype(np.float32)).astype(kernel.dtype)
    fused[component] = traverse_util.unflatten_dict(flat)
  return _replace(params, fused)
