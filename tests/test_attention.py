"""Every attention implementation equals a float64 softmax reference (values and gradients).

The Pallas kernels run on CPU in interpret mode (TPU: `force_tpu_interpret_mode`, GPU: `interpret=True`) at
SD's head dims (40, 64, 80, 160) and token counts (77 CLIP keys, 256-1024 latent tokens), one batch, two heads.
"""
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.experimental.pallas import tpu as pltpu

from sdjax.models import attention, attention_kernels
from sdjax.models.attention import dot_product_attention


def reference(q, k, v, mask=None, causal=False):
  q, k, v = (a.astype(np.float64) for a in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  allowed = np.ones(logits.shape, bool)
  if causal:
    allowed &= np.tril(np.ones(logits.shape[-2:], bool))
  if mask is not None:
    allowed &= mask
  logits = np.where(allowed, logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)


def reference_vjp(q, k, v, ct, keep=None, causal=False, mask=None):
  """float64 attention output and the gradients (dq, dk, dv) of sum(ct * output), written out in numpy."""
  q, k, v, ct = (np.asarray(a, np.float64) for a in (q, k, v, ct))
  scale = 1 / np.sqrt(q.shape[-1])
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  allowed = np.ones(s.shape, bool)
  if keep is not None:
    allowed &= keep[:, None, None, :]
  if mask is not None:
    allowed &= mask
  if causal:
    allowed &= np.tril(np.ones(s.shape[-2:], bool))
  s = np.where(allowed, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  dp = np.einsum("bqhd,bkhd->bhqk", ct, v)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  return np.einsum("bhqk,bkhd->bqhd", p, v), (np.einsum("bhqk,bkhd->bqhd", ds, k) * scale,
                                              np.einsum("bhqk,bqhd->bkhd", ds, q) * scale,
                                              np.einsum("bhqk,bqhd->bkhd", p, ct))


def assert_close_to_reference(got, want, rel):
  """Every array's max abs error <= rel * its reference's max abs value."""
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    err = np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max()
    assert err <= rel, f"{name}: relative error {err:.2e} > {rel:.0e}"


def inputs(lq=37, lk=37, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(rng.standard_normal((2, n, 3, 8)).astype(np.float32) for n in (lq, lk, lk))


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_float64_reference(implementation, causal, masked):
  q, k, v = inputs()
  mask = None
  if masked:  # a key-padding mask [B, 1, 1, Lk], as CLIP uses
    mask = np.random.default_rng(1).random((2, 1, 1, 37)) > 0.3
    mask[..., 0] = True
  # Chunks that do not divide the lengths exercise the padding of queries and keys.
  out = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=mask, is_causal=causal,
                              implementation=implementation, query_chunk=8, key_chunk=5)
  np.testing.assert_allclose(out, reference(q, k, v, mask, causal), rtol=1e-5, atol=1e-5)


def test_chunked_cross_attention_and_gradients_equal_xla():
  q, k, v = (jnp.asarray(a) for a in inputs(lq=50, lk=13))
  loss = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(dot_product_attention(
      q, k, v, implementation=impl, query_chunk=16, key_chunk=4)))
  g_xla = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  g_chunked = jax.jit(jax.grad(loss("chunked"), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g_xla, g_chunked):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bfloat16_inputs_softmax_in_float32():
  q, k, v = inputs()
  ref = reference(q, k, v)
  for impl in ("xla", "chunked"):
    out = dot_product_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), implementation=impl)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2)


