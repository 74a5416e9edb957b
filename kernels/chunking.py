"""Walking the queries in chunks, and a masked softmax: shared by the pure-JAX references.

A sparse reference must never hold a [T, T] tensor: each function computes one query chunk's
scores at a time. `map_query_chunks` runs the chunks in a `lax.scan` of `jax.checkpoint`ed
bodies, so the backward pass saves only each chunk's inputs and recomputes its scores: peak
memory is one chunk's, forward and backward.
"""
import jax
import jax.numpy as jnp


def map_query_chunks(fn, q, *per_query, chunk: int, remat: bool = True, unroll: bool = False, offset=0):
  """out[:, t] = fn(q chunk, chunk start, per_query chunks...)[:, t - start], chunk by chunk.
  q and every per_query array have [B, T, ...] leading dims; the last chunk is zero-padded.
  remat=False for functions nothing differentiates (interpret-mode Pallas cannot sit in a remat).
  unroll=True unrolls the loop (XLA's cost analysis then counts every chunk).
  offset (int or traced int32): the global position of q's first row (context parallelism); the
  chunk starts fn sees are global positions."""
  b, t = q.shape[:2]
  chunk = max(1, min(chunk, t))
  n = -(-t // chunk)
  pad = n * chunk - t

  def split(x):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)       # [n, B, chunk, ...]

  starts = offset + jnp.arange(n, dtype=jnp.int32) * chunk
  body = lambda args: fn(args[0], args[1], *args[2:])
  body = jax.checkpoint(body) if remat else body
  _, outs = jax.lax.scan(lambda carry, args: (carry, body(args)), None,
                         (split(q), starts, *map(split, per_query)), unroll=unroll)

  def join(y):
    return y.swapaxes(0, 1).reshape(b, n * chunk, *y.shape[3:])[:, :t]
  return jax.tree.map(join, outs)


def masked_softmax(logits, mask):
  """Softmax over the last axis restricted to `mask`; rows with nothing visible give p = 0 and
  lse = -inf, with zero (not NaN) gradients. Returns (p float32, lse float32)."""
  logits = jnp.where(mask, logits, -jnp.inf)
  any_visible = jnp.any(mask, axis=-1)
  m = jax.lax.stop_gradient(jnp.where(any_visible, jnp.max(logits, axis=-1), 0.0))
  e = jnp.exp(logits - m[..., None])                                 # exactly 0 where masked
  denom = jnp.where(any_visible, jnp.sum(e, axis=-1), 1.0)
  lse = jnp.where(any_visible, m + jnp.log(denom), -jnp.inf)
  return e / denom[..., None], lse
