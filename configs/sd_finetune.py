"""Fine-tune a diffusers-format Stable Diffusion checkpoint (SD 1.x / 2.x / SDXL) on an image-caption
folder: the whole U-Net, or LoRA on its attention projections (lora.rank > 0). VAE and text encoder(s)
stay frozen; the noise schedule is the checkpoint's.

  python -m sdjax.data.prepare --input my_images/ --output data/mine      # captions from .txt sidecars
  python train.py --config configs/sd_finetune.py --config.pretrained=/models/sd15 \\
      --config.data.path=data/mine --workdir runs/sd15_mine
  python train.py --config configs/sd_finetune.py:lora --config.pretrained=/models/sd15 \\
      --config.data.path=data/mine --workdir runs/sd15_lora
  python train.py --config configs/sd_finetune.py:tiny --workdir runs/finetune_tiny   # seconds, after
      python -m sdjax.convert.random runs/tiny_sd1 --tokenizer tests/fixtures/models/tokenizer
  python sample.py --workdir runs/sd15_mine --prompts prompts.txt --outdir out/

Variants: "" full fine-tuning, "lora", "tiny" and "tiny_lora" (the random tiny pipeline on the shapes data).
"""
import ml_collections

from configs import ldm_shapes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or ""
  tiny = variant.startswith("tiny")
  if variant not in ("", "lora", "tiny", "tiny_lora"):
    raise ValueError(f"configs/sd_finetune.py: unknown variant {arg!r}; expected '', 'lora', 'tiny' or 'tiny_lora'")
  c = ldm_shapes.get_config("tiny" if tiny else None).unlock()
  c.pretrained = "runs/tiny_sd1" if tiny else ""   # required: the diffusers folder to fine-tune
  c.frozen.from_pipeline = ""      # VAE, text encoder(s), tokenizer(s): those of `pretrained`
  c.frozen.vae = ""
  del c["diffusion"]               # the checkpoint's scheduler_config.json
  c.model = ml_collections.ConfigDict()
  c.model.dtype = "float32"        # compute dtype of the U-Net (bfloat16 on accelerators)
  c.model.remat = False            # rematerialise blocks (less memory, ~30% more compute)

  if not tiny:
    c.data.source = "records"      # python -m sdjax.data.prepare
    c.data.path = ""
    c.data.resolution = 512
    c.data.crop = "random"
    c.data.random_flip = True
    c.data.max_length = 77
    c.train.batch_size = 8
    c.train.num_steps = 2000
    c.train.ema_decay = 0.9999
    c.train.checkpoint_every = 250
    c.train.sample_every = 250
    c.optim.lr = 1e-5
    c.optim.weight_decay = 1e-2
    c.optim.warmup_steps = 100
    c.optim.schedule = "constant"
    c.sample.num_steps = 25
    c.sample.guidance_scale = 7.5
    c.sample.prompts = ("a photo of a cat", "a painting of a lighthouse at dusk")
    c.sample.per_prompt = 2
  if variant.endswith("lora"):
    c.lora.rank = 4 if tiny else 16
    c.lora.alpha = 0.0
    c.optim.lr = 1e-3 if tiny else 1e-4
  return c.lock()
