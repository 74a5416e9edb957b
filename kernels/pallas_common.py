"""What NSA's and DSA's Pallas TPU kernels share (docs/design.md §7): the fp32 online softmax with
lane-replicated statistics, per-row statistics as lane-dense tile rows, cost estimates, and the
inverted selection that makes a KV-stationary backward possible without scatter-adds.
"""
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

ROWS = 128            # matmul rows per tile
LANES = 128


def cost(flops, transcendentals, bytes_accessed) -> pl.CostEstimate:
  """What a pallas_call does, for XLA's scheduler and cost analysis (they cannot see inside)."""
  return pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals), bytes_accessed=int(bytes_accessed))


# ---- online softmax (fp32; max and sum lane-replicated [R, 128] as in the splash kernels) ----

def softmax_init(m_scratch, l_scratch, acc_scratch):
  m_scratch[...] = jnp.full(m_scratch.shape, -jnp.inf, jnp.float32)
  l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
  acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)


def softmax_step(s, v, m_scratch, l_scratch, acc_scratch):
  """One online-softmax step over masked scores s [R, keys] (fp32) and their values v."""
  m_prev = m_scratch[...][:, :1]
  m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)          # rows with nothing seen yet
  p = jnp.exp(s - m_safe)
  alpha = jnp.exp(m_prev - m_safe)
  l_next = alpha * l_scratch[...][:, :1] + jnp.sum(p, axis=1, keepdims=True)
  acc_scratch[...] = alpha * acc_scratch[...] + jax.lax.dot_general(
      p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  m_scratch[...] = jnp.broadcast_to(m_next, m_scratch.shape)
  l_scratch[...] = jnp.broadcast_to(l_next, l_scratch.shape)


def softmax_finish(o_ref, lse_ref, m_scratch, l_scratch, acc_scratch):
  """out = acc / l and lse = m + log l; rows that saw nothing: 0 and -inf."""
  l = l_scratch[...][:, :1]
  seen = l > 0
  o_ref[...] = jnp.where(seen, acc_scratch[...] / jnp.where(seen, l, 1.0), 0.0).astype(o_ref.dtype)
  lse = jnp.where(seen, m_scratch[...] + jnp.log(jnp.where(seen, l_scratch[...], 1.0)), -jnp.inf)
  lse_ref[...] = lse.T[:1]       # lane-replicated [R, 128] -> the [1, R] row of a tile-row array


def column(ref):
  """A [1, R] tile-row block (lse, delta) as the [R, 1] column the scores broadcast against."""
  return jnp.expand_dims(ref[0], -1)


def probs(s, lse_ref):
  """p = exp(s - lse) for masked scores s [R, keys]; 0 for rows that saw nothing (lse -inf)."""
  lse = column(lse_ref)
  return jnp.where(lse == -jnp.inf, 0.0, jnp.exp(s - jnp.where(lse == -jnp.inf, 0.0, lse)))


def probs_and_dscores(s, lse_ref, do, v, delta_ref):
  """Backward recompute for one step: p = exp(s - lse) and dS = p * (dO V^T - delta), [R, keys] fp32."""
  p = probs(s, lse_ref)
  dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  return p, p * (dp - column(delta_ref))


# ---- the inverted selection: KV-stationary backward lists ----

def inverted_pairs(block, tile, num_blocks: int, payload=None):
  """(block, tile, payload) [..., L + num_blocks] sorted by block then tile: the (key block j,
  query tile i) pairs given (entries whose block is num_blocks are unused), plus one pair (j, -1)
  per block that does no work but makes sure block j is initialised and written. Unused entries
  sort last and repeat the last real pair as work-free steps (tile -1)."""
  lead = block.shape[:-1]
  all_blocks = jnp.broadcast_to(jnp.arange(num_blocks, dtype=jnp.int32), (*lead, num_blocks))
  block = jnp.concatenate([all_blocks, block.astype(jnp.int32)], -1)
  tile = jnp.concatenate([jnp.full((*lead, num_blocks), -1, jnp.int32), tile.astype(jnp.int32)], -1)
  payload = jnp.zeros_like(tile) if payload is None else payload
  payload = jnp.concatenate([jnp.zeros((*lead, num_blocks), jnp.int32), payload.astype(jnp.int32)], -1)
  num_tiles = jnp.max(tile) + 2
  order = jnp.argsort(block * num_tiles + tile + 1, axis=-1)
  block, tile, payload = (jnp.take_along_axis(x, order, -1) for x in (block, tile, payload))
  last = jnp.sum(block < num_blocks, axis=-1, keepdims=True) - 1
  unused = block >= num_blocks
  block = jnp.where(unused, jnp.take_along_axis(block, last, -1), block)
  tile = jnp.where(unused, -1, tile)
  return block, tile, payload


def pair_windows(lists, prefetch_bytes: int):
  """(lists padded to whole windows, window): the pair lists (block first, then tile, then any
  payloads) [..., L] cut into windows of pairs whose int32 lists, over all leading dims, fit
  `prefetch_bytes` of scalar memory; one pallas_call per window. Padding repeats the last
  block as work-free pairs (tile -1)."""
  block, tile, *payloads = lists
  *lead, length = block.shape
  per_pair = 4 * len(lists) * math.prod(lead)
  window = max(1, min(length, prefetch_bytes // per_pair))
  pad = [(0, 0)] * len(lead) + [(0, -length % window)]
  block = jnp.pad(block, pad, mode="edge")
  tile = jnp.pad(tile, pad, constant_values=-1)
  payloads = [jnp.pad(x, pad, mode="edge") for x in payloads]
  return (block, tile, *payloads), window
