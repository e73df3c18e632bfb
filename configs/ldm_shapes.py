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

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "ldm"
  c.pretrained = ""           # a diffusers SD folder to fine-tune (configs/sd_finetune.py); "": from scratch
  c.frozen = common.frozen(from_pipeline="runs/tiny_sd1", vae="runs/vae_shapes/vae")
  c.data = common.text_data()
  # The U-Net on latents (in/out = the VAE's latent channels, cross-attention = the text encoder's width).
  c.model = common.unet(
      in_channels=4,
      out_channels=4,
      block_out_channels=(32, 64, 64),
      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
      cross_attention_dim=16,
      num_class_embeds=None,
      norm_num_groups=16)
  c.diffusion = common.diffusion(  # Stable Diffusion's schedule
      beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
  c.loss = common.loss()
  c.lora = common.lora()
  c.optim = common.optim(lr=1e-3)
  c.train = common.train(num_steps=3000, ema_decay=0.999, cond_drop_prob=0.0, checkpoint_every=500,
                         sample_every=500)
  c.sample = common.sample_prompts()
  # Off: needs Inception weights (and statistics of real shapes images) and a CLIP model folder.
  c.eval = common.evaluation(num_samples=1000, batch_size=100, sampler="ddim", steps=25, guidance=3.0,
                             metrics=("fid", "clip_score"), features="inception")
  c.mesh = common.mesh()

  if arg == "tiny":
    common.tiny_run(c)
    c.frozen.vae = ""         # the random tiny pipeline's VAE: a smoke test, not pictures
    c.model.block_out_channels = (16, 32)
    c.model.down_block_types = ("CrossAttnDownBlock2D", "DownBlock2D")
    c.model.up_block_types = ("UpBlock2D", "CrossAttnUpBlock2D")
    c.model.attention_head_dim = 2
    c.model.norm_num_groups = 8
    c.sample = common.sample_prompts(tiny=True)
  elif arg:
    raise ValueError(f"configs/ldm_shapes.py: unknown variant {arg!r}; expected 'tiny' or nothing")
  return c.lock()
