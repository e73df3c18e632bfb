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

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or ""
  tiny = variant.startswith("tiny")
  if variant not in ("", "lora", "tiny", "tiny_lora"):
    raise ValueError(f"configs/sd_finetune.py: unknown variant {arg!r}; expected '', 'lora', 'tiny' or 'tiny_lora'")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "ldm"
  c.pretrained = "runs/tiny_sd1" if tiny else ""   # required: the diffusers folder to fine-tune
  c.frozen = common.frozen()  # VAE, text encoder(s), tokenizer(s): those of `pretrained`
  # No diffusion section: the noise schedule is the checkpoint's scheduler_config.json.
  c.model = common.unet_compute()  # the architecture is the checkpoint's
  c.loss = common.loss()
  c.lora = common.lora()
  c.mesh = common.mesh()
  # Off: needs Inception weights, reference statistics, a CLIP model folder and eval.prompts.
  c.eval = common.evaluation(num_samples=1000, batch_size=8, sampler="ddim", steps=25, guidance=7.5,
                             metrics=("fid", "clip_score"), features="inception")
  if tiny:                    # configs/ldm_shapes.py:tiny's data and run
    c.data = common.text_data()
    c.optim = common.optim(lr=1e-3)
    c.train = common.train(ema_decay=0.999, cond_drop_prob=0.0)
    c.sample = common.sample_prompts(tiny=True)
    common.tiny_run(c)
  else:
    c.data = common.text_data(source="records", resolution=512, crop="random", random_flip=True, max_length=77)
    c.optim = common.optim(lr=1e-5, schedule="constant", weight_decay=1e-2)
    c.train = common.train(batch_size=8, num_steps=2000, ema_decay=0.9999, cond_drop_prob=0.0, checkpoint_every=250,
                           sample_every=250)
    c.sample = common.sample_prompts(guidance_scale=7.5, per_prompt=2,
                                     prompts=("a photo of a cat", "a painting of a lighthouse at dusk"))
  if variant.endswith("lora"):
    c.lora.rank = 4 if tiny else 16
    c.optim.lr = 1e-3 if tiny else 1e-4
  return c.lock()
