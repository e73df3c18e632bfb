"""Stage 2 of "Stable Diffusion from scratch": a text-conditioned latent diffusion U-Net on the coloured,
captioned digits ("a red 7 on a black background", sdjax.data.colored_digits), on the latents of the VAE of
configs/vae_digits.py, conditioned through cross-attention on a frozen CLIP text encoder, with classifier-free
guidance learnt by caption dropout.

  python -m sdjax.convert.random runs/tiny_sd1 --tokenizer tests/fixtures/models/tokenizer  # the text encoder
  python train.py --config configs/vae_digits.py --workdir runs/vae_digits                  # stage 1
  python -m sdjax.data.cache_latents --source colored_digits --vae runs/vae_digits/vae --resolution 32 \
      --output runs/colored_digits_z                                                        # latents, once
  python train.py --config configs/ldm_digits.py --workdir runs/ldm_digits                  # stage 2
  python sample.py --workdir runs/ldm_digits --prompt "a red 7 on a black background" --num_per_prompt 8 \
      --height 32 --width 32 --outdir out/red7

The text encoder is the random tiny CLIP of runs/tiny_sd1 (SD 1.x's architecture, 16 wide, frozen random
weights): bench/digits_demo.py shows that its features still tell all 80 captions apart. Five (digit, colour)
pairs never occur in training (sdjax.data.colored_digits.HELD_OUT), to measure compositional generalisation.
Stage 2 reads the cached VAE posteriors (a fresh latent is drawn from each every epoch) with their captions;
`--config.data.source=colored_digits` instead encodes the images inside the step (slower, same model).
"""
import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "ldm"
  c.pretrained = ""
  c.frozen = common.frozen(from_pipeline="runs/tiny_sd1", vae="runs/vae_digits/vae")
  c.data = common.text_data(source="latents", path="runs/colored_digits_z", caption_dropout=0.1)
  # The U-Net on 8x8x4 latents; cross-attention to the 16-wide text features at both levels.
  c.model = common.unet(
      in_channels=4,
      out_channels=4,
      block_out_channels=(32, 64),
      layers_per_block=2,
      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
      attention_head_dim=4,
      cross_attention_dim=16,
      num_class_embeds=None,
      norm_num_groups=16)
  c.diffusion = common.diffusion(  # Stable Diffusion's schedule
      beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
  c.loss = common.loss()
  c.lora = common.lora()
  c.optim = common.optim(lr=1e-3)
  c.train = common.train(num_steps=3000, ema_decay=0.999, cond_drop_prob=0.0, checkpoint_every=500,
                         sample_every=1000)
  c.sample = common.sample_prompts(
      guidance_scale=4.0, per_prompt=4,
      prompts=("a red 7 on a black background", "a blue 3 on a white background",
               "a green 0 on a black background", "a yellow 8 on a white background",
               "a red 0 on a white background"))  # the last: a held-out (digit, colour) pair
  with c.sample.unlocked():
    c.sample.size = 32        # image side of the grids (the cached latents do not say)
  c.eval = common.evaluation()  # off; bench/digits_demo.py judges the samples
  c.mesh = common.mesh()

  if arg == "tiny":
    common.tiny_run(c)
    c.frozen.vae = ""         # the random tiny pipeline's VAE: a smoke test, not pictures
    c.data.source = "colored_digits"  # images encoded in the step: no cache to make first
    c.data.path = ""
    c.model.block_out_channels = (16, 32)
    c.model.layers_per_block = 1
    c.model.attention_head_dim = 2
    c.model.norm_num_groups = 8
    c.sample = common.sample_prompts(tiny=True, prompts=("a red 7 on a black background",
                                                         "a blue 3 on a white background"))
  elif arg:
    raise ValueError(f"configs/ldm_digits.py: unknown variant {arg!r}; expected 'tiny' or nothing")
  return c.lock()
