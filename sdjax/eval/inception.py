"""InceptionV3 as FID uses it (the TF 2015-12-05 graph), in Flax Linen, NHWC, float32 or bfloat16 compute.

The network is the one pytorch-fid's `InceptionV3(use_fid_inception=True)` reproduces: torchvision's Inception3
layout with 1008 classes and no aux head, whose Mixed_5b-d / Mixed_6b-e / Mixed_7b blocks average-pool without
counting the zero padding (TF's `count_include_pad=False`) and whose Mixed_7c pools with a 3x3 *max* pool (a quirk
of the TF graph). `features` returns the 2048-d average-pool features FID/KID/precision-recall use, and the
1008-class logits of the `fc` layer (with and without its bias; torch-fidelity's Inception Score uses the latter).

Input handling is pytorch-fid's: images in [0, 1] (uint8 images are divided by 255), resized to 299x299 by
bilinear interpolation with `align_corners=False` and no antialiasing exactly as `torch.nn.functional.interpolate`
does (implemented here as two interpolation matrices, not jax.image.resize, which antialiases when shrinking),
then mapped to [-1, 1] by `2x - 1`. torch-fidelity resizes its uint8 input with TF1's bilinear rule instead; its
features therefore differ slightly from pytorch-fid's on images that are not already 299x299.

Weights: the user's own copy of pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (or torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth`, same keys), read by `load_params`. `.pth` files are read by
sdjax.eval.torch_pickle, a restricted unpickler that resolves only tensor/storage rebuilders and runs no pickled
code, so no torch and no `allow_pickle` switch are needed for the one file format users actually have;
`.safetensors` and `.npz` files with the same keys are accepted too. Each BatchNorm (eps 1e-3) is folded into the
convolution before it at load time: conv(x) * s + (beta - mean * s) with s = gamma / sqrt(var + eps).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
NUM_CLASSES = 1008
FEATURE_DIM = 2048
BN_EPS = 1e-3


class BasicConv2d(nn.Module):
  """torchvision's BasicConv2d (conv without bias, BatchNorm, ReLU) with the BatchNorm folded into the conv."""
  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    precision = jax.lax.Precision.HIGHEST if self.dtype == jnp.float32 else None
    x = nn.Conv(self.features, self.kernel, (self.strides, self.strides), padding=((ph, ph), (pw, pw)),
                dtype=self.dtype, precision=precision, name="conv")(x)
    return nn.relu(x)


def _avg_pool_3x3_exclude_pad(x):
  """3x3, stride 1, padding 1 average pool that divides by the number of real (unpadded) pixels."""
  window, pad = (1, 3, 3, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, jnp.zeros((), x.dtype), jax.lax.add, window, (1, 1, 1, 1), pad)
  ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
  count = jax.lax.reduce_window(ones, jnp.zeros((), x.dtype), jax.lax.add, window, (1, 1, 1, 1), pad)
  return total / count


def _max_pool(x, stride: int, padding: int = 0):
  return nn.max_pool(x, (3, 3), (stride, stride), ((padding, padding), (padding, padding)))


