"""DSA's pure-JAX reference (`impl="xla"`): the oracle for the Pallas kernels, and the path on CPU/GPU.

Memory is O(T*k), never T x T: every function walks the queries in chunks of
`options.dsa_query_chunk` (kernels.chunking.map_query_chunks). Per chunk the indexer holds
[chunk, H_I, T] scores and the sparse attention [chunk, k, D] gathered rows; the backward
recomputes them chunk by chunk and its only dense tensor is the [T, D] gradient of kv itself (the
gather's transpose adds rows into it). Each function is one device's work: queries at global
positions q_offset + [0, Tq) against all keys (docs/design.md §5).
"""
import jax
import jax.numpy as jnp

from kernels import chunking
from kernels.chunking import masked_softmax


def map_query_chunks(fn, q, *per_query, options, offset=0):
  """chunking.map_query_chunks with the chunk size and unrolling of `options`."""
  return chunking.map_query_chunks(fn, q, *per_query, chunk=options.dsa_query_chunk, unroll=options.unroll_chunks,
                                   offset=offset)


def causal_mask(t0, num_queries: int, num_keys: int):
  """[Qc, S] bool: key s visible to query t0 + i."""
  return jnp.arange(num_keys)[None, :] <= (t0 + jnp.arange(num_queries))[:, None]


def visible_mask(t0, num_keys: int, doc_chunk, batch: int, num_queries: int):
  """[B, Qc, S] bool: causal, and with packed documents (doc_chunk = (doc_start [B, Qc],))
  only keys of the query's own document."""
  visible = causal_mask(t0, num_queries, num_keys)[None]
  if doc_chunk:
    visible = visible & (jnp.arange(num_keys)[None, None, :] >= doc_chunk[0][:, :, None])
  return jnp.broadcast_to(visible, (batch, num_queries, num_keys))


def index_scores(q_idx, weights, k_idx):
  """I[b, q, s] = sum_j w[b, q, j] * relu(q_idx[b, q, j] . k_idx[b, s]) in float32.
  k_idx is [B, S, D_I] (all keys) or [B, Qc, K, D_I] (each query's own rows)."""
  if k_idx.ndim == 3:
    dots = jnp.einsum("bqhd,bsd->bqhs", q_idx, k_idx, preferred_element_type=jnp.float32)
    return jnp.einsum("bqhs,bqh->bqs", jax.nn.relu(dots), weights.astype(jnp.float32))
  dots = jnp.einsum("bqkd,bqhd->bqkh", k_idx, q_idx, preferred_element_type=jnp.float32)
  return jnp.einsum("bqkh,bqh->bqk", jax.nn.relu(dots), weights.astype(jnp.float32))


def valid(indices_sorted, t0, num_keys: int):
  """Which slots of a chunk's sorted [B, Qc, K] indices are real, visible and not repeats."""
  t_q = (t0 + jnp.arange(indices_sorted.shape[1]))[None, :, None]
  first = jnp.concatenate([jnp.ones_like(indices_sorted[..., :1], bool),
                           indices_sorted[..., 1:] != indices_sorted[..., :-1]], axis=-1)
  return (indices_sorted >= 0) & (indices_sorted < num_keys) & (indices_sorted <= t_q) & first


def gather_rows(x_BSD, indices_BQK):
  """x[b, indices[b, q, k]] -> [B, Qc, K, D]: whole-row gathers (out-of-range indices clipped;
  callers mask them)."""
  b, qc, k = indices_BQK.shape
  safe = jnp.clip(indices_BQK, 0, x_BSD.shape[1] - 1).reshape(b, qc * k)
  rows = jax.vmap(lambda x, i: jnp.take(x, i, axis=0))(x_BSD, safe)
  return rows.reshape(b, qc, k, x_BSD.shape[-1])


def indexer_topk(q_idx, k_idx, weights, doc_start=None, *, q_offset, topk, options):
  """One device's indexer top-k: queries at global positions q_offset + [0, Tq), all keys."""
  num_keys = k_idx.shape[1]

  def chunk_fn(q_chunk, t0, w_chunk, *doc):
    scores = index_scores(q_chunk, w_chunk, k_idx)                    # [B, Qc, T]
    scores = jnp.where(visible_mask(t0, num_keys, doc, *scores.shape[:2]), scores, -jnp.inf)
    if num_keys < topk:
      scores = jnp.pad(scores, [(0, 0), (0, 0), (0, topk - num_keys)], constant_values=-jnp.inf)
    values, index = jax.lax.top_k(scores, topk)
    return jnp.where(values == -jnp.inf, -1, index).astype(jnp.int32)
  per_query = () if doc_start is None else (doc_start,)
  return map_query_chunks(chunk_fn, q_idx, weights, *per_query, options=options, offset=q_offset)


