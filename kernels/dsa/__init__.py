"""DeepSeek Sparse Attention (docs/design.md §5, §6): the lightning indexer's top-k, MLA attention in
MQA form over the selected rows, and the indexer's KL loss and recall.

`impl="xla"` is the pure-JAX reference: the oracle for the Pallas kernels and the path on CPU/GPU.
`impl="pallas"` (and `auto` on TPU) runs the indexer's scores and the sparse attention (forward,
dq, dkv) on the Pallas kernels of kernels/dsa_pallas.py. The sparse stage's indexer loss takes its
teacher from the attention forward's own statistics (`sparse_attention_and_indexer_loss`: one
more walk over the gathered rows with the saved lse, QK only); the dense warm-up's loss and the
recall stay on the reference.
Memory is O(T*k), never T x T: every function walks the queries in chunks of `options.dsa_query_chunk`
(kernels/chunking.py). Per chunk the indexer holds [chunk, H_I, T] scores and the sparse attention
[chunk, k, D] gathered rows; the backward recomputes them chunk by chunk and its only dense
tensor is the [T, D] gradient of kv itself (the gather's transpose adds rows into it).

Shapes: q [B,T,H,Dk] (absorbed queries), kv [B,T,Dk] (the one key row per token, its first v_dim
columns are the value), q_idx [B,T,H_I,D_I], k_idx [B,T,D_I], weights [B,T,H_I], indices int32
[B,T,k]. Key s is visible to query t iff s <= t (positions are sequence indices) and, for packed
documents, s >= doc_start[t] (int32 [B, T]: where t's document starts; a padding token's is t).
The sparse attention and the sparse stage's loss need no doc_start: the top-k already holds
only the query's own document.

Under context parallelism each function runs per device (kernels/placement.py): a device's
queries (global positions q_offset + i) against every key, the small key-side tensors k_idx
[T, D_I] and kv [T, Dk] gathered over the context axis. Each function's `_local` body is that
per-device computation.
"""
import functools

import jax
import jax.numpy as jnp

from kernels import DEFAULT_OPTIONS, chunking, resolve_impl
from kernels.chunking import masked_softmax
from kernels.dsa import pallas as dsa_pallas
from parallel import placement


def check_supported(*, n_heads: int) -> None:
  """The DSA Pallas kernels' shape rules (raises kernels.Unsupported naming the argument)."""
  dsa_pallas.check_supported(n_heads)


def _pallas(impl: str, options) -> bool:
  return resolve_impl(impl, options) == "pallas"


def map_query_chunks(fn, q, *per_query, options, offset=0):
  """chunking.map_query_chunks with the chunk size and unrolling of `options`."""
  return chunking.map_query_chunks(fn, q, *per_query, chunk=options.dsa_query_chunk, unroll=options.unroll_chunks,
                                   offset=offset)


def _per_device(fn, in_axes, out_axes, pallas: bool = False):
  """The XLA references run as they are, or per device under context parallelism; the Pallas
  kernels always per device."""
  return placement.per_device(fn, in_axes, out_axes, pallas=pallas)


def _causal(t0, num_queries: int, num_keys: int):
  """[Qc, S] bool: key s visible to query t0 + i."""
  return jnp.arange(num_keys)[None, :] <= (t0 + jnp.arange(num_queries))[:, None]


def _visible(t0, num_keys: int, doc_chunk, batch: int, num_queries: int):
  """[B, Qc, S] bool: _causal, and with packed documents (doc_chunk = (doc_start [B, Qc],))
  only keys of the query's own document."""
  visible = _causal(t0, num_queries, num_keys)[None]
  if doc_chunk:
    visible = visible & (jnp.arange(num_keys)[None, None, :] >= doc_chunk[0][:, :, None])
  return jnp.broadcast_to(visible, (batch, num_queries, num_keys))