class InceptionA(nn.Module):
  pool_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, dtype=self.dtype)
    b1 = conv(64, (1, 1), name="branch1x1")(x)
    b5 = conv(48, (1, 1), name="branch5x5_1")(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, dtype=self.dtype)
    b3 = conv(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = conv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool(x, 2)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv, c7 = functools.partial(BasicConv2d, dtype=self.dtype), self.channels_7x7
    b1 = conv(192, (1, 1), name="branch1x1")(x)
    b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, dtype=self.dtype)
    b3 = conv(192, (1, 1), name="branch3x3_1")(x)
    b3 = conv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (`max_pool=False`) and Mixed_7c (`max_pool=True`, the TF graph's quirk) of the FID network."""
  max_pool: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, dtype=self.dtype)
    b1 = conv(320, (1, 1), name="branch1x1")(x)
    b3 = conv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    pooled = _max_pool(x, 1, 1) if self.max_pool else _avg_pool_3x3_exclude_pad(x)
    bp = conv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """[B, H, W, 3] in [-1, 1] (H, W >= 75; 299 for FID) -> {"pool": [B, 2048], "logits": [B, 1008],
  "logits_unbiased": [B, 1008]}, all float32 whatever the compute dtype."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, dtype=self.dtype)
    x = x.astype(self.dtype)
    x = conv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool(x, 2)
    x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool(x, 2)
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(pool_features, dtype=self.dtype, name=name)(x)
    x = InceptionB(dtype=self.dtype, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, dtype=self.dtype, name=name)(x)
    x = InceptionD(dtype=self.dtype, name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, dtype=self.dtype, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, dtype=self.dtype, name="Mixed_7c")(x)
    pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [B, 2048]
    fc = self.param("fc", nn.initializers.zeros, (FEATURE_DIM, NUM_CLASSES))  # kernel, [2048, 1008]
    fc_bias = self.param("fc_bias", nn.initializers.zeros, (NUM_CLASSES,))
    unbiased = jnp.dot(pool, fc, precision=jax.lax.Precision.HIGHEST)
    return {"pool": pool, "logits": unbiased + fc_bias, "logits_unbiased": unbiased}


# --- input handling (pytorch-fid) ---

def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] float32 weights of torch's bilinear interpolation along one axis, align_corners=False.

  As ATen's upsample_bilinear2d computes it in float32: scale = n_in / n_out, src = scale * (dst + 0.5) - 0.5
  clamped at 0, i0 = floor(src), i1 = min(i0 + 1, n_in - 1), weights (1 - l, l) with l = src - i0.
  """
  scale = np.float32(n_in / n_out)
  dst = np.arange(n_out, dtype=np.float32)
  src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0))
  i0 = src.astype(np.int64)
  i1 = np.minimum(i0 + 1, n_in - 1)
  l1 = (src - i0.astype(np.float32)).astype(np.float32)
  m = np.zeros((n_out, n_in), np.float32)
  np.add.at(m, (np.arange(n_out), i0), np.float32(1) - l1)
  np.add.at(m, (np.arange(n_out), i1), l1)
  return m


