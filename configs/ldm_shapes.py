"""Text-conditioned latent diffusion from scratch on the procedural shapes dataset ("a red circle", ...),
with a frozen VAE and CLIP text encoder.

  python -m sdjax.convert.random runs/tiny_sd1 --tokenizer tests/fixtures/models/tokenizer  # frozen parts
  python train.py --config configs/vae_shapes.py --workdir runs/vae_shapes                  # the VAE (optional)
  python train.py --config configs/ldm_shapes.py --workdir runs/ldm_shapes
  python train.py --config configs/ldm_shapes.py:tiny --workdir runs/ldm_tiny               # seconds
  python sample.py --workdir runs/ldm_shapes --prompt "a red circle" --num_per_prompt 4

The VAE is `frozen.vae` (default: the shapes VAE trained by configs/vae_shapes.py); the text encoder and
tokenizer come from `frozen.from_pipeline` (a random tiny CLIP here: frozen random features still tell the
captions apart). With a real Stable Diffusion folder as `frozen.from_pipeline` (and `frozen.vae=""`), the same
config trains on its VAE latents and CLIP text features (then set model.cross_attention_dim to its width).
Cached latents: `python -m sdjax.data.cache_latents` then data.source="latents", data.path=<cache>.
"""
import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = default.get_config().unlock()
  c.task = "ldm"
  c.pretrained = ""                # a diffusers SD folder to fine-tune (configs/sd_finetune.py); "": from scratch
  c.frozen = ml_collections.ConfigDict()
  c.frozen.from_pipeline = "runs/tiny_sd1"   # diffusers folder: text_encoder/, tokenizer/ (and vae/ if vae="")
  c.frozen.vae = "runs/vae_shapes/vae"       # a diffusers AutoencoderKL folder (a task=vae run's <workdir>/vae)
  c.frozen.text_encoder = ""                 # "": <from_pipeline>/text_encoder
  c.frozen.text_encoder_2 = ""               # SDXL-style second encoder

  c.data.source = "shapes"         # 4,096 procedural captioned images, 32x32
  c.data.name = ""
  c.data.resolution = 32
  c.data.num_classes = 0
  c.data.random_flip = False       # "triangle" is not flip-symmetric in general; keep the data as drawn
  c.data.caption_dropout = 0.1     # empty caption for classifier-free guidance
  c.data.max_length = 16

  # The U-Net on latents (in/out = the VAE's latent channels, cross-attention = the text encoder's width).
  c.model.in_channels = 4
  c.model.out_channels = 4
  c.model.block_out_channels = (32, 64, 64)
  c.model.layers_per_block = 1
  c.model.down_block_types = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
  c.model.up_block_types = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
  c.model.attention_head_dim = 4
  c.model.cross_attention_dim = 16
  c.model.num_class_embeds = None
  c.model.norm_num_groups = 16

  c.diffusion.beta_schedule = "scaled_linear"   # Stable Diffusion's schedule
  c.diffusion.beta_start = 0.00085
  c.diffusion.beta_end = 0.012
  c.diffusion.clip_sample = False

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0                  # > 0: LoRA on the attention projections (needs pretrained)
  c.lora.alpha = 0.0               # 0: = rank
  c.lora.targets = ("to_q", "to_k", "to_v", "to_out_0")

  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.train.batch_size = 64
  c.train.num_steps = 3000
  c.train.cond_drop_prob = 0.0     # labels: none; captions are dropped by data.caption_dropout
  c.train.ema_decay = 0.999
  c.train.checkpoint_every = 500
  c.train.sample_every = 500

  del c.sample["per_class"]
  c.sample.sampler = "ddim"
  c.sample.num_steps = 25
  c.sample.guidance_scale = 3.0
  c.sample.prompts = ("a red circle", "a green square", "a blue triangle", "a yellow circle")
  c.sample.per_prompt = 4          # grid columns

  if arg == "tiny":
    c.frozen.vae = ""              # the random tiny pipeline's VAE: a smoke test, not pictures
    c.model.block_out_channels = (16, 32)
    c.model.down_block_types = ("CrossAttnDownBlock2D", "DownBlock2D")
    c.model.up_block_types = ("UpBlock2D", "CrossAttnUpBlock2D")
    c.model.attention_head_dim = 2
    c.model.norm_num_groups = 8
    c.train.batch_size = 16
    c.train.num_steps = 6
    c.train.log_every = 2
    c.train.checkpoint_every = 3
    c.train.sample_every = 0
    c.optim.warmup_steps = 2
    c.sample.num_steps = 3
    c.sample.per_prompt = 2
    c.sample.prompts = ("a red circle", "a blue square")
  elif arg:
    raise ValueError(f"configs/ldm_shapes.py: unknown variant {arg!r}; expected 'tiny' or nothing")
  return c.lock()
