"""The lightning indexer's exact top-k on Pallas TPU (docs/design.md §5-§7): per block of queries, the
index scores I[t, s] = sum_j w[t, j] relu(q_I[t, j] . k_I[s]) for every visible key and a
per-bin top-m of them in VMEM, so only m candidates per bin reach HBM, never a score per key.

Select   divide and filter (tallax's bins-top-m, with our own exactness test): key s falls in bin
         s mod M (M = bins, the key chunk width, 2048). Each (query, bin) keeps its m best keys in
         VMEM, best first, by a sinking insertion (key s enters above a kept key iff its score is
         strictly greater: equal scores keep the lower key first, as keys arrive in order) and the
         largest score it ever pushed out, `evicted`. XLA sorts each query's m*M candidates by
         (score desc, key asc) and takes k: v_k is the k-th. Exact iff evicted < v_k (or nothing
         was evicted): every key not kept then scores strictly below v_k, so the true top-k, ties at
         v_k included, is among the candidates and the sort orders it as the reference does. A
         query that fails the test is recomputed exactly by XLA (its [Tk] scores and lax.top_k):
         up to FALLBACK_ROWS per chunk row by row, more than that the whole chunk. m: the fewest
         levels with bins * P(Binomial(Tk/M, k/Tk) > m) <= EXACT_FAILURES (the chance that a query
         falls back, top-k keys spread over bins at random), at most Tk/M (then nothing is ever
         evicted). T=131072, k=2048: Poisson(1) per bin, m = 9, about 2e-4 of queries fall back.
         options.topk_recall < 1: the fewest levels whose expected recall E[min(X, m)] / E[X]
         meets it, no test and no fallback (an approximate top-k, as lax.approx_max_k's bins).
rows     a block is bq = options.dsa_index_queries (64) query positions; per product a group of
         8 of them x H_I heads (512 matmul rows at H_I = 64) against SUB = 512 keys.
grid     (B, Tq / bq), both parallel: one step per block, T / 64 = 2048 steps at T = 131072 for
         the whole layer (the XLA loop runs it one chunk of options.select_chunk queries at a time).
chunks   k_I stays in HBM (memory_space ANY) as [B, Tk, d_I]; a step walks the key chunks of M
         keys from its block's first document start to its last query, double-buffered (chunk
         c + 1's DMA is in flight while c computes), one DMA per chunk; within the last chunk only
         the sub-chunks of SUB keys up to the last query compute. Future chunks cost nothing.
step     per (chunk, sub-chunk, group): dots [8 H_I, SUB] = q_I k_I^T on the MXU (fp32, or int32
         for int8), relu, times w as a [8 H_I, 1] column, summed over the H_I heads on the VPU
         (no block-diagonal weight matmul: that would double the MXU work), the mask (s <= t,
         s >= doc_start[t], s < Tk), then the m-level insertion (5 VPU ops per level and score).
int8     options.dsa_indexer_dtype = "int8": q_I per (query, head) row and k_I per key row are
         quantised to int8 with fp32 scales sq = max|q| / 127, sk = max|k| / 127; the MXU product
         is int32 (twice the bf16 rate on v5e, v5p, v6e); sq folds into w (sq > 0 commutes with
         relu) and sk multiplies each key's head sum. Rows then need not equal the reference's
         (quantisation moves scores); scripts/bench_topk.py reports the recall against bf16.
bytes    per step: q rows bq H_I d_I (itemsize), w bq H_I 4, doc_start bq 4, the visible chunks
         M d_I each (+ M 4 of int8 scales), out: candidates bq m M (4 + 4) and evicted bq 128 4.
         T=131072 (B=1, H_I=64, d_I=128, bf16, k=2048, m=9, `walk`): 2048 steps, 66,560 key-chunk
         DMAs (of 512 KiB), 141.3 TFLOP on the MXU (the causal half), 56.5 GB: 35.0 GB of key
         chunks (each block re-reads its past; int8: half) and 19.3 GB of candidates (131072 x
         18432 x 8 B). The old score kernel: 4,194,304 steps and [T, T] fp32 scores (68.7 GB)
         written and read again by a top_k over [chunk, T].
XLA      per chunk of queries: one sort of [chunk, m M] (two keys: score, key; 18432 wide at
         128k, 7x narrower than a top_k over [chunk, Tk]), the exactness test, the fallback rows
         (a lax.cond: nothing runs when every row passes).
pallas_call name: dsa_index_topk. `walk` counts its steps, DMAs, FLOPs and bytes from the loop
bounds the kernel uses; they are its CostEstimate.
"""
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import DEFAULT_OPTIONS, KernelOptions, chunking
from kernels.dsa import reference
from kernels.pallas_common import LANES, cost

