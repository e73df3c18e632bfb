"""An AutoencoderKL (Stable Diffusion's VAE) with a patch-GAN on a folder of RGB images at 64x64 -> 16x16x4.

  # once: images -> records in DIR (prepare wants captions: without sidecars, list the images with empty ones)
  (cd PICS && for f in *.jpg; do echo "{\"file_name\": \"$f\", \"caption\": \"\"}"; done > metadata.jsonl)
  python -m sdjax.data.prepare --input PICS --output DIR --allow_empty_captions
  python train.py --config configs/vae_folder.py --config.data.path=DIR --workdir runs/vae_folder
  python train.py --config configs/vae_folder.py:tiny --config.data.path=DIR --workdir runs/vae_tiny  # seconds

The discriminator joins after gan.start_step steps of reconstruction + KL training (LDM's warm-up). The
trained autoencoder is exported as a diffusers AutoencoderKL folder, <workdir>/vae, with scaling_factor =
1 / std of its latents; a latent-diffusion config takes it as its vae.path.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "vae"

  # The input pipeline (sdjax.data), as in configs/default.py; captions and labels are not read.
  c.data = ml_collections.ConfigDict()
  c.data.source = "records"        # records (python -m sdjax.data.prepare) | tfds | bundled
  c.data.name = ""                 # tfds: e.g. "celeb_a"
  c.data.split = "train"
  c.data.data_dir = ""             # TFDS data dir
  c.data.path = ""                 # required for records: the directory prepare wrote
  c.data.image_key = "image"       # tfds feature names
  c.data.label_key = "label"
  c.data.caption_key = ""
  c.data.num_classes = 0
  c.data.resolution = 64           # resize the shorter side and crop to this
  c.data.crop = "random"           # center | random
  c.data.random_flip = True
  c.data.tokenizer = ""
  c.data.tokenizer_2 = ""
  c.data.max_length = 77
  c.data.caption_dropout = 0.0
  c.data.micro_conditioning = False
  c.data.num_threads = 8           # grain reader threads (decode + resize)
  c.data.prefetch = 2              # batches read ahead of the train step

  # sdjax.models.VAEConfig fields (diffusers' AutoencoderKL names); downscale 2**(levels - 1) = 4.
  c.vae = ml_collections.ConfigDict()
  c.vae.in_channels = 3
  c.vae.out_channels = 3
  c.vae.down_block_types = ("DownEncoderBlock2D",) * 3
  c.vae.up_block_types = ("UpDecoderBlock2D",) * 3
  c.vae.block_out_channels = (64, 128, 256)
  c.vae.layers_per_block = 2
  c.vae.latent_channels = 4
  c.vae.norm_num_groups = 32
  c.vae.sample_size = 64
  c.vae.scaling_factor = 1.0       # replaced by 1 / std of the latents in the exported config
  c.vae.mid_block_add_attention = True
  c.vae.dtype = "float32"          # compute dtype (params are float32)
  c.vae.remat = False

  c.loss = ml_collections.ConfigDict()
  c.loss.recon = "l1"              # l1 | l2, mean over pixels
  c.loss.kl_weight = 1e-6          # on the KL summed over latents / pixel count (LDM's balance)

  # PatchGAN discriminator (pix2pix with GroupNorm), hinge loss.
  c.gan = ml_collections.ConfigDict()
  c.gan.enabled = True
  c.gan.start_step = 5000          # warm-up: no adversarial term and no discriminator update before
  c.gan.weight = 0.5               # of -mean(D(reconstruction)) in the autoencoder's loss
  c.gan.disc_channels = 64
  c.gan.disc_layers = 3            # 64px -> 6x6 patch logits
  c.gan.lr = 1e-4                  # Adam for the discriminator (LDM's betas)
  c.gan.b1 = 0.5
  c.gan.b2 = 0.9

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"          # adamw | adafactor | lion
  c.optim.lr = 2e-4
  c.optim.schedule = "cosine"      # constant | cosine (after linear warmup)
  c.optim.warmup_steps = 500
  c.optim.final_lr_fraction = 0.1
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0          # global-norm clipping; 0: off

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32          # global batch, split over the mesh's data x fsdp axes
  c.train.num_steps = 20000
  c.train.ema_decay = 0.999        # 0: no EMA (the params are exported)
  c.train.ema_warmup = True        # decay min(ema_decay, (1 + step) / (10 + step))
  c.train.log_every = 100
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  c.train.sample_every = 1000      # reconstruction grid every N steps (and at the end); 0: only at the end

  c.sample = ml_collections.ConfigDict()
  c.sample.num_images = 8          # grid columns: originals (first row) and reconstructions of batch 0

  c.export = ml_collections.ConfigDict()
  c.export.scaling_batches = 8     # batches whose latent std sets the exported scaling_factor

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                 # -1: all remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.rules = ()
  c.mesh.fsdp_min_size = 1024

  if arg == "tiny":
    c.data.resolution = 32
    c.vae.block_out_channels = (8, 8, 8)
    c.vae.layers_per_block = 1
    c.vae.norm_num_groups = 4
    c.vae.sample_size = 32
    c.vae.mid_block_add_attention = False
    c.gan.start_step = 2
    c.gan.disc_channels = 8
    c.gan.disc_layers = 2
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 2
    c.train.batch_size = 16
    c.train.num_steps = 6
    c.train.log_every = 2
    c.train.checkpoint_every = 3
    c.train.sample_every = 0
    c.sample.num_images = 4
    c.export.scaling_batches = 1
  elif arg:
    raise ValueError(f"configs/vae_folder.py: unknown variant {arg!r}; expected 'tiny' or nothing")
  return c.lock()
