"""Class-conditional pixel-space diffusion on the bundled 28x28 MNIST digits (the default job).

  python train.py                                            # this config, into runs/default
  python train.py --config configs/default.py:tiny --workdir runs/tiny   # seconds, for tests
  python train.py --config configs/default.py --config.optim.lr=3e-4 --workdir runs/x
"""
import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = common.data()
  c.model = common.unet()
  c.diffusion = common.diffusion()
  c.loss = common.loss()
  c.optim = common.optim()
  c.train = common.train()
  c.sample = common.sample_classes()
  # Digit FID (MNIST classifier features), precision/recall and accuracy of 100 samples (DDPM 25 steps: ~12 s on
  # 2 CPU cores), at steps 900 and 1800.
  c.eval = common.evaluation(every_steps=900, steps=25, metrics=("fid", "precision", "recall", "digit_accuracy"))
  c.mesh = common.mesh()

  if arg == "tiny":
    common.tiny_run(c)
    c.model.block_out_channels = (8, 16)
    c.model.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D")
    c.model.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D")
    c.model.attention_head_dim = 2
    c.model.norm_num_groups = 4
    c.sample.num_steps = 4
    c.sample.per_class = 2
    c.sample.eval_per_class = 2
    c.eval.every_steps = 0    # --config.eval.every_steps=2 to evaluate 16 samples in 4 steps
    c.eval.num_samples = 16
    c.eval.batch_size = 16
    c.eval.steps = 4
  elif arg:
    raise ValueError(f"configs/default.py: unknown variant {arg!r}; expected 'tiny' or nothing")
  return c.lock()
