"""Dense causal attention with GQA: the baseline (and the DSA warm-up stage's attention).

`impl="xla"`: `jax.nn.dot_product_attention` (materialises [B, H, T, T] logits: fine for a
baseline, never used by the sparse paths). `impl="pallas"`: jax's splash-attention TPU kernels
(forward and backward) with a causal block mask, one MQA kernel per KV group so the G query heads
of a group share each K/V tile.
"""
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from kernels import DEFAULT_OPTIONS, Unsupported, partition, resolve_impl

TILE = 128   # splash blocks are multiples of it


def check_supported(*, seq_len: int) -> None:
  """The splash kernels' shape rule (raises kernels.Unsupported)."""
  if seq_len % TILE:
    raise Unsupported("seq_len", seq_len, f"dense attention with Pallas kernels needs a multiple of {TILE}")


def attention(q_BTHD, k_BTKD, v_BTKD, *, segment_ids=None, scale=None, window=None, impl="auto", options=None):
  """Causal softmax attention. q/k [B,T,HQ|HKV,Dk], v [B,T,HKV,Dv] -> [B,T,HQ,Dv] in q's dtype.
  segment_ids int32 [B,T] (optional): a query sees only keys of its own segment.
  window (optional): query t sees only keys t - window < s <= t (NSA's sliding window).
  impl="pallas" runs per device (kernels/partition.py) under the caller's mesh."""
  options = options or DEFAULT_OPTIONS
  scale = q_BTHD.shape[-1] ** -0.5 if scale is None else scale
  dk, dv = q_BTHD.shape[-1], v_BTKD.shape[-1]
  if dk != dv:   # both kernels want one head dim: zero columns change neither logits nor outputs
    widen = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, max(dk, dv) - x.shape[-1])])
    out = attention(widen(q_BTHD), widen(k_BTKD), widen(v_BTKD), segment_ids=segment_ids, scale=scale,
                    window=window, impl=impl, options=options)
    return out[..., :dv]
  if resolve_impl(impl, options) == "xla":
    mask = None
    if segment_ids is not None:
      mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]     # [B, 1, T, T]
    return jax.nn.dot_product_attention(q_BTHD, k_BTKD, v_BTKD, mask=mask, scale=scale, is_causal=True,
                                        local_window_size=None if window is None else (window - 1, 0),
                                        implementation="xla")
  check_supported(seq_len=q_BTHD.shape[1])
  if segment_ids is None:
    segment_ids = jnp.zeros(q_BTHD.shape[:2], jnp.int32)
  splash = lambda q, k, v, seg: _splash_attention(q, k, v, seg, scale=scale, window=window,
                                                  interpret=options.interpret_params())
  kv_axes = partition.KV if k_BTKD.shape[2] > 1 else partition.MQA   # one KV head: every device needs it
  return partition.per_device(splash, (partition.Q, kv_axes, kv_axes, partition.ROWS), partition.Q)(
      q_BTHD, k_BTKD, v_BTKD, segment_ids)


def _block(t: int, preferred: int = 512) -> int:
  return next(b for b in (preferred, 256, TILE) if t % b == 0)


def _splash_kernel(seq_len: int, group: int, interpret, window=None):
  # Grid of the forward kernel: (group heads, T/bq, T/bkv); blocks the mask excludes (above the
  # diagonal; outside the window) are skipped via the block mask's data_next prefetch, so ~T^2/2
  # of the K/V tiles are read (causal), or ~T * (window + bkv) / bkv (local).
  bq = bkv = _block(seq_len)
  sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                            block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
  if window is None:
    head_mask = splash_mask.CausalMask((seq_len, seq_len))
  else:
    head_mask = splash_mask.LocalMask((seq_len, seq_len), window_size=(window - 1, 0), offset=0)
  mask = splash_mask.MultiHeadMask([head_mask] * group)
  # Built per trace, not cached: the kernel holds its block-mask arrays, which must not outlive
  # the trace that made them.
  return splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash_attention(q_BTHD, k_BTKD, v_BTKD, segment_ids, *, scale, window, interpret):
  b, t, hq, d = q_BTHD.shape
  hkv = k_BTKD.shape[2]
  group = hq // hkv
  kernel = _splash_kernel(t, group, interpret, window)
  q = (q_BTHD * scale).astype(q_BTHD.dtype).reshape(b, t, hkv, group, d).transpose(0, 2, 3, 1, 4)
  k = k_BTKD.transpose(0, 2, 1, 3)                     # [B, HKV, T, D]
  v = v_BTKD.transpose(0, 2, 1, 3)
  flat = lambda x: x.reshape(b * hkv, *x.shape[2:])
  seg = flat(jnp.broadcast_to(segment_ids[:, None], (b, hkv, t)).astype(jnp.int32))
  call = lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s))
  if interpret:   # TPU interpret mode does not batch a pallas_call under vmap: loop instead
    out = jax.lax.map(lambda args: call(*args), (flat(q), flat(k), flat(v), seg))
  else:
    out = jax.vmap(call)(flat(q), flat(k), flat(v), seg)   # [B*HKV, G, T, D]
  return out.reshape(b, hkv, group, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d).astype(q_BTHD.dtype)
