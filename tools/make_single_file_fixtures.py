"""Regenerate tests/fixtures/single_file/: tiny SD 1.x / 2.x / SDXL models as LDM single files.

  pip install torch==2.13.0 diffusers transformers && python tools/make_single_file_fixtures.py
  python tools/make_single_file_fixtures.py --full-size   # check the packaged full-size default configs

For each model type this builds tiny random diffusers/transformers components (U-Net, VAE, text
encoder(s)), writes their weights under the original LDM / SGM key names into `<type>.safetensors` by
an inverse mapping written here (independently of sdjax.convert.single_file), and checks that file with
diffusers' own single-file converters (`diffusers.loaders.single_file_utils`): they must give back every
original array exactly. It then saves the expected diffusers state dicts (`<type>.<component>.safetensors`)
and the tiny configs (`<type>.<component>.json`) that `ldm_to_diffusers` needs.

The LDM files also carry the non-weight keys real checkpoints have (schedule buffers, EMA bookkeeping,
position_ids, OpenCLIP's logit_scale and, for SD 2.x, the last OpenCLIP block and the text_projection
that diffusers drops), so the tests see them reported as ignored. Text-encoder keys are stored as
transformers checkpoints hold them, below `text_model.` (transformers >= 5.6 flattens CLIPTextModel's
own state dict; the prefix is added back here).

`--full-size` writes nothing: it builds the packaged default configs (sdjax/convert/configs) at full size
on the meta device, writes their LDM key layout the same way, and checks that diffusers' converters and
sdjax's `ldm_to_diffusers` (on zero-stride numpy views) both give back every key with its shape.
torch is needed only here.
"""
import contextlib
import json
import os
import re
import sys

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors.numpy import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "single_file")

UNETS = {
    # SD 1.x: conv proj_in/proj_out, one head count for all blocks (`attention_head_dim` = heads).
    "sd1": dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(4, 8, 8), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2),
    # SD 2.x: linear projection, per-block head counts.
    "sd2": dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(4, 8, 8), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                norm_num_groups=4, cross_attention_dim=12, attention_head_dim=(2, 4, 4), use_linear_projection=True),
    # SDXL: text_time addition embedding, 2 transformer layers in the inner blocks (and the mid block).
    "sdxl": dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(4, 8, 8), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 1, 2), norm_num_groups=4, cross_attention_dim=20,
                 attention_head_dim=(2, 2, 4), use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=4, projection_class_embeddings_input_dim=10 + 6 * 4),
}
VAES = {
    "sd1": dict(block_out_channels=(4, 8, 8), layers_per_block=2, norm_num_groups=4, latent_channels=4),
    "sd2": dict(block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4),
    "sdxl": dict(block_out_channels=(4, 4, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                 scaling_factor=0.13025),
}
for _cfg in VAES.values():
  n = len(_cfg["block_out_channels"])
  _cfg.update(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n, sample_size=32)
_CLIP = dict(vocab_size=64, max_position_embeddings=7, bos_token_id=0, eos_token_id=2, pad_token_id=1,
             num_attention_heads=2, layer_norm_eps=1e-5)
TEXT = {  # model type -> [(component, CLIPTextConfig kwargs)]
    "sd1": [("text_encoder", dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, hidden_act="quick_gelu"))],
    # OpenCLIP ViT-H stand-in: the LDM file holds 3 blocks, diffusers keeps 2 (the penultimate layer).
    "sd2": [("text_encoder", dict(hidden_size=12, intermediate_size=24, num_hidden_layers=2, hidden_act="gelu",
                                  projection_dim=12))],
    "sdxl": [("text_encoder", dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, hidden_act="quick_gelu")),
             ("text_encoder_2", dict(hidden_size=12, intermediate_size=24, num_hidden_layers=2, hidden_act="gelu",
                                     projection_dim=10))],
}
SCHEDULE_KEYS = ("betas", "alphas_cumprod", "alphas_cumprod_prev")  # LatentDiffusion buffers (subset)


