"""jax's Pallas flash-attention kernels behind sdjax's attention contract ([B, L, H, D], scale 1/sqrt(D)).

- "pallas_tpu": `jax.experimental.pallas.ops.tpu.flash_attention`. Chosen over splash_attention because it
  takes [B, H, L, D] batches, q/kv segment ids (a key-padding mask is exactly kv segment ids, O(L)) and a
  causal flag in one call with its own custom VJP; splash needs a static numpy mask object per shape
  and a vmap over the batch, which buys block-sparsity SD's dense attention does not use. Sequence lengths
  are zero-padded to multiples of 128 (the TPU lane width the kernel's key blocks need) and the padded keys
  get kv segment id 0 against the queries' 1, so they have zero weight (77 CLIP tokens -> 128). Head dims
  are zero-padded to a multiple of 128 (40, 80 -> 128; 160 -> 256): zero columns change no logit and give
  zero output columns, and sm_scale stays 1/sqrt(true D).
- "pallas_gpu": `jax.experimental.pallas.ops.gpu.attention.mha` (Triton). Triton blocks are powers of two,
  so lengths are padded to one (the kernel loads whole K/V per query block); the kernel pads the head dim
  itself. mha's segment ids index queries and keys with the same array (self-attention only), so padded or
  masked keys are removed with one extra head column instead: q gets 1 there, k gets 0 for a kept key and a
  large negative number (half the dtype's most negative) for a removed one, v gets 0; a removed key's logit is
  then hugely negative and its probability exactly 0. The backward is Triton's fused kernel when the padded
  lengths are equal (self-attention), else mha's XLA backward (cross-attention: its [B, H, Lq, Lk] logits are
  small with 77-128 keys; it differentiates a float32 reference, so these calls run in float32).

Both take no mask but a key-padding one ([B or 1, 1, 1, Lk]). Under an active mesh (`jax.set_mesh` /
`jax.sharding.use_mesh` with sdjax's ("data", "fsdp", "tensor") axes) the kernel runs per shard through
`shard_map`: batch over data x fsdp, heads over tensor, where they divide (a pallas_call cannot be partitioned
by XLA itself).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

LANES = 128  # TPU vector lane width: the kernel's key blocks and our head-dim padding are multiples of it


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _next_pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _largest_block(n: int, choices=(512, 256, 128)) -> int:
  return next(c for c in choices if n % c == 0)


def _pad_to(x, axis: int, n: int, value=0):
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, n - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def key_keep(mask, batch: int, lk: int):
  """The [B, Lk] boolean keys-to-keep of a key-padding mask (None: all)."""
  if mask is None:
    return None
  return jnp.broadcast_to(mask[:, 0, 0, :], (batch, lk))


def tpu_flash(q, k, v, keep, is_causal: bool):
  """Pallas TPU flash attention on [B, L, H, D]; keep: None or [B, Lk] bool. Returns [B, Lq, H, D]."""
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  b, lq, h, d = q.shape
  lk = k.shape[1]
  dp, lqp, lkp = _round_up(d, LANES), _round_up(lq, LANES), _round_up(lk, LANES)
  if is_causal:
    lqp = lkp = max(lqp, lkp)
  to_bhld = lambda x, n: _pad_to(_pad_to(x.transpose(0, 2, 1, 3), 2, n), 3, dp)
  segment_ids = None
  if keep is not None or lkp != lk:
    kv = jnp.ones((b, lk), jnp.int32) if keep is None else keep.astype(jnp.int32)
    segment_ids = fa.SegmentIds(q=jnp.ones((b, lqp), jnp.int32), kv=_pad_to(kv, 1, lkp))
  bq, bk = _largest_block(lqp), _largest_block(lkp)
  blocks = fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
                         block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq,
                         block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)
  out = fa.flash_attention(to_bhld(q, lqp), to_bhld(k, lkp), to_bhld(v, lkp), segment_ids=segment_ids,
                           causal=is_causal, sm_scale=1.0 / math.sqrt(d), block_sizes=blocks)
  return out[:, :, :lq, :d].transpose(0, 2, 1, 3)


def gpu_flash(q, k, v, keep, is_causal: bool, interpret: bool = False):
  """Pallas GPU (Triton) flash attention on [B, L, H, D]; keep: None or [B, Lk] bool. Returns [B, Lq, H, D]."""
  from jax.experimental.pallas.ops.gpu import attention as ga
  b, lq, h, d = q.shape
  lk = k.shape[1]
  lkp = _next_pow2(max(lk, 16))
  bq = min(128, _next_pow2(max(lq, 16)))
  lqp = _round_up(lq, bq)
  if is_causal or lq == lk:  # self-attention: equal padded lengths keep Triton's fused backward
    lqp = lkp = max(_next_pow2(max(lq, 16)), lkp)
  q, k, v = _pad_to(q, 1, lqp), _pad_to(k, 1, lkp), _pad_to(v, 1, lkp)
  if keep is not None or lkp != lk:
    kept = (jnp.arange(lkp) < lk)[None] if keep is None else _pad_to(keep, 1, lkp, False)
    bias = jnp.where(kept, 0.0, jnp.finfo(q.dtype).min / 2).astype(q.dtype)  # [B or 1, Lkp]
    q = jnp.concatenate([q, jnp.ones((b, lqp, h, 1), q.dtype)], -1)
    k = jnp.concatenate([k, jnp.broadcast_to(bias[:, :, None, None], (b, lkp, h, 1))], -1)
    v = _pad_to(v, 3, d + 1)
  bk = min(128, lkp)
  fused = lqp == lkp  # Triton's fused backward needs as many query blocks as key blocks
  bb = min(32, lqp)
  blocks = ga.BlockSizes(block_q=bq, block_k=bk, block_q_dkv=bb, block_kv_dkv=bb, block_q_dq=bb, block_kv_dq=bb)
  dtype = q.dtype
  if not fused:  # mha's XLA backward differentiates a float32 reference: it needs float32 inputs
    q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
  out = ga.mha(q, k, v, None, sm_scale=1.0 / math.sqrt(d), causal=is_causal, block_sizes=blocks,
               backward_pass_impl="triton" if fused else "xla", interpret=interpret)
  return out[:, :lq, :, :d].astype(dtype)


def _mesh_specs(mesh, batch: int, heads: int):
  """Per-shard PartitionSpecs of [B, L, H, D] and of the [B, Lk] keep mask under `mesh`, or None when the
  mesh is empty or splits neither the batch nor the heads."""
  names = set(getattr(mesh, "axis_names", ()) or ())
  if not names:
    return None
  batch_axes = tuple(a for a in ("data", "fsdp") if a in names and mesh.shape[a] > 1)
  if batch_axes and batch % math.prod(mesh.shape[a] for a in batch_axes):
    batch_axes = ()
  head_axis = "tensor" if "tensor" in names and mesh.shape["tensor"] > 1 and heads % mesh.shape["tensor"] == 0 \
      else None
  if not batch_axes and head_axis is None:
    return None
  b = batch_axes or None
  return P(b, None, head_axis, None), P(b, None)


def is_key_padding_mask(mask: jax.Array | None) -> bool:
  """Whether `mask` (4-d) only removes keys, the same for every head and query: [B or 1, 1, 1, Lk or 1]."""
  return mask is None or (mask.shape[1] == 1 and mask.shape[2] == 1)


def pallas_attention(q, k, v, mask, is_causal: bool, implementation: str, interpret: bool = False):
  """Run "pallas_tpu" or "pallas_gpu" (see the module docstring); mask: None or a key-padding mask."""
  if not is_key_padding_mask(mask):
    raise ValueError(f"attention implementation {implementation!r} takes only a key-padding mask "
                     f"[B or 1, 1, 1, Lk]; got a mask of shape {mask.shape} (use 'chunked' or 'xla')")
  keep = key_keep(mask, q.shape[0], k.shape[1])
  kernel = tpu_flash if implementation == "pallas_tpu" else functools.partial(gpu_flash, interpret=interpret)
  dtype = q.dtype
  if implementation == "pallas_gpu" and dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
  mesh = jax.sharding.get_abstract_mesh()
  specs = None if mesh is None or mesh.empty else _mesh_specs(mesh, q.shape[0], q.shape[2])
  if specs is None:
    return kernel(q, k, v, keep, is_causal).astype(dtype)
  qkv_spec, keep_spec = specs
  if keep is None:
    fn = jax.shard_map(lambda q, k, v: kernel(q, k, v, None, is_causal), in_specs=(qkv_spec,) * 3,
                       out_specs=qkv_spec, check_vma=False)
    return fn(q, k, v).astype(dtype)
  fn = jax.shard_map(lambda q, k, v, keep: kernel(q, k, v, keep, is_causal), in_specs=(qkv_spec,) * 3 + (keep_spec,),
                     out_specs=qkv_spec, check_vma=False)
  return fn(q, k, v, keep).astype(dtype)

