"""Diffusers-format folders and single-file checkpoints -> sdjax (module, params), and back.

No torch: weights are read with sdjax.convert.safetensors_io. Pickled weights (`.bin`, `.ckpt`, `.pt`) are
refused unless `allow_pickle=True`, which then needs torch and uses its `weights_only` loader.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from typing import Any, Callable, Mapping, NamedTuple

import jax
import numpy as np
from flax import linen as nn

from sdjax import schedules
from sdjax.convert import safetensors_io, single_file, tree
from sdjax.models import clip, controlnet, unet, vae

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


class Kind(NamedTuple):
  """How to build one kind of component: config class, module class, example init args, weights file name,
  a state-dict normaliser, and the diffusers/transformers class names it serves; `to_torch` maps the keys of
  `tree.from_flax` to the saved layout (the inverse of `normalize` where that renames keys)."""
  config_cls: Any
  module_cls: Any
  init_args: Callable
  weights_name: str
  normalize: Callable[[dict], dict]
  class_names: tuple[str, ...]
  to_torch: Callable[[dict], dict] = dict


KINDS = {
    "unet": Kind(unet.UNetConfig, unet.UNet, unet.init_args, "diffusion_pytorch_model", dict,
                 ("UNet2DConditionModel",)),
    "vae": Kind(vae.VAEConfig, vae.AutoencoderKL, vae.init_args, "diffusion_pytorch_model",
                vae.normalize_state_dict, ("AutoencoderKL",)),
    "text_encoder": Kind(clip.CLIPTextConfig, clip.CLIPTextModel, clip.init_args, "model",
                         clip.normalize_state_dict, ("CLIPTextModel", "CLIPTextModelWithProjection")),
    "controlnet": Kind(controlnet.ControlNetConfig, controlnet.ControlNet, controlnet.init_args,
                       "diffusion_pytorch_model", controlnet.normalize_state_dict, ("ControlNetModel",),
                       controlnet.denormalize_state_dict),
}
KIND_OF_CLASS = {name: kind for kind, k in KINDS.items() for name in k.class_names}
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")


# --- reading weights ---------------------------------------------------------------------------------

def weight_files(folder: str, weights_name: str, variant: str | None = None) -> list[str]:
  """The safetensors file(s) of a component folder (single or sharded, optionally a variant like fp16)."""
  stem = f"{weights_name}.{variant}" if variant else weights_name
  single = os.path.join(folder, f"{stem}.safetensors")
  if os.path.isfile(single):
    return [single]
  index = os.path.join(folder, f"{stem}.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if missing:
      raise FileNotFoundError(f"{index} lists shard(s) that are not in the folder: {missing}")
    return [os.path.join(folder, s) for s in shards]
  found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*")))
  pickled = [p for p in found if p.endswith(PICKLE_SUFFIXES)]
  hint = (f"; it has pickled weights {pickled}: convert them to safetensors, or pass allow_pickle=True "
          "(needs torch; loaded with torch.load(weights_only=True))" if pickled else "")
  raise FileNotFoundError(f"{folder}: no {stem}.safetensors (or sharded index) found; files: {found}{hint}")


def read_folder_weights(folder: str, weights_name: str, variant: str | None = None, *,
                        allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """The state dict of a model folder: its `weights_name` safetensors (sharded or not, `weight_files`), or,
  when there are none and `allow_pickle`, its first pickled file (PICKLE_SUFFIXES)."""
  try:
    files = weight_files(folder, weights_name, variant)
  except FileNotFoundError:
    pickled = sorted(p for p in glob.glob(os.path.join(folder, "*")) if p.endswith(PICKLE_SUFFIXES))
    if not (allow_pickle and pickled):
      raise
    files = pickled[:1]
  state = {}
  for path in files:
    state.update(read_state_dict(path, allow_pickle=allow_pickle))
  return state


def read_state_dict(path: str, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """A weights file (safetensors; pickled only with allow_pickle) as {key: numpy array}."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no weights file at {path}")
  if path.endswith(PICKLE_SUFFIXES):
    if not allow_pickle:
      raise ValueError(f"{path} is a pickled checkpoint, which can run arbitrary code when loaded; sdjax "
                       "reads safetensors only. Convert it to .safetensors, or pass allow_pickle=True "
                       "(needs torch; uses torch.load(weights_only=True))")
    try:
      import torch  # noqa: PLC0415 - optional, only for explicitly allowed pickles
    except ImportError:
      raise ImportError(f"loading the pickled checkpoint {path} needs torch (pip install torch)") from None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    obj = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
            for k, v in obj.items() if isinstance(v, torch.Tensor)}
  return safetensors_io.load(path)


