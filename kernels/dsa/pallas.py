"""Pallas TPU kernels for DSA (docs/design.md §5-§7): the lightning indexer's scores (for an exact
top-k) and sparse MLA attention in MQA form, forward, dq and dkv, behind a custom_vjp.

Indexer scores, I[t, s] = sum_j w[t, j] relu(q_I[t, j] . k_I[s]):
  grid     (B, Tq / bq, Tk / bk), bq query positions x H_I heads = bq*H_I matmul rows (a
           multiple of 128; H_I=64: bq=8, 512 rows), bk = 512 keys.
  step     dots [bq*H_I, bk] = q_I k_I^T on the MXU in fp32, relu, then the head-weighted sum as a
           second MXU product W [bq, bq*H_I] @ relu (W holds query i's weights in its own rows).
  skip     a key tile wholly in the tile's future writes -inf and its index map repeats the last
           visible tile, so no K DMA is issued for it.
  bytes    per step q_I rows bq*H_I*d_I and the key tile bk*d_I (once per query tile), out bq*bk
           fp32. The scores exist only for one chunk of queries at a time ([chunk, Tk] fp32 in
           HBM, chunk = options.select_chunk <= k); XLA's exact top_k ranks them (best first,
           ties to the lower s), so memory stays O(T*k).

Sparse attention (MQA: every head of query t over the rows kv[s], s in S_t):
  rows     a tile is qpt = min(32, rows / H) queries x their H heads, rows = options.dsa_tile_rows
           (128: H=128 one query, H=16 8; 256 fills v6e's MXU: two V3.2 queries share a union),
           R rows (32 queries at most: a key's choosers are the bits of one int32).
  union    per tile, the sorted distinct keys any of its queries may read (valid: >= 0, < Tk,
           <= the query's position; repeats dropped) with a bitmask per key of the queries that
           chose it (`tile_selection`), padded to whole chunks of KC = 128 keys by repeating the
           last key with an empty mask. H=128: a query's own sorted set.
  forward  grid (B, NT); per tile the union list is copied to SMEM and its rows are DMA-gathered
           from kv in HBM, KC rows a chunk, double-buffered (chunk c+1's row copies are in
           flight while chunk c computes); per chunk s = q rows^T [R, KC] masked by the bits,
           an fp32 online softmax, out and lse. Chunks past the union's count are not run.
           Bytes: q R*Dk, each union row once (count * Dk), out R*Dk, lse R fp32.
  dq+dkv   (options.dsa_dkv = "rows", the default) the same walk: p = exp(s - lse),
           dS = p (dO V^T - delta), dq += scale dS rows; and per chunk the chosen rows' kv gradient
           scale dS^T q + p^T dO, added to their fp32 rows in HBM: read by DMA with the kv rows,
           written back after the chunk (a batch row's tiles run in order on one core, a union's
           keys are distinct, a slot's writes finish before it is refilled: no races, no atomics).
           Bytes: dq's plus 8*Dk per union row (fp32 in and out).
  teacher  (the indexer loss, sparse stage) the forward's walk with its lse: p = exp(s - lse),
           its mean over each query's H heads as one [qpt, R] x [R, KC] product, [qpt, U] fp32
           per tile. Half the forward's FLOPs, its bytes.
  dkv      (dsa_dkv = "tiles") KV-stationary over the inverted selection: every (key tile j of
           BK = 128 keys, query tile i) pair with a key of tile j in tile i's union, sorted by j,
           plus a work-free pair per key tile (so every tile is written): a key tile's gradient
           accumulates in VMEM and is written once. Per pair, which (row, key) pairs were chosen
           comes from a 256-entry window of tile i's union (its keys in tile j are consecutive)
           as one 0/1 MXU product. Bytes per pair: the query tile's q and dO rows (R*Dk each),
           lse and delta, its union row; per key tile its kv rows once and the fp32 gradient in
           and out once per window. Only the windows holding real pairs run. At H=128 a pair
           loads 295 KB of q and dO for the few keys one query chose in one key tile, so a
           token-level selection over a long sequence moves far more than "rows"
           (perf/dsa_traffic.py); it pays only where selections cluster densely.
  value    the first v_dim columns of each row: out and the dO products run at the full width Dk
           with dO zero-padded (12% more MXU work at 576/512, no unaligned lane slices).
"""
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import DEFAULT_OPTIONS, KernelOptions, Unsupported, chunking
from kernels.pallas_common import (
  LANES,
  ROWS,
  cost,
  inverted_pairs,
  pair_windows,
  probs,
  probs_and_dscores,
  softmax_finish,
  softmax_init,
  softmax_step,
)

KEY_CHUNK = 128        # union rows gathered per chunk (forward, dq)
KEY_TILE = 128         # keys per dkv tile
SCORE_KEYS = 512       # indexer: keys per score tile
BIG = jnp.iinfo(jnp.int32).max


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


# ---- indexer scores and top-k ----

def _score_queries(index_heads: int) -> int:
  """Query positions per score tile: their rows (x H_I) a multiple of 128, at least 8."""
  return max(8, 128 // math.gcd(index_heads, 128))


def _scores_kernel(offset_ref, q_ref, w_ref, doc_ref, k_ref, o_ref, *, bq, bk, heads, num_keys):
  i, j = pl.program_id(1), pl.program_id(2)
  first_query = offset_ref[0] + i * bq
  visible = j * bk <= first_query + bq - 1

  @pl.when(visible)
  def _scores():
    dots = jax.lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)                     # [bq*H_I, bk]
    rows = bq * heads
    owner = jax.lax.broadcasted_iota(jnp.int32, (bq, rows), 1) // heads
    weights = jnp.where(owner == jax.lax.broadcasted_iota(jnp.int32, (bq, rows), 0),
                        w_ref[...].astype(jnp.float32), 0.0)                          # [bq, bq*H_I]
    scores = jnp.dot(weights, jnp.maximum(dots, 0.0), preferred_element_type=jnp.float32)
    query = first_query + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    key = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    o_ref[...] = jnp.where((key <= query) & (key < num_keys) & (key >= doc_ref[...]), scores, -jnp.inf)

  @pl.when(jnp.logical_not(visible))
  def _future():
    o_ref[...] = jnp.full(o_ref.shape, -jnp.inf, jnp.float32)