def resize_bilinear(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """[B, H, W, C] -> [B, size, size, C] float32, as torch's F.interpolate(mode="bilinear", align_corners=False)."""
  b, h, w, c = images.shape
  x = images.astype(jnp.float32)
  if (h, w) == (size, size):
    return x
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,bhwc->bowc", _bilinear_matrix(h, size), x, precision=hi)
  return jnp.einsum("pw,bowc->bopc", _bilinear_matrix(w, size), x, precision=hi)


def preprocess(images: jax.Array) -> jax.Array:
  """pytorch-fid's input handling: [B, H, W, 3] in [0, 1] (or uint8, divided by 255) -> [B, 299, 299, 3] in
  [-1, 1], resized first and then scaled by 2x - 1."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be [B, H, W, 3], got shape {images.shape}")
  x = images.astype(jnp.float32)
  if images.dtype == jnp.uint8:
    x = x / 255.0
  return 2.0 * resize_bilinear(x) - 1.0


@functools.partial(jax.jit, static_argnames=("dtype",))
def features(params: Mapping[str, Any], images: jax.Array, dtype: Any = jnp.float32) -> dict[str, jax.Array]:
  """Pure and jitted: {"pool": [B, 2048], "logits": [B, 1008], "logits_unbiased": [B, 1008]} float32 for
  [B, H, W, 3] images in [0, 1] (or uint8). `params` is `load_params`' output (the Flax variables' "params").

  Shard it like training: put `images` on `sdjax.parallel.batch_sharding(mesh)` (B divisible by the batch devices)
  and `params` replicated; the outputs come back sharded the same way along B. dtype=jnp.bfloat16 computes the
  convolutions in bfloat16 (params stay float32); pool features and logits are accumulated in float32.
  """
  return InceptionV3(dtype=dtype).apply({"params": params}, preprocess(images))


# --- weights ---

@functools.lru_cache(maxsize=1)
def _flax_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  abstract = jax.eval_shape(InceptionV3().init, jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract["params"])[0]:
    flat[tuple(p.key for p in path)] = tuple(leaf.shape)
  return flat


def state_dict_shapes() -> dict[str, tuple[int, ...]]:
  """{torch key: shape} of the FID InceptionV3 state dict, in module order (num_batches_tracked not listed)."""
  shapes = {}
  for path, shape in _flax_shapes().items():
    if path[-1] == "kernel":  # a folded BasicConv2d: (..., name, "conv", "kernel"), [kh, kw, cin, cout]
      prefix = ".".join(path[:-2])
      kh, kw, cin, cout = shape
      shapes[f"{prefix}.conv.weight"] = (cout, cin, kh, kw)
      for p in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{prefix}.bn.{p}"] = (cout,)
  shapes["fc.weight"] = (NUM_CLASSES, FEATURE_DIM)
  shapes["fc.bias"] = (NUM_CLASSES,)
  return shapes


def params_from_state_dict(state: Mapping[str, np.ndarray], what: str = "state dict") -> dict[str, Any]:
  """Flax params of `InceptionV3` from a pytorch-fid / torch-fidelity state dict ({torch key: array}).

  Raises one ValueError naming `what` and the first offending key: a missing key, an unexpected one (other than
  BatchNorm's num_batches_tracked), a wrong shape, or a non-finite value.
  """
  want = state_dict_shapes()
  extra = sorted(k for k in state if k not in want and not k.endswith(".num_batches_tracked"))
  missing = [k for k in want if k not in state]
  if missing:
    raise ValueError(f"{what}: not a FID InceptionV3 state dict: missing key {missing[0]!r} "
                     f"({len(missing)} of {len(want)} missing)" + (f"; unexpected keys start with {extra[0]!r}"
                                                                  if extra else ""))
  if extra:
    raise ValueError(f"{what}: not a FID InceptionV3 state dict: unexpected key {extra[0]!r} ({len(extra)} in all)")
  arrays = {}
  for k, shape in want.items():
    a = np.asarray(state[k])
    if tuple(a.shape) != shape:
      raise ValueError(f"{what}: key {k!r} has shape {tuple(a.shape)}, the FID InceptionV3 needs {shape}")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
      raise ValueError(f"{what}: key {k!r} has non-finite values")
    arrays[k] = a
  params: dict[str, Any] = {}
  for path in _flax_shapes():
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    if path[-1] in ("fc", "fc_bias"):
      value = arrays["fc.weight"].T if path[-1] == "fc" else arrays["fc.bias"]
    else:
      prefix = ".".join(path[:-2])
      scale = arrays[f"{prefix}.bn.weight"] / np.sqrt(arrays[f"{prefix}.bn.running_var"] + BN_EPS)
      if path[-1] == "kernel":
        value = arrays[f"{prefix}.conv.weight"].transpose(2, 3, 1, 0) * scale  # [kh, kw, cin, cout]
      else:
        value = arrays[f"{prefix}.bn.bias"] - arrays[f"{prefix}.bn.running_mean"] * scale
    node[path[-1]] = jnp.asarray(value.astype(np.float32))
  return params


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{key: array} of a `.pth`/`.pt` (restricted reader, no code run), `.safetensors` or `.npz` weights file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Inception weights file {path!r} does not exist (pytorch-fid's "
                            "pt_inception-2015-12-05-6726825d.pth or torch-fidelity's equivalent)")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".safetensors":
    from sdjax.convert import safetensors_io
    return dict(safetensors_io.load(path))
  if ext == ".npz":
    try:
      with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
    except (ValueError, OSError) as e:
      raise ValueError(f"{path}: not a readable .npz of weights ({e})") from None
  from sdjax.eval import torch_pickle
  return torch_pickle.load(path)


def load_params(path: str) -> dict[str, Any]:
  """Flax params of the FID InceptionV3 from a weights file (see read_state_dict); one clear error otherwise."""
  return params_from_state_dict(read_state_dict(path), what=path)


def random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  """A deterministic random FID InceptionV3 state dict (float32) for tests and benchmarks without the real file.

  numpy only, so tools/make_inception_fixtures.py (torch) and the tests (no torch) build identical weights: per
  key in `state_dict_shapes()` order from np.random.default_rng(seed), conv weights He-normal (std sqrt(2/fan_in)),
  BatchNorm gamma ~ U(0.5, 1.5), beta ~ N(0, 0.1), running mean ~ N(0, 0.1), running var ~ U(0.5, 1.5), fc weight
  ~ N(0, 1/2048) and bias ~ N(0, 0.1): activations stay O(1) through the whole network.
  """
  rng = np.random.default_rng(seed)
  state = {}
  for k, shape in state_dict_shapes().items():
    if k.endswith("conv.weight"):
      v = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / np.prod(shape[1:])))
    elif k.endswith(("bn.weight", "bn.running_var")):
      v = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    elif k == "fc.weight":
      v = rng.standard_normal(shape, dtype=np.float32) * np.float32(1 / np.sqrt(FEATURE_DIM))
    else:  # bn.bias, bn.running_mean, fc.bias
      v = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1)
    state[k] = v
  return state
