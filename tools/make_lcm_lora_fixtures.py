"""Regenerate tests/fixtures/lcm_lora/: tiny random LCM-LoRAs in the published files' format, and diffusers' outputs.

  pip install torch==2.13.0 "diffusers==0.42.*" transformers peft && python tools/make_lcm_lora_fixtures.py

The published LCM-LoRAs (latent-consistency/lcm-lora-sdv1-5, lcm-lora-sdxl: `pytorch_lora_weights.safetensors`)
were trained by diffusers' examples/consistency_distillation/train_lcm_distill_lora_sd(xl)_wds.py as of their
release (diffusers db2d8e76f8, Nov 2023) and saved with its `get_module_kohya_state_dict`: kohya keys with
diffusers' U-Net module names, `lora_unet_<module, . -> _>.lora_down.weight` [r, in(, kh, kw)],
`.lora_up.weight` [out, r(, 1, 1)] and a scalar `.alpha` per layer, float16, U-Net only. Their LoraConfig had
r = --lora_rank (default 64) and no lora_alpha (peft's default 8: scale alpha / r = 1/8), with the target modules
TARGETS below (every attention projection, proj_in/out, the feed-forward, every resnet conv, conv_shortcut and
time_emb_proj, the down/upsampler convs). 64 x those modules in float16 is 134.5 MB for SD 1.5's U-Net and
393.5 MB for SDXL's: the published files' sizes (135 MB, 394 MB).

Here, the tiny random SD 1.x and SDXL pipelines of `sdjax.convert.random.write_random_pipeline` (seed 0; the test
rebuilds them in memory with `random_pipeline`) get such a LoRA with rank 4 and alpha 0.5 (the published 1/8),
written in that format (float16, same key names, one alpha per layer) as <model>/pytorch_lora_weights.safetensors.
diffusers loads each with `pipe.load_lora_weights(folder)` (its kohya path; the script checks that every
target module got its LoRA layer), `fuse_lora()`, and samples with `LCMScheduler.from_config(pipe.scheduler.config)`
as the LCM-LoRA model cards do, 4 steps, 32x32 images, given starting latents. reference.npz holds per case C:
C.prompt / C.negative (strings), C.guidance, C.noise (the `latents=` fed to diffusers, NHWC), C.step_noise
([steps, B, h, w, c]: the noise LCMScheduler.step drew, zeros for the last step, which draws none), C.latents
(output_type="latent", NHWC), C.image (NHWC in [-1, 1]), C.scheduler (the LCMScheduler config, JSON); and the
SD 1.x U-Net's output at one input (unet.x, unet.t, unet.context; unet.base without the LoRA, unet.fused with it).

Cases: sd1_w1 (two prompts, guidance 1.0: no classifier-free guidance, the LCM-LoRA default), sd1_w15 (two
prompts with negative prompts, guidance 1.5: classifier-free guidance, as diffusers' LCM-LoRA guide allows 1-2),
sdxl_w1 (SDXL, two prompts, guidance 1.0).
"""
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
import diffusers
from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from sdjax.convert.random import write_random_pipeline  # noqa: E402

TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "models", "tokenizer")
OUT = os.path.join(ROOT, "tests", "fixtures", "lcm_lora")
SIZE, STEPS, RANK, ALPHA = 32, 4, 4, 0.5
# train_lcm_distill_lora_sd_wds.py / _sdxl_wds.py: LoraConfig(target_modules=...), matched as peft does (the
# module name equals a target or ends with "." + target).
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
           "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
PROMPTS = ["a photo of a cat", "an astronaut riding a horse"]
CASES = [("sd1_w1", "sd1", PROMPTS, ["", ""], 1.0), ("sd1_w15", "sd1", PROMPTS, ["blurry", "ugly"], 1.5),
         ("sdxl_w1", "sdxl", ["a bowl of fruit", "a red car"], ["", ""], 1.0)]


def nhwc(a):
  return a.permute(0, 2, 3, 1).numpy()


def targets(unet):
  return {n: m for n, m in unet.named_modules()
          if any(n == t or n.endswith("." + t) for t in TARGETS) and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def lcm_lora(unet, gen):
  """kohya keys as get_module_kohya_state_dict writes them (float16, scalar alpha per layer). up ~ N(0, 1.5^2) and
  down ~ N(0, 1/fan_in) so that the 1/8-scaled update is of the order of the weights (the LoRA moves the outputs)."""
  out = {}
  for name, m in sorted(targets(unet).items()):
    if isinstance(m, torch.nn.Conv2d):
      down_shape, up_shape = (RANK, m.in_channels, *m.kernel_size), (m.out_channels, RANK, 1, 1)
    else:
      down_shape, up_shape = (RANK, m.in_features), (m.out_features, RANK)
    fan_in = int(np.prod(down_shape[1:]))
    key = "lora_unet_" + name.replace(".", "_")
    out[f"{key}.lora_down.weight"] = (torch.randn(down_shape, generator=gen) / fan_in ** 0.5).half()
    out[f"{key}.lora_up.weight"] = (1.5 * torch.randn(up_shape, generator=gen)).half()
    out[f"{key}.alpha"] = torch.tensor(ALPHA).half()
  return out


def scheduler_config(scheduler) -> dict:
  config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
  return {"_class_name": type(scheduler).__name__, **config}


def load_lora(pipe, model_type):
  """Write the LoRA, load it into `pipe` (checking every target got its layer) and fuse it."""
  folder = os.path.join(OUT, model_type)
  os.makedirs(folder)
  tensors = lcm_lora(pipe.unet, torch.Generator().manual_seed(1 + (model_type == "sdxl")))
  save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, "pytorch_lora_weights.safetensors"))
  want = set(targets(pipe.unet))
  pipe.load_lora_weights(folder)
  got = {n for n, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)}
  assert got == want, sorted(want ^ got)
  kinds = sorted({type(m.base_layer).__name__ for n, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)})
  print(f"{model_type}: {len(got)} LoRA layers ({', '.join(kinds)}), {len(tensors)} tensors, "
        f"{os.path.getsize(os.path.join(folder, 'pytorch_lora_weights.safetensors')) / 1024:.0f} KiB")
  pipe.fuse_lora()
  pipe.unload_lora_weights()  # the fused weights stay