def _index_scores(q_idx, weights, k_idx):
  """I[b, q, s] = sum_j w[b, q, j] * relu(q_idx[b, q, j] . k_idx[b, s]) in float32.
  k_idx is [B, S, D_I] (all keys) or [B, Qc, K, D_I] (each query's own rows)."""
  if k_idx.ndim == 3:
    dots = jnp.einsum("bqhd,bsd->bqhs", q_idx, k_idx, preferred_element_type=jnp.float32)
    return jnp.einsum("bqhs,bqh->bqs", jax.nn.relu(dots), weights.astype(jnp.float32))
  dots = jnp.einsum("bqkd,bqhd->bqkh", k_idx, q_idx, preferred_element_type=jnp.float32)
  return jnp.einsum("bqkh,bqh->bqk", jax.nn.relu(dots), weights.astype(jnp.float32))


def _valid(indices_sorted, t0, num_keys: int):
  """Which slots of a chunk's sorted [B, Qc, K] indices are real, visible and not repeats."""
  t_q = (t0 + jnp.arange(indices_sorted.shape[1]))[None, :, None]
  first = jnp.concatenate([jnp.ones_like(indices_sorted[..., :1], bool),
                           indices_sorted[..., 1:] != indices_sorted[..., :-1]], axis=-1)
  return (indices_sorted >= 0) & (indices_sorted < num_keys) & (indices_sorted <= t_q) & first


def _gather_rows(x_BSD, indices_BQK):
  """x[b, indices[b, q, k]] -> [B, Qc, K, D]: whole-row gathers (out-of-range indices clipped;
  callers mask them)."""
  b, qc, k = indices_BQK.shape
  safe = jnp.clip(indices_BQK, 0, x_BSD.shape[1] - 1).reshape(b, qc * k)
  rows = jax.vmap(lambda x, i: jnp.take(x, i, axis=0))(x_BSD, safe)
  return rows.reshape(b, qc, k, x_BSD.shape[-1])


def indexer_topk(q_idx, k_idx, weights, *, topk: int, impl="auto", options=None, doc_start=None):
  """int32 [B, T, topk]: per query t, the visible keys s (s <= t, in t's document when doc_start
  is given) with the highest index scores I[t, s], best first (ties: the lower s). Fewer than
  topk visible keys: all of them, then -1. No gradient (the choice is discrete)."""
  options = options or DEFAULT_OPTIONS
  q_idx, k_idx, weights = (jax.lax.stop_gradient(x) for x in (q_idx, k_idx, weights))
  pallas = _pallas(impl, options)
  if pallas:
    local = lambda q_idx, k_idx, weights, doc=None, *, q_offset: dsa_pallas.indexer_topk(
        q_idx, k_idx, weights, q_offset, topk=topk, options=options, doc_start=doc)
  else:
    local = functools.partial(indexer_topk_local, topk=topk, options=options)
  args, axes = placement.with_doc_start(
      (q_idx, k_idx, weights), (placement.QUERY_HEADS, placement.KEY_ROW, placement.QUERY_ROWS), doc_start)
  return _per_device(local, axes, placement.QUERY_ROWS, pallas)(*args)


def indexer_topk_local(q_idx, k_idx, weights, doc_start=None, *, q_offset, topk, options):
  """One device's indexer_topk: queries at global positions q_offset + [0, Tq), all keys."""
  num_keys = k_idx.shape[1]

  def chunk_fn(q_chunk, t0, w_chunk, *doc):
    scores = _index_scores(q_chunk, w_chunk, k_idx)                    # [B, Qc, T]
    scores = jnp.where(_visible(t0, num_keys, doc, *scores.shape[:2]), scores, -jnp.inf)
    if num_keys < topk:
      scores = jnp.pad(scores, [(0, 0), (0, 0), (0, topk - num_keys)], constant_values=-jnp.inf)
    values, index = jax.lax.top_k(scores, topk)
    return jnp.where(values == -jnp.inf, -1, index).astype(jnp.int32)
  per_query = () if doc_start is None else (doc_start,)
  return map_query_chunks(chunk_fn, q_idx, weights, *per_query, options=options, offset=q_offset)


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
    local = functools.partial(sparse_attention_local, v_dim=v_dim, scale=scale, options=options)
  return _per_device(local, (placement.Q, placement.KEY_ROW, placement.QUERY_ROWS), placement.Q,
                     pallas)(q, kv, indices)