def randomize(model, seed):
  """Distinct random values in every parameter, so a swapped key cannot pass as equal (norms init to 1/0)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=g) * 0.2)
  return model


# --- inverse mapping: diffusers -> LDM keys ----------------------------------------------------------

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_to_ldm(sd, config, prefix="model.diffusion_model."):
  per = config["layers_per_block"]
  up_attention = [t == "CrossAttnUpBlock2D" for t in config["up_block_types"]]
  fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
  out = {}
  for key, value in sd.items():
    module, leaf = key.rsplit(".", 1)
    if module in fixed:
      new = f"{fixed[module]}.{leaf}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
      b, j, name = int(m[1]), int(m[2]), m[3]
      new = f"input_blocks.{1 + b * (per + 1) + j}.0.{UNET_RESNET[name]}.{leaf}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
      new = f"input_blocks.{1 + int(m[1]) * (per + 1) + int(m[2])}.1.{m[3]}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
      new = f"input_blocks.{1 + int(m[1]) * (per + 1) + per}.0.op.{leaf}"
    elif m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(\w+)", module):
      new = f"middle_block.{2 * int(m[1])}.{UNET_RESNET[m[2]]}.{leaf}"
    elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
      new = f"middle_block.1.{m[1]}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
      new = f"output_blocks.{int(m[1]) * (per + 1) + int(m[2])}.0.{UNET_RESNET[m[3]]}.{leaf}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
      new = f"output_blocks.{int(m[1]) * (per + 1) + int(m[2])}.1.{m[3]}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
      u = int(m[1])
      new = f"output_blocks.{u * (per + 1) + per}.{2 if up_attention[u] else 1}.conv.{leaf}"
    else:
      raise KeyError(f"unet key without an LDM name: {key}")
    out[prefix + new] = value
  return out


VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(sd, config, prefix="first_stage_model."):
  n = len(config["block_out_channels"])
  out = {}
  for key, value in sd.items():
    module, leaf = key.rsplit(".", 1)
    if module in ("quant_conv", "post_quant_conv") or re.fullmatch(r"(en|de)coder\.conv_(in|out)", module):
      new = key
    elif m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out", module):
      new = f"{m[1]}.norm_out.{leaf}"
    elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
      new = f"encoder.down.{m[1]}.block.{m[2]}.{VAE_RESNET[m[3]]}.{leaf}"
    elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
      new = f"encoder.down.{m[1]}.downsample.conv.{leaf}"
    elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
      new = f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{VAE_RESNET[m[3]]}.{leaf}"
    elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
      new = f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{leaf}"
    elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)", module):
      new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{VAE_RESNET[m[3]]}.{leaf}"
    elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)",
                           module):
      new = f"{m[1]}.mid.attn_1.{VAE_ATTN[m[2]]}.{leaf}"
      if m[2] != "group_norm" and leaf == "weight":
        value = value[:, :, None, None]  # taming's AttnBlock uses 1x1 convolutions
    else:
      raise KeyError(f"vae key without an LDM name: {key}")
    out[prefix + new] = value
  return out


def clip_to_ldm(sd, prefix):
  out = {prefix + k: v for k, v in sd.items()}
  positions = sd["text_model.embeddings.position_embedding.weight"].shape[0]
  out[prefix + "text_model.embeddings.position_ids"] = torch.arange(positions)[None]  # a buffer in real files
  return out


OPENCLIP_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                  "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def openclip_to_ldm(sd, prefix, projection, extra_block, new):
  """transformers CLIP text keys -> OpenCLIP's. `extra_block`: index of a last block to append (SD 2.x: the
  block diffusers drops); `new(shape)` makes the tensors that only the LDM file has."""
  out, fused = {}, {}
  for key, value in sd.items():
    if key == "text_projection.weight":
      new_key = "text_projection"
      value = value.T.contiguous()  # OpenCLIP computes x @ P
    elif key == "text_model.embeddings.position_embedding.weight":
      new_key = "positional_embedding"
    elif key == "text_model.embeddings.token_embedding.weight":
      new_key = "token_embedding.weight"
    elif m := re.fullmatch(r"text_model\.final_layer_norm\.(\w+)", key):
      new_key = f"ln_final.{m[1]}"
    elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(\w+)", key):
      fused.setdefault((int(m[1]), m[3]), {})[m[2]] = value
      continue
    elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(\w+)", key):
      new_key = f"transformer.resblocks.{m[1]}.{OPENCLIP_BLOCK[m[2]]}.{m[3]}"
    else:
      raise KeyError(f"text key without an OpenCLIP name: {key}")
    out[prefix + new_key] = value
  for (layer, leaf), qkv in fused.items():
    out[prefix + f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
  if extra_block is not None:  # shaped like block 0
    for key in [k for k in out if k.startswith(prefix + "transformer.resblocks.0.")]:
      out[key.replace("resblocks.0.", f"resblocks.{extra_block}.")] = new(out[key].shape)
  if not projection:  # SD 2.x: OpenCLIP has a projection that CLIPTextModel does not use
    hidden = out[prefix + "ln_final.weight"].shape[0]
    out[prefix + "text_projection"] = new((hidden, hidden))
  out[prefix + "logit_scale"] = new(())
  return out


# --- building and verifying -----------------------------------------------------------------------------

TEXT_PREFIX = {  # model type -> [(component, LDM prefix, style)]
    "sd1": [("text_encoder", "cond_stage_model.transformer.", "clip")],
    "sd2": [("text_encoder", "cond_stage_model.model.", "openclip")],
    "sdxl": [("text_encoder", "conditioner.embedders.0.transformer.", "clip"),
             ("text_encoder_2", "conditioner.embedders.1.model.", "openclip_proj")],
}


def text_state_dict(model):
  sd = model.state_dict()
  if not any(k.startswith("text_model.") for k in sd):  # transformers >= 5.6 flattens CLIPTextModel
    sd = {"text_model." + k: v for k, v in sd.items()}
  return sd


def build(kind, configs, seed=None):
  """Models from `configs` (random values from `seed`, or on the meta device when seed is None), their
  state dicts and the LDM single-file dict holding the same tensors."""
  meta = seed is None
  g = torch.Generator().manual_seed(0 if meta else seed + 1000)
  new = (lambda shape: torch.empty(shape, device="meta")) if meta else (lambda shape: torch.randn(shape, generator=g))
  with torch.device("meta") if meta else contextlib.nullcontext():
    models = {"unet": UNet2DConditionModel.from_config(configs["unet"]),
              "vae": AutoencoderKL.from_config(configs["vae"])}
    for component, _, style in TEXT_PREFIX[kind]:
      cls = CLIPTextModelWithProjection if style == "openclip_proj" else CLIPTextModel
      models[component] = cls(CLIPTextConfig.from_dict(configs[component]))
  if not meta:
    for i, model in enumerate(models.values()):
      randomize(model, seed + i)
  expected = {c: text_state_dict(m) if c.startswith("text") else m.state_dict() for c, m in models.items()}
  ldm = {**unet_to_ldm(expected["unet"], configs["unet"]), **vae_to_ldm(expected["vae"], configs["vae"])}
  for component, prefix, style in TEXT_PREFIX[kind]:
    if style == "clip":
      ldm.update(clip_to_ldm(expected[component], prefix))
    else:
      extra = configs[component]["num_hidden_layers"] if style == "openclip" else None
      ldm.update(openclip_to_ldm(expected[component], prefix, style == "openclip_proj", extra, new))
  for key in SCHEDULE_KEYS:
    ldm[key] = new((10,))  # 1000 entries in real files
  ldm["model_ema.decay"] = new(())
  ldm["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32, device="meta" if meta else "cpu")
  return models, expected, ldm


def check_equal(what, converted, expected, extra=lambda k: False):
  """`converted` reproduces `expected` (exactly; shapes only on the meta device); keys only in `converted`
  must satisfy `extra`."""
  missing = sorted(set(expected) - set(converted))
  surplus = sorted(k for k in set(converted) - set(expected) if not extra(k))
  assert not missing and not surplus, f"{what}: missing {missing[:5]}, surplus {surplus[:5]}"
  for k, v in expected.items():
    assert tuple(converted[k].shape) == tuple(v.shape), f"{what}: {k} has shape {converted[k].shape}, not {v.shape}"
    assert v.is_meta or torch.equal(converted[k], v), f"{what}: {k} differs"
  print(f"  {what}: {len(expected)} arrays reproduced " + ("(shapes)" if v.is_meta else "exactly"))


def verify_with_diffusers(kind, configs, models, expected, ldm):
  """diffusers' own single-file converters read the LDM dict back into every original tensor."""
  print(" diffusers.loaders.single_file_utils:")
  check_equal("unet", sfu.convert_ldm_unet_checkpoint(ldm, configs["unet"]), expected["unet"])
  check_equal("vae", sfu.convert_ldm_vae_checkpoint(ldm, configs["vae"]), expected["vae"])
  position_ids = lambda k: k == "text_model.embeddings.position_ids"  # a buffer transformers no longer saves
  if kind == "sd2":
    # diffusers drops ViT-H's block 23 by name; in the tiny model the dropped block has a smaller index.
    dropped = f"text_model.encoder.layers.{configs['text_encoder']['num_hidden_layers']}."
    converted = sfu.convert_open_clip_checkpoint(models["text_encoder"], ldm, prefix="cond_stage_model.model.")
    check_equal("text_encoder", converted, expected["text_encoder"], lambda k: k.startswith(dropped))
  else:
    check_equal("text_encoder", sfu.convert_ldm_clip_checkpoint(ldm), expected["text_encoder"], position_ids)
  if kind == "sdxl":
    converted = sfu.convert_open_clip_checkpoint(models["text_encoder_2"], ldm, prefix="conditioner.embedders.1.model.")
    check_equal("text_encoder_2", converted, expected["text_encoder_2"])
  for component, model in models.items():  # the expected state dicts load strictly into the models
    sd = expected[component]
    if component.startswith("text") and not any(k.startswith("text_model.") for k in model.state_dict()):
      sd = {k[len("text_model."):]: v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)


