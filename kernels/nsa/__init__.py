"""Native Sparse Attention: the four functions of the kernel contract (docs/design.md §4, §6), and
compressed_attention_and_selection, the first two in one (the model's path: on Pallas one forward
kernel gives the compressed branch and its block scores).

Shapes: q [B,T,HQ,Dk], k [B,T,HKV,Dk], v [B,T,HKV,Dv], k_cmp [B,C,HKV,Dk], v_cmp [B,C,HKV,Dv];
query head h uses KV head h // (HQ // HKV). `impl="xla"` runs the pure-JAX reference
(kernels/nsa/reference.py); `impl="pallas"` (and `"auto"` on TPU) the Pallas TPU kernels, forward
and backward: compressed attention and block scores in kernels/nsa/compressed_pallas.py,
selection and the window in kernels/nsa/selection_pallas.py (one block walk); off TPU they run
in TPU interpret mode. Every function runs per device through parallel.placement.per_device (the
Pallas calls inside jax.shard_map; under context parallelism both impls): each `_local` body is
one device's queries at global positions q_offset + [0, Tq) against all keys.
"""
import functools

import jax
import jax.numpy as jnp

from kernels import DEFAULT_OPTIONS, resolve_impl
from kernels.nsa import reference
from kernels.nsa.reference import map_query_chunks, rank_blocks
from parallel import placement


def _slc_block(slc_block, legacy: int | None, legacy_name: str) -> int:
  """l' under its one name; the brief's first contract named it `select_block` (select_blocks) and
  `block_size` (selection_attention), which are still accepted."""
  if legacy is not None:
    if slc_block is not None and slc_block != legacy:
      raise ValueError(f"slc_block={slc_block} and {legacy_name}={legacy}: give one (they are the same l')")
    return legacy
  if slc_block is None:
    raise TypeError("slc_block (NSA's selection block l') is required")
  return slc_block


def check_supported(*, seq_len: int, n_heads: int, n_kv_heads: int, slc_block: int) -> None:
  """The NSA Pallas kernels' shape rules (raises kernels.Unsupported naming the argument): the
  selection and compressed kernels' (kernels/nsa/selection_pallas.py) and splash's for the window."""
  from kernels.nsa import selection_pallas
  selection_pallas.check_supported(seq_len, n_heads, n_kv_heads, slc_block)
  selection_pallas.check_window(seq_len, seq_len, n_heads, n_kv_heads)


def _pallas(impl: str, options) -> bool:
  return resolve_impl(impl, options) == "pallas"


def num_compressed(seq_len: int, block_len: int, stride: int) -> int:
  """C = (T - l) // d + 1 compressed tokens, 0 when T < l."""
  return 0 if seq_len < block_len else (seq_len - block_len) // stride + 1


# ---- compressed attention ----

def compressed_attention(q, k_cmp, v_cmp, *, block_len, stride, scale=None, impl="auto", options=None,
                         doc_start=None):
  """Query t attends to compressed token i iff i*stride + block_len - 1 <= t and, with packed
  documents, i*stride >= doc_start[t] (int32 [B, T]: where t's document starts, a multiple of
  the selection block as model/packing.py lays rows out; t itself for padding).
  Returns (out [B,T,HQ,Dv] in q's dtype, lse [B,T,HQ] float32; -inf where nothing is visible).
  impl="pallas": kernels/nsa/compressed_pallas.py (forward, dq, dK/dV)."""
  options = options or DEFAULT_OPTIONS
  b, t, hq, dk = q.shape
  scale = dk ** -0.5 if scale is None else scale
  if k_cmp.shape[1] == 0:
    return jnp.zeros((b, t, hq, v_cmp.shape[-1]), q.dtype), jnp.full((b, t, hq), -jnp.inf, jnp.float32)
  pallas = _pallas(impl, options)
  local = functools.partial(compressed_local, block_len=block_len, stride=stride, scale=scale, pallas=pallas,
                            options=options)
  args, axes = placement.with_doc_start((q, k_cmp, v_cmp), (placement.Q, placement.CMP, placement.CMP), doc_start)
  return placement.per_device(local, axes, [placement.Q, placement.STATS], pallas=pallas)(*args)