NAME = "dsa_index_topk"
BINS = 2048               # keys per chunk = bins per query
SUB = 512                 # keys per product
GROUP = 8                 # query positions per product (x H_I heads = its rows)
EXACT_FAILURES = 1e-3     # the chance a query falls back that the levels allow (random spread)
MAX_LEVELS = 16
FALLBACK_ROWS = 32        # per chunk (and batch row), recomputed exactly one by one
VMEM_LIMIT = 56 << 20     # below v5p's 64 MiB per core


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _binomial_tail(n: int, p: float, m: int) -> float:
  """P(X > m), X ~ Binomial(n, p)."""
  return max(0.0, 1.0 - sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(min(m, n) + 1)))


def levels_for(num_keys: int, topk: int, bins: int, recall: float = 1.0) -> int:
  """m: candidates kept per (query, bin). Exact (recall 1): the fewest levels whose chance that any
  bin of a query pushes out a top-k key is <= EXACT_FAILURES; < 1: the fewest whose expected
  recall meets `recall`. At most the keys per bin (nothing is evicted then) and MAX_LEVELS."""
  per_bin = -(-num_keys // bins)
  p = min(1.0, topk / max(num_keys, 1))
  for m in range(1, min(per_bin, MAX_LEVELS) + 1):
    if recall >= 1.0 and bins * _binomial_tail(per_bin, p, m) <= EXACT_FAILURES:
      return m
    if recall < 1.0:
      kept = sum(min(i, m) * math.comb(per_bin, i) * p ** i * (1 - p) ** (per_bin - i) for i in range(per_bin + 1))
      if kept >= recall * per_bin * p:
        return m
  return min(per_bin, MAX_LEVELS)


class Geometry(NamedTuple):
  b: int
  tq: int                 # queries (real)
  tk: int                 # keys (real)
  heads: int
  dim: int
  bq: int                 # queries per grid step
  bins: int               # keys per chunk = bins
  sub: int                # keys per product
  levels: int
  int8: bool
  itemsize: int           # of q_I and k_I as the kernel reads them
  options: KernelOptions

  @property
  def blocks(self) -> int:
    return -(-self.tq // self.bq)

  @property
  def num_chunks(self) -> int:
    return -(-self.tk // self.bins)

  @property
  def width(self) -> int:
    return self.levels * self.bins

  @property
  def rows(self) -> int:
    return GROUP * self.heads


def geometry(q_idx, k_idx, topk: int, options, bins=None, levels=None) -> Geometry:
  b, tq, heads, dim = q_idx.shape
  tk = k_idx.shape[1]
  bins = bins or min(BINS, _round_up(tk, LANES))
  sub = LANES * math.gcd(bins // LANES, SUB // LANES)
  bq = _round_up(max(options.dsa_index_queries, GROUP), GROUP)
  int8 = options.dsa_indexer_dtype == "int8"
  levels = levels or levels_for(tk, topk, bins, options.topk_recall)
  return Geometry(b, tq, tk, heads, dim, bq, bins, sub, levels, int8, 1 if int8 else q_idx.dtype.itemsize, options)


class Walk(NamedTuple):
  """What one pallas_call does: grid steps, K-chunk DMAs, MXU FLOPs, HBM bytes."""
  steps: int
  dmas: int
  flops: int
  bytes: int


def walk(g: Geometry, q_offset: int) -> Walk:
  """The kernel's loop bounds summed over its blocks (no documents: the walks start at key 0;
  packed rows start later and cost less). FLOPs: 2 d_I per (matmul row, key) of every sub-chunk
  computed; bytes: every block's inputs and outputs and every chunk DMA'd."""
  chunks = keys = 0
  for i in range(g.blocks):
    last = q_offset + min((i + 1) * g.bq, g.tq) - 1
    chunks += min(last // g.bins + 1, g.num_chunks)
    keys += min(_round_up(last + 1, g.sub), g.num_chunks * g.bins)
  rows = g.b * g.blocks * g.bq
  flops = 2 * g.dim * g.b * keys * g.bq * g.heads
  chunk_bytes = g.bins * (g.dim * g.itemsize + 4 * g.int8)
  bytes_ = (rows * (g.heads * (g.dim * g.itemsize + 4) + 4)                 # q rows, w column, doc_start
            + g.b * chunks * chunk_bytes                                    # key chunks
            + rows * (8 * g.width + 4 * LANES))                             # candidates, evicted
  return Walk(g.b * g.blocks, g.b * chunks * (1 + g.int8), flops, bytes_)


# ---- the kernel ----

def _kernel(offset_ref, first_ref, q_ref, w_ref, doc_ref, k_hbm, *rest, g: Geometry):
  if g.int8:
    ks_hbm, val_ref, idx_ref, ev_ref, kbuf, ksbuf, evicted, sem = rest
  else:
    val_ref, idx_ref, ev_ref, kbuf, evicted, sem = rest
  b, i = pl.program_id(0), pl.program_id(1)
  first_query = offset_ref[0] + i * g.bq
  last_query = offset_ref[0] + jnp.minimum((i + 1) * g.bq, g.tq) - 1
  lo = first_ref[b * g.blocks + i]
  hi = jnp.minimum(jax.lax.div(last_query, g.bins) + 1, g.num_chunks)     # lax.div, rem: non-negative here
  val_ref[...] = jnp.full(val_ref.shape, -jnp.inf, jnp.float32)
  idx_ref[...] = jnp.full(idx_ref.shape, -1, jnp.int32)
  evicted[...] = jnp.full(evicted.shape, -jnp.inf, jnp.float32)

  def copies(c, slot):
    keys = pl.ds(pl.multiple_of(c * g.bins, g.bins), g.bins)
    out = [pltpu.make_async_copy(k_hbm.at[b, keys], kbuf.at[slot], sem.at[0, slot])]
    if g.int8:
      out.append(pltpu.make_async_copy(ks_hbm.at[b, c], ksbuf.at[slot], sem.at[1, slot]))
    return out

  @pl.when(lo < hi)
  def _first():
    for cp in copies(lo, 0):
      cp.start()

  def chunk(c, carry):
    slot = jax.lax.rem(c - lo, 2)
    for cp in copies(c, slot):
      cp.wait()

    @pl.when(c + 1 < hi)
    def _next():
      for cp in copies(c + 1, 1 - slot):
        cp.start()

    def sub_chunk(j, carry):
      lanes = pl.ds(pl.multiple_of(j * g.sub, g.sub), g.sub)
      keys = kbuf[slot, lanes, :]                                                    # [SUB, d_I]
      key = c * g.bins + j * g.sub + jax.lax.broadcasted_iota(jnp.int32, (GROUP, g.sub), 1)

      def group(gi, carry):
        rows = pl.ds(pl.multiple_of(gi * g.rows, g.rows), g.rows)
        queries = pl.ds(pl.multiple_of(gi * GROUP, GROUP), GROUP)
        acc = jnp.int32 if g.int8 else jnp.float32
        dots = jax.lax.dot_general(q_ref[rows, :], keys, (((1,), (1,)), ((), ())), preferred_element_type=acc)
        s = (jnp.maximum(dots, 0).astype(jnp.float32) * w_ref[rows, :]).reshape(GROUP, g.heads, g.sub).sum(1)
        if g.int8:
          s = s * ksbuf[slot, :, lanes]
        query = first_query + gi * GROUP + jax.lax.broadcasted_iota(jnp.int32, (GROUP, g.sub), 0)
        visible = (key <= query) & (key < g.tk) & (key >= doc_ref[queries, :])
        score, index = jnp.where(visible, s, -jnp.inf), key
        for level in range(g.levels):      # sink: a key passes a kept one only if strictly better
          cols = pl.ds(pl.multiple_of(level * g.bins + j * g.sub, g.sub), g.sub)
          kept, kept_index = val_ref[queries, cols], idx_ref[queries, cols]
          better = score > kept
          val_ref[queries, cols] = jnp.where(better, score, kept)
          idx_ref[queries, cols] = jnp.where(better, index, kept_index)
          score, index = jnp.where(better, kept, score), jnp.where(better, kept_index, index)
        evicted[queries, lanes] = jnp.maximum(evicted[queries, lanes], score)
        return carry
      jax.lax.fori_loop(0, g.bq // GROUP, group, 0)
      return carry
    subs = jnp.minimum(g.bins // g.sub, jax.lax.div(last_query - c * g.bins, g.sub) + 1)   # none past the last query
    jax.lax.fori_loop(0, subs, sub_chunk, 0)
    return carry
  jax.lax.fori_loop(lo, hi, chunk, 0)
  ev_ref[...] = jnp.broadcast_to(jnp.max(evicted[...], axis=1, keepdims=True), ev_ref.shape)


def _quantize(x):
  """int8 values and fp32 scales per row of the last axis (max |x| -> 127)."""
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=-1) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  return jnp.clip(jnp.round(x / scale[..., None]), -127, 127).astype(jnp.int8), scale


def candidates(q_idx, k_idx, weights, q_offset, *, topk: int, options=None, doc_start=None, bins=None, levels=None,
               estimate: Walk | None = None):
  """The kernel on queries at global positions q_offset + [0, Tq): (values [B, Tq, m M] fp32, keys
  [B, Tq, m M] int32 (-1 empty), evicted [B, Tq] fp32: the best score no candidate holds, -inf if
  none). Each bin's candidates are best first. estimate: the call's Walk (indexer_topk's share of
  its whole walk); by default walk(q_offset), the last Tq positions of the keys if it is traced."""
  options = options or DEFAULT_OPTIONS
  g = geometry(q_idx, k_idx, topk, options, bins, levels)
  rows_t, keys_t = g.blocks * g.bq, g.num_chunks * g.bins
  weights = weights.astype(jnp.float32)
  if g.int8:
    q_idx, q_scale = _quantize(q_idx)
    k_idx, k_scale = _quantize(k_idx)
    weights = weights * q_scale
    k_scale = jnp.pad(k_scale, [(0, 0), (0, keys_t - g.tk)]).reshape(g.b, g.num_chunks, 1, g.bins)
  pad_q = [(0, 0), (0, rows_t - g.tq)]
  q_rows = jnp.pad(q_idx, pad_q + [(0, 0), (0, 0)]).reshape(g.b, rows_t * g.heads, g.dim)
  w_col = jnp.pad(weights, pad_q + [(0, 0)]).reshape(g.b, rows_t * g.heads, 1)
  keys = jnp.pad(k_idx, [(0, 0), (0, keys_t - g.tk), (0, 0)])
  doc = jnp.zeros((g.b, g.tq), jnp.int32) if doc_start is None else doc_start.astype(jnp.int32)
  doc = jnp.pad(doc, pad_q, mode="edge")
  first_chunk = (doc.reshape(g.b, g.blocks, g.bq).min(-1) // g.bins).reshape(-1)     # skip earlier documents
  offset = jnp.asarray(q_offset, jnp.int32).reshape(1)
  rows_spec = lambda width: pl.BlockSpec((None, g.bq * g.heads, width), lambda b, i, *_: (b, i, 0))
  query_spec = lambda width: pl.BlockSpec((None, g.bq, width), lambda b, i, *_: (b, i, 0))
  hbm = pl.BlockSpec(memory_space=pl.ANY)
  scratch = [pltpu.VMEM((2, g.bins, g.dim), keys.dtype)] + [pltpu.VMEM((2, 1, g.bins), jnp.float32)] * g.int8
  scratch += [pltpu.VMEM((g.bq, g.bins), jnp.float32), pltpu.SemaphoreType.DMA((2, 2))]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(g.b, g.blocks),
      in_specs=[rows_spec(g.dim), rows_spec(1), query_spec(1), hbm] + [hbm] * g.int8,
      out_specs=[query_spec(g.width), query_spec(g.width), query_spec(LANES)],
      scratch_shapes=scratch)
  static = _static_offset(q_offset)
  w = estimate or walk(g, static if static is not None else g.tk - g.tq)
  val, idx, ev = pl.pallas_call(
      functools.partial(_kernel, g=g), grid_spec=grid_spec, name=NAME,
      out_shape=[jax.ShapeDtypeStruct((g.b, rows_t, g.width), jnp.float32),
                 jax.ShapeDtypeStruct((g.b, rows_t, g.width), jnp.int32),
                 jax.ShapeDtypeStruct((g.b, rows_t, LANES), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"),
                                           vmem_limit_bytes=VMEM_LIMIT),
      cost_estimate=cost(w.flops, 0, w.bytes), interpret=options.interpret_params(),
  )(offset, first_chunk, q_rows, w_col, doc[..., None], keys, *([k_scale] if g.int8 else []))
  return val[:, :g.tq], idx[:, :g.tq], ev[:, :g.tq, 0]


def _static_offset(q_offset):
  try:
    return int(q_offset)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


# ---- top-k ----

def _exact_rows(q_idx, weights, k_idx, positions, doc, topk: int):
  """XLA's exact top-k of queries q_idx [B, R, H_I, d_I] at global `positions` [B, R]."""
  scores = reference.index_scores(q_idx, weights, k_idx)                              # [B, R, Tk]
  key = jnp.arange(k_idx.shape[1])[None, None, :]
  scores = jnp.where((key <= positions[..., None]) & (key >= doc[..., None]), scores, -jnp.inf)
  if k_idx.shape[1] < topk:
    scores = jnp.pad(scores, [(0, 0), (0, 0), (0, topk - k_idx.shape[1])], constant_values=-jnp.inf)
  values, index = jax.lax.top_k(scores, topk)
  return jnp.where(values == -jnp.inf, -1, index).astype(jnp.int32)


def select(values, keys, evicted, topk: int):
  """(indices [B, Tq, topk] best first, ties to the lower key, -1 padding; exact [B, Tq] bool:
  the certificate that the candidates hold the true top-k)."""
  if values.shape[-1] < topk:
    pad = [(0, 0), (0, 0), (0, topk - values.shape[-1])]
    values, keys = jnp.pad(values, pad, constant_values=-jnp.inf), jnp.pad(keys, pad, constant_values=-1)
  neg, keys = jax.lax.sort((-values, keys), dimension=-1, num_keys=2)
  best = -neg[..., :topk]
  exact = (evicted < best[..., -1]) | (evicted == -jnp.inf)
  return jnp.where(best == -jnp.inf, -1, keys[..., :topk]).astype(jnp.int32), exact


def indexer_topk(q_idx, k_idx, weights, q_offset, *, topk: int, options=None, doc_start=None, bins=None, levels=None):
  """The contract of kernels.dsa.indexer_topk for queries at q_offset + [0, Tq): int32
  [B, Tq, topk], best first, ties to the lower s, -1 padding; keys s <= t and s >= doc_start[t].
  Exact (options.topk_recall = 1; bf16 QK): the reference's rows. topk_recall < 1 or int8 QK:
  approximate (see the module docstring). bins, levels: override M and m (tests)."""
  options = options or DEFAULT_OPTIONS
  g = geometry(q_idx, k_idx, topk, options, bins, levels)
  exact_wanted = options.topk_recall >= 1.0
  chunk = min(_round_up(max(options.select_chunk, g.bq), g.bq), _round_up(g.tq, g.bq))
  static = _static_offset(q_offset)
  whole = walk(g, static if static is not None else g.tk - g.tq)
  calls = -(-g.tq // chunk)
  share = Walk(*(x // calls for x in whole))      # one CostEstimate per call of the loop: the mean

  def chunk_fn(q_chunk, t0, w_chunk, *doc):
    doc_chunk = doc[0] if doc else None
    values, keys, evicted = candidates(q_chunk, k_idx, w_chunk, t0, topk=topk, options=options, doc_start=doc_chunk,
                                       bins=g.bins, levels=g.levels, estimate=share)
    out, exact = select(values, keys, evicted, topk)
    if not exact_wanted:
      return out
    return _fallback(out, exact, q_chunk, w_chunk, t0, doc_chunk, k_idx, topk)
  per_query = () if doc_start is None else (doc_start,)
  return chunking.map_query_chunks(chunk_fn, q_idx, weights, *per_query, chunk=chunk, remat=False, offset=q_offset)


def _fallback(out, exact, q_chunk, w_chunk, t0, doc_chunk, k_idx, topk: int):
  """Rows whose certificate failed, recomputed by XLA: up to FALLBACK_ROWS per batch row one by
  one, the whole chunk when more fail."""
  b, c = exact.shape
  positions = t0 + jnp.arange(c, dtype=jnp.int32)[None, :].repeat(b, 0)
  doc = jnp.zeros((b, c), jnp.int32) if doc_chunk is None else doc_chunk.astype(jnp.int32)
  failed = (~exact).sum(-1).max()
  rows_cap = min(FALLBACK_ROWS, c)

  def some_rows():
    rows = jnp.argsort(exact, axis=-1, stable=True)[:, :rows_cap]                       # failed rows first
    take = lambda x: jnp.take_along_axis(x, rows.reshape(b, rows_cap, *([1] * (x.ndim - 2))), axis=1)
    fixed = _exact_rows(take(q_chunk), take(w_chunk), k_idx, take(positions), take(doc), topk)
    fixed = jnp.where(take(exact)[..., None], take(out), fixed)
    return jax.vmap(lambda o, r, f: o.at[r].set(f))(out, rows, fixed)

  def all_rows():
    return jnp.where(exact[..., None], out, _exact_rows(q_chunk, w_chunk, k_idx, positions, doc, topk))
  return jax.lax.cond(failed == 0, lambda: out,
                      lambda: jax.lax.cond(failed <= rows_cap, some_rows, all_rows))


def index_scores(q_idx, weights, k_idx, q_offset, *, options=None, doc_start=None):
  """I [B, Tq, Tk] float32 from the kernel with every key kept (levels = keys per bin): -inf
  where s > t or s < doc_start[t]. For tests and small shapes: it is the dense [Tq, Tk]."""
  options = options or DEFAULT_OPTIONS
  tk = k_idx.shape[1]
  bins = min(BINS, _round_up(tk, LANES))
  values, keys, _ = candidates(q_idx, k_idx, weights, q_offset, topk=1, options=options, doc_start=doc_start,
                               bins=bins, levels=-(-tk // bins))
  b, tq, _ = values.shape
  dense = jnp.full((b, tq, tk + 1), -jnp.inf, jnp.float32)
  slot = jnp.where(keys < 0, tk, keys)
  bi, qi = jnp.arange(b)[:, None, None], jnp.arange(tq)[None, :, None]
  return dense.at[bi, qi, slot].set(jnp.where(keys < 0, -jnp.inf, values))[..., :tk]