def _read_json(folder: str, name: str, kind: str) -> Any:
  """`folder`/`name` parsed; a missing or unreadable file is one error naming it ("not a <kind> folder")."""
  path = os.path.join(folder, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{folder}: not a {kind} folder (no {name})")
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int too long to convert
    raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_model_index(folder: str) -> Any:
  """A diffusers pipeline folder's parsed model_index.json (callers check its shape)."""
  return _read_json(folder, "model_index.json", "diffusers pipeline")


def _read_config(folder: str, kind: str = "diffusers component") -> dict[str, Any]:
  """`folder`/config.json as a dict; a missing, unreadable or non-object file is one error naming it."""
  d = _read_json(folder, "config.json", kind)
  path = os.path.join(folder, "config.json")
  if not isinstance(d, dict):
    raise ValueError(f"{path}: expected a JSON object of config fields, got {type(d).__name__} {d!r:.60}")
  return d


# --- components --------------------------------------------------------------------------------------

def param_shapes(kind: str, config) -> dict:
  """Parameter shapes (ShapeDtypeStructs) of a component, without allocating weights."""
  k = KINDS[kind]
  module = k.module_cls(config)
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *k.init_args(config)))
  return nn.meta.unbox(boxed)["params"]


def config_from_dict(kind: str, d: Mapping[str, Any], **overrides):
  """The sdjax config of a diffusers/transformers `config.json` dict; one-line ValueErrors for bad fields."""
  if not isinstance(d, Mapping):
    raise ValueError(f"{kind} config: expected a JSON object of config fields, got {type(d).__name__} {d!r:.60}")
  config = KINDS[kind].config_cls.from_diffusers_config(dict(d))
  if overrides and kind == "controlnet":  # its sdjax-only fields (dtype, remat, ...) are those of its U-Net part
    return dataclasses.replace(config, unet=dataclasses.replace(config.unet, **overrides))
  return dataclasses.replace(config, **overrides) if overrides else config


def load_state_dict(kind: str, config, state_dict: Mapping[str, np.ndarray], *, what: str = "") -> tuple:
  """(module, params) of `kind` from a diffusers/transformers-layout state dict."""
  k = KINDS[kind]
  params = tree.to_flax(k.normalize(dict(state_dict)), param_shapes(kind, config), what=what or kind)
  return k.module_cls(config), params


def load_component(folder: str, kind: str | None = None, *, variant: str | None = None,
                   allow_pickle: bool = False, **overrides) -> tuple:
  """(module, params) from a diffusers component folder (config.json + safetensors weights).

  `kind` ("unet", "vae", "text_encoder", "controlnet") is read from the config's class name when None; `overrides`
  set sdjax-only config fields such as dtype="bfloat16" or remat=True.
  """
  d = _read_config(folder)
  if kind is None:
    archs = d.get("architectures")
    cls_name = d.get("_class_name") or (archs[0] if isinstance(archs, list) and archs else None)
    if not isinstance(cls_name, str) or cls_name not in KIND_OF_CLASS:
      raise ValueError(f"{folder}: component class {cls_name!r:.60} is not supported; sdjax loads "
                       f"{sorted(KIND_OF_CLASS)}")
    kind = KIND_OF_CLASS[cls_name]
  try:
    config = config_from_dict(kind, d, **overrides)
  except ValueError as e:
    raise ValueError(f"{os.path.join(folder, 'config.json')}: {e}") from None
  state = read_folder_weights(folder, KINDS[kind].weights_name, variant, allow_pickle=allow_pickle)
  return load_state_dict(kind, config, state, what=folder)


def load_unet(path: str, **kwargs) -> tuple:
  """(UNet, params) from a diffusers `UNet2DConditionModel` folder. Call as
  `unet.apply({"params": p}, x_nhwc, t, context)` (SDXL: `added_cond={"text_embeds", "time_ids"}`)."""
  return load_component(path, "unet", **kwargs)


def load_vae(path: str, **kwargs) -> tuple:
  """(AutoencoderKL, params) from a diffusers `AutoencoderKL` folder."""
  return load_component(path, "vae", **kwargs)


