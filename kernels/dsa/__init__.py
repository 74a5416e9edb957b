"""DeepSeek Sparse Attention: the lightning indexer's top-k, MLA attention in MQA form over the
selected rows, and the indexer's KL loss and recall (docs/design.md §5, §6).

`impl="xla"` runs the pure-JAX reference (kernels/dsa/reference.py); `impl="pallas"` (and `auto`
on TPU) the indexer's scores and the sparse attention (forward, dq, dkv) on the Pallas kernels of
kernels/dsa/pallas.py. The sparse stage's indexer loss takes its teacher from the attention
forward's own statistics (`sparse_attention_and_indexer_loss`: one more walk over the gathered
rows with the saved lse, QK only); the dense warm-up's loss and the recall stay on the reference.

Shapes: q [B,T,H,Dk] (absorbed queries), kv [B,T,Dk] (the one key row per token, its first v_dim
columns are the value), q_idx [B,T,H_I,D_I], k_idx [B,T,D_I], weights [B,T,H_I], indices int32
[B,T,k]. Key s is visible to query t iff s <= t (positions are sequence indices) and, for packed
documents, s >= doc_start[t] (int32 [B, T]: where t's document starts; a padding token's is t).
The sparse attention and the sparse stage's loss need no doc_start: the top-k already holds
only the query's own document.

Under context parallelism each function runs per device (parallel.placement.per_device): a
device's queries (global positions q_offset + i) against every key, the small key-side tensors
k_idx [T, D_I] and kv [T, Dk] gathered over the context axis.
"""
import functools

import jax
import jax.numpy as jnp

from kernels import DEFAULT_OPTIONS, chunking, resolve_impl
from kernels.dsa import indexer_pallas, reference
from kernels.dsa import pallas as dsa_pallas
from parallel import placement


def check_supported(*, n_heads: int) -> None:
  """The DSA Pallas kernels' shape rules (raises kernels.Unsupported naming the argument)."""
  dsa_pallas.check_supported(n_heads)


def _pallas(impl: str, options) -> bool:
  return resolve_impl(impl, options) == "pallas"


def _per_device(fn, in_axes, out_axes, pallas: bool = False):
  """The XLA references run as they are, or per device under context parallelism; the Pallas
  kernels always per device."""
  return placement.per_device(fn, in_axes, out_axes, pallas=pallas)


def indexer_topk(q_idx, k_idx, weights, *, topk: int, impl="auto", options=None, doc_start=None):
  """int32 [B, T, topk]: per query t, the visible keys s (s <= t, in t's document when doc_start
  is given) with the highest index scores I[t, s], best first (ties: the lower s). Fewer than
  topk visible keys: all of them, then -1. No gradient (the choice is discrete)."""
  options = options or DEFAULT_OPTIONS
  q_idx, k_idx, weights = (jax.lax.stop_gradient(x) for x in (q_idx, k_idx, weights))
  pallas = _pallas(impl, options)
  if pallas:
    local = lambda q_idx, k_idx, weights, doc=None, *, q_offset: indexer_pallas.indexer_topk(
        q_idx, k_idx, weights, q_offset, topk=topk, options=options, doc_start=doc)
  else:
    local = functools.partial(reference.indexer_topk, topk=topk, options=options)
  args, axes = placement.with_doc_start(
      (q_idx, k_idx, weights), (placement.QUERY_HEADS, placement.KEY_ROW, placement.QUERY_ROWS), doc_start)
  return _per_device(local, axes, placement.QUERY_ROWS, pallas)(*args)


