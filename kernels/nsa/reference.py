"""NSA's pure-JAX reference (`impl="xla"`): the oracle for the Pallas kernels, and the path on CPU/GPU.

Memory stays about linear in T: every function walks the queries in chunks of
`options.query_chunk` (kernels.chunking.map_query_chunks), so a chunk's scores ([chunk, heads,
keys it may see]) exist only while that chunk runs, in the forward and again in the backward.
Nothing holds a T x T tensor, nor [T, C] per head for the whole sequence. Each function is one
device's work: queries at global positions q_offset + [0, Tq) against all keys (docs/design.md §4).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels import chunking
from kernels.chunking import masked_softmax


def map_query_chunks(fn, q, *per_query, chunk: int, options, remat: bool = True, offset=0):
  return chunking.map_query_chunks(fn, q, *per_query, chunk=chunk, remat=remat, unroll=options.unroll_chunks,
                                   offset=offset)


def _grouped(q_BTHD, hkv: int):
  b, t, hq, d = q_BTHD.shape
  return q_BTHD.reshape(b, t, hkv, hq // hkv, d)                     # [B, T, HKV, G, D]


def _from_doc(doc_start_chunk, key_start):
  """[B, Qc, K] bool: key_start [K] (a key's or compressed token's first position) is in the
  query's document (doc_start [B, Qc], see compressed_attention); True everywhere for None."""
  if doc_start_chunk is None:
    return jnp.ones((1, 1, key_start.shape[0]), bool)
  return key_start[None, None, :] >= doc_start_chunk[:, :, None]


def compressed_probs(q_chunk, t0, k_cmp, doc_start_chunk=None, *, block_len, stride, scale):
  """p_cmp [B, Qc, HKV, G, C] (float32) and lse [B, Qc, HKV, G] for one query chunk."""
  hkv, c = k_cmp.shape[2], k_cmp.shape[1]
  qg = _grouped(q_chunk, hkv)
  logits = jnp.einsum("bqhgd,bchd->bqhgc", qg, k_cmp, preferred_element_type=jnp.float32) * scale
  t = t0 + jnp.arange(q_chunk.shape[1])
  visible = (jnp.arange(c) * stride + block_len - 1)[None, :] <= t[:, None]        # [Qc, C]
  visible = visible[None] & _from_doc(doc_start_chunk, jnp.arange(c) * stride)      # [B|1, Qc, C]
  return masked_softmax(logits, visible[:, :, None, None, :])