def index_scores(q_idx, weights, k_idx, q_offset, *, options=None, doc_start=None):
  """I [B, Tq, Tk] float32 for queries at global positions q_offset + [0, Tq): -inf where s > t
  or, with packed documents, s < doc_start [B, Tq] (a [bq, 1] int32 column per tile)."""
  options = options or DEFAULT_OPTIONS
  b, tq, heads, d = q_idx.shape
  tk = k_idx.shape[1]
  bq = _score_queries(heads)
  bk = min(SCORE_KEYS, _round_up(tk, LANES))
  tq_pad, tk_pad = _round_up(tq, bq), _round_up(tk, bk)
  q_rows = jnp.pad(q_idx, [(0, 0), (0, tq_pad - tq), (0, 0), (0, 0)]).reshape(b, tq_pad * heads, d)
  w_row = jnp.pad(weights, [(0, 0), (0, tq_pad - tq), (0, 0)]).reshape(b, 1, tq_pad * heads)
  keys = jnp.pad(k_idx, [(0, 0), (0, tk_pad - tk), (0, 0)])
  doc = jnp.zeros((b, tq), jnp.int32) if doc_start is None else doc_start.astype(jnp.int32)
  doc = jnp.pad(doc, [(0, 0), (0, tq_pad - tq)])[:, :, None]
  nk = tk_pad // bk
  last_tile = lambda i, offset: jnp.minimum((offset[0] + (i + 1) * bq - 1) // bk, nk - 1)
  rows = bq * heads
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(b, tq_pad // bq, nk),
      in_specs=[pl.BlockSpec((None, rows, d), lambda bi, i, j, off: (bi, i, 0)),
                pl.BlockSpec((None, 1, rows), lambda bi, i, j, off: (bi, 0, i)),
                pl.BlockSpec((None, bq, 1), lambda bi, i, j, off: (bi, i, 0)),
                pl.BlockSpec((None, bk, d), lambda bi, i, j, off: (bi, jnp.minimum(j, last_tile(i, off)), 0))],
      out_specs=pl.BlockSpec((None, bq, bk), lambda bi, i, j, off: (bi, i, j)))
  itemsize = q_idx.dtype.itemsize
  out = pl.pallas_call(
      functools.partial(_scores_kernel, bq=bq, bk=bk, heads=heads, num_keys=tk),
      grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((b, tq_pad, tk_pad), jnp.float32),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=cost(b * tq_pad * tk_pad * heads * (2 * d + 2) // 2, 0,   # ~half the tiles are future
                         b * (tq_pad * heads * (d * itemsize + 4) + tq_pad // bq * tk_pad * d * itemsize // 2
                              + tq_pad * tk_pad * 4)),
      interpret=options.interpret_params(),
  )(jnp.asarray(q_offset, jnp.int32).reshape(1), q_rows, w_row, doc, keys)
  return out[:, :tq, :tk]


def indexer_topk(q_idx, k_idx, weights, q_offset, *, topk: int, options=None, doc_start=None):
  """The contract of kernels.dsa.indexer_topk for queries at q_offset + [0, Tq): int32
  [B, Tq, topk], best first, ties to the lower s, -1 padding. Scores come from the Pallas
  kernel one chunk of queries at a time; lax.top_k ranks them exactly (options.topk_recall < 1:
  chunking.top_k's approximate top-k, still best first, -1 where it found fewer keys).
  doc_start [B, Tq] (packed documents): the score kernel masks keys before it."""
  options = options or DEFAULT_OPTIONS
  num_keys = k_idx.shape[1]

  def chunk_fn(q_chunk, t0, w_chunk, *doc):
    scores = index_scores(q_chunk, w_chunk, k_idx, t0, options=options, doc_start=doc[0] if doc else None)
    if num_keys < topk:
      scores = jnp.pad(scores, [(0, 0), (0, 0), (0, topk - num_keys)], constant_values=-jnp.inf)
    values, index = chunking.top_k(scores, topk, options.topk_recall)
    return jnp.where(values == -jnp.inf, -1, index).astype(jnp.int32)
  chunk = max(options.select_chunk, _score_queries(q_idx.shape[2]))
  per_query = () if doc_start is None else (doc_start,)
  return chunking.map_query_chunks(chunk_fn, q_idx, weights, *per_query, chunk=chunk, remat=False, offset=q_offset)


# ---- the selection per query tile ----

class _Geometry(NamedTuple):
  b: int
  t: int                  # queries (padded to whole tiles)
  heads: int
  dk: int
  dv: int
  tk: int                 # keys
  queries_per_tile: int
  union: int              # union slots per tile (whole chunks)
  scale: float
  options: KernelOptions
  kv_dtype: jnp.dtype

  @property
  def rows(self):
    return self.queries_per_tile * self.heads

  @property
  def num_tiles(self):
    return self.t // self.queries_per_tile

  @property
  def interpret(self):
    return self.options.interpret_params()


def queries_per_tile(heads: int, rows: int = ROWS) -> int:
  """Queries whose heads fill one tile's `rows` matmul rows (options.dsa_tile_rows: 128, or 256
  for v6e's MXU) -- 1 when H >= rows or H does not divide them -- at most 32: a union key's
  choosers are the bits of one int32."""
  return min(32, rows // heads) if rows % heads == 0 else 1


def check_supported(n_heads: int) -> None:
  """The sparse kernels' rule: a tile's rows (qpt x H) are a multiple of 8: H divides 128 or is
  a multiple of 8. Raises kernels.Unsupported."""
  if 128 % n_heads and n_heads % 8:
    raise Unsupported("n_heads", n_heads, "must divide 128 or be a multiple of 8 (DSA's Pallas row tiles)")


def _geometry(q, kv, topk: int, v_dim, scale, options) -> _Geometry:
  b, t, heads, dk = q.shape
  check_supported(heads)
  options = options or DEFAULT_OPTIONS
  qpt = queries_per_tile(heads, options.dsa_tile_rows)
  union = _round_up(min(qpt * topk, kv.shape[1]), KEY_CHUNK)
  return _Geometry(b, _round_up(t, qpt), heads, dk, v_dim, kv.shape[1], qpt, union,
                   dk ** -0.5 if scale is None else scale, options, kv.dtype)


def tile_selection(indices, q_offset, *, num_keys: int, queries_per_tile: int, slots: int):
  """Per tile of `queries_per_tile` queries (global positions q_offset + ...): (keys [B, NT, slots]
  the sorted distinct keys its queries may read, padded by repeating the last (0 if none); bits
  [B, NT, slots] int32, bit q set iff the tile's query q chose that key; count [B, NT]).
  -1, out-of-range, future and repeated entries are dropped."""
  b, t, k = indices.shape
  qpt = queries_per_tile
  nt = t // qpt
  position = q_offset + jnp.arange(t, dtype=jnp.int32)
  valid = (indices >= 0) & (indices < num_keys) & (indices <= position[None, :, None])
  owner = (jnp.arange(t, dtype=jnp.int32) % qpt)[None, :, None]
  entry = jnp.sort(jnp.where(valid, indices * qpt + owner, BIG).reshape(b, nt, qpt * k), axis=-1)
  real = entry != BIG
  key, who = entry // qpt, entry % qpt
  differs = lambda x: jnp.concatenate([jnp.ones_like(x[..., :1], bool), x[..., 1:] != x[..., :-1]], -1)
  first_of_entry = real & differs(entry)            # (key, query) pairs once each
  first_of_key = real & differs(key)
  last_of_key = real & jnp.flip(differs(jnp.flip(key, -1)), -1)
  count = first_of_key.sum(-1).astype(jnp.int32)
  # A key's bits: its (key, query) entries' 1 << query summed over its run of the sorted list,
  # from a running sum at the run's two ends (no scatter: XLA's TPU scatters reject some shapes).
  running = jnp.cumsum(jnp.where(first_of_entry, jnp.left_shift(1, who), 0), axis=-1, dtype=jnp.int32)
  index = jnp.arange(entry.shape[-1], dtype=jnp.int32)
  run_end = lambda marks: jnp.sort(jnp.where(marks, index, BIG), axis=-1)[..., :slots]
  starts, ends = run_end(first_of_key), run_end(last_of_key)
  pad = max(0, slots - starts.shape[-1])
  starts, ends = (jnp.pad(x, [(0, 0), (0, 0), (0, pad)], constant_values=BIG) for x in (starts, ends))
  at = lambda x, i: jnp.take_along_axis(x, jnp.minimum(i, entry.shape[-1] - 1), axis=-1)
  before = jnp.where(starts > 0, at(running, starts - 1), 0)
  slot = jnp.arange(slots)
  used = slot < count[..., None]
  bits = jnp.where(used, at(running, ends) - before, 0)
  keys = at(key, starts)
  last = jnp.take_along_axis(keys, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  keys = jnp.where(used, keys, jnp.where(count[..., None] > 0, last, 0))
  return keys.astype(jnp.int32), bits, count


def _selection(g: _Geometry, indices, q_offset):
  """(sel [B, NT, 1 + U]: count then the union keys, for SMEM; bits [B, NT, 1, U + KC])."""
  pad = g.t - indices.shape[1]
  indices = jnp.pad(indices, [(0, 0), (0, pad), (0, 0)], constant_values=-1)
  keys, bits, count = tile_selection(indices, q_offset, num_keys=g.tk, queries_per_tile=g.queries_per_tile,
                                     slots=g.union)
  sel = jnp.concatenate([count[..., None], keys], -1)
  # KC empty slots past the end: dkv reads 256-slot windows from any 128-aligned slot.
  bits = jnp.pad(bits, [(0, 0), (0, 0), (0, KEY_CHUNK)])[:, :, None, :]
  keys_row = jnp.pad(keys, [(0, 0), (0, 0), (0, KEY_CHUNK)], constant_values=-1)[:, :, None, :]
  return sel, bits, keys_row, count


def _tile_rows(g: _Geometry, x):
  """[B, T, H, D] -> [B, NT, R, D] (row = local query * H + head), queries zero-padded."""
  x = jnp.pad(x, [(0, 0), (0, g.t - x.shape[1]), (0, 0), (0, 0)])
  return x.reshape(g.b, g.num_tiles, g.rows, x.shape[-1])


def _untile_rows(g: _Geometry, x, t: int):
  return x.reshape(g.b, g.t, g.heads, x.shape[-1])[:, :t]


# ---- forward and dq: the union walk with DMA row gathers ----

def gather_rows(kv):
  """kv [B, T, Dk] as [B, T, 1, Dk]: each row its own (1, Dk) slab, so a DMA can start at any
  row (Mosaic slices the tiled (sublane) dims only at whole tiles). XLA stores it with 2-row
  tiles in bf16 (one padding row: 2x kv's bytes, a copy of kv per call; kv is [T, 576] per layer,
  small next to the attention)."""
  return kv[:, :, None, :]


def _gather_walk(sel_hbm, sel_smem, sources, sem, step, write=None):
  """Walks the tile's union: copies its list to SMEM, then per chunk of KC keys DMA-gathers the
  keys' rows of every source (hbm [B, T, 1, D], buf [2, KC, 1, D]) into buf[slot] (the next
  chunk's copies start before this chunk computes; sem: DMA [sources, 2]) and calls
  step(chunk, slot, [rows [KC, D] per source]).
  write = (buf, hbm, sem [2]): after each step, buf[slot]'s rows of the chunk's real keys go back
  to their hbm rows (async; a slot's writes are awaited before it is refilled, and all by the
  end). The union's keys are distinct, so no two copies in flight touch one row; the padding
  slots of the last chunk (repeats of the last key) are never written."""
  b, i = pl.program_id(0), pl.program_id(1)
  pltpu.sync_copy(sel_hbm.at[b, i], sel_smem)
  count = sel_smem[0]
  chunks = (count + KEY_CHUNK - 1) // KEY_CHUNK
  key = lambda c, m: sel_smem[1 + c * KEY_CHUNK + m]

  def each_row(n, fn):
    def one(m, carry):
      fn(m)
      return carry
    jax.lax.fori_loop(0, n, one, 0)

  def start(c, slot):
    def one(m):
      for s, (hbm, buf) in enumerate(sources):
        pltpu.make_async_copy(hbm.at[b, key(c, m)], buf.at[slot, m], sem.at[s, slot]).start()
    each_row(KEY_CHUNK, one)

  def wait(slot):
    def one(m):
      for s, (hbm, buf) in enumerate(sources):
        pltpu.make_async_copy(hbm.at[b, 0], buf.at[slot, 0], sem.at[s, slot]).wait()
    each_row(KEY_CHUNK, one)

  real = lambda c: jnp.minimum(KEY_CHUNK, count - c * KEY_CHUNK)

  def write_start(c, slot):
    buf, hbm, wsem = write
    each_row(real(c), lambda m: pltpu.make_async_copy(buf.at[slot, m], hbm.at[b, key(c, m)], wsem.at[slot]).start())

  def write_wait(c, slot):
    buf, hbm, wsem = write
    each_row(real(c), lambda m: pltpu.make_async_copy(buf.at[slot, 0], hbm.at[b, 0], wsem.at[slot]).wait())

  @pl.when(chunks > 0)
  def _first():
    start(0, 0)

  def body(c, carry):
    slot = c % 2

    @pl.when(c + 1 < chunks)
    def _next():
      if write:
        @pl.when(c >= 1)
        def _drain():             # chunk c-1's writes leave slot 1 - slot before it is refilled
          write_wait(c - 1, 1 - slot)
      start(c + 1, 1 - slot)
    wait(slot)
    step(c, slot, [buf[slot].reshape(KEY_CHUNK, buf.shape[-1]) for _, buf in sources])
    if write:
      write_start(c, slot)
    return carry
  jax.lax.fori_loop(0, chunks, body, 0)
  if write:                       # the last two chunks' writes (the loop awaited the others)
    @pl.when(chunks >= 2)
    def _second_last():
      write_wait(chunks - 2, chunks % 2)

    @pl.when(chunks >= 1)
    def _last():
      write_wait(chunks - 1, (chunks - 1) % 2)


def _chosen(bits_ref, c, rows: int, heads: int):
  """[R, KC] bool: row r's query (r // H) chose chunk c's key."""
  bits = bits_ref[:, pl.ds(pl.multiple_of(c * KEY_CHUNK, KEY_CHUNK), KEY_CHUNK)]            # [1, KC]
  who = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // heads
  return jnp.bitwise_and(jnp.right_shift(bits, who), 1) == 1


def _scores(q, rows, chosen, scale):
  s = jax.lax.dot_general(q, rows, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
  return jnp.where(chosen, s, -jnp.inf)


def _forward_kernel(sel_hbm, bits_ref, q_ref, kv_hbm, o_ref, lse_ref, sel_smem, buf, sem, m_scratch, l_scratch,
                    acc_scratch, *, scale, heads):
  softmax_init(m_scratch, l_scratch, acc_scratch)
  q = q_ref[...]

  def step(c, slot, sources):
    rows, = sources
    s = _scores(q, rows, _chosen(bits_ref, c, q.shape[0], heads), scale)
    softmax_step(s, rows, m_scratch, l_scratch, acc_scratch)
  _gather_walk(sel_hbm, sel_smem, [(kv_hbm, buf)], sem, step)
  softmax_finish(o_ref, lse_ref, m_scratch, l_scratch, acc_scratch)


def _dq_kernel(sel_hbm, bits_ref, q_ref, do_ref, lse_ref, delta_ref, kv_hbm, dq_ref, sel_smem, buf, sem,
               acc_scratch, *, scale, heads):
  acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)
  q, do = q_ref[...], do_ref[...]

  def step(c, slot, sources):
    rows, = sources
    s = _scores(q, rows, _chosen(bits_ref, c, q.shape[0], heads), scale)
    p, ds = probs_and_dscores(s, lse_ref, do, rows, delta_ref)
    acc_scratch[...] += scale * jnp.dot(ds.astype(rows.dtype), rows, preferred_element_type=jnp.float32)
  _gather_walk(sel_hbm, sel_smem, [(kv_hbm, buf)], sem, step)
  dq_ref[...] = acc_scratch[...].astype(dq_ref.dtype)


def _dq_dkv_kernel(sel_hbm, bits_ref, q_ref, do_ref, lse_ref, delta_ref, kv_hbm, dkv_in_hbm, dq_ref, dkv_hbm,
                   sel_smem, buf, grad_buf, sem, write_sem, acc_scratch, *, scale, heads):
  """dq as _dq_kernel, and per chunk the chosen rows' kv gradient, added into their fp32 rows in
  HBM: read with the kv rows, written back after the chunk (dkv_in_hbm is dkv_hbm, aliased)."""
  del dkv_in_hbm
  acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)
  q, do = q_ref[...], do_ref[...]

  def step(c, slot, sources):
    rows, grad_rows = sources
    s = _scores(q, rows, _chosen(bits_ref, c, q.shape[0], heads), scale)
    p, ds = probs_and_dscores(s, lse_ref, do, rows, delta_ref)
    acc_scratch[...] += scale * jnp.dot(ds.astype(rows.dtype), rows, preferred_element_type=jnp.float32)
    contraction = (((0,), (0,)), ((), ()))
    grad = (grad_rows
            + scale * jax.lax.dot_general(ds.astype(q.dtype), q, contraction, preferred_element_type=jnp.float32)
            + jax.lax.dot_general(p.astype(do.dtype), do, contraction, preferred_element_type=jnp.float32))
    grad_buf[slot] = grad.reshape(grad_buf.shape[1:])
  _gather_walk(sel_hbm, sel_smem, [(kv_hbm, buf), (dkv_hbm, grad_buf)], sem, step, write=(grad_buf, dkv_hbm, write_sem))
  dq_ref[...] = acc_scratch[...].astype(dq_ref.dtype)


def _walk_call(g: _Geometry, kernel, row_inputs, outputs, scratch, estimate):
  """pallas_call over grid (B, NT): sel (HBM, copied to SMEM per tile), bits and the row inputs
  as tile blocks, kv in HBM (rows gathered by DMA; pass `gather_rows(kv)`); outputs are tile
  blocks."""
  tile = lambda width: pl.BlockSpec((None, None, 1 if width is None else g.rows, width or g.rows),
                                    lambda b, i: (b, i, 0, 0))
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  bits_spec = pl.BlockSpec((None, None, 1, g.union + KEY_CHUNK), lambda b, i: (b, i, 0, 0))
  return pl.pallas_call(
      functools.partial(kernel, scale=g.scale, heads=g.heads),
      grid=(g.b, g.num_tiles),
      in_specs=[any_spec, bits_spec, *[tile(w) for w in row_inputs], any_spec],
      out_specs=[tile(w) for w, _ in outputs],
      out_shape=[jax.ShapeDtypeStruct((g.b, g.num_tiles, 1 if w is None else g.rows, w or g.rows), dtype)
                 for w, dtype in outputs],
      scratch_shapes=[pltpu.SMEM((1 + g.union,), jnp.int32), pltpu.VMEM((2, KEY_CHUNK, 1, g.dk), g.kv_dtype),
                      pltpu.SemaphoreType.DMA((1, 2)), *scratch],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      cost_estimate=estimate, interpret=g.interpret)


def _walk_cost(g: _Geometry, matmuls: int, row_bytes: int):
  """FLOPs: R rows x a union of up to qpt*k rows per tile x `matmuls` products of width Dk (the
  union bound: the count is data); bytes: the tile rows plus each union row once."""
  selected = g.b * g.num_tiles * g.rows * g.union
  itemsize = jnp.dtype(g.kv_dtype).itemsize
  return cost(2 * selected * g.dk * matmuls, selected,
              g.b * g.num_tiles * (g.rows * row_bytes + g.union * g.dk * itemsize))


def _forward_rows(g: _Geometry, sel, bits, q_rows, kv):
  """(out rows [B, NT, R, Dk] (the first Dv columns are the output), lse [B, NT, 1, R])."""
  return _walk_call(g, _forward_kernel, [g.dk], [(g.dk, q_rows.dtype), (None, jnp.float32)],
                    [pltpu.VMEM((g.rows, LANES), jnp.float32), pltpu.VMEM((g.rows, LANES), jnp.float32),
                     pltpu.VMEM((g.rows, g.dk), jnp.float32)],
                    _walk_cost(g, 2, 4 * g.dk + 4))(sel, bits, q_rows, gather_rows(kv))


def sparse_forward(q, kv, indices, q_offset=0, *, v_dim: int, scale=None, options=None):
  """(out [B, T, H, v_dim] in q's dtype, lse [B, T, H] float32): kernels.dsa.sparse_attention's
  numbers for queries at global positions q_offset + [0, T) against all rows kv [B, Tk, Dk]."""
  g = _geometry(q, kv, indices.shape[-1], v_dim, scale, options)
  sel, bits, _, _ = _selection(g, indices, q_offset)
  out, lse = _forward_rows(g, sel, bits, _tile_rows(g, q), kv)
  t = q.shape[1]
  return _untile_rows(g, out, t)[..., :v_dim], lse.reshape(g.b, g.t, g.heads)[:, :t]


# ---- the indexer's teacher: head-averaged probabilities over the selected keys ----

def _teacher_kernel(sel_hbm, bits_ref, q_ref, lse_ref, kv_hbm, teacher_ref, sel_smem, buf, sem, *, scale, heads):
  teacher_ref[...] = jnp.zeros(teacher_ref.shape, jnp.float32)       # union slots past the count
  q = q_ref[...]
  rows, queries = q.shape[0], teacher_ref.shape[0]
  owner = jax.lax.broadcasted_iota(jnp.int32, (queries, rows), 1) // heads
  mean = jnp.where(owner == jax.lax.broadcasted_iota(jnp.int32, (queries, rows), 0), 1.0 / heads, 0.0)

  def step(c, slot, sources):
    kv_rows, = sources
    p = probs(_scores(q, kv_rows, _chosen(bits_ref, c, rows, heads), scale), lse_ref)        # [R, KC]
    teacher_ref[:, pl.ds(pl.multiple_of(c * KEY_CHUNK, KEY_CHUNK), KEY_CHUNK)] = jnp.dot(
        mean, p, preferred_element_type=jnp.float32)                                          # [qpt, KC]
  _gather_walk(sel_hbm, sel_smem, [(kv_hbm, buf)], sem, step)


def _teacher_rows(g: _Geometry, sel, bits, q_rows, lse_rows, kv):
  """[B, NT, qpt, U] float32: per tile query and union slot, the attention probability of that
  key averaged over the query's H heads (0 where the query did not choose it). The forward's walk
  and gathers with the saved lse, the QK product only: half the forward's FLOPs, its bytes."""
  tile = pl.BlockSpec((None, None, g.rows, g.dk), lambda b, i: (b, i, 0, 0))
  lse_spec = pl.BlockSpec((None, None, 1, g.rows), lambda b, i: (b, i, 0, 0))
  out_spec = pl.BlockSpec((None, None, g.queries_per_tile, g.union), lambda b, i: (b, i, 0, 0))
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  bits_spec = pl.BlockSpec((None, None, 1, g.union + KEY_CHUNK), lambda b, i: (b, i, 0, 0))
  estimate = _walk_cost(g, 1, 2 * g.dk + 4 + 4 * g.union // g.heads)
  return pl.pallas_call(
      functools.partial(_teacher_kernel, scale=g.scale, heads=g.heads),
      grid=(g.b, g.num_tiles), in_specs=[any_spec, bits_spec, tile, lse_spec, any_spec], out_specs=out_spec,
      out_shape=jax.ShapeDtypeStruct((g.b, g.num_tiles, g.queries_per_tile, g.union), jnp.float32),
      scratch_shapes=[pltpu.SMEM((1 + g.union,), jnp.int32), pltpu.VMEM((2, KEY_CHUNK, 1, g.dk), g.kv_dtype),
                      pltpu.SemaphoreType.DMA((1, 2))],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      cost_estimate=estimate, interpret=g.interpret,
  )(sel, bits, q_rows, lse_rows, gather_rows(kv))


# ---- dq and dkv in one walk: each chosen row's gradient added into its fp32 row in HBM ----

def _dq_dkv(g: _Geometry, sel, bits, q_rows, do_rows, lse_rows, delta_rows, kv):
  """(dq rows [B, NT, R, Dk], d kv [B, Tk, Dk] float32) in one walk of the unions (options.dsa_dkv
  = "rows"). Per chunk the 5 products of a row tile against KC gathered rows (MXU rows: R, as the
  forward) and the chunk's fp32 gradient rows read, added to and written back by DMA. No two
  writers race: a batch row's tiles run in order on one core (the tile axis is "arbitrary"),
  each waits for its writes, and a union's keys are distinct.
  Bytes per tile: q, dO R*Dk each, lse, delta; per union row kv Dk (bf16) plus the fp32 row read
  and written (8*Dk): 4.6 KB a row at Dk=576, against the KV-stationary dkv's q and dO rows of
  every (key tile, query tile) pair (R*Dk*4 bytes = 295 KB at H=128, for the few keys a query
  picks in one 128-key tile of a long sequence: the inverse of a token-level selection spreads)."""
  grad = jnp.zeros((g.b, g.tk, 1, g.dk), jnp.float32)
  tile = lambda width: pl.BlockSpec((None, None, 1 if width is None else g.rows, width or g.rows),
                                    lambda b, i: (b, i, 0, 0))
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  bits_spec = pl.BlockSpec((None, None, 1, g.union + KEY_CHUNK), lambda b, i: (b, i, 0, 0))
  estimate = _walk_cost(g, 5, 6 * g.dk + 8)
  estimate = cost(estimate.flops, estimate.transcendentals,
                  estimate.bytes_accessed + g.b * g.num_tiles * g.union * g.dk * 8)
  dq_rows, grad = pl.pallas_call(
      functools.partial(_dq_dkv_kernel, scale=g.scale, heads=g.heads),
      grid=(g.b, g.num_tiles),
      in_specs=[any_spec, bits_spec, tile(g.dk), tile(g.dk), tile(None), tile(None), any_spec, any_spec],
      out_specs=[tile(g.dk), any_spec],
      out_shape=[jax.ShapeDtypeStruct((g.b, g.num_tiles, g.rows, g.dk), q_rows.dtype),
                 jax.ShapeDtypeStruct(grad.shape, jnp.float32)],
      scratch_shapes=[pltpu.SMEM((1 + g.union,), jnp.int32), pltpu.VMEM((2, KEY_CHUNK, 1, g.dk), g.kv_dtype),
                      pltpu.VMEM((2, KEY_CHUNK, 1, g.dk), jnp.float32), pltpu.SemaphoreType.DMA((2, 2)),
                      pltpu.SemaphoreType.DMA((2,)), pltpu.VMEM((g.rows, g.dk), jnp.float32)],
      input_output_aliases={7: 1},
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      cost_estimate=estimate, interpret=g.interpret,
  )(sel, bits, q_rows, do_rows, lse_rows, delta_rows, gather_rows(kv), grad)
  return dq_rows, grad[:, :, 0]


# ---- dkv: KV-stationary over the inverted selection ----

def _dkv_kernel(tile_ref, key_tile_ref, start_ref, q_ref, do_ref, lse_ref, delta_ref, keys_ref, bits_ref, kv_ref,
                acc_in_ref, acc_ref, acc_scratch, *, scale, heads, window):
  b, p = pl.program_id(0), pl.program_id(1)
  at = b * window + p
  j, tile = key_tile_ref[at], tile_ref[at]
  starts = (p == 0) | (key_tile_ref[jnp.maximum(at - 1, 0)] != j)
  ends = (p == window - 1) | (key_tile_ref[jnp.minimum(at + 1, (b + 1) * window - 1)] != j)

  @pl.when(starts)
  def _init():
    acc_scratch[...] = acc_in_ref[...]

  @pl.when(tile >= 0)
  def _step():
    q, do, kv = q_ref[...], do_ref[...], kv_ref[...]
    rows = q.shape[0]
    # Tile i's union keys in key tile j are consecutive, from slot start_ref[at]: a 256-slot
    # window from its 128-aligned start holds them all (at most KEY_TILE of them).
    first = pl.multiple_of(start_ref[at] // KEY_CHUNK * KEY_CHUNK, KEY_CHUNK)
    keys = keys_ref[:, pl.ds(first, 2 * KEY_CHUNK)]                                     # [1, 256]
    bits = bits_ref[:, pl.ds(first, 2 * KEY_CHUNK)]
    who = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // heads
    chose = jnp.bitwise_and(jnp.right_shift(bits, who), 1).astype(jnp.float32)       # [R, 256]
    key = j * KEY_TILE + jax.lax.broadcasted_iota(jnp.int32, (KEY_TILE, 1), 0)
    is_key = (keys == key).astype(jnp.float32)                                          # [KT, 256]
    chosen = jax.lax.dot_general(chose, is_key, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32) > 0              # [R, KT]
    s = _scores(q, kv, chosen, scale)
    p = probs(s, lse_ref)
    dp = jax.lax.dot_general(do, kv, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = p * (dp - jnp.expand_dims(delta_ref[0], -1))
    acc_scratch[...] += (
        scale * jax.lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)
        + jax.lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32))

  @pl.when(ends)
  def _finish():
    acc_ref[...] = acc_scratch[...]


def _key_tile_pairs(g: _Geometry, keys_row, count):
  """Per batch row, the (query tile, key tile, start slot) triples sorted by key tile: every
  pair where tile i's union has a key in key tile j (start: its first such slot), plus one
  work-free (-1, j) pair per key tile."""
  num_key_tiles = -(-g.tk // KEY_TILE)
  keys = keys_row[:, :, 0, :g.union]                                                  # [B, NT, U]
  real = jnp.arange(g.union)[None, None, :] < count[..., None]
  key_tile = jnp.where(real, keys // KEY_TILE, num_key_tiles)
  # the first slot of each run of one key tile in a tile's (sorted) union
  first = real & jnp.concatenate([jnp.ones_like(key_tile[..., :1], bool), key_tile[..., 1:] != key_tile[..., :-1]], -1)
  slot = jnp.broadcast_to(jnp.arange(g.union, dtype=jnp.int32), key_tile.shape)
  tile = jnp.broadcast_to(jnp.arange(g.num_tiles, dtype=jnp.int32)[:, None], key_tile.shape)
  flat = lambda x: x.reshape(g.b, g.num_tiles * g.union)
  return inverted_pairs(flat(jnp.where(first, key_tile, num_key_tiles)), flat(jnp.where(first, tile, -1)),
                        num_key_tiles, payload=flat(slot))


def _dkv(g: _Geometry, keys_row, bits, count, q_rows, do_rows, lse_rows, delta_rows, kv):
  """d kv [B, Tk, Dk] float32 (the score part over all Dk columns plus the value part, through
  dO zero-padded to Dk), window by window of the pair list."""
  tk_pad = _round_up(g.tk, KEY_TILE)
  kv = jnp.pad(kv, [(0, 0), (0, tk_pad - g.tk), (0, 0)])
  key_tile, tile, start = _key_tile_pairs(g, keys_row, count)
  (key_tile, tile, start), window = pair_windows((key_tile, tile, start), g.options.prefetch_bytes)
  windows = key_tile.shape[-1] // window
  at = lambda b, p: b * window + p
  row_map = lambda b, p, tiles, key_tiles, starts: (b, jnp.maximum(tiles[at(b, p)], 0), 0, 0)
  kv_map = lambda b, p, tiles, key_tiles, starts: (b, key_tiles[at(b, p)], 0)
  tile_spec = lambda width: pl.BlockSpec((None, None, 1 if width is None else g.rows, width or g.rows), row_map)
  union_spec = pl.BlockSpec((None, None, 1, g.union + KEY_CHUNK), row_map)
  kv_spec = pl.BlockSpec((None, KEY_TILE, g.dk), kv_map)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=(g.b, window),
      in_specs=[tile_spec(g.dk), tile_spec(g.dk), tile_spec(None), tile_spec(None), union_spec, union_spec, kv_spec,
                kv_spec],
      out_specs=kv_spec, scratch_shapes=[pltpu.VMEM((KEY_TILE, g.dk), jnp.float32)])
  pairs = g.b * g.num_tiles * (g.union // KEY_CHUNK + 1)
  itemsize = jnp.dtype(g.kv_dtype).itemsize
  call = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=g.scale, heads=g.heads, window=window),
      grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct(kv.shape, jnp.float32),
      input_output_aliases={10: 0},            # operands counted with the 3 prefetch lists
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      cost_estimate=cost(2 * pairs * g.rows * KEY_TILE * g.dk * 5 // windows, pairs * g.rows * KEY_TILE // windows,
                         (pairs * g.rows * (2 * g.dk * itemsize + 8) + tk_pad * g.dk * (itemsize + 8)) // windows),
      interpret=g.interpret)

  # The list's real entries (a pair or a key tile's work-free pair) come first; the unused union
  # slots after them are only run up to the end of the window holding the last real entry.
  lists = [x.reshape(g.b, windows, window) for x in (tile, key_tile, start)]
  real = jnp.max(jnp.sum(tile >= 0, axis=-1)) + -(-g.tk // KEY_TILE)
  busy_windows = (real + window - 1) // window

  def one_window(w, acc):
    window_lists = [jax.lax.dynamic_index_in_dim(x, w, axis=1, keepdims=False).reshape(-1) for x in lists]
    return call(*window_lists, q_rows, do_rows, lse_rows, delta_rows, keys_row, bits, kv, acc)
  acc = jax.lax.fori_loop(0, busy_windows, one_window, jnp.zeros(kv.shape, jnp.float32))
  return acc[:, :g.tk]


# ---- the differentiable functions ----

class Teacher(NamedTuple):
  """The indexer loss's teacher in union space (kernels.dsa.indexer_loss, sparse stage): per
  query tile of `queries_per_tile(H, options.dsa_tile_rows)` queries, its union keys [B, NT, U] (sorted, distinct,
  padding repeats the last), the queries that chose each (bits [B, NT, U], bit i = tile query i)
  and probs [B, NT, qpt, U] float32, the head-averaged attention probability of each chosen key
  (each query's row sums to 1 over its chosen keys, or is 0 if it has none). Tile query i is
  global position q_offset + tile * qpt + i."""
  keys: jax.Array
  bits: jax.Array
  probs: jax.Array


def sparse_attention(q, kv, indices, q_offset, *, v_dim: int, scale=None, options=None, teacher: bool = False):
  """Differentiable Pallas sparse attention: the contract of kernels.dsa.sparse_attention for
  queries at global positions q_offset + [0, T) (int or traced int32) against all rows kv.
  teacher=True: (out, Teacher) with the teacher from the forward's own lse (a constant: no
  gradient flows through it)."""
  g = _geometry(q, kv, indices.shape[-1], v_dim, scale, options)
  sel, bits, keys_row, count = _selection(g, indices, jnp.asarray(q_offset, jnp.int32))
  out, probs_union = _sparse(q, kv, sel, bits, keys_row, count, v_dim, scale, options, teacher)
  if not teacher:
    return out
  return out, Teacher(keys_row[:, :, 0, :g.union], bits[:, :, 0, :g.union], probs_union)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _sparse(q, kv, sel, bits, keys_row, count, v_dim, scale, options, teacher):
  return _sparse_fwd(q, kv, sel, bits, keys_row, count, v_dim, scale, options, teacher)[0]


def _union_geometry(q, kv, bits, v_dim, scale, options) -> _Geometry:
  g = _geometry(q, kv, 1, v_dim, scale, options)
  return g._replace(union=bits.shape[-1] - KEY_CHUNK)


def _sparse_fwd(q, kv, sel, bits, keys_row, count, v_dim, scale, options, teacher):
  g = _union_geometry(q, kv, bits, v_dim, scale, options)
  q_rows = _tile_rows(g, q)
  out_rows, lse_rows = _forward_rows(g, sel, bits, q_rows, kv)
  out = _untile_rows(g, out_rows, q.shape[1])[..., :v_dim]
  probs_union = _teacher_rows(g, sel, bits, q_rows, lse_rows, kv) if teacher else None
  return (out, probs_union), (q, kv, sel, bits, keys_row, count, out_rows, lse_rows)


def _sparse_bwd(v_dim, scale, options, teacher, residuals, cotangents):
  del teacher      # the teacher is a constant: its cotangent is dropped
  q, kv, sel, bits, keys_row, count, out_rows, lse_rows = residuals
  dout = cotangents[0]
  g = _union_geometry(q, kv, bits, v_dim, scale, options)
  q_rows = _tile_rows(g, q)
  # dO zero-padded to Dk: the value is kv's first v_dim columns.
  do_rows = _tile_rows(g, jnp.pad(dout.astype(q.dtype), [(0, 0), (0, 0), (0, 0), (0, g.dk - v_dim)]))
  delta = jnp.sum(out_rows.astype(jnp.float32) * do_rows.astype(jnp.float32), -1)                # [B, NT, R]
  delta_rows = delta[:, :, None, :]
  if g.options.dsa_dkv == "rows":
    dq_rows, dkv = _dq_dkv(g, sel, bits, q_rows, do_rows, lse_rows, delta_rows, kv)
  else:
    dq_rows, = _walk_call(g, _dq_kernel, [g.dk, g.dk, None, None], [(g.dk, q.dtype)],
                          [pltpu.VMEM((g.rows, g.dk), jnp.float32)],
                          _walk_cost(g, 3, 6 * g.dk + 8))(sel, bits, q_rows, do_rows, lse_rows, delta_rows,
                                                          gather_rows(kv))
    dkv = _dkv(g, keys_row, bits, count, q_rows, do_rows, lse_rows, delta_rows, kv)
  return _untile_rows(g, dq_rows, q.shape[1]), dkv.astype(kv.dtype), None, None, None, None


_sparse.defvjp(_sparse_fwd, _sparse_bwd)