def sparse_attention_local(q, kv, indices, *, q_offset, v_dim, scale, options):
  """One device's sparse_attention (indices sorted): queries at q_offset + [0, Tq), all rows kv."""
  t = kv.shape[1]

  def chunk_fn(q_chunk, t0, idx):
    rows = _gather_rows(kv, idx)                                       # [B, Qc, K, Dk]
    # The keys as matmul rows (K >> H): XLA's CPU dot is much faster that way round.
    logits = jnp.einsum("bqkd,bqhd->bqhk", rows, q_chunk, preferred_element_type=jnp.float32) * scale
    p, _ = masked_softmax(logits, _valid(idx, t0, t)[:, :, None, :])
    out = jnp.einsum("bqhk,bqkd->bqhd", p.astype(kv.dtype), rows[..., :v_dim],
                     preferred_element_type=jnp.float32)
    return out.astype(q.dtype)
  return map_query_chunks(chunk_fn, q, indices, options=options, offset=q_offset)


def _kl(teacher, student_logits, support):
  """KL(teacher || softmax(student over support)) per row; teacher sums to 1 over the support."""
  _, lse = masked_softmax(student_logits, support)
  log_student = jnp.where(support, student_logits - lse[..., None], 0.0)
  return jnp.sum(jax.scipy.special.xlogy(teacher, teacher) - teacher * log_student, axis=-1)


def _teacher(logits_BQHS, support_BQS):
  """Each head's softmax over the support, summed over heads and L1-normalised: [B, Qc, S]."""
  p, _ = masked_softmax(logits_BQHS, support_BQS[:, :, None, :])
  return p.mean(axis=2)      # every head's row sums to 1, so the head mean is the L1-normalised sum


