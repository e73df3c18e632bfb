"""The MLPerf Training stable_diffusion reference recipe (SD 2 U-Net from scratch, 512 px, v-prediction) as an
sdjax latent diffusion job on cached VAE moments and cached OpenCLIP ViT-H/14 text embeddings.

  # frozen parts: a diffusers SD 2 base folder, its U-Net unused (stabilityai/stable-diffusion-2-base holds the
  # 512-base-ema.ckpt the reference loads its VAE and OpenCLIP encoder from, and its diffusers form)
  python -m sdjax.data.cache_latents --data data/laion-prepared --vae sd2-base/vae --resolution 512 \\
      --text_encoder sd2-base/text_encoder --tokenizer sd2-base/tokenizer --output data/laion-z
  python train.py --config configs/mlperf_sd2.py --config.frozen.from_pipeline=sd2-base \\
      --config.data.path=data/laion-z --config.train.batch_size=2048 --workdir runs/mlperf_sd2
  python train.py --config configs/mlperf_sd2.py:tiny --workdir runs/mlperf_tiny   # a minute on a CPU, after
      python -m sdjax.convert.random runs/tiny_sd2 --model_type sd2 --tokenizer tests/fixtures/models/tokenizer
      and a 16 px cache of any captioned records dir (python -m sdjax.data.prepare) in runs/mlperf_tiny_latents:
      python -m sdjax.data.cache_latents --data <records> --vae runs/tiny_sd2/vae --resolution 16 --dtype float32 \\
          --text_encoder runs/tiny_sd2/text_encoder --tokenizer runs/tiny_sd2/tokenizer \\
          --output runs/mlperf_tiny_latents
      (tests/test_mlperf_config.py builds both in-process from the shapes data)

Learning rate: the reference scales it linearly with the global batch, lr = base_learning_rate x global batch
with base_learning_rate 1.25e-7 (6.4e-5 at the reference's 512, 2.56e-4 at 2048). Here `optim.lr`,
`train.num_steps`, `train.checkpoint_every` and `train.sample_every` are ml_collections references to
`train.batch_size` (the global batch, gradient accumulation included): `--config.train.batch_size=N` moves
them all; setting one of them explicitly replaces its rule.

Facts of the reference: mlcommons/training, folder stable_diffusion/ at commit 46a0072512ab (the parent of
72f96848, which retired the benchmark); configs/train_32x08x02.yaml (x04, x08 and 01x08x08 differ only in
batch_size, num_nodes and val_check_interval) unless another file is named.
- U-Net (yaml l.56-73, ldm/modules/diffusionmodules/openaimodel.py): model_channels 320, channel_mult
  [1, 2, 4, 4], num_res_blocks 2, attention_resolutions [4, 2, 1] (cross-attention in the first three levels
  and the middle), num_head_channels 64 (5/10/20/20 heads), transformer_depth 1, use_linear_in_transformer
  True, context_dim 1024, legacy False: diffusers' SD 2 base UNet2DConditionModel (sdjax/convert/configs/sd2/
  unet.json), 865,910,724 params. Random init: load_unet False (l.23); README "The Model": "the UNet backbone
  ... initialized from random weights".
- GroupNorm: 16 groups in the res-blocks and the output norm (ldm/modules/diffusionmodules/util.py l.209;
  README: a deliberate deviation from SD 2's 32), 32 groups (eps 1e-6) in the transformers' input norm
  (ldm/modules/attention.py l.86).
- Objective: parameterization "v" (l.5; README: "the so-called v-objective"), plain MSE averaged over the
  latent (ldm/models/diffusion/ddpm.py l.71 loss_type l2, l.1136-1164: l_simple_weight 1, logvar 0,
  original_elbo_weight 0), t uniform in [0, 1000) (ddpm.py l.1091).
- Schedule: timesteps 1000, linear_start 0.00085, linear_end 0.012 (l.6-10) with ddpm.py's default
  beta_schedule "linear" (l.70), which is linspace(sqrt(start), sqrt(end))^2 (util.py l.20-24): diffusers'
  "scaled_linear".
- Latents: 512 x 512 x 3 images -> 64 x 64 x 4 (README "The Model"; image_size 64, channels 4). Trained on
  precomputed VAE moments (first_stage_type moments, l.12; README recommends the moments download), from which
  a latent is drawn at every step (ddpm.py l.1016-1018 and get_first_stage_encoding l.881-889), times
  scale_factor 0.18215 (l.19).
- Text: FrozenOpenCLIPEmbedder ViT-H-14 laion2b_s32b_b79k, layer "penultimate" (l.101-104; ldm/modules/
  encoders/modules.py l.32-69: 77 tokens, the 23rd of 24 blocks then ln_final, [77, 1024]), frozen
  (cond_stage_trainable false, l.16), run on the captions at every step: only the VAE side is precomputed.
- No conditioning dropout (no ucg_training in the yaml; ddpm.py l.101, l.547-553), no EMA (use_ema False, l.20).
- Optimizer: torch.optim.AdamW(params, lr) with its defaults, logged as beta1 0.9, beta2 0.999, eps 1e-8,
  weight_decay 0.01 (ddpm.py l.1629-1645); no gradient clipping (no gradient_clip_val in the trainer config).
- Learning rate: base_learning_rate 1.25e-7 (l.2), --scale_lr default True (main.py l.165-170):
  lr = accumulate_grad_batches x num_gpus x local_batch_size x base_lr (main.py l.636-642).
- Schedule of the lr: LambdaLinearScheduler, warm_up_steps 1000 from f_start 1e-6 to 1, then f_min = f_max =
  1 with a 1e13-step cycle, i.e. constant (l.47-54; ldm/lr_scheduler.py l.81-97).
- Batch: 2 images per GPU x 8 GPUs x 32 nodes = 512 (l.114, l.133-134; x04 = 1024, x08 = 2048, 01x08x08 = 64 on
  one node); fp16 mixed precision (precision 16, l.135; use_fp16 True); no activation checkpointing
  (use_checkpoint False, l.59).
- Training set: 6,513,144 LAION-400M images (main.py l.613); quality target FID <= 90 and CLIP >= 0.15 on 30,000
  COCO-2014 prompts, evaluated every 512,000 images (README "Quality"), sampled with DDIM 50 steps, eta 0, guidance
  8.0 (l.26-30). The README's convergence tables run to 5,120,000 images (10,000 iterations at 512).

What differs here, and why:
- Text embeddings are cached by sdjax.data.cache_latents (the text encoder's last hidden state, which for a
  diffusers SD 2 text_encoder is OpenCLIP's penultimate block + final norm: diffusers keeps 23 of its 24
  layers). The encoder is frozen and there is no caption dropout, so this equals encoding in the step.
- One GroupNorm group count for the whole U-Net (16, the reference's res-block value): sdjax's UNetConfig, like
  diffusers, has no separate one for the transformers' norms (32 in the reference). Parameter count unchanged.
- bfloat16 compute with float32 params instead of fp16 with a loss scaler; warm-up from 0 instead of 1e-6 x lr.
- Latent draws: a `--store dist` cache gives a fresh posterior draw per epoch (the reference: per step; the
  same thing, each example being seen once per epoch).
- Validation: sample grids of `sample.prompts` every 512,000 images; FID / CLIP on COCO is `config.eval`, off
  until its files are given; `train.num_steps` stops at 5,120,000 images instead of at the quality target.
"""
import ml_collections