@functools.cache
def overlap_weights(block_len: int, stride: int, slc_block: int) -> np.ndarray:
  """w[k] = |[i*d, i*d+l) ∩ [0, l')| / d for the compressed tokens i = k - (l/d - 1) that overlap
  selection block 0; the same weights hold for every block j (shift i by j*l'/d). 1,2,2,2,1 for
  the paper's l=32, d=16, l'=64."""
  first = -(block_len // stride - 1)
  last = slc_block // stride - 1
  w = [max(0, min(i * stride + block_len, slc_block) - max(i * stride, 0)) / stride
       for i in range(first, last + 1)]
  return np.asarray(w, np.float32)


def block_scores(p_cmp_BQHC, num_blocks: int, *, block_len, stride, slc_block):
  """s[..., j] = sum_i w(i, j) p_cmp[..., i] over the compressed tokens overlapping block j."""
  w = overlap_weights(block_len, stride, slc_block)
  r, left = slc_block // stride, block_len // stride - 1
  c = p_cmp_BQHC.shape[-1]
  need = (num_blocks - 1) * r + len(w)
  p = jnp.pad(p_cmp_BQHC, [(0, 0)] * (p_cmp_BQHC.ndim - 1) + [(left, max(0, need - left - c))])
  return sum(float(w[k]) * p[..., k:k + (num_blocks - 1) * r + 1:r] for k in range(len(w)))


def rank_blocks(scores, t0, doc_start_chunk=None, *, slc_block, num_selected, num_initial, num_local):
  """int32 [B, Qc, HKV, n] from block scores [B, Qc, HKV, NB] of queries t0 + [0, Qc): the forced
  blocks first (score +inf), then the highest scores among blocks j <= t // l'; -1 in free slots.
  With doc_start [B, Qc] blocks count from the document's first one (ceil(doc_start / l')): the
  blocks before it are never chosen and the initial blocks are the document's."""
  qc, num_blocks = scores.shape[1], scores.shape[-1]
  current = (t0 + jnp.arange(qc)) // slc_block
  j = jnp.arange(num_blocks)
  first = jnp.zeros((1, 1), jnp.int32) if doc_start_chunk is None else -(-doc_start_chunk // slc_block)
  back = (current[:, None] - j[None, :])[None]                                   # [1, Qc, NB]
  own = j[None, None, :] - first[:, :, None]                                     # [B|1, Qc, NB]
  forced = ((own >= 0) & (own < num_initial)) | ((back >= 0) & (back < num_local))
  eligible = (back >= 0) & (own >= 0)
  scores = jnp.where(forced[:, :, None, :], jnp.inf, scores)
  scores = jnp.where(eligible[:, :, None, :], scores, -jnp.inf)
  if num_blocks < num_selected:
    scores = jnp.pad(scores, [(0, 0)] * 3 + [(0, num_selected - num_blocks)], constant_values=-jnp.inf)
  values, index = jax.lax.top_k(scores, num_selected)            # ties: the lower block index
  return jnp.where(values == -jnp.inf, -1, index).astype(jnp.int32)


# ---- the four branches, per device ----

def compressed(q, k_cmp, v_cmp, doc_start=None, *, q_offset, block_len, stride, scale, options):
  """(out [B,Tq,HQ,Dv], lse [B,Tq,HQ]) of compressed attention for queries at q_offset + [0, Tq)."""
  hq = q.shape[2]

  def chunk_fn(q_chunk, t0, *doc_chunk):
    p, lse = compressed_probs(q_chunk, t0, k_cmp, *doc_chunk, block_len=block_len, stride=stride, scale=scale)
    out = jnp.einsum("bqhgc,bchd->bqhgd", p.astype(v_cmp.dtype), v_cmp, preferred_element_type=jnp.float32)
    return out.reshape(*out.shape[:2], hq, -1).astype(q.dtype), lse.reshape(*lse.shape[:2], hq)
  per_query = () if doc_start is None else (doc_start,)
  return map_query_chunks(chunk_fn, q, *per_query, chunk=options.query_chunk, options=options, offset=q_offset)


def select(q, k_cmp, doc_start=None, *, q_offset, num_blocks, block_len, stride, slc_block, rank, scale, options):
  """int32 [B,Tq,HKV,n]: block scores from the compressed probabilities, ranked by `rank`
  (rank_blocks with the selection's settings bound)."""
  per_query = () if doc_start is None else (doc_start,)

  def chunk_fn(q_chunk, t0, *doc):
    p, _ = compressed_probs(q_chunk, t0, k_cmp, *doc, block_len=block_len, stride=stride, scale=scale)
    return rank(block_scores(p.sum(axis=3), num_blocks, block_len=block_len, stride=stride,
                             slc_block=slc_block), t0, *doc)        # [B, Qc, HKV, NB] scores
  return map_query_chunks(chunk_fn, q, *per_query, chunk=options.query_chunk, options=options, offset=q_offset)


def selection(q, k, v, block_indices, *, q_offset, slc_block, scale, options):
  """out [B,Tq,HQ,Dv] of selected-block attention: whole l' blocks gathered per query chunk."""
  b, _, hq, dk = q.shape
  t, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
  scale = dk ** -0.5 if scale is None else scale
  num_blocks = -(-t // slc_block)
  pad = num_blocks * slc_block - t
  # [B, HKV, NB, block * D]: whole blocks as rows, gathered per query chunk below.
  to_blocks = lambda x: jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)]).reshape(
      b, num_blocks, slc_block, hkv, x.shape[-1]).transpose(0, 3, 1, 2, 4).reshape(b, hkv, num_blocks, -1)
  k_blocks, v_blocks = to_blocks(k), to_blocks(v)
  n = block_indices.shape[-1]

  def chunk_fn(q_chunk, t0, idx):                                    # idx [B, Qc, HKV, n]
    qc = q_chunk.shape[1]
    t_q = t0 + jnp.arange(qc)
    earlier = jnp.tril(jnp.ones((n, n), bool), -1)                   # slot r repeats slot s < r
    repeated = jnp.any((idx[..., :, None] == idx[..., None, :]) & earlier, axis=-1)
    valid = (idx >= 0) & (idx < num_blocks) & (idx <= (t_q // slc_block)[None, :, None, None]) & ~repeated
    safe = jnp.clip(idx, 0, num_blocks - 1).transpose(0, 2, 1, 3).reshape(b, hkv, qc * n)
    # Whole-block row gathers (block x D contiguous values per index), not element gathers.
    rows = jax.vmap(jax.vmap(lambda blocks, i: jnp.take(blocks, i, axis=0)))
    gather = lambda blocks: rows(blocks, safe).reshape(b, hkv, qc, n * slc_block, -1)   # [B,HKV,Qc,n*blk,D]
    k_sel, v_sel = gather(k_blocks), gather(v_blocks)
    # Per (query, KV head) the matmul has only G rows; with the keys as rows instead (k x g)
    # XLA's CPU dot is ~8x faster, so logits are [B, HKV, Qc, keys, G] here.
    qg = _grouped(q_chunk, hkv).transpose(0, 2, 1, 3, 4)             # [B, HKV, Qc, G, D]
    logits = jnp.einsum("bhqkd,bhqgd->bhqkg", k_sel, qg, preferred_element_type=jnp.float32) * scale
    pos = (jnp.clip(idx, 0)[..., None] * slc_block + jnp.arange(slc_block)).reshape(b, qc, hkv, -1)
    visible = jnp.repeat(valid, slc_block, axis=-1) & (pos <= t_q[None, :, None, None])
    p, _ = masked_softmax(logits.swapaxes(-1, -2), visible.transpose(0, 2, 1, 3)[:, :, :, None, :])
    out = jnp.einsum("bhqkg,bhqkd->bhqgd", p.swapaxes(-1, -2).astype(v.dtype), v_sel,
                     preferred_element_type=jnp.float32)              # [B, HKV, Qc, G, Dv]
    out = out.transpose(0, 2, 1, 3, 4)
    return out.reshape(b, qc, hq, dv).astype(q.dtype)
  return map_query_chunks(chunk_fn, q, block_indices, chunk=max(1, options.query_chunk // 2), options=options,
                          offset=q_offset)


def window(q, k, v, q_doc=None, *, q_offset, window, scale, options):
  """out [B,Tq,HQ,Dv] of sliding-window attention; q_doc: the queries' doc_start (packed rows)."""
  b, tq, hq, _ = q.shape
  t, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
  w = min(window, t)
  # Keys padded in front by w - 1 so chunk [t0, t0 + Qc) reads the slice [t0, t0 + Qc + w - 1).
  chunk = min(options.window_chunk, tq)
  tail = -(-tq // chunk) * chunk - tq
  k_pad = jnp.pad(k, [(0, 0), (w - 1, tail), (0, 0), (0, 0)])
  v_pad = jnp.pad(v, [(0, 0), (w - 1, tail), (0, 0), (0, 0)])

  def chunk_fn(q_chunk, t0, *doc):
    qc = q_chunk.shape[1]
    span = qc + w - 1
    k_win = jax.lax.dynamic_slice_in_dim(k_pad, t0, span, axis=1)
    v_win = jax.lax.dynamic_slice_in_dim(v_pad, t0, span, axis=1)
    logits = jnp.einsum("bqhgd,bshd->bqhgs", _grouped(q_chunk, hkv), k_win,
                        preferred_element_type=jnp.float32) * scale
    t_q = t0 + jnp.arange(qc)
    s = t0 - (w - 1) + jnp.arange(span)
    visible = (s[None, :] >= 0) & (s[None, :] <= t_q[:, None]) & (s[None, :] > t_q[:, None] - w)
    visible = visible[None] & _from_doc(doc[0] if doc else None, s)               # [B|1, Qc, span]
    p, _ = masked_softmax(logits, visible[:, :, None, None, :])
    out = jnp.einsum("bqhgs,bshd->bqhgd", p.astype(v.dtype), v_win, preferred_element_type=jnp.float32)
    return out.reshape(b, qc, hq, dv).astype(q.dtype)
  per_query = () if q_doc is None else (q_doc,)
  return map_query_chunks(chunk_fn, q, *per_query, chunk=chunk, options=options, offset=q_offset)
