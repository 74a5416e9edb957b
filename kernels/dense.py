"""Dense causal attention with GQA: the baseline (and the DSA warm-up stage's attention).

`impl="xla"`: `jax.nn.dot_product_attention` (materialises [B, H, T, T] logits: fine for a
baseline, never used by the sparse paths). `impl="pallas"`: jax's splash-attention TPU kernels
(forward and backward) with a causal block mask, one MQA kernel per KV group so the G query heads
of a group share each K/V tile.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from kernels import DEFAULT_OPTIONS, Unsupported, resolve_impl
from parallel import placement

TILE = 128   # splash blocks are multiples of it


def check_supported(*, seq_len: int) -> None:
  """The splash kernels' shape rule (raises kernels.Unsupported)."""
  if seq_len % TILE:
    raise Unsupported("seq_len", seq_len, f"dense attention with Pallas kernels needs a multiple of {TILE}")


def attention(q_BTHD, k_BTKD, v_BTKD, *, segment_ids=None, scale=None, window=None, impl="auto", options=None):
  """Causal softmax attention. q/k [B,T,HQ|HKV,Dk], v [B,T,HKV,Dv] -> [B,T,HQ,Dv] in q's dtype.
  segment_ids int32 [B,T] (optional): a query sees only keys of its own segment.
  window (optional): query t sees only keys t - window < s <= t (NSA's sliding window).
  Runs per device (parallel/placement.py) under the caller's mesh: always for Pallas, and for both
  impls under context parallelism (each device's queries against all keys)."""
  options = options or DEFAULT_OPTIONS
  scale = q_BTHD.shape[-1] ** -0.5 if scale is None else scale
  pallas = resolve_impl(impl, options) == "pallas"
  if pallas:
    check_supported(seq_len=q_BTHD.shape[1])
  if segment_ids is None:
    segment_ids = jnp.zeros(q_BTHD.shape[:2], jnp.int32)
  local = functools.partial(local_attention, scale=scale, window=window, pallas=pallas, options=options)
  kv_axes = placement.KV if k_BTKD.shape[2] > 1 else placement.MQA   # one KV head: every device needs it
  return placement.per_device(local, (placement.Q, kv_axes, kv_axes, placement.PER_QUERY, placement.PER_KEY),
                              placement.Q, pallas=pallas)(q_BTHD, k_BTKD, v_BTKD, segment_ids, segment_ids)


def local_attention(q, k, v, q_segments, kv_segments, *, q_offset, scale, window, pallas, options):
  """One device's attention: queries q [B, Tq] at global positions q_offset + [0, Tq) against
  all keys k, v [B, Tk] (Tq = Tk, q_offset = 0 without context parallelism)."""
  dk, dv = q.shape[-1], v.shape[-1]
  if dk != dv:   # both kernels want one head dim: zero columns change neither logits nor outputs
    widen = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, max(dk, dv) - x.shape[-1])])
    return local_attention(widen(q), widen(k), widen(v), q_segments, kv_segments, q_offset=q_offset, scale=scale,
                           window=window, pallas=pallas, options=options)[..., :dv]
  tq, tk = q.shape[1], k.shape[1]
  if not pallas:
    t_q = q_offset + jnp.arange(tq)
    s = jnp.arange(tk)
    visible = s[None, :] <= t_q[:, None]
    if window is not None:
      visible &= s[None, :] > t_q[:, None] - window
    mask = visible[None, None] & (q_segments[:, :, None] == kv_segments[:, None, :])[:, None]   # [B,1,Tq,Tk]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")
  interpret = options.interpret_params()
  if tq == tk and isinstance(q_offset, int) and q_offset == 0:
    return _splash_attention(q, k, v, q_segments, kv_segments, scale=scale, mask=_mask(tq, tk, window),
                             interpret=interpret)
  # A query chunk at a traced offset (context parallelism): give splash the `span` keys before the
  # chunk and the chunk's own, so that the mask relative to the chunk is static. Keys before
  # position 0 are padding, masked out by segment id -1.
  #   window: a halo of >= window - 1 keys, in whole blocks of the chunk's block size (fewer,
  #           larger blocks for splash's mask bookkeeping).
  #   causal: the keys [q_offset + tq - tk, q_offset + tq); the padding among them (tk - tq -
  #           q_offset keys) is still computed, as splash's block mask is static: up to ~2x the
  #           causal work of dense attention under context parallelism.
  span = tk - tq if window is None else -(-(window - 1) // _block(tq)) * _block(tq)
  pad = lambda x, value: jnp.pad(x, [(0, 0), (span, 0)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
  take = lambda x: jax.lax.dynamic_slice_in_dim(x, q_offset, span + tq, axis=1)
  return _splash_attention(q, take(pad(k, 0)), take(pad(v, 0)), q_segments, take(pad(kv_segments, -1)),
                           scale=scale, mask=_mask(tq, span + tq, window, offset=span), interpret=interpret)


def _mask(tq: int, tk: int, window=None, offset: int = 0):
  """Query i sees key j iff j <= i + offset (and j > i + offset - window)."""
  if window is None:
    return splash_mask.CausalMask((tq, tk), offset=offset)
  return splash_mask.LocalMask((tq, tk), window_size=(window - 1, 0), offset=offset)


def _block(t: int, preferred: int = 512) -> int:
  return next(b for b in (preferred, 256, TILE) if t % b == 0)


def _splash_kernel(head_mask, group: int, interpret):
  # Grid of the forward kernel: (group heads, Tq/bq, Tk/bkv); blocks the mask excludes (above the
  # diagonal; outside the window) are skipped via the block mask's data_next prefetch, so ~T^2/2
  # of the K/V tiles are read (causal), or ~T * (window + bkv) / bkv (local).
  tq, tk = head_mask.shape
  bq, bkv = _block(tq), _block(tk)
  sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                            block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
  mask = splash_mask.MultiHeadMask([head_mask] * group)
  # Built per trace, not cached: the kernel holds its block-mask arrays, which must not outlive
  # the trace that made them.
  return splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash_attention(q_BTHD, k_BTKD, v_BTKD, q_segments, kv_segments, *, scale, mask, interpret):
  b, t, hq, d = q_BTHD.shape
  hkv, tk = k_BTKD.shape[2], k_BTKD.shape[1]
  group = hq // hkv
  kernel = _splash_kernel(mask, group, interpret)
  q = (q_BTHD * scale).astype(q_BTHD.dtype).reshape(b, t, hkv, group, d).transpose(0, 2, 3, 1, 4)
  k = k_BTKD.transpose(0, 2, 1, 3)                     # [B, HKV, Tk, D]
  v = v_BTKD.transpose(0, 2, 1, 3)
  flat = lambda x: x.reshape(b * hkv, *x.shape[2:])
  per_head = lambda s, n: flat(jnp.broadcast_to(s[:, None], (b, hkv, n)).astype(jnp.int32))
  q_seg, kv_seg = per_head(q_segments, t), per_head(kv_segments, tk)
  call = lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=splash.SegmentIds(q=qs, kv=ks))
  args = (flat(q), flat(k), flat(v), q_seg, kv_seg)
  if interpret:   # TPU interpret mode does not batch a pallas_call under vmap: loop instead
    out = jax.lax.map(lambda a: call(*a), args)
  else:
    out = jax.vmap(call)(*args)                         # [B*HKV, G, T, D]
  return out.reshape(b, hkv, group, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d).astype(q_BTHD.dtype)