from configs import common

BASE_LR = 1.25e-7               # per image of the global batch (reference: base_learning_rate)
WARMUP_STEPS = 1000             # reference: warm_up_steps, independent of the batch
TRAIN_IMAGES = 5_120_000        # the reference README's convergence tables (10,000 steps at batch 512)
EVAL_IMAGES = 512_000           # the reference's evaluation interval: checkpoints and sample grids
SD2_HEADS = (5, 10, 20, 20)     # 320/640/1280/1280 channels in heads of 64


def _per_images(images: int, batch: ml_collections.FieldReference) -> ml_collections.FieldReference:
  """ceil(images / global batch) steps, a reference that follows train.batch_size."""
  return -(-images // batch)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "tiny"):
    raise ValueError(f"configs/mlperf_sd2.py: unknown variant {arg!r}; expected 'tiny' or nothing")
  tiny = arg == "tiny"
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "ldm"
  c.pretrained = ""             # from scratch: the reference discards the checkpoint's U-Net
  # VAE, OpenCLIP text encoder and tokenizer: a diffusers SD 2 base folder (used for the sample grids; the
  # training batches hold cached latents and embeddings).
  c.frozen = common.frozen()
  # cache_latents output: posteriors ("dist") and prompt_embeds [77, 1024]; resolution and max_length are those
  # the cache was made with (latents come at their cached size).
  c.data = common.text_data(source="latents", path="", resolution=512, max_length=77, caption_dropout=0.0)
  c.model = common.unet(
      in_channels=4,
      out_channels=4,
      block_out_channels=(320, 640, 1280, 1280),
      layers_per_block=2,
      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
      mid_block_attention=True,
      cross_attention_dim=1024,
      num_class_embeds=None,
      norm_num_groups=16,
      dtype="bfloat16")
  with c.model.ignore_type():   # diffusers' attention_head_dim (= heads), per level
    c.model.attention_head_dim = SD2_HEADS
  with c.model.unlocked():
    c.model.use_linear_projection = True
    c.model.sample_size = 64    # latent side, recorded in the exported U-Net (sample.py's default size)
  c.diffusion = common.diffusion(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                 prediction_type="v_prediction", clip_sample=False)
  c.loss = common.loss()
  c.lora = common.lora()
  c.optim = common.optim(schedule="constant", warmup_steps=WARMUP_STEPS, b1=0.9, b2=0.999, eps=1e-8,
                         weight_decay=0.01, grad_clip=0.0)
  c.train = common.train(batch_size=512, ema_decay=0.0, ema_warmup=False, cond_drop_prob=0.0, log_every=100)
  batch = c.train.get_ref("batch_size")
  c.optim.lr = batch.to_float() * BASE_LR
  c.train.num_steps = _per_images(TRAIN_IMAGES, batch)
  c.train.checkpoint_every = _per_images(EVAL_IMAGES, batch)
  c.train.sample_every = _per_images(EVAL_IMAGES, batch)
  c.sample = common.sample_prompts(num_steps=50, guidance_scale=8.0, per_prompt=2, prompts=(
      "a photograph of an astronaut riding a horse", "a bowl of fruit on a wooden table"))
  with c.sample.unlocked():
    c.sample.size = 512         # image side of the grids (the cache has no image size)
  c.mesh = common.mesh()        # data parallel; --config.mesh.fsdp=N shards params and AdamW state
  # The reference's quality check (FID and CLIP score of 30,000 COCO-2014 captions, DDIM 50 steps, guidance 8.0),
  # off until given its files: eval.every_steps (e.g. that of EVAL_IMAGES), inception_weights, reference_stats
  # (COCO's), clip_model (ViT-H/14 in the reference), prompts (the 30,000 captions, one a line).
  c.eval = common.evaluation(num_samples=30_000, batch_size=512, sampler="ddim", steps=50, guidance=8.0,
                             metrics=("fid", "clip_score"), features="inception")

  if tiny:                      # the same recipe on a tiny U-Net of the family, on a 16 px cache
    common.tiny_run(c)
    c.frozen.from_pipeline = "runs/tiny_sd2"
    c.data.path = "runs/mlperf_tiny_latents"
    c.data.resolution = 16
    c.data.max_length = 16      # the tiny text encoder's positions
    c.model.block_out_channels = (32, 64)
    c.model.layers_per_block = 1
    c.model.down_block_types = ("CrossAttnDownBlock2D", "DownBlock2D")
    c.model.up_block_types = ("UpBlock2D", "CrossAttnUpBlock2D")
    c.model.attention_head_dim = (4, 8)   # heads of 8 channels
    c.model.cross_attention_dim = 16      # the tiny text encoder's width
    c.model.sample_size = 8
    c.model.dtype = "float32"
    c.optim.lr = 1e-3
    c.sample = common.sample_prompts(tiny=True)
    with c.sample.unlocked():
      c.sample.size = 16
  return c.lock()