def load_controlnet(path: str, *, config: Any = None, **kwargs) -> tuple:
  """(ControlNet, params) from a diffusers `ControlNetModel` folder (config.json + diffusion_pytorch_model
  safetensors), or from a file in the original layout (lllyasviel's control_*.safetensors: `input_hint_block`,
  `zero_convs`, ...; `sdjax.convert.controlnet_single_file`), whose `config` (a diffusers ControlNetModel config
  dict or folder; None: SD 1.5 / 2.1's by the text width) the file does not hold.
  `ControlNet.apply({"params": p}, x, t, context, cond_image, ...)` -> (down residuals, mid residual).
  Write one with `save_component(folder, "controlnet", module.config, params)`."""
  if os.path.isfile(path):
    from sdjax.convert import controlnet_single_file  # noqa: PLC0415
    state = read_state_dict(path, allow_pickle=kwargs.pop("allow_pickle", False))
    config = controlnet_single_file.resolve_config(config, state, **kwargs)
    converted, _ = controlnet_single_file.to_diffusers(state, config)
    return load_state_dict("controlnet", config, converted, what=path)
  if config is not None:
    raise ValueError(f"{path}: config= is for single files; a diffusers folder has its config.json")
  return load_component(path, "controlnet", **kwargs)


def load_text_encoder(path: str, **kwargs) -> tuple:
  """(CLIPTextModel, params) from a transformers `CLIPTextModel[WithProjection]` folder; apply returns
  `(last_hidden_state, pooled_output)`."""
  return load_component(path, "text_encoder", **kwargs)


# --- whole pipelines ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Pipeline:
  """Every component of a Stable Diffusion checkpoint. `models[name] = (module, params)` for unet, vae,
  text_encoder[_2]; `tokenizers[name]` (None where the source has none, e.g. a single file);
  `scheduler_config` is the diffusers scheduler dict (`schedules.from_diffusers_config` reads it).
  `model_type`: "sd1", "sd2", "sdxl" or "sdxl_refiner" (text_encoder_2 only, 5 time ids with an aesthetic score).
  `pipeline_config`: the model_index.json settings sdjax uses (`force_zeros_for_empty_prompt`,
  `requires_aesthetics_score`) where the folder sets them (pipelines.from_components takes them)."""
  models: dict[str, tuple]
  tokenizers: dict[str, Any]
  scheduler_config: dict[str, Any]
  model_type: str
  source: str
  skipped: list[str] = dataclasses.field(default_factory=list)
  pipeline_config: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def schedule(self):
    return schedules.from_diffusers_config(self.scheduler_config)

  @property
  def sampler(self) -> str:
    return schedules.sampler_from_diffusers_config(self.scheduler_config)


def _guess_model_type(models) -> str:
  if models["unet"][0].config.addition_embed_type == "text_time":
    return "sdxl" if time_ids_of(models) == 6 else "sdxl_refiner"
  # SD 2.x uses OpenCLIP ViT-H (gelu); SD 1.x OpenAI CLIP ViT-L (quick_gelu).
  return "sd2" if models["text_encoder"][0].config.hidden_act == "gelu" else "sd1"


def time_ids_of(models: Mapping[str, tuple]) -> int | None:
  """How many SDXL time ids the U-Net's added embedding takes beside the last text encoder's pooled output (6:
  base, 5: refiner), or None (no text_time embedding, or a width that fits neither)."""
  ucfg = models["unet"][0].config
  if ucfg.addition_embed_type != "text_time":
    return None
  enc = [models[n][0].config for n in ("text_encoder", "text_encoder_2") if n in models][-1]
  pooled = enc.projection_dim if enc.with_projection else enc.hidden_size
  for n in (6, 5):
    if pooled + n * ucfg.addition_time_embed_dim == ucfg.projection_class_embeddings_input_dim:
      return n
  return None