def indexer_loss(q, kv, q_idx, k_idx, weights, indices=None, *, scale=None, impl="auto", options=None,
                 doc_start=None):
  """mean over queries of KL(teacher_t || softmax(I[t, support])), DESIGN §5.

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
  local = functools.partial(indexer_loss_local, scale=scale, options=options)
  axes = [placement.Q, placement.KEY_ROW, placement.QUERY_HEADS, placement.KEY_ROW, placement.QUERY_ROWS]
  args = [q, kv, q_idx, k_idx, weights]
  if indices is not None:
    axes.append(placement.QUERY_ROWS)
    args.append(jnp.sort(indices, axis=-1))
  elif doc_start is not None:
    local = lambda q, kv, q_idx, k_idx, weights, doc, *, q_offset: indexer_loss_local(
        q, kv, q_idx, k_idx, weights, None, doc, q_offset=q_offset, scale=scale, options=options)
    args, axes = placement.with_doc_start(args, axes, doc_start)
  return _per_device(local, tuple(axes), placement.PER_QUERY)(*args).mean()


def sparse_attention_and_indexer_loss(q, kv, q_idx, k_idx, weights, indices, *, v_dim: int, scale=None, impl="auto",
                                      options=None):
  """(sparse_attention(q, kv, indices), indexer_loss(q, kv, q_idx, k_idx, weights, indices)): the
  sparse stage's two calls sharing one attention forward. On Pallas the teacher is the forward's
  head-averaged probabilities over each query's selected keys (kernels/dsa_pallas.Teacher, from its
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
    rows = _gather_rows(k_idx, keys)                                                # [B, c, U, D_I]
    dots = jnp.einsum("bcud,bcqhd->bcquh", rows, qi, preferred_element_type=jnp.float32)
    student = jnp.einsum("bcquh,bcqh->bcqu", jax.nn.relu(dots), w.astype(jnp.float32))
    chose = jnp.right_shift(bits[:, :, None, :], jnp.arange(qpt, dtype=jnp.int32)[None, None, :, None]) & 1
    return _kl(probs, student, chose == 1)                                          # [B, c, qpt]
  kl = chunking.map_query_chunks(chunk_fn, tiles(q_idx), tiles(weights), teacher.keys, teacher.bits, teacher.probs,
                                 chunk=max(1, options.dsa_query_chunk // qpt), unroll=options.unroll_chunks)
  return kl.reshape(b, nt * qpt)[:, :tq]


def indexer_loss_local(q, kv, q_idx, k_idx, weights, indices=None, doc_start=None, *, q_offset, scale, options):
  """Per query [B, Tq]: KL(teacher || student) over its support."""
  t = kv.shape[1]

  def dense_chunk(q_chunk, t0, qi_chunk, w_chunk, *doc):
    support = _visible(t0, t, doc, q.shape[0], q_chunk.shape[1])
    logits = jnp.einsum("bqhd,bsd->bqhs", q_chunk, kv, preferred_element_type=jnp.float32) * scale
    return _kl(_teacher(logits, support), _index_scores(qi_chunk, w_chunk, k_idx), support)

  def sparse_chunk(q_chunk, t0, qi_chunk, w_chunk, idx):
    support = _valid(idx, t0, t)
    logits = jnp.einsum("bqkd,bqhd->bqhk", _gather_rows(kv, idx), q_chunk,
                        preferred_element_type=jnp.float32) * scale
    student = _index_scores(qi_chunk, w_chunk, _gather_rows(k_idx, idx))
    return _kl(_teacher(logits, support), student, support)

  if indices is None:
    per_query = () if doc_start is None else (doc_start,)
    return map_query_chunks(dense_chunk, q, q_idx, weights, *per_query, options=options, offset=q_offset)
  return map_query_chunks(sparse_chunk, q, q_idx, weights, indices, options=options, offset=q_offset)


def indexer_recall(q, kv, indices, *, topk: int, scale=None, options=None, doc_start=None):
  """(recall, rows): the mean over queries with more than `topk` visible keys (s <= t, in t's
  document with doc_start) of |indices[t] ∩ true top-k of the head-summed attention at t| / topk,
  and how many such queries there were (recall is 1 when there are none: every key is selected)."""
  options = options or DEFAULT_OPTIONS
  q, kv = jax.lax.stop_gradient(q), jax.lax.stop_gradient(kv)
  t = kv.shape[1]
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if t <= topk:
    return jnp.float32(1.0), jnp.int32(0)
  local = functools.partial(recall_local, topk=topk, scale=scale, options=options)
  args, axes = placement.with_doc_start((q, kv, jnp.sort(indices, axis=-1)), (placement.Q, placement.KEY_ROW,
                                                                      placement.QUERY_ROWS), doc_start)
  recall, counted = _per_device(local, axes, [placement.PER_QUERY, placement.PER_QUERY])(*args)
  rows = counted.sum()
  return recall.sum() / jnp.maximum(rows, 1), rows


def recall_local(q, kv, indices, doc_start=None, *, q_offset, topk, scale, options):
  """Per query [B, Tq]: (recall, counted)."""
  t = kv.shape[1]

  def chunk_fn(q_chunk, t0, idx, *doc):
    qc = q_chunk.shape[1]
    visible = _visible(t0, t, doc, q.shape[0], qc)
    logits = jnp.einsum("bqhd,bsd->bqhs", q_chunk, kv, preferred_element_type=jnp.float32) * scale
    teacher = jnp.where(visible, _teacher(logits, visible), -1.0)
    kth = jax.lax.top_k(teacher, topk)[0][..., -1:]                  # the k-th largest per row
    hits = _valid(idx, t0, t) & (jnp.take_along_axis(teacher, jnp.clip(idx, 0, t - 1), axis=-1) >= kth)
    counted = visible.sum(-1) > topk
    return jnp.where(counted, hits.sum(-1) / topk, 0.0), counted
  per_query = () if doc_start is None else (doc_start,)
  return map_query_chunks(chunk_fn, q, indices, *per_query, options=options, offset=q_offset)
