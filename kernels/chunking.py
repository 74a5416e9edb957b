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


def expected_recall(n: int, bins: int, k: int) -> float:
  """The expected recall of top_k's reduction of n scores to `bins` bins of W = n / bins: the
  i-th best survives iff none of the i-1 better ones shares its bin (each does with probability
  p = (W-1)/(n-1)), so recall = mean_i (1-p)^(i-1)."""
  p = (-(-n // bins) - 1) / max(n - 1, 1)
  return 1.0 if p == 0 else (1.0 - (1.0 - p) ** k) / (k * p)


def approx_bins(n: int, k: int, recall: float) -> int:
  """The fewest bins M = ceil(n / W), W a power of two, whose expected recall is >= `recall`
  (n: no reduction)."""
  window = 1
  while -(-n // (2 * window)) >= k and expected_recall(n, -(-n // (2 * window)), k) >= recall:
    window *= 2
  return -(-n // window)


def top_k(scores, k: int, recall: float = 1.0):
  """(values, index) of the k largest scores along the last axis, best first. recall = 1: exact
  (lax.top_k; ties to the lower index). recall < 1: approximate, the partial reduction behind
  lax.approx_max_k written out so it runs (and its recall is measured) the same on every
  backend: element i goes to bin i mod M, each bin keeps its maximum, and an exact top-k ranks
  the M winners; M = approx_bins(N, k, recall), so the sort is over N / W values (W = N / M a
  power of two). Neighbouring keys (a query's local keys score alike) land in different bins."""
  n = scores.shape[-1]
  bins = n if recall >= 1.0 else approx_bins(n, k, recall)
  if bins == n:
    return jax.lax.top_k(scores, k)
  window = -(-n // bins)
  padded = jnp.pad(scores, [(0, 0)] * (scores.ndim - 1) + [(0, bins * window - n)], constant_values=-jnp.inf)
  windows = padded.reshape(*scores.shape[:-1], window, bins)          # [..., W, M]: bin = i mod M
  winner = jnp.argmax(windows, axis=-2)
  values, top = jax.lax.top_k(jnp.max(windows, axis=-2), k)
  return values, jnp.take_along_axis(winner, top, -1) * bins + top