def check_compatible(models: Mapping[str, tuple], where: str) -> None:
  """The components of one pipeline fit together (text width, latent channels, SDXL pooled width)."""
  ucfg = models["unet"][0].config
  encoders = [models[n][0].config for n in ("text_encoder", "text_encoder_2") if n in models]
  width = sum(c.hidden_size for c in encoders)
  if ucfg.cross_attention_dim != width:
    raise ValueError(f"{where}: the U-Net's cross_attention_dim is {ucfg.cross_attention_dim} but the text "
                     f"encoder(s) give {width} features ({' + '.join(str(c.hidden_size) for c in encoders)})")
  latent = models["vae"][0].config.latent_channels
  if ucfg.in_channels not in (latent, 2 * latent + 1):  # 2 * latent + 1: the inpainting U-Net
    upscaler = ("; latent + 3 is an x4 upscaler's U-Net: load such a pipeline with sdjax.upscale.load"
                if ucfg.in_channels == latent + 3 else "")
    raise ValueError(f"{where}: the U-Net takes {ucfg.in_channels} channels, the VAE has {latent} latent "
                     f"channels (expected {latent}, or {2 * latent + 1} for inpainting){upscaler}")
  if ucfg.addition_embed_type == "text_time" and time_ids_of(models) is None:
    pooled = encoders[-1].projection_dim if encoders[-1].with_projection else encoders[-1].hidden_size
    raise ValueError(f"{where}: the U-Net's projection_class_embeddings_input_dim "
                     f"{ucfg.projection_class_embeddings_input_dim} != pooled text width {pooled} + "
                     f"6 (SDXL) or 5 (SDXL refiner) * addition_time_embed_dim {ucfg.addition_time_embed_dim}")


def load_pipeline(path: str, *, variant: str | None = None, allow_pickle: bool = False, **overrides) -> Pipeline:
  """A whole diffusers pipeline folder (`model_index.json`), or a single-file LDM checkpoint.

  Components sdjax does not use (safety_checker, feature_extractor, image_encoder) are listed in
  `skipped`. `overrides` (dtype, remat, ...) apply to the U-Net.
  """
  if os.path.isfile(path):
    return load_single_file(path, allow_pickle=allow_pickle, **overrides)
  index_path = os.path.join(path, "model_index.json")
  if not os.path.isfile(index_path):
    raise FileNotFoundError(f"{path}: not a diffusers pipeline folder (no model_index.json) and not a file")
  index = read_model_index(path)
  models, tokenizers, skipped, scheduler_config = {}, {}, [], None
  for name, spec in index.items():
    if name.startswith("_") or not isinstance(spec, (list, tuple)) or len(spec) != 2:
      continue
    _, cls_name = spec
    folder = os.path.join(path, name)
    if cls_name is None:
      continue
    if cls_name in KIND_OF_CLASS:
      kind = KIND_OF_CLASS[cls_name]
      extra = overrides if kind == "unet" else {}
      if kind == "text_encoder":  # the class named in model_index.json decides the projection head
        extra = {"with_projection": cls_name == "CLIPTextModelWithProjection"}
      models[name] = load_component(folder, kind, variant=variant, allow_pickle=allow_pickle, **extra)
    elif cls_name in TOKENIZER_CLASSES:
      tokenizers[name] = clip.load_tokenizer(folder)
    elif cls_name.endswith("Scheduler"):
      with open(os.path.join(folder, "scheduler_config.json")) as f:
        scheduler_config = {"_class_name": cls_name, **json.load(f)}
    else:
      skipped.append(f"{name} ({cls_name})")
  # The SDXL refiner has text_encoder_2 only (text_encoder null or absent in model_index.json).
  for required in ("unet", "vae", "text_encoder" if "text_encoder_2" not in models else "text_encoder_2"):
    if required not in models:
      raise ValueError(f"{path}: model_index.json has no loadable {required!r} component")
  if scheduler_config is None:
    raise ValueError(f"{path}: model_index.json has no scheduler")
  check_compatible(models, path)
  settings = {k: index[k] for k in ("force_zeros_for_empty_prompt", "requires_aesthetics_score") if k in index}
  for key, value in settings.items():
    if not isinstance(value, bool):
      raise ValueError(f"{index_path}: {key} must be true or false, got {value!r:.60}")
  model_type = _guess_model_type(models)
  aesthetic = settings.get("requires_aesthetics_score")
  if aesthetic is not None and aesthetic != (model_type == "sdxl_refiner"):
    n = time_ids_of(models)
    raise ValueError(f"{index_path}: requires_aesthetics_score is {str(aesthetic).lower()} but the U-Net takes "
                     f"{n if n else 'no'} time ids (5 with an aesthetic score: the SDXL refiner; 6: SDXL)")
  return Pipeline(models, tokenizers, scheduler_config, model_type, path, skipped, settings)


