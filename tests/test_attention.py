"""Every attention implementation equals a float64 softmax reference (values and gradients)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.models import attention
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