def compressed_local(q, k_cmp, v_cmp, doc_start=None, *, q_offset, block_len, stride, scale, pallas, options):
  """One device's compressed_attention: queries at global positions q_offset + [0, Tq)."""
  if pallas:
    from kernels.nsa import compressed_pallas
    return compressed_pallas.compressed_attention(q, k_cmp, v_cmp, q_offset, block_len, stride, scale, options,
                                                      doc_start=doc_start)
  return reference.compressed(q, k_cmp, v_cmp, doc_start, q_offset=q_offset, block_len=block_len, stride=stride,
                              scale=scale, options=options)


# ---- block selection ----

def select_blocks(q, k_cmp, *, block_len, stride, slc_block=None, num_selected, num_initial=1,
                  num_local=2, scale=None, lse=None, impl="auto", options=None, doc_start=None, select_block=None):
  """int32 [B, T, HKV, n]: per query and KV group, the forced blocks (the first `num_initial`,
  the `num_local` ending at t // l') and the highest group-summed importance scores among the
  eligible blocks j <= t // l'. Free slots are -1. No gradient flows through the choice.
  doc_start [B, T] (packed documents, see compressed_attention): blocks and scores count from
  the query's document only.
  impl="pallas": scores tile by tile in a Pallas kernel from q, k_cmp and the compressed branch's
  `lse` [B,T,HQ] (computed here when not given), top-n in XLA per chunk of options.select_chunk
  queries."""
  slc_block = _slc_block(slc_block, select_block, "select_block")
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
  local = functools.partial(select_local, num_blocks=-(-q.shape[1] // slc_block), block_len=block_len,
                            stride=stride, slc_block=slc_block, num_selected=num_selected,
                            num_initial=num_initial, num_local=num_local, scale=scale, pallas=pallas,
                            options=options)
  args, axes = placement.with_doc_start(
      (q, k_cmp, jax.lax.stop_gradient(lse)), (placement.Q, placement.CMP, placement.STATS), doc_start)
  return placement.per_device(local, axes, placement.SELECTED, pallas=pallas)(*args)


def select_local(q, k_cmp, lse, doc_start=None, *, q_offset, num_blocks, block_len, stride, slc_block, num_selected,
                 num_initial, num_local, scale, pallas, options):
  """One device's select_blocks: queries at global positions q_offset + [0, Tq) of a sequence of
  num_blocks selection blocks, with their compressed branch's lse (Pallas only)."""
  rank = functools.partial(rank_blocks, slc_block=slc_block, num_selected=num_selected,
                           num_initial=num_initial, num_local=num_local)
  b, hkv = q.shape[0], k_cmp.shape[2]
  per_query = () if doc_start is None else (doc_start,)
  if not k_cmp.shape[1]:
    return map_query_chunks(lambda q_chunk, t0, *doc: rank(jnp.zeros((b, q_chunk.shape[1], hkv, num_blocks)), t0, *doc),
                            q, *per_query, chunk=options.query_chunk, options=options, offset=q_offset)
  if pallas:
    from kernels.nsa import compressed_pallas
    scores = functools.partial(compressed_pallas.block_scores, k_cmp=k_cmp, block_len=block_len,
                               stride=stride, slc_block=slc_block, num_blocks=num_blocks, scale=scale,
                               options=options)
    def pallas_chunk(q_chunk, t0, lse_chunk, *doc):
      return rank(scores(q_chunk, lse_chunk, chunk_start=t0, doc_start=doc[0] if doc else None), t0, *doc)
    return map_query_chunks(pallas_chunk, q, lse, *per_query, chunk=options.select_chunk, remat=False, options=options,
                            offset=q_offset)

  return reference.select(q, k_cmp, doc_start, q_offset=q_offset, num_blocks=num_blocks, block_len=block_len,
                          stride=stride, slc_block=slc_block, rank=rank, scale=scale, options=options)


# ---- compressed attention and block selection, fused ----

def compressed_attention_and_selection(q, k_cmp, v_cmp, *, block_len, stride, slc_block, num_selected, num_initial=1,
                                       num_local=2, scale=None, impl="auto", options=None, doc_start=None):
  """(out, lse, block_indices): compressed_attention's (out, lse) and select_blocks' indices of the
  same queries (select_blocks from this lse). impl="pallas": one forward kernel gives the
  attention and the block scores (kernels/nsa/compressed_pallas.py, nsa_compressed_fwd_scores;
  NSA reuses the compressed branch's probabilities), ranked per chunk of options.select_chunk
  queries; where the fused kernel does not apply (compressed_pallas.fused_geometry: e.g. more
  blocks than its VMEM holds) the separate score kernel, as select_blocks runs it. impl="xla":
  compressed_attention then select_blocks. The indices get no gradient."""
  options = options or DEFAULT_OPTIONS
  b, t, hq, dk = q.shape
  scale = dk ** -0.5 if scale is None else scale
  select = dict(slc_block=slc_block, num_selected=num_selected, num_initial=num_initial, num_local=num_local)
  if not (_pallas(impl, options) and k_cmp.shape[1]):
    out, lse = compressed_attention(q, k_cmp, v_cmp, block_len=block_len, stride=stride, scale=scale, impl=impl,
                                    options=options, doc_start=doc_start)
    return out, lse, select_blocks(q, k_cmp, block_len=block_len, stride=stride, scale=scale, lse=lse, impl=impl,
                                   options=options, doc_start=doc_start, **select)
  local = functools.partial(compressed_selection_local, num_blocks=-(-t // slc_block), block_len=block_len,
                            stride=stride, scale=scale, options=options, **select)
  args, axes = placement.with_doc_start((q, k_cmp, v_cmp), (placement.Q, placement.CMP, placement.CMP), doc_start)
  return placement.per_device(local, axes, [placement.Q, placement.STATS, placement.SELECTED], pallas=True)(*args)


def compressed_selection_local(q, k_cmp, v_cmp, doc_start=None, *, q_offset, num_blocks, block_len, stride, slc_block,
                               num_selected, num_initial, num_local, scale, options):
  """One device's compressed_attention_and_selection on Pallas: queries at q_offset + [0, Tq)."""
  from kernels.nsa import compressed_pallas
  b, t, hq, dk = q.shape
  fused = compressed_pallas.fused_geometry(b, t, hq, k_cmp.shape[2], dk, v_cmp.shape[-1], k_cmp.shape[1], block_len,
                                           stride, slc_block, num_blocks, dtype=q.dtype, scale=scale, options=options,
                                           docs=doc_start is not None)
  select = dict(slc_block=slc_block, num_selected=num_selected, num_initial=num_initial, num_local=num_local)
  if fused is None:
    out, lse = compressed_pallas.compressed_attention(q, k_cmp, v_cmp, q_offset, block_len, stride, scale, options,
                                                      doc_start=doc_start)
    stop = jax.lax.stop_gradient
    return out, lse, select_local(stop(q), stop(k_cmp), stop(lse), doc_start, q_offset=q_offset, num_blocks=num_blocks,
                                  block_len=block_len, stride=stride, scale=scale, pallas=True, options=options,
                                  **select)
  out, lse, scores = compressed_pallas.compressed_attention_and_scores(
      q, k_cmp, v_cmp, q_offset, block_len, stride, slc_block, num_blocks, scale, options, doc_start=doc_start,
      geometry=fused)
  return out, lse, rank_score_chunks(scores, q_offset, doc_start, chunk=options.select_chunk, **select)


def rank_score_chunks(scores_BHTN, q_offset, doc_start=None, *, chunk: int, **select):
  """int32 [B, T, HKV, n]: rank_blocks of block scores [B, HKV, T, NB] (queries at q_offset + [0, T)),
  a chunk of queries at a time (the largest divisor of T up to `chunk`): top-n of [chunk, HKV, NB]."""
  b, hkv, t, _ = scores_BHTN.shape
  qc = max(d for d in range(1, min(chunk, t) + 1) if t % d == 0)

  def ranked(i):
    s = jax.lax.dynamic_slice_in_dim(scores_BHTN, i * qc, qc, axis=2).transpose(0, 2, 1, 3)
    doc = () if doc_start is None else (jax.lax.dynamic_slice_in_dim(doc_start, i * qc, qc, axis=1),)
    return rank_blocks(s, q_offset + i * qc, *doc, **select)
  out = jax.lax.map(ranked, jnp.arange(t // qc, dtype=jnp.int32))              # [n, B, qc, HKV, sel]
  return out.swapaxes(0, 1).reshape(b, t, hkv, -1)


# ---- selected-block attention ----

def selection_attention(q, k, v, block_indices, *, slc_block=None, scale=None, impl="auto", options=None,
                        block_size=None):
  """Query t attends to keys s with s // slc_block among its KV group's `block_indices` and
  s <= t. Indices that are -1, repeated, in the future or out of range are ignored."""
  slc_block = _slc_block(slc_block, block_size, "block_size")
  options = options or DEFAULT_OPTIONS
  pallas = _pallas(impl, options)   # the Pallas kernels (forward, dq, dK/dV); TPU interpret mode off-TPU
  local = functools.partial(selection_local, slc_block=slc_block, scale=scale, pallas=pallas, options=options)
  return placement.per_device(local, (placement.Q, placement.KV, placement.KV, placement.SELECTED), placement.Q,
                              pallas=pallas)(q, k, v, block_indices)


def selection_local(q, k, v, block_indices, *, q_offset, slc_block, scale, pallas, options):
  """One device's selection_attention: queries at q_offset + [0, Tq) against all keys k, v."""
  if pallas:
    from kernels.nsa import selection_pallas
    return selection_pallas.selection_attention(q, k, v, block_indices, q_offset, slc_block, scale, options)
  return reference.selection(q, k, v, block_indices, q_offset=q_offset, slc_block=slc_block, scale=scale,
                             options=options)


# ---- selection and window of one K/V ----

def selection_and_window(q, k, v, block_indices, *, slc_block, window, scale=None, impl="auto", options=None,
                         doc_start=None):
  """(selection_attention(q, k, v, block_indices, ...), window_attention(q, k, v, ...)) when the two
  branches share K and V (nsa.separate_kv False): one per-device call, so that under context
  parallelism K and V are gathered once for both."""
  options = options or DEFAULT_OPTIONS
  pallas = _pallas(impl, options)
  if pallas:
    from kernels.nsa import selection_pallas
    selection_pallas.check_window(q.shape[1], k.shape[1], q.shape[2], k.shape[2])
  scale = q.shape[-1] ** -0.5 if scale is None else scale

  def local(q, k, v, block_indices, q_doc=None, *, q_offset):
    kw = dict(q_offset=q_offset, scale=scale, pallas=pallas, options=options)
    return (selection_local(q, k, v, block_indices, slc_block=slc_block, **kw),
            window_local(q, k, v, q_doc, window=window, **kw))
  kv_axes = placement.KV if k.shape[2] > 1 else placement.MQA
  args, axes = (q, k, v, block_indices), (placement.Q, kv_axes, kv_axes, placement.SELECTED)
  if doc_start is not None:
    args, axes = (*args, doc_start), (*axes, placement.PER_QUERY)
  return placement.per_device(local, axes, [placement.Q, placement.Q], pallas=pallas)(*args)


# ---- sliding window ----

def window_attention(q, k, v, *, window, scale=None, impl="auto", options=None, doc_start=None):
  """Query t attends to keys s with t - window < s <= t (`window` keys including itself) and,
  with packed documents, s >= doc_start[t] (int32 [B, T], see compressed_attention).
  impl="pallas": the block walk of kernels/nsa/selection_pallas.py over each query tile's window
  blocks (forward and backward), doc_start as a per-row mask."""
  options = options or DEFAULT_OPTIONS
  pallas = _pallas(impl, options)
  if pallas:
    from kernels.nsa import selection_pallas
    selection_pallas.check_window(q.shape[1], k.shape[1], q.shape[2], k.shape[2])
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  local = functools.partial(window_local, window=window, scale=scale, pallas=pallas, options=options)
  kv_axes = placement.KV if k.shape[2] > 1 else placement.MQA
  args, axes = (q, k, v), (placement.Q, kv_axes, kv_axes)
  if doc_start is not None:
    args, axes = (*args, doc_start, doc_start), (*axes, placement.PER_QUERY, placement.PER_KEY)
  return placement.per_device(local, axes, placement.Q, pallas=pallas)(*args)


def window_local(q, k, v, q_doc=None, kv_doc=None, *, q_offset, window, scale, pallas, options):
  """One device's window_attention: queries at q_offset + [0, Tq) against all keys k, v; q_doc,
  kv_doc: the queries' and keys' doc_start."""
  if pallas:
    from kernels.nsa import selection_pallas
    return selection_pallas.window_attention(q, k, v, q_doc, q_offset, window, scale, options)
  return reference.window(q, k, v, q_doc, q_offset=q_offset, window=window, scale=scale, options=options)
