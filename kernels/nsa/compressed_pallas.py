"""Pallas TPU kernels for NSA's compressed branch (docs/design.md §4, §7): attention over the compressed
keys (forward with lse, dq, dK/dV behind a custom_vjp) and the group-summed, overlap-mapped block
scores that select_blocks ranks. Query t sees compressed token c iff c*d + l - 1 <= t and
c >= first[t], the first compressed token of t's document (0 for one document per row; packed
documents: ceil(doc_start[t] / d)). first travels as one int32 column per tile ([128, 1] rows of
[B, 1, T*G, 1], shared by the KV heads): 512 bytes from HBM per query tile (its index map ignores
the key axis, so it is fetched once per tile), a lane-padded 64 KiB buffer in VMEM. Key tiles
wholly before a tile's documents are still walked (masked): packed rows cost what one document
of T costs.

rows    as in the selection kernels (kernels/nsa/selection_pallas.py): a tile is bq = 128 // G query
        positions x the G heads of one KV group, 128 matmul rows whatever G is.
Attention, forward and dq: grid (B, HKV, T/bq, Cp/BK), BK = 128 compressed keys per step, an
        online softmax over the key axis. Query tile i needs only its first n_i key tiles (the
        ones with a token it can see); later steps skip compute with pl.when and their index map
        repeats tile n_i - 1, so they issue no DMA. Query tiles sit at a global offset (scalar
        prefetch: context parallelism hands each device a chunk of the sequence), so visibility
        and the key tiles needed use global positions. Bytes per query tile: q 128*Dk (+ dO, lse,
        delta in dq), n_i*BK*(Dk + Dv) of K/V, out 128*Dv, lse 128 fp32 (a tile row).
dK/dV:  KV-stationary grid (B, HKV, Cp/BK, T/bq): key tile kb accumulates over the query tiles
        that see any of its tokens in VMEM and is written once; earlier tiles are skipped and their
        index maps clamped forward to the first tile that is read.
Scores: grid (B, HKV, Qc/bq, NBp/nbt) over one query chunk. Step kb reads BKS = nbt*l'/d compressed
        keys, exactly the ones starting inside selection blocks [kb*nbt, (kb+1)*nbt), and turns
        p = exp(s - lse) ([128, BKS], lse from the compressed attention) into the chunk's
        [bq, nbt] block scores with two MXU products: a 0/1 [bq, 128] matrix sums the G heads of
        each query, and a constant [BKS, nbt] overlap matrix maps tokens to blocks. Tokens of tile
        kb-1 that reach into block kb*nbt (l > d) come from the previous step's sums, kept in VMEM.
        Nothing [T, C] exists per head or per group: HBM sees [Qc, NB] per KV group and chunk.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import DEFAULT_OPTIONS, KernelOptions
from kernels.nsa.rows import (
  check_rows,
  from_rows,
  from_tile_rows,
  row_spec,
  tile_row_spec,
  to_rows,
  to_tile_rows,
)
from kernels.nsa.selection_pallas import _Shape
from kernels.pallas_common import (
  LANES,
  ROWS,
  accumulate_dkv,
  accumulate_dq,
  cost,
  probs,
  softmax_finish,
  softmax_init,
  softmax_step,
)


class _Cmp(NamedTuple):
  """Static geometry of one compressed-attention call."""
  b: int
  t: int
  hkv: int
  group: int
  dk: int
  dv: int
  c: int                # compressed tokens
  block_len: int        # l
  stride: int           # d
  scale: float
  options: KernelOptions

  queries_per_tile = _Shape.queries_per_tile      # 128 // G positions per tile, as in selection
  num_tiles = _Shape.num_tiles
  interpret = _Shape.interpret

  @property
  def key_tile(self):
    """Compressed keys per attention step (the lane width of the scores)."""
    return self.options.key_tile

  def visible_tokens(self, query_tile):
    """Compressed tokens the last query of `query_tile` sees (traced int32)."""
    last = (query_tile + 1) * self.queries_per_tile - 1
    return jnp.clip((last - self.block_len + 1) // self.stride + 1, 0, self.c)

  def key_tiles(self, query_tile, key_tile=None):
    """How many key tiles of `key_tile` (default self.key_tile) tokens query tile i needs (traced int32)."""
    key_tile = key_tile or self.key_tile
    return (self.visible_tokens(query_tile) + key_tile - 1) // key_tile

  def first_query_tile(self, kb):
    """The first query tile that sees a token of key tile kb (may be >= the number of tiles)."""
    return (kb * self.key_tile * self.stride + self.block_len - 1) // self.queries_per_tile


def _geometry(q, k_cmp, v_cmp, block_len, stride, scale, options) -> _Cmp:
  b, t, hq, dk = q.shape
  hkv = k_cmp.shape[2]
  group = check_rows(t, hq, hkv)
  return _Cmp(b, t, hkv, group, dk, v_cmp.shape[-1], k_cmp.shape[1], block_len, stride,
              dk ** -0.5 if scale is None else scale, options or DEFAULT_OPTIONS)


def _scores(g: _Cmp, q, k, first, query_tile, key_tile):
  """scale * q k^T [128, keys] fp32, -inf where the row's query cannot see the compressed token
  (in its future, or before `first` [128, 1], its document's first)."""
  rows, keys = q.shape[0], k.shape[0]
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * g.scale
  query_pos = query_tile * g.queries_per_tile + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // g.group
  token = key_tile * keys + jax.lax.broadcasted_iota(jnp.int32, (1, keys), 1)
  return jnp.where((token * g.stride + g.block_len - 1 <= query_pos) & (token >= first), s, -jnp.inf)


def first_rows(doc_start, b: int, t: int, group: int, stride: int):
  """int32 [B, 1, T*G, 1]: per row (query t, head g) the first compressed token of its document."""
  first = jnp.zeros((b, t), jnp.int32) if doc_start is None else -(-doc_start.astype(jnp.int32) // stride)
  return to_rows(jnp.broadcast_to(first[:, :, None, None], (b, t, group, 1)), 1)


def first_spec(index_map):
  """BlockSpec of one tile's [128, 1] column of first_rows; index_map gives (b, h, tile)."""
  return pl.BlockSpec((None, None, ROWS, 1), lambda *a: (index_map(*a)[0], 0, index_map(*a)[2], 0))


def _attention_cost(g: _Cmp, *, matmul_width: int, row_bytes: int, kv_passes: int = 1, row_passes: int = 1):
  """A compressed-attention pallas_call: every row against the compressed tokens it sees (C/2 on
  average, causal), `matmul_width` the summed widths of a step's matmuls; bytes: the rows
  (`row_passes` times: dK/dV rereads a query tile per key tile) and each query tile's visible K/V."""
  rows = g.b * g.hkv * g.num_tiles * ROWS
  seen = g.c / 2
  kv = g.b * g.hkv * g.num_tiles * seen * (g.dk + g.dv) * 2
  return cost(2 * rows * seen * matmul_width, rows * seen, row_passes * rows * row_bytes + kv_passes * kv)


def _pad_keys(x_t, multiple):
  c = x_t.shape[2]
  return jnp.pad(x_t, [(0, 0), (0, 0), (0, -(-c // multiple) * multiple - c), (0, 0)])


# ---- attention: forward and dq (query-stationary), dK/dV (KV-stationary) ----

def _forward_kernel(offset_ref, q_ref, first_ref, k_ref, v_ref, o_ref, lse_ref, m_scratch, l_scratch, acc_scratch,
                    *, g):
  i, kb = offset_ref[0] + pl.program_id(2), pl.program_id(3)

  @pl.when(kb == 0)
  def _init():
    softmax_init(m_scratch, l_scratch, acc_scratch)

  @pl.when(kb < g.key_tiles(i))
  def _step():
    softmax_step(_scores(g, q_ref[...], k_ref[...], first_ref[...], i, kb), v_ref[...], m_scratch, l_scratch,
                 acc_scratch)

  @pl.when(kb == pl.num_programs(3) - 1)
  def _finish():
    softmax_finish(o_ref, lse_ref, m_scratch, l_scratch, acc_scratch)


def _dq_kernel(offset_ref, q_ref, first_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, dq_ref, acc_scratch, *, g):
  i, kb = offset_ref[0] + pl.program_id(2), pl.program_id(3)

  @pl.when(kb == 0)
  def _init():
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

  @pl.when(kb < g.key_tiles(i))
  def _step():
    s = _scores(g, q_ref[...], k_ref[...], first_ref[...], i, kb)
    accumulate_dq(s, do_ref[...], k_ref[...], v_ref[...], lse_ref, delta_ref, acc_scratch, g.scale)

  @pl.when(kb == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = acc_scratch[...].astype(dq_ref.dtype)


def _dkv_kernel(offset_ref, q_ref, first_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, dk_ref, dv_ref, dk_scratch,
                dv_scratch, *, g):
  kb, local = pl.program_id(2), pl.program_id(3)
  i = offset_ref[0] + local                     # the query tile's global index

  @pl.when(local == 0)
  def _init():
    dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
    dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

  @pl.when(i >= g.first_query_tile(kb))
  def _step():
    q = q_ref[...]
    accumulate_dkv(_scores(g, q, k_ref[...], first_ref[...], i, kb), q, do_ref[...], v_ref[...], lse_ref, delta_ref,
                    dk_scratch, dv_scratch, g.scale)

  @pl.when(local == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = dk_scratch[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)


def _query_stationary_call(g: _Cmp, kernel, row_inputs, row_outputs, scratch, num_key_tiles, estimate):
  """pallas_call over grid (B, HKV, T/bq, key tiles), the query tiles' global offset in scalar
  prefetch. row_inputs / row_outputs: per-row arrays as ("rows", width, dtype) ([B, HKV, T*G,
  width]), ("tile_row", 1, dtype) ([B, HKV, NQ, 1, 128]) or ("first", 1, None) (first_rows);
  K and V tiles come after the row inputs, clamped to the query tile's last needed one."""
  tile = lambda b, h, i, kb, offset: (b, h, i)
  spec = lambda kind, width: {"tile_row": tile_row_spec, "first": first_spec}.get(
      kind, lambda t: row_spec(t, width))(tile)
  def shape(kind, width, dtype):
    dims = (g.num_tiles, 1, ROWS) if kind == "tile_row" else (g.t * g.group, width)
    return jax.ShapeDtypeStruct((g.b, g.hkv, *dims), dtype)
  key_map = lambda b, h, i, kb, offset: (b, h, jnp.minimum(kb, jnp.maximum(g.key_tiles(offset[0] + i) - 1, 0)), 0)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(g.b, g.hkv, g.num_tiles, num_key_tiles),
      in_specs=[spec(kind, w) for kind, w, _ in row_inputs]
               + [pl.BlockSpec((None, None, g.key_tile, g.dk), key_map),
                  pl.BlockSpec((None, None, g.key_tile, g.dv), key_map)],
      out_specs=[spec(kind, w) for kind, w, _ in row_outputs],
      scratch_shapes=[pltpu.VMEM(s, jnp.float32) for s in scratch])
  return pl.pallas_call(
      functools.partial(kernel, g=g), grid_spec=grid_spec,
      out_shape=[shape(*o) for o in row_outputs],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=estimate, interpret=g.interpret)


def _offset_tiles(g: _Cmp, q_offset):
  """int32 [1]: the global index of the first query tile (q_offset is a multiple of 128/G)."""
  return (jnp.asarray(q_offset, jnp.int32) // g.queries_per_tile).reshape(1)


def _forward_rows(g: _Cmp, offset, q_rows, first, k_t, v_t):
  """(out rows [B,HKV,T*G,Dv], lse tile rows [B,HKV,NQ,1,128] fp32); k_t, v_t padded to g.key_tile."""
  return _query_stationary_call(
      g, _forward_kernel, [("rows", g.dk, None), ("first", 1, None)],
      [("rows", g.dv, q_rows.dtype), ("tile_row", 1, jnp.float32)],
      [(ROWS, LANES), (ROWS, LANES), (ROWS, g.dv)], k_t.shape[2] // g.key_tile,
      _attention_cost(g, matmul_width=g.dk + g.dv, row_bytes=2 * (g.dk + g.dv) + 8))(offset, q_rows, first, k_t, v_t)


def _keys_t(g: _Cmp, k_cmp, v_cmp):
  return (_pad_keys(k_cmp.transpose(0, 2, 1, 3), g.key_tile), _pad_keys(v_cmp.transpose(0, 2, 1, 3), g.key_tile))


def compressed_attention(q, k_cmp, v_cmp, q_offset, block_len: int, stride: int, scale=None, options=None,
                         doc_start=None):
  """(out [B,T,HQ,Dv] in q's dtype, lse [B,T,HQ] fp32, -inf where nothing is visible): the contract
  of kernels.nsa.compressed_attention for queries at global positions q_offset + [0, T) (an int
  or traced int32, a multiple of 128/G), doc_start [B, T] of packed documents or None; forward,
  dq and dK/dV are Pallas kernels. Needs C >= 1."""
  b, t, hq, _ = q.shape
  first = first_rows(doc_start, b, t, hq // k_cmp.shape[2], stride)
  return _compressed(q, k_cmp, v_cmp, jnp.asarray(q_offset, jnp.int32), first, block_len, stride, scale, options)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _compressed(q, k_cmp, v_cmp, q_offset, first, block_len, stride, scale, options):
  return _compressed_fwd(q, k_cmp, v_cmp, q_offset, first, block_len, stride, scale, options)[0]


def _compressed_fwd(q, k_cmp, v_cmp, q_offset, first, block_len, stride, scale, options):
  g = _geometry(q, k_cmp, v_cmp, block_len, stride, scale, options)
  offset = _offset_tiles(g, q_offset)
  out_rows, lse_rows = _forward_rows(g, offset, to_rows(q, g.hkv), first, *_keys_t(g, k_cmp, v_cmp))
  result = (from_rows(out_rows, g.t), from_tile_rows(lse_rows, g.t))
  return result, (q, k_cmp, v_cmp, offset, first, out_rows, lse_rows)


def _compressed_bwd(block_len, stride, scale, options, residuals, cotangents):
  q, k_cmp, v_cmp, offset, first, out_rows, lse_rows = residuals
  dout, dlse = cotangents
  g = _geometry(q, k_cmp, v_cmp, block_len, stride, scale, options)
  k_t, v_t = _keys_t(g, k_cmp, v_cmp)
  q_rows, do_rows = to_rows(q, g.hkv), to_rows(dout.astype(q.dtype), g.hkv)
  # d lse / d s = p, so the lse cotangent enters as dS = p * (dO V^T - (delta - dlse)).
  delta = jnp.sum(out_rows.astype(jnp.float32) * do_rows.astype(jnp.float32), -1).reshape(lse_rows.shape)
  delta_rows = delta - to_tile_rows(dlse.astype(jnp.float32), g.hkv)
  num_key_tiles = k_t.shape[2] // g.key_tile
  dq_rows, = _query_stationary_call(
      g, _dq_kernel, [("rows", g.dk, None), ("first", 1, None), ("rows", g.dv, None), ("tile_row", 1, None),
                      ("tile_row", 1, None)],
      [("rows", g.dk, q.dtype)], [(ROWS, g.dk)], num_key_tiles,
      _attention_cost(g, matmul_width=2 * g.dk + g.dv, row_bytes=2 * (2 * g.dk + g.dv) + 12),
  )(offset, q_rows, first, do_rows, lse_rows, delta_rows, k_t, v_t)

  last = g.num_tiles - 1
  # Local query tile i is global tile offset + i; tiles before a key tile's first reader are
  # skipped, their index clamped forward to the first one read (no DMA).
  tile = lambda b, h, kb, i, offset: (b, h, jnp.minimum(jnp.maximum(i, g.first_query_tile(kb) - offset[0]), last))
  key_map = lambda b, h, kb, i, offset: (b, h, kb, 0)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(g.b, g.hkv, num_key_tiles, g.num_tiles),
      in_specs=[row_spec(tile, g.dk), first_spec(tile), row_spec(tile, g.dv)]
               + [tile_row_spec(tile), tile_row_spec(tile)]
               + [pl.BlockSpec((None, None, g.key_tile, w), key_map) for w in (g.dk, g.dv)],
      out_specs=[pl.BlockSpec((None, None, g.key_tile, w), key_map) for w in (g.dk, g.dv)],
      scratch_shapes=[pltpu.VMEM((g.key_tile, g.dk), jnp.float32), pltpu.VMEM((g.key_tile, g.dv), jnp.float32)])
  dk_t, dv_t = pl.pallas_call(
      functools.partial(_dkv_kernel, g=g), grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(k_t.shape, k_cmp.dtype), jax.ShapeDtypeStruct(v_t.shape, v_cmp.dtype)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=_attention_cost(g, matmul_width=2 * (g.dk + g.dv), row_bytes=2 * (g.dk + g.dv) + 12,
                                    row_passes=max(1, num_key_tiles // 2), kv_passes=2),
      interpret=g.interpret)(offset, q_rows, first, do_rows, lse_rows, delta_rows, k_t, v_t)
  unpad = lambda x: x[:, :, :g.c].transpose(0, 2, 1, 3)
  return from_rows(dq_rows, g.t), unpad(dk_t), unpad(dv_t), None, None


_compressed.defvjp(_compressed_fwd, _compressed_bwd)


# ---- block scores for select_blocks ----

@functools.cache
def overlap_tiles(block_len: int, stride: int, slc_block: int, blocks_per_tile: int):
  """(own [BKS, nbt], previous [BKS, nbt]) float32: |tokens of compressed c ∩ selection block j| / d
  for c in the current key tile and in the one before, j in the current tile of blocks. Every tile
  pair looks the same because a key tile covers exactly its blocks' span (BKS*d = nbt*l')."""
  keys = blocks_per_tile * slc_block // stride
  c = np.arange(-keys, keys)[:, None]
  j = np.arange(blocks_per_tile)[None, :]
  w = np.maximum(0, np.minimum(c * stride + block_len, (j + 1) * slc_block)
                 - np.maximum(c * stride, j * slc_block)) / stride
  return w[keys:].astype(np.float32), w[:keys].astype(np.float32)


def _scores_kernel(chunk_ref, q_ref, first_ref, lse_ref, k_ref, own_ref, prev_ref, out_ref, sums_scratch, *, g, keys):
  i, kb = pl.program_id(2), pl.program_id(3)
  query_tile = chunk_ref[0] + i
  needed = g.key_tiles(query_tile, keys)
  dot = lambda a, b: jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

  @pl.when(kb == 0)
  def _init():
    sums_scratch[...] = jnp.zeros(sums_scratch.shape, jnp.float32)

  @pl.when(kb < needed)
  def _step():
    s = _scores(g, q_ref[...], k_ref[...], first_ref[...], query_tile, kb)
    p = probs(s, lse_ref)                                                      # [128, BKS]
    if g.group > 1:   # sum each query's G heads: [bq, 128] 0/1 matrix times p
      rows = jax.lax.broadcasted_iota(jnp.int32, (g.queries_per_tile, ROWS), 1) // g.group
      p = dot((rows == jax.lax.broadcasted_iota(jnp.int32, (g.queries_per_tile, ROWS), 0)).astype(jnp.float32), p)
    out_ref[...] = dot(p, own_ref[...]) + dot(sums_scratch[...], prev_ref[...])
    sums_scratch[...] = p

  @pl.when(kb >= needed)
  def _rest():   # only the first step past the last needed tile gets the spill of its tokens
    out_ref[...] = dot(sums_scratch[...], prev_ref[...])
    sums_scratch[...] = jnp.zeros(sums_scratch.shape, jnp.float32)


def _scores_cost(g: _Cmp, keys: int, nbt: int, num_tiles: int):
  """A block-score call: per query tile and seen compressed token (C/2 on average; the chunk's
  start is traced) the scores (Dk), the head sum (128 wide, G > 1) and the two overlap products."""
  tiles, seen, bq = g.b * g.hkv * g.num_tiles, g.c / 2, g.queries_per_tile
  per_token = 2 * ROWS * g.dk + (2 * bq * ROWS if g.group > 1 else 0) + 4 * bq * nbt
  return cost(tiles * seen * per_token, tiles * ROWS * seen,
              tiles * (ROWS * g.dk * 2 + ROWS * 4 + bq * num_tiles * nbt * 4 + seen * g.dk * 2))


def block_scores(q_chunk, lse_chunk, k_cmp, chunk_start, *, block_len: int, stride: int, slc_block: int,
                 num_blocks: int, scale=None, options=None, doc_start=None):
  """float32 [B, Qc, HKV, num_blocks]: for queries chunk_start + [0, Qc) the selection-block
  importance sum_{g, c} w(c, j) p_cmp[g, c] of NSA (the XLA reference's block_scores of the
  group-summed compressed probabilities), with p_cmp = exp(s - lse) from the compressed
  attention's lse. chunk_start (traced int32) must be a multiple of 128/G, as must Qc. doc_start
  [B, Qc]: packed documents (a document's tokens count from its first compressed token)."""
  g = _geometry(q_chunk, k_cmp, k_cmp, block_len, stride, scale, options)
  nbt = min(g.options.score_blocks, num_blocks)
  num_tiles = -(-num_blocks // nbt)
  keys = nbt * slc_block // stride
  own, prev = (jnp.asarray(w) for w in overlap_tiles(block_len, stride, slc_block, nbt))
  k_t = k_cmp.transpose(0, 2, 1, 3)
  k_t = jnp.pad(k_t, [(0, 0), (0, 0), (0, max(0, num_tiles * keys - g.c)), (0, 0)])[:, :, :num_tiles * keys]
  lse_rows = to_tile_rows(lse_chunk, g.hkv)
  start_tile = (jnp.asarray(chunk_start, jnp.int32) // g.queries_per_tile).reshape(1)

  row_map = lambda b, h, i, kb, start: (b, h, i)
  key_map = lambda b, h, i, kb, start: (b, h, jnp.minimum(kb, jnp.maximum(g.key_tiles(start[0] + i, keys) - 1, 0)), 0)
  fixed = lambda b, h, i, kb, start: (0, 0)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(g.b, g.hkv, g.num_tiles, num_tiles),
      in_specs=[row_spec(row_map, g.dk), first_spec(row_map), tile_row_spec(row_map),
                pl.BlockSpec((None, None, keys, g.dk), key_map),
                pl.BlockSpec((keys, nbt), fixed), pl.BlockSpec((keys, nbt), fixed)],
      out_specs=pl.BlockSpec((None, None, None, g.queries_per_tile, nbt), lambda b, h, i, kb, start: (b, h, i, 0, kb)),
      scratch_shapes=[pltpu.VMEM((g.queries_per_tile, keys), jnp.float32)])
  out = pl.pallas_call(
      functools.partial(_scores_kernel, g=g, keys=keys), grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((g.b, g.hkv, g.num_tiles, g.queries_per_tile, num_tiles * nbt), jnp.float32),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=_scores_cost(g, keys, nbt, num_tiles), interpret=g.interpret,
  )(start_tile, to_rows(q_chunk, g.hkv), first_rows(doc_start, g.b, g.t, g.group, stride), lse_rows, k_t, own, prev)
  return out.reshape(g.b, g.hkv, g.t, -1)[..., :num_blocks].transpose(0, 2, 1, 3)
