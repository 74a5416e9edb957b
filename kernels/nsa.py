"""Native Sparse Attention (DESIGN.md §4, §6): the four functions of the kernel contract.

`impl="xla"` is the pure-JAX reference: the oracle for the Pallas kernels and the path on CPU/GPU.
Memory stays about linear in T: every function walks the queries in chunks of
`options.query_chunk` (kernels/chunking.py), so a chunk's scores ([chunk, heads, keys it may see]) exist only while that
chunk runs, in the forward and again in the backward. Nothing holds a T x T tensor, nor [T, C] per
head for the whole sequence. Shapes: q [B,T,HQ,Dk], k [B,T,HKV,Dk], v [B,T,HKV,Dv],
k_cmp [B,C,HKV,Dk], v_cmp [B,C,HKV,Dv]; query head h uses KV head h // (HQ // HKV).

`impl="pallas"` (and `"auto"` on TPU) runs every function on Pallas TPU kernels, forward and
backward: compressed attention and block scores in kernels/nsa_compressed_pallas.py, selection in
kernels/nsa_pallas.py, the window on splash attention; off TPU they run in TPU interpret mode.
Under a mesh of several devices each Pallas call runs per device (kernels/partition.py), and
under context parallelism every function runs per device for both impls: a device's queries
(global positions q_offset + i) against all keys. Each function's `_local` body is that
per-device computation; its q_offset is 0 without context parallelism.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels import DEFAULT_OPTIONS, chunking, dense, partition, resolve_impl
from kernels.chunking import masked_softmax


def check_supported(*, seq_len: int, n_heads: int, n_kv_heads: int, slc_block: int) -> None:
  """The NSA Pallas kernels' shape rules (raises kernels.Unsupported naming the argument): the
  selection and compressed kernels' (kernels/nsa_pallas.py) and splash's for the window."""
  from kernels import nsa_pallas
  nsa_pallas.check_supported(seq_len, n_heads, n_kv_heads, slc_block)
  dense.check_supported(seq_len=seq_len)


def _pallas(impl: str, options) -> bool:
  return resolve_impl(impl, options) == "pallas"


def map_query_chunks(fn, q, *per_query, chunk: int, options, remat: bool = True, offset=0):
  return chunking.map_query_chunks(fn, q, *per_query, chunk=chunk, remat=remat, unroll=options.unroll_chunks,
                                   offset=offset)


def num_compressed(seq_len: int, block_len: int, stride: int) -> int:
  """C = (T - l) // d + 1 compressed tokens, 0 when T < l."""
  return 0 if seq_len < block_len else (seq_len - block_len) // stride + 1