def test_default_dispatch_and_errors(monkeypatch):
  q, k, v = (jnp.asarray(a) for a in inputs())
  assert attention._default_implementation(q, k, None) == "xla"
  monkeypatch.setattr(attention, "CHUNK_THRESHOLD", 100)
  assert attention._default_implementation(q, k, None) == "chunked"
  np.testing.assert_allclose(dot_product_attention(q, k, v), reference(*inputs()), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
    dot_product_attention(q, k, v, implementation="flash")
  with pytest.raises(ValueError, match="causal attention needs Lq == Lk"):
    dot_product_attention(q[:, :5], k, v, is_causal=True)
  with pytest.raises(ValueError, match="attention expects"):
    dot_product_attention(q, k[:, :, :2], v)


def _vjp_case(fn, dtype, lq, lk, d, seed, heads=2, batch=1):
  """Inputs of one case in `dtype`, a cotangent, and fn's (out, dq, dk, dv)."""
  rng = np.random.default_rng(seed)
  q, ct = (rng.standard_normal((batch, lq, heads, d)) for _ in range(2))
  k, v = (rng.standard_normal((batch, lk, heads, d)) for _ in range(2))
  q, k, v, ct = (jnp.asarray(a, dtype) for a in (q, k, v, ct))
  out, vjp = jax.vjp(fn, q, k, v)
  return (q, k, v, ct), (out, *vjp(ct))


# bf16 inputs, float32 accumulation: errors are those of rounding the inputs, outputs and gradients to bf16.
BF16_REL = 1.5e-2


@pytest.mark.parametrize("dtype,rel", [(jnp.float32, 1e-5), (jnp.bfloat16, BF16_REL)])
def test_chunked_flash_vjp_matches_float64_reference(dtype, rel):
  # Blocks that do not divide the lengths (padding), a full [B, H, Lq, Lk] mask with causal, a key-padding
  # mask for cross-attention: forward and the custom VJP's dq, dk, dv against the float64 formulas.
  rng = np.random.default_rng(3)
  full_mask = rng.random((2, 3, 37, 37)) > 0.3
  full_mask[..., 0] = True
  keep = rng.random((2, 13)) > 0.3
  keep[:, 0] = True
  cases = [(37, 37, dict(mask=full_mask, is_causal=True)), (50, 13, dict(mask=keep[:, None, None, :])),
           (40, 24, {})]
  for i, (lq, lk, kw) in enumerate(cases):
    fn = jax.jit(lambda q, k, v, kw=kw: attention.chunked_attention(q, k, v, kw.get("mask"), kw.get("is_causal", False),
                                                                   query_chunk=16, key_chunk=5))
    (q, k, v, ct), got = _vjp_case(fn, dtype, lq, lk, 8, seed=i, heads=3, batch=2)
    want = reference_vjp(*(np.asarray(a, np.float64) for a in (q, k, v, ct)), mask=kw.get("mask"),
                         causal=kw.get("is_causal", False))
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert_close_to_reference(got, (want[0], *want[1]), rel)


def test_chunked_rows_without_keys_are_zero_with_zero_gradients():
  q, k, v = (jnp.asarray(a) for a in inputs(lq=6, lk=6))
  mask = np.ones((1, 1, 6, 6), bool)
  mask[..., 2, :] = False  # query 2 attends to nothing
  out, vjp = jax.vjp(lambda q: attention.chunked_attention(q, k, v, jnp.asarray(mask), key_chunk=4), q)
  assert np.all(np.asarray(out[:, 2]) == 0) and np.all(np.isfinite(out))
  (dq,) = vjp(jnp.ones_like(out))
  assert np.all(np.asarray(dq[:, 2]) == 0) and np.all(np.isfinite(dq))


def _temp_bytes(fn, n, **kw):
  shape = jax.ShapeDtypeStruct((1, n, 1, 8), jnp.float32)
  grad = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, **kw)), argnums=(0, 1, 2))
  return jax.jit(grad).lower(shape, shape, shape).compile().memory_analysis().temp_size_in_bytes


def test_chunked_gradient_memory_grows_linearly():
  # Compile-only: the custom VJP keeps O(L) temporaries where XLA's attention keeps the [L, L] probabilities.
  chunked = lambda n: _temp_bytes(attention.chunked_attention, n, query_chunk=256, key_chunk=256)
  xla = lambda n: _temp_bytes(jax.nn.dot_product_attention, n)
  small, large = chunked(2048), chunked(4096)  # about 1.2 and 1.5 MB
  assert large < 2 * small and large * 50 < xla(4096)  # XLA: about 84 and 201 MB


# SD's head dims and token counts: (Lq, Lk, D, causal, key-padding mask).
PALLAS_CASES = [(256, 77, 40, False, False),   # SD 1.x cross-attention, 77 keys padded to the kernel's blocks
                (256, 256, 80, False, False),  # self-attention
                (1024, 77, 160, False, False),  # 160-wide heads, 1,024 latent tokens
                (77, 77, 64, True, True)]      # CLIP: causal plus a key-padding mask