def sparse_attention(q, kv, indices, *, v_dim: int, scale=None, impl="auto", options=None):
  """MQA attention of every head of query t over the rows kv[s], s in indices[t] (a set: -1,
  repeated, future and out-of-range entries are ignored); value = kv[..., :v_dim].
  Returns [B, T, H, v_dim] in q's dtype; a query with no valid index gets 0."""
  options = options or DEFAULT_OPTIONS
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  pallas = _pallas(impl, options)
  if pallas:      # the kernels sort each tile's union themselves
    local = lambda q, kv, indices, q_offset: dsa_pallas.sparse_attention(q, kv, indices, q_offset, v_dim=v_dim,
                                                                         scale=scale, options=options)
  else:           # sorted, a repeat sits next to its first copy, and the gathers walk kv in order
    indices = jnp.sort(indices, axis=-1)
    local = functools.partial(reference.sparse_attention, v_dim=v_dim, scale=scale, options=options)
  return _per_device(local, (placement.Q, placement.KEY_ROW, placement.QUERY_ROWS), placement.Q,
                     pallas)(q, kv, indices)


def indexer_loss(q, kv, q_idx, k_idx, weights, indices=None, *, scale=None, impl="auto", options=None,
                 doc_start=None):
  """mean over queries of KL(teacher_t || softmax(I[t, support])), docs/design.md §5.3.

  Support: every visible key (indices None: the dense warm-up; s <= t, in t's document with
  doc_start) or the set indices[t] (the sparse stage). Teacher: the main attention's
  probabilities (q, kv as in sparse_attention) restricted to the support, per head
  renormalised, summed over heads and L1-normalised; it is a constant (stop-gradient), so only
  q_idx, k_idx and weights receive gradients. On Pallas the sparse
  stage's teacher comes from the attention kernels (training calls
  sparse_attention_and_indexer_loss, which shares the attention's forward); the dense warm-up's
  loss is the reference on every backend."""
  options = options or DEFAULT_OPTIONS
  q, kv = jax.lax.stop_gradient(q), jax.lax.stop_gradient(kv)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if indices is not None and _pallas(impl, options):
    return sparse_attention_and_indexer_loss(q, kv, q_idx, k_idx, weights, indices, v_dim=kv.shape[-1], scale=scale,
                                             impl="pallas", options=options)[1]
  local = functools.partial(reference.indexer_loss, scale=scale, options=options)
  axes = [placement.Q, placement.KEY_ROW, placement.QUERY_HEADS, placement.KEY_ROW, placement.QUERY_ROWS]
  args = [q, kv, q_idx, k_idx, weights]
  if indices is not None:
    axes.append(placement.QUERY_ROWS)
    args.append(jnp.sort(indices, axis=-1))
  elif doc_start is not None:
    local = lambda q, kv, q_idx, k_idx, weights, doc, *, q_offset: reference.indexer_loss(
        q, kv, q_idx, k_idx, weights, None, doc, q_offset=q_offset, scale=scale, options=options)
    args, axes = placement.with_doc_start(args, axes, doc_start)
  return _per_device(local, tuple(axes), placement.PER_QUERY)(*args).mean()


def sparse_attention_and_indexer_loss(q, kv, q_idx, k_idx, weights, indices, *, v_dim: int, scale=None, impl="auto",
                                      options=None):
  """(sparse_attention(q, kv, indices), indexer_loss(q, kv, q_idx, k_idx, weights, indices)): the
  sparse stage's two calls sharing one attention forward. On Pallas the teacher is the forward's
  head-averaged probabilities over each query's selected keys (kernels.dsa.pallas.Teacher, from its
  own lse: O(T*k) floats, no attention recomputed in XLA); the student's scores are XLA's, over the
  same keys. Gradients: out's as sparse_attention's; the loss's reach q_idx, k_idx, weights only."""
  options = options or DEFAULT_OPTIONS
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if not _pallas(impl, options):
    return (sparse_attention(q, kv, indices, v_dim=v_dim, scale=scale, impl=impl, options=options),
            indexer_loss(q, kv, q_idx, k_idx, weights, indices, scale=scale, impl=impl, options=options))

  def local(q, kv, q_idx, k_idx, weights, indices, q_offset):
    out, teacher = dsa_pallas.sparse_attention(q, kv, indices, q_offset, v_dim=v_dim, scale=scale, options=options,
                                               teacher=True)
    heads = placement.split_axes("act_heads")      # tensor parallelism: a mean over this device's heads
    if heads:
      teacher = teacher._replace(probs=jax.lax.pmean(teacher.probs, heads))
    return out, union_kl(teacher, q_idx, k_idx, weights, options=options)
  axes = (placement.Q, placement.KEY_ROW, placement.QUERY_HEADS, placement.KEY_ROW, placement.QUERY_ROWS,
          placement.QUERY_ROWS)
  out, kl = _per_device(local, axes, (placement.Q, placement.PER_QUERY), True)(q, kv, q_idx, k_idx, weights, indices)
  return out, kl.mean()


