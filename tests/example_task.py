"""A digit classifier as an sdjax training task, and its config: the worked example of docs/architecture.md.

  python train.py --config tests/example_task.py --workdir runs/classifier
"""
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from configs import common
from sdjax.data import input_pipeline
from sdjax.train import task


class CNN(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x):                                          # [B, H, W, C] in [-1, 1]
    for features in (16, 32):
      x = nn.avg_pool(nn.gelu(nn.Conv(features, (3, 3))(x)), (2, 2), (2, 2))
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))  # logits [B, classes]


@task.register("classifier")
class Classifier(task.Task):
  """config sections: data (images with labels); optim, train and mesh are the trainer's."""

  def __init__(self, config, mesh):
    super().__init__(config, mesh)
    input_pipeline.check_config(config.data)
    self.size = input_pipeline.image_size(config.data)
    self.model = CNN(config.data.num_classes)

  def init(self, rng, frozen):
    return self.model.init(rng, jnp.zeros((1, self.size, self.size, 1)))["params"]

  def loss_fn(self, params, batch, rng, frozen, state):
    logits = self.model.apply({"params": params}, batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

  def input_pipeline(self, process_index, process_count):
    return input_pipeline.pipeline_from_config(
        self.config.data, channels=1, global_batch_size=self.config.train.batch_size, seed=self.config.seed,
        label=True, process_index=process_index, process_count=process_count)

  def inference(self, state, frozen):
    return self.model, state.ema_params


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "classifier"
  c.data = common.data()                    # the bundled MNIST digits
  c.optim = common.optim(lr=3e-3, warmup_steps=10, schedule="constant")
  c.train = common.train(denoiser=False, batch_size=64, num_steps=60, log_every=10, checkpoint_every=30,
                         sample_every=0, ema_decay=0.9)
  c.mesh = common.mesh()
  return c.lock()