def _pallas_cases(implementation, dtype, cases):
  for i, (lq, lk, d, causal, masked) in enumerate(cases):
    keep = None
    if masked:
      keep = np.random.default_rng(i).random((1, lk)) > 0.3
      keep[:, 0] = True
    mask = None if keep is None else jnp.asarray(keep[:, None, None, :])
    fn = jax.jit(lambda q, k, v, mask=mask, causal=causal: attention_kernels.pallas_attention(
        q, k, v, mask, causal, implementation, interpret=True))
    (q, k, v, ct), got = _vjp_case(fn, dtype, lq, lk, d, seed=i)
    want = reference_vjp(*(np.asarray(a, np.float64) for a in (q, k, v, ct)), keep=keep, causal=causal)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert_close_to_reference(got, (want[0], *want[1]), 1e-5 if dtype == jnp.float32 else BF16_REL)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_tpu_flash_attention_in_interpret_mode(dtype):
  cases = PALLAS_CASES if dtype == jnp.float32 else PALLAS_CASES[:1]
  with pltpu.force_tpu_interpret_mode():
    _pallas_cases("pallas_tpu", dtype, cases)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_gpu_flash_attention_in_interpret_mode(dtype):
  _pallas_cases("pallas_gpu", dtype, PALLAS_CASES if dtype == jnp.float32 else PALLAS_CASES[:1])


def test_automatic_choice_per_backend():
  q, k, _ = (jnp.asarray(a) for a in inputs())
  long = jnp.zeros((1, 4096, 1, 8))
  key_mask, full_mask = jnp.ones((1, 1, 1, 37), bool), jnp.ones((1, 1, 37, 37), bool)
  choose = attention.default_implementation
  assert choose(q, k, None, "tpu") == choose(q, k, key_mask, "tpu") == "pallas_tpu"
  assert choose(q, k, full_mask, "tpu") == "xla"
  assert choose(q, k, None, "gpu") == "xla"  # short: plain XLA (cuDNN is not available on this CPU)
  assert choose(long, long, None, "gpu") == choose(long, long, jnp.ones((1, 1, 1, 4096), bool), "gpu") == "pallas_gpu"
  assert choose(long, long, jnp.ones((1, 1, 4096, 4096), bool), "gpu") == "xla"  # a mask Pallas does not take
  assert choose(jnp.zeros((1, 4096, 1, 512)), jnp.zeros((1, 4096, 1, 512)), None, "gpu") == "xla"  # a VAE's D=512
  assert choose(q, k, None, "cpu") == "xla" and choose(long, long, None, "cpu") == "chunked"
  with pytest.raises(ValueError, match="takes only a key-padding mask"):
    dot_product_attention(q, k, k, mask=full_mask, implementation="pallas_tpu")


def test_automatic_choice_on_a_gpu_with_cudnn(monkeypatch):
  # cuDNN trains bf16/fp16 without a mask at D <= 128 and even lengths only: SD's 77 text keys go elsewhere
  # (an H200 raised "Unsupported sequence length Q 4096, KV 77" at the first train step when they did not).
  monkeypatch.setattr(attention, "cudnn_available", lambda: True)
  choose = attention.default_implementation
  x = lambda n, d=64, dtype=jnp.bfloat16: jnp.zeros((2, n, 5, d), dtype)
  assert choose(x(4096), x(4096), None, "gpu") == choose(x(4096), x(78), None, "gpu") == "cudnn"
  assert choose(x(4096), x(77), None, "gpu") == "xla"
  assert choose(x(4096, dtype=jnp.float32), x(4096, dtype=jnp.float32), None, "gpu") == "pallas_gpu"
  assert choose(x(4096, d=160), x(4096, d=160), None, "gpu") == "xla"
  assert choose(x(4096), x(4096), jnp.ones((2, 1, 1, 4096), bool), "gpu") == "pallas_gpu"


def test_unet_config_names_the_valid_implementations():
  from sdjax.models.unet import UNetConfig
  assert UNetConfig(attention_implementation="pallas_tpu").attention_implementation == "pallas_tpu"
  with pytest.raises(ValueError, match=r"UNetConfig.attention_implementation 'flash'; expected one of \('xla', "
                                       r"'cudnn', 'chunked', 'pallas_tpu', 'pallas_gpu'\)"):
    UNetConfig(attention_implementation="flash")


def test_pallas_kernels_run_per_shard_under_a_mesh():
  # conftest gives 8 CPU devices. Under jax.set_mesh the kernel runs in shard_map (batch over data x fsdp,
  # heads over tensor) with a per-shard key mask; the values equal the unsharded call's (gradients go through
  # shard_map's own transpose).
  from sdjax import parallel
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((4, n, 4, 40)), jnp.float32) for n in (128, 77, 77))
  mask = jnp.asarray(rng.random((4, 1, 1, 77)) > 0.3).at[..., 0].set(True)
  fn = lambda q, k, v: attention_kernels.pallas_attention(q, k, v, mask, False, "pallas_gpu", interpret=True)
  want = jax.jit(fn)(q, k, v)
  with jax.set_mesh(parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
    assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v))
    got = jax.jit(fn)(q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