def sparse_attention(q, kv, indices, *, q_offset, v_dim, scale, options):
  """One device's sparse attention (indices sorted): queries at q_offset + [0, Tq), all rows kv."""
  t = kv.shape[1]

  def chunk_fn(q_chunk, t0, idx):
    rows = gather_rows(kv, idx)                                       # [B, Qc, K, Dk]
    # The keys as matmul rows (K >> H): XLA's CPU dot is much faster that way round.
    logits = jnp.einsum("bqkd,bqhd->bqhk", rows, q_chunk, preferred_element_type=jnp.float32) * scale
    p, _ = masked_softmax(logits, valid(idx, t0, t)[:, :, None, :])
    out = jnp.einsum("bqhk,bqkd->bqhd", p.astype(kv.dtype), rows[..., :v_dim],
                     preferred_element_type=jnp.float32)
    return out.astype(q.dtype)
  return map_query_chunks(chunk_fn, q, indices, options=options, offset=q_offset)


def kl(teacher, student_logits, support):
  """KL(teacher || softmax(student over support)) per row; teacher sums to 1 over the support."""
  _, lse = masked_softmax(student_logits, support)
  log_student = jnp.where(support, student_logits - lse[..., None], 0.0)
  return jnp.sum(jax.scipy.special.xlogy(teacher, teacher) - teacher * log_student, axis=-1)


def teacher_probs(logits_BQHS, support_BQS):
  """Each head's softmax over the support, summed over heads and L1-normalised: [B, Qc, S]."""
  p, _ = masked_softmax(logits_BQHS, support_BQS[:, :, None, :])
  return p.mean(axis=2)      # every head's row sums to 1, so the head mean is the L1-normalised sum


def indexer_loss(q, kv, q_idx, k_idx, weights, indices=None, doc_start=None, *, q_offset, scale, options):
  """Per query [B, Tq]: KL(teacher || student) over its support."""
  t = kv.shape[1]

  def dense_chunk(q_chunk, t0, qi_chunk, w_chunk, *doc):
    support = visible_mask(t0, t, doc, q.shape[0], q_chunk.shape[1])
    logits = jnp.einsum("bqhd,bsd->bqhs", q_chunk, kv, preferred_element_type=jnp.float32) * scale
    return kl(teacher_probs(logits, support), index_scores(qi_chunk, w_chunk, k_idx), support)

  def sparse_chunk(q_chunk, t0, qi_chunk, w_chunk, idx):
    support = valid(idx, t0, t)
    logits = jnp.einsum("bqkd,bqhd->bqhk", gather_rows(kv, idx), q_chunk,
                        preferred_element_type=jnp.float32) * scale
    student = index_scores(qi_chunk, w_chunk, gather_rows(k_idx, idx))
    return kl(teacher_probs(logits, support), student, support)

  if indices is None:
    per_query = () if doc_start is None else (doc_start,)
    return map_query_chunks(dense_chunk, q, q_idx, weights, *per_query, options=options, offset=q_offset)
  return map_query_chunks(sparse_chunk, q, q_idx, weights, indices, options=options, offset=q_offset)


def recall(q, kv, indices, doc_start=None, *, q_offset, topk, scale, options, distance_edges=()):
  """Per query [B, Tq]: (recall, counted); with distance_edges (ascending key distances t - s,
  the first 0) also (hits, relevant) [B, Tq, buckets]: of the true top-k keys in each distance
  bucket, how many the indices chose, and how many there were."""
  t = kv.shape[1]
  edges = jnp.asarray(distance_edges, jnp.int32)

  def chunk_fn(q_chunk, t0, idx, *doc):
    qc = q_chunk.shape[1]
    visible = visible_mask(t0, t, doc, q.shape[0], qc)
    logits = jnp.einsum("bqhd,bsd->bqhs", q_chunk, kv, preferred_element_type=jnp.float32) * scale
    teacher = jnp.where(visible, teacher_probs(logits, visible), -1.0)
    kth = jax.lax.top_k(teacher, topk)[0][..., -1:]                  # the k-th largest per row
    hits = valid(idx, t0, t) & (jnp.take_along_axis(teacher, jnp.clip(idx, 0, t - 1), axis=-1) >= kth)
    counted = visible.sum(-1) > topk
    out = (jnp.where(counted, hits.sum(-1) / topk, 0.0), counted)
    if not distance_edges:
      return out
    t_q = (t0 + jnp.arange(qc))[None, :, None]
    bucket = lambda distance: jnp.searchsorted(edges, distance, side="right") - 1
    relevant = visible & (teacher >= kth) & counted[..., None]
    hit_bucket = jnp.where(hits & counted[..., None], bucket(t_q - idx), -1)
    key_bucket = jnp.where(relevant, bucket(t_q - jnp.arange(t)[None, None, :]), -1)
    count = lambda b: jnp.stack([(b == i).sum(-1) for i in range(len(distance_edges))], axis=-1)
    return (*out, count(hit_bucket), count(key_bucket))
  per_query = () if doc_start is None else (doc_start,)
  return map_query_chunks(chunk_fn, q, indices, *per_query, options=options, offset=q_offset)