def load_single_file(path: str, model_type: str | None = None, *, configs: Mapping[str, dict] | None = None,
                     allow_pickle: bool = False, **overrides) -> Pipeline:
  """A single-file SD 1.x / 2.x / SDXL (or SDXL refiner) checkpoint with the original LDM key names.

  model_type: "sd1", "sd2" (epsilon, 512 px), "sd2_v" (v-prediction, 768 px), "sdxl" or "sdxl_refiner";
  detected from the keys when None (SD 2.x then means "sd2": pass "sd2_v" for the 768 px v-prediction model, which
  the keys cannot tell apart). configs: {"unet", "vae", "text_encoder"[, "text_encoder_2"], "scheduler"} diffusers
  config dicts to use instead of the reference release's (`single_file.default_configs`). The file
  carries no tokenizer: `tokenizers` is empty (load one with `sdjax.models.clip.load_tokenizer`).
  """
  state = read_state_dict(path, allow_pickle=allow_pickle)
  detected = single_file.detect_model_type(state)
  model_type = model_type or detected
  if single_file._LAYOUT.get(model_type) != detected:
    raise ValueError(f"{path}: the keys are those of a {detected} checkpoint, not {model_type}")
  configs = {**single_file.default_configs(model_type), **(configs or {})}
  converted = single_file.ldm_to_diffusers(state, model_type, unet_config=configs["unet"],
                                           vae_config=configs["vae"],
                                           text_encoder_config=configs.get("text_encoder"))
  models = {}
  for name, sd in converted.components.items():
    kind = "text_encoder" if name.startswith("text_encoder") else name
    extra = overrides if kind == "unet" else {}
    if kind == "text_encoder":  # SDXL's second encoder is CLIPTextModelWithProjection
      extra = {"with_projection": name == "text_encoder_2"}
    config = config_from_dict(kind, configs[name], **extra)
    models[name] = load_state_dict(kind, config, sd, what=f"{path} ({name})")
  check_compatible(models, path)
  return Pipeline(models, {}, dict(configs["scheduler"]), model_type, path, converted.ignored)


# --- export ------------------------------------------------------------------------------------------

def save_component(folder: str, kind: str, config, params, *, dtype: Any = None) -> None:
  """Write a diffusers/transformers component folder (config.json + safetensors) that diffusers'
  `from_pretrained` loads. `dtype` (e.g. np.float16) casts the weights; default: as they are (float32)."""
  os.makedirs(folder, exist_ok=True)
  state = KINDS[kind].to_torch(tree.from_flax(params, dtype))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config.to_diffusers_config(), f, indent=2, sort_keys=True)
  safetensors_io.save(os.path.join(folder, KINDS[kind].weights_name + ".safetensors"), state,
                      {"format": "pt"})


def save_pipeline(folder: str, pipeline: Pipeline, *, dtype: Any = None) -> None:
  """Write `pipeline` as a diffusers folder: model_index.json, each model, tokenizers, scheduler."""
  os.makedirs(folder, exist_ok=True)
  sdxl = "text_encoder_2" in pipeline.models
  index = {"_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"}
  for name, (module, params) in pipeline.models.items():
    kind = "text_encoder" if name.startswith("text_encoder") else name
    save_component(os.path.join(folder, name), kind, module.config, params, dtype=dtype)
    config = module.config.to_diffusers_config()
    cls_name = config.get("_class_name") or config["architectures"][0]
    index[name] = ["transformers" if kind == "text_encoder" else "diffusers", cls_name]
  for name, tok in pipeline.tokenizers.items():
    if tok is not None:
      tok.save_pretrained(os.path.join(folder, name))
      index[name] = ["transformers", type(tok).__name__]
  sched = dict(pipeline.scheduler_config)
  cls_name = sched.pop("_class_name", "DDIMScheduler")
  os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
  with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump({"_class_name": cls_name, **sched}, f, indent=2, sort_keys=True)
  index["scheduler"] = ["diffusers", cls_name]
  if not sdxl:
    index.update(safety_checker=[None, None], feature_extractor=[None, None])
  with open(os.path.join(folder, "model_index.json"), "w") as f:
    json.dump(index, f, indent=2)


def params_hash(params) -> str:
  """A short content hash of a parameter tree (model id in generation metadata)."""
  h = hashlib.sha256()
  for key, a in sorted(tree.from_flax(params).items()):
    h.update(key.encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]