def verify_with_sdjax(kind, configs, expected, ldm):
  """sdjax's numpy converter on shape-only arrays (zero-stride views, no memory) of a full-size file."""
  from sdjax.convert.single_file import ldm_to_diffusers  # pylint: disable=import-outside-toplevel
  arrays = {k: np.broadcast_to(np.zeros((), np.float32), tuple(v.shape)) for k, v in ldm.items()}
  components, ignored = ldm_to_diffusers(arrays, unet_config=configs["unet"], vae_config=configs["vae"],
                                         text_encoder_config=configs["text_encoder"])
  print(f" sdjax.convert.single_file ({len(ignored)} keys ignored):")
  assert set(components) == set(expected), sorted(components)
  for component, sd in expected.items():
    check_equal(component, {k: torch.empty(v.shape, device="meta") for k, v in components[component].items()}, sd)


def numpy_dict(sd):
  return {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in sd.items()}


def tiny_configs(kind):
  configs = {"unet": json.loads(UNet2DConditionModel(**UNETS[kind]).to_json_string()),  # as in config.json
             "vae": json.loads(AutoencoderKL(**VAES[kind]).to_json_string())}
  for component, kwargs in TEXT[kind]:
    configs[component] = json.loads(CLIPTextConfig(**_CLIP, **kwargs).to_json_string(use_diff=True))
  return configs