def union_kl(teacher, q_idx, k_idx, weights, *, options):
  """Per query [B, Tq]: KL(teacher || softmax of the indexer's scores over the query's chosen
  keys), in the union space of dsa_pallas.Teacher. The student's scores are computed for every
  key of a tile's union (qpt x the chosen ones when qpt > 1; H=128 has qpt = 1), tile chunks of
  ~options.dsa_query_chunk queries at a time ([chunk, H_I, U] fp32, as the reference)."""
  b, nt, qpt, _ = teacher.probs.shape
  tq = q_idx.shape[1]

  def tiles(x):
    x = jnp.pad(x, [(0, 0), (0, nt * qpt - tq)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(b, nt, qpt, *x.shape[2:])

  def chunk_fn(qi, _, w, keys, bits, probs):
    rows = reference.gather_rows(k_idx, keys)                                                # [B, c, U, D_I]
    dots = jnp.einsum("bcud,bcqhd->bcquh", rows, qi, preferred_element_type=jnp.float32)
    student = jnp.einsum("bcquh,bcqh->bcqu", jax.nn.relu(dots), w.astype(jnp.float32))
    chose = jnp.right_shift(bits[:, :, None, :], jnp.arange(qpt, dtype=jnp.int32)[None, None, :, None]) & 1
    return reference.kl(probs, student, chose == 1)                                          # [B, c, qpt]
  kl = chunking.map_query_chunks(chunk_fn, tiles(q_idx), tiles(weights), teacher.keys, teacher.bits, teacher.probs,
                                 chunk=max(1, options.dsa_query_chunk // qpt), unroll=options.unroll_chunks)
  return kl.reshape(b, nt * qpt)[:, :tq]


def indexer_recall(q, kv, indices, *, topk: int, scale=None, options=None, doc_start=None, distance_edges=()):
  """(recall, rows): the mean over queries with more than `topk` visible keys (s <= t, in t's
  document with doc_start) of |indices[t] ∩ true top-k of the head-summed attention at t| / topk,
  and how many such queries there were (recall is 1 when there are none: every key is selected).
  With distance_edges (ascending t - s, the first 0): (recall, rows, hits, relevant), each
  [buckets]: of the true top-k keys at those distances, how many the indices chose and how many
  there were (hits / relevant: the recall by distance)."""
  options = options or DEFAULT_OPTIONS
  q, kv = jax.lax.stop_gradient(q), jax.lax.stop_gradient(kv)
  t = kv.shape[1]
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if t <= topk:
    none = jnp.zeros(len(distance_edges), jnp.int32)
    return (jnp.float32(1.0), jnp.int32(0)) + ((none, none) if distance_edges else ())
  local = functools.partial(reference.recall, topk=topk, scale=scale, options=options,
                            distance_edges=tuple(distance_edges))
  args, axes = placement.with_doc_start((q, kv, jnp.sort(indices, axis=-1)), (placement.Q, placement.KEY_ROW,
                                                                      placement.QUERY_ROWS), doc_start)
  outs = _per_device(local, axes, [placement.PER_QUERY] * (4 if distance_edges else 2))(*args)
  recall, counted = outs[:2]
  rows = counted.sum()
  if not distance_edges:
    return recall.sum() / jnp.maximum(rows, 1), rows
  return recall.sum() / jnp.maximum(rows, 1), rows, outs[2].sum((0, 1)), outs[3].sum((0, 1))