def _grouped(q_BTHD, hkv: int):
  b, t, hq, d = q_BTHD.shape
  return q_BTHD.reshape(b, t, hkv, hq // hkv, d)                     # [B, T, HKV, G, D]


# ---- compressed attention ----

def _from_doc(doc_start_chunk, key_start):
  """[B, Qc, K] bool: key_start [K] (a key's or compressed token's first position) is in the
  query's document (doc_start [B, Qc], see compressed_attention); True everywhere for None."""
  if doc_start_chunk is None:
    return jnp.ones((1, 1, key_start.shape[0]), bool)
  return key_start[None, None, :] >= doc_start_chunk[:, :, None]


def _compressed_probs(q_chunk, t0, k_cmp, doc_start_chunk=None, *, block_len, stride, scale):
  """p_cmp [B, Qc, HKV, G, C] (float32) and lse [B, Qc, HKV, G] for one query chunk."""
  hkv, c = k_cmp.shape[2], k_cmp.shape[1]
  qg = _grouped(q_chunk, hkv)
  logits = jnp.einsum("bqhgd,bchd->bqhgc", qg, k_cmp, preferred_element_type=jnp.float32) * scale
  t = t0 + jnp.arange(q_chunk.shape[1])
  visible = (jnp.arange(c) * stride + block_len - 1)[None, :] <= t[:, None]        # [Qc, C]
  visible = visible[None] & _from_doc(doc_start_chunk, jnp.arange(c) * stride)      # [B|1, Qc, C]
  return masked_softmax(logits, visible[:, :, None, None, :])


def compressed_attention(q, k_cmp, v_cmp, *, block_len, stride, scale=None, impl="auto", options=None,
                         doc_start=None):
  """Query t attends to compressed token i iff i*stride + block_len - 1 <= t and, with packed
  documents, i*stride >= doc_start[t] (int32 [B, T]: where t's document starts, a multiple of
  the selection block as model/packing.py lays rows out; t itself for padding).
  Returns (out [B,T,HQ,Dv] in q's dtype, lse [B,T,HQ] float32; -inf where nothing is visible).
  impl="pallas": kernels/nsa_compressed_pallas.py (forward, dq, dK/dV)."""
  options = options or DEFAULT_OPTIONS
  b, t, hq, dk = q.shape
  scale = dk ** -0.5 if scale is None else scale
  if k_cmp.shape[1] == 0:
    return jnp.zeros((b, t, hq, v_cmp.shape[-1]), q.dtype), jnp.full((b, t, hq), -jnp.inf, jnp.float32)
  pallas = _pallas(impl, options)
  local = functools.partial(compressed_local, block_len=block_len, stride=stride, scale=scale, pallas=pallas,
                            options=options)
  args, axes = partition.with_doc_start((q, k_cmp, v_cmp), (partition.Q, partition.CMP, partition.CMP), doc_start)
  return partition.per_device(local, axes, [partition.Q, partition.STATS], pallas=pallas)(*args)


def compressed_local(q, k_cmp, v_cmp, doc_start=None, *, q_offset, block_len, stride, scale, pallas, options):
  """One device's compressed_attention: queries at global positions q_offset + [0, Tq)."""
  if pallas:
    from kernels import nsa_compressed_pallas
    return nsa_compressed_pallas.compressed_attention(q, k_cmp, v_cmp, q_offset, block_len, stride, scale, options,
                                                      doc_start=doc_start)
  hq = q.shape[2]

  def chunk_fn(q_chunk, t0, *doc_chunk):
    p, lse = _compressed_probs(q_chunk, t0, k_cmp, *doc_chunk, block_len=block_len, stride=stride, scale=scale)
    out = jnp.einsum("bqhgc,bchd->bqhgd", p.astype(v_cmp.dtype), v_cmp, preferred_element_type=jnp.float32)
    return out.reshape(*out.shape[:2], hq, -1).astype(q.dtype), lse.reshape(*lse.shape[:2], hq)
  per_query = () if doc_start is None else (doc_start,)
  return map_query_chunks(chunk_fn, q, *per_query, chunk=options.query_chunk, options=options, offset=q_offset)


# ---- block selection ----

@functools.lru_cache(maxsize=None)
def overlap_weights(block_len: int, stride: int, select_block: int) -> np.ndarray:
  """w[k] = |[i*d, i*d+l) ∩ [0, l')| / d for the compressed tokens i = k - (l/d - 1) that overlap
  selection block 0; the same weights hold for every block j (shift i by j*l'/d). 1,2,2,2,1 for
  the paper's l=32, d=16, l'=64."""
  first = -(block_len // stride - 1)
  last = select_block // stride - 1
  w = [max(0, min(i * stride + block_len, select_block) - max(i * stride, 0)) / stride
       for i in range(first, last + 1)]
  return np.asarray(w, np.float32)


def block_scores(p_cmp_BQHC, num_blocks: int, *, block_len, stride, select_block):
  """s[..., j] = sum_i w(i, j) p_cmp[..., i] over the compressed tokens overlapping block j."""
  w = overlap_weights(block_len, stride, select_block)
  r, left = select_block // stride, block_len // stride - 1
  c = p_cmp_BQHC.shape[-1]
  need = (num_blocks - 1) * r + len(w)
  p = jnp.pad(p_cmp_BQHC, [(0, 0)] * (p_cmp_BQHC.ndim - 1) + [(left, max(0, need - left - c))])
  return sum(float(w[k]) * p[..., k:k + (num_blocks - 1) * r + 1:r] for k in range(len(w)))


def rank_blocks(scores, t0, doc_start_chunk=None, *, select_block, num_selected, num_initial, num_local):
  """int32 [B, Qc, HKV, n] from block scores [B, Qc, HKV, NB] of queries t0 + [0, Qc): the forced
  blocks first (score +inf), then the highest scores among blocks j <= t // l'; -1 in free slots.
  With doc_start [B, Qc] blocks count from the document's first one (ceil(doc_start / l')): the
  blocks before it are never chosen and the initial blocks are the document's."""
  qc, num_blocks = scores.shape[1], scores.shape[-1]
  current = (t0 + jnp.arange(qc)) // select_block
  j = jnp.arange(num_blocks)
  first = jnp.zeros((1, 1), jnp.int32) if doc_start_chunk is None else -(-doc_start_chunk // select_block)
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


def select_blocks(q, k_cmp, *, block_len, stride, select_block, num_selected, num_initial=1,
                  num_local=2, scale=None, lse=None, impl="auto", options=None, doc_start=None):
  """int32 [B, T, HKV, n]: per query and KV group, the forced blocks (the first `num_initial`,
  the `num_local` ending at t // l') and the highest group-summed importance scores among the
  eligible blocks j <= t // l'. Free slots are -1. No gradient flows through the choice.
  doc_start [B, T] (packed documents, see compressed_attention): blocks and scores count from
  the query's document only.
  impl="pallas": scores tile by tile in a Pallas kernel from q, k_cmp and the compressed branch's
  `lse` [B,T,HQ] (computed here when not given), top-n in XLA per chunk of options.select_chunk
  queries."""
  options = options or DEFAULT_OPTIONS
  q, k_cmp = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k_cmp)
  dk = q.shape[-1]
  scale = dk ** -0.5 if scale is None else scale
  pallas = _pallas(impl, options) and k_cmp.shape[1] > 0
  if pallas and lse is None:
    lse = compressed_attention(q, k_cmp, k_cmp, block_len=block_len, stride=stride, scale=scale, impl=impl,
                               options=options, doc_start=doc_start)[1]
  if lse is None:
    lse = jnp.zeros(q.shape[:3], jnp.float32)          # unused by the XLA reference
  local = functools.partial(select_local, num_blocks=-(-q.shape[1] // select_block), block_len=block_len,
                            stride=stride, select_block=select_block, num_selected=num_selected,
                            num_initial=num_initial, num_local=num_local, scale=scale, pallas=pallas,
                            options=options)
  args, axes = partition.with_doc_start(
      (q, k_cmp, jax.lax.stop_gradient(lse)), (partition.Q, partition.CMP, partition.STATS), doc_start)
  return partition.per_device(local, axes, partition.SELECTED, pallas=pallas)(*args)


def select_local(q, k_cmp, lse, doc_start=None, *, q_offset, num_blocks, block_len, stride, select_block, num_selected,
                 num_initial, num_local, scale, pallas, options):
  """One device's select_blocks: queries at global positions q_offset + [0, Tq) of a sequence of
  num_blocks selection blocks, with their compressed branch's lse (Pallas only)."""
  rank = functools.partial(rank_blocks, select_block=select_block, num_selected=num_selected,
                           num_initial=num_initial, num_local=num_local)
  b, hkv = q.shape[0], k_cmp.shape[2]
  per_query = () if doc_start is None else (doc_start,)
  if not k_cmp.shape[1]:
    return map_query_chunks(lambda q_chunk, t0, *doc: rank(jnp.zeros((b, q_chunk.shape[1], hkv, num_blocks)), t0, *doc),
                            q, *per_query, chunk=options.query_chunk, options=options, offset=q_offset)
  if pallas:
    from kernels import nsa_compressed_pallas
    scores = functools.partial(nsa_compressed_pallas.block_scores, k_cmp=k_cmp, block_len=block_len,
                               stride=stride, select_block=select_block, num_blocks=num_blocks, scale=scale,
                               options=options)
    def pallas_chunk(q_chunk, t0, lse_chunk, *doc):
      return rank(scores(q_chunk, lse_chunk, chunk_start=t0, doc_start=doc[0] if doc else None), t0, *doc)
    return map_query_chunks(pallas_chunk, q, lse, *per_query, chunk=options.select_chunk, remat=False, options=options,
                            offset=q_offset)

  def chunk_fn(q_chunk, t0, *doc):
    p, _ = _compressed_probs(q_chunk, t0, k_cmp, *doc, block_len=block_len, stride=stride, scale=scale)
    return rank(block_scores(p.sum(axis=3), num_blocks, block_len=block_len, stride=stride,
                             select_block=select_block), t0, *doc)        # [B, Qc, HKV, NB] scores
  return map_query_chunks(chunk_fn, q, *per_query, chunk=options.query_chunk, options=options, offset=q_offset)


# ---- selected-block attention ----

def selection_attention(q, k, v, block_indices, *, block_size, scale=None, impl="auto", options=None):
  """Query t attends to keys s with s // block_size among its KV group's `block_indices` and
  s <= t. Indices that are -1, repeated, in the future or out of range are ignored."""
  options = options or DEFAULT_OPTIONS
  pallas = _pallas(impl, options)   # the Pallas kernels (forward, dq, dK/dV); TPU interpret mode off-TPU
  local = functools.partial(selection_local, block_size=block_size, scale=scale, pallas=pallas, options=options)
  return partition.per_device(local, (partition.Q, partition.KV, partition.KV, partition.SELECTED), partition.Q,
                              pallas=pallas)(q, k, v, block_indices)


def selection_local(q, k, v, block_indices, *, q_offset, block_size, scale, pallas, options):
  """One device's selection_attention: queries at q_offset + [0, Tq) against all keys k, v."""
  if pallas:
    from kernels import nsa_pallas
    return nsa_pallas.selection_attention(q, k, v, block_indices, q_offset, block_size, scale, options)
  b, _, hq, dk = q.shape
  t, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
  scale = dk ** -0.5 if scale is None else scale
  num_blocks = -(-t // block_size)
  pad = num_blocks * block_size - t
  # [B, HKV, NB, block * D]: whole blocks as rows, gathered per query chunk below.
  to_blocks = lambda x: jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)]).reshape(
      b, num_blocks, block_size, hkv, x.shape[-1]).transpose(0, 3, 1, 2, 4).reshape(b, hkv, num_blocks, -1)
  k_blocks, v_blocks = to_blocks(k), to_blocks(v)
  n = block_indices.shape[-1]

  def chunk_fn(q_chunk, t0, idx):                                    # idx [B, Qc, HKV, n]
    qc = q_chunk.shape[1]
    t_q = t0 + jnp.arange(qc)
    earlier = jnp.tril(jnp.ones((n, n), bool), -1)                   # slot r repeats slot s < r
    repeated = jnp.any((idx[..., :, None] == idx[..., None, :]) & earlier, axis=-1)
    valid = (idx >= 0) & (idx < num_blocks) & (idx <= (t_q // block_size)[None, :, None, None]) & ~repeated
    safe = jnp.clip(idx, 0, num_blocks - 1).transpose(0, 2, 1, 3).reshape(b, hkv, qc * n)
    # Whole-block row gathers (block x D contiguous values per index), not element gathers.
    rows = jax.vmap(jax.vmap(lambda blocks, i: jnp.take(blocks, i, axis=0)))
    gather = lambda blocks: rows(blocks, safe).reshape(b, hkv, qc, n * block_size, -1)   # [B,HKV,Qc,n*blk,D]
    k_sel, v_sel = gather(k_blocks), gather(v_blocks)
    # Per (query, KV head) the matmul has only G rows; with the keys as rows instead (k x g)
    # XLA's CPU dot is ~8x faster, so logits are [B, HKV, Qc, keys, G] here.
    qg = _grouped(q_chunk, hkv).transpose(0, 2, 1, 3, 4)             # [B, HKV, Qc, G, D]
    logits = jnp.einsum("bhqkd,bhqgd->bhqkg", k_sel, qg, preferred_element_type=jnp.float32) * scale
    pos = (jnp.clip(idx, 0)[..., None] * block_size + jnp.arange(block_size)).reshape(b, qc, hkv, -1)
    visible = jnp.repeat(valid, block_size, axis=-1) & (pos <= t_q[None, :, None, None])
    p, _ = masked_softmax(logits.swapaxes(-1, -2), visible.transpose(0, 2, 1, 3)[:, :, :, None, :])
    out = jnp.einsum("bhqkg,bhqkd->bhqgd", p.swapaxes(-1, -2).astype(v.dtype), v_sel,
                     preferred_element_type=jnp.float32)              # [B, HKV, Qc, G, Dv]
    out = out.transpose(0, 2, 1, 3, 4)
    return out.reshape(b, qc, hq, dv).astype(q.dtype)
  return map_query_chunks(chunk_fn, q, block_indices, chunk=max(1, options.query_chunk // 2), options=options,
                          offset=q_offset)


# ---- sliding window ----

def window_attention(q, k, v, *, window, scale=None, impl="auto", options=None, doc_start=None):
  """Query t attends to keys s with t - window < s <= t (`window` keys including itself) and,
  with packed documents, s >= doc_start[t] (int32 [B, T], see compressed_attention).
  impl="pallas": jax's splash-attention kernels (forward and backward) with a local mask, and
  doc_start as segment ids (a document's tokens share it; padding's are its own positions)."""
  options = options or DEFAULT_OPTIONS
  pallas = _pallas(impl, options)
  if pallas:
    dense.check_supported(seq_len=q.shape[1])
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  local = functools.partial(window_local, window=window, scale=scale, pallas=pallas, options=options)
  kv_axes = partition.KV if k.shape[2] > 1 else partition.MQA
  args, axes = (q, k, v), (partition.Q, kv_axes, kv_axes)
  if doc_start is not None:
    args, axes = (*args, doc_start, doc_start), (*axes, partition.ROWS, partition.KEY_ROWS)
  return partition.per_device(local, axes, partition.Q, pallas=pallas)(*args)


def window_local(q, k, v, q_doc=None, kv_doc=None, *, q_offset, window, scale, pallas, options):
  """One device's window_attention: queries at q_offset + [0, Tq) against all keys k, v; q_doc,
  kv_doc: the queries' and keys' doc_start."""
  if pallas:
    if q_doc is None:
      q_doc, kv_doc = jnp.zeros(q.shape[:2], jnp.int32), jnp.zeros(k.shape[:2], jnp.int32)
    return dense.local_attention(q, k, v, q_doc.astype(jnp.int32), kv_doc.astype(jnp.int32), q_offset=q_offset,
                                 scale=scale, window=window, pallas=True, options=options)
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