def render(pipe, name, prompts, negatives, guidance, seed):
  rng = np.random.default_rng(seed)
  latent = SIZE // pipe.vae_scale_factor
  noise = rng.standard_normal((len(prompts), pipe.unet.config.in_channels, latent, latent)).astype(np.float32)
  module = diffusers.schedulers.scheduling_lcm
  original = module.randn_tensor
  out = {}
  for output_type in ("latent", "np"):
    drawn, gen = [], torch.Generator().manual_seed(seed)

    def recording_randn(shape, *args, **kwargs):
      z = torch.randn(shape, generator=gen)
      drawn.append(z.permute(0, 2, 3, 1).numpy())
      return z

    module.randn_tensor = recording_randn
    try:
      with torch.no_grad():
        result = pipe(prompt=prompts, negative_prompt=negatives, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                      guidance_scale=guidance, latents=torch.from_numpy(noise), output_type=output_type).images
    finally:
      module.randn_tensor = original
    assert len(drawn) == STEPS - 1, len(drawn)
    out[output_type] = (result, drawn)
  latents = nhwc(out["latent"][0])
  image = np.asarray(out["np"][0], np.float32) * 2 - 1
  step_noise = np.stack(out["np"][1] + [np.zeros_like(out["np"][1][0])])
  np.testing.assert_array_equal(step_noise[:-1], np.stack(out["latent"][1]))
  print(f"{name}: guidance {guidance}, latents std {latents.std():.3f}, images {image.shape} in "
        f"[{image.min():.3f}, {image.max():.3f}], std {image.std():.3f}")
  return {f"{name}.prompt": np.asarray(prompts), f"{name}.negative": np.asarray(negatives),
          f"{name}.guidance": np.float32(guidance), f"{name}.noise": noise.transpose(0, 2, 3, 1),
          f"{name}.step_noise": step_noise, f"{name}.latents": latents, f"{name}.image": image,
          f"{name}.scheduler": np.asarray(json.dumps(scheduler_config(pipe.scheduler)))}


def unet_outputs(pipe, seed=5):
  rng = np.random.default_rng(seed)
  x = torch.from_numpy(rng.standard_normal((2, 4, 8, 8)).astype(np.float32))
  t = torch.tensor([999.0, 259.0])
  context = torch.from_numpy(rng.standard_normal((2, 5, pipe.unet.config.cross_attention_dim)).astype(np.float32))
  with torch.no_grad():
    y = pipe.unet(x, t, encoder_hidden_states=context).sample
  return {"unet.x": nhwc(x), "unet.t": t.numpy(), "unet.context": context.numpy()}, nhwc(y)


def main():
  torch.manual_seed(0)
  shutil.rmtree(OUT, ignore_errors=True)
  os.makedirs(OUT)
  arrays = {"cases": np.asarray(json.dumps([c[0] for c in CASES])), "rank": np.int32(RANK),
            "alpha": np.float32(ALPHA), "targets": np.asarray(TARGETS)}
  with tempfile.TemporaryDirectory() as tmp:
    for model_type, cls in (("sd1", StableDiffusionPipeline), ("sdxl", StableDiffusionXLPipeline)):
      folder = os.path.join(tmp, model_type)
      write_random_pipeline(folder, model_type, tokenizer=TOKENIZER, seed=0)
      kwargs = {"safety_checker": None, "requires_safety_checker": False} if model_type == "sd1" else {}
      pipe = cls.from_pretrained(folder, local_files_only=True, **kwargs)
      pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
      pipe.set_progress_bar_config(disable=True)
      if model_type == "sd1":
        inputs, base = unet_outputs(pipe)
      load_lora(pipe, model_type)
      if model_type == "sd1":
        _, fused = unet_outputs(pipe)
        arrays.update(inputs, **{"unet.base": base, "unet.fused": fused})
        print(f"sd1 U-Net: the LoRA moves the output by {np.abs(fused - base).max():.3f} (|out| max "
              f"{np.abs(fused).max():.3f})")
      for i, (name, mt, prompts, negatives, guidance) in enumerate(CASES):
        if mt == model_type:
          arrays.update(render(pipe, name, prompts, negatives, guidance, seed=10 + i))
  np.savez_compressed(os.path.join(OUT, "reference.npz"), **arrays)
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
  print(f"wrote {OUT} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
  main()