def write_fixtures():
  os.makedirs(OUT, exist_ok=True)
  for i, kind in enumerate(("sd1", "sd2", "sdxl")):
    print(f"{kind} (tiny fixture)")
    configs = tiny_configs(kind)
    models, expected, ldm = build(kind, configs, seed=10 * i)
    verify_with_diffusers(kind, configs, models, expected, ldm)
    files = {f"{kind}.safetensors": numpy_dict(ldm)}
    files.update({f"{kind}.{c}.safetensors": numpy_dict(sd) for c, sd in expected.items()})
    for name, arrays in files.items():
      save_file(arrays, os.path.join(OUT, name))
    for component, config in configs.items():
      with open(os.path.join(OUT, f"{kind}.{component}.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    print("  wrote " + ", ".join(f"{n} {os.path.getsize(os.path.join(OUT, n)) / 1024:.0f} KiB" for n in files))


def check_full_size():
  """The packaged default configs at full size: diffusers and sdjax agree on every key and shape."""
  from sdjax.convert.single_file import default_configs  # pylint: disable=import-outside-toplevel
  for name in ("sd1", "sd2", "sd2_v", "sdxl"):
    configs = default_configs(name)
    kind = "sd2" if name == "sd2_v" else name
    print(f"{name} (full size, meta tensors)")
    models, expected, ldm = build(kind, configs)
    counts = ", ".join(f"{c} {sum(p.numel() for p in m.parameters()):,}" for c, m in models.items())
    print(f"  parameters: {counts}; LDM file: {len(ldm)} keys")
    verify_with_diffusers(kind, configs, models, expected, ldm)
    verify_with_sdjax(kind, configs, expected, ldm)


if __name__ == "__main__":
  if "--full-size" in sys.argv[1:]:
    check_full_size()
  else:
    write_fixtures()
