"""Pallas TPU kernels for NSA's selection branch (docs/design.md §7): forward, dq and dK/dV behind a
custom_vjp (`kernels.nsa.selection_attention(impl="pallas")`) and the GQA row layout the
compressed kernels share (kernels/nsa/compressed_pallas.py). The online softmax and the inverted
selection are kernels/pallas_common.py's (shared with DSA); the traffic model of the three
kernels is perf/nsa_traffic.py. The window branch runs on splash attention (kernels/dense.py).

Selection forward, union query tiling:
  rows     a tile is bq = 128 // G query positions x the G query heads of one KV group: 128
           matmul rows (q viewed as [B, HKV, T*G, Dk], row = t*G + g), whatever G is.
  union    per (batch, KV head, tile) the sorted set of blocks any of the tile's queries selected,
           length U = min(bq * n, number of blocks), padded by repeating its last entry: a padded
           step maps to the same K/V block as the step before, so Pallas issues no DMA for it,
           and `pl.when(u < count)` skips its compute. The lists live in scalar prefetch (SMEM).
  grid     (B, HKV, T / bq, U); the last axis walks the union with an online softmax in fp32
           ([128, 128] lane-replicated max/sum, [128, Dv] accumulator in VMEM scratch).
  masks    each row keeps a key iff its own query chose that block and the key is not in its
           future; rows see their n indices ([128, n] int32 tile) to decide.
  bytes    per tile: q 128*Dk, the union's K/V blocks once each (count * l' * (Dk + Dv)),
           out 128*Dv, lse 128 fp32 (one [1, 128] tile row; see to_tile_rows).
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import DEFAULT_OPTIONS, KernelOptions, Unsupported
from kernels.nsa.rows import check_rows, from_rows, from_tile_rows, row_spec, tile_row_spec, to_rows
from kernels.pallas_common import (
  LANES,
  ROWS,
  accumulate_dkv,
  accumulate_dq,
  cost,
  inverted_pairs,
  pair_windows,
  softmax_finish,
  softmax_init,
  softmax_step,
  window_share,
)


def tile_unions(block_indices, *, slc_block: int, seq_len: int, queries_per_tile: int, first_tile=0):
  """(union [B, HKV, NQ, U] int32, count [B, HKV, NQ] int32): per query tile, the sorted distinct
  valid blocks its queries selected (-1, out-of-range and wholly-future blocks dropped), padded
  by repeating the last entry (0 when the tile selected nothing). seq_len: the keys' length;
  first_tile (traced int32 ok): the global index of the first query tile."""
  b, t, hkv, n = block_indices.shape
  num_blocks = -(-seq_len // slc_block)
  nq = t // queries_per_tile
  idx = block_indices.reshape(b, nq, queries_per_tile, hkv, n).transpose(0, 3, 1, 2, 4)
  idx = idx.reshape(b, hkv, nq, queries_per_tile * n)
  last_block = ((first_tile + jnp.arange(nq) + 1) * queries_per_tile - 1) // slc_block         # [NQ]
  valid = (idx >= 0) & (idx < num_blocks) & (idx <= last_block[None, None, :, None])
  big = jnp.iinfo(jnp.int32).max
  s = jnp.sort(jnp.where(valid, idx, big), axis=-1)
  first = jnp.concatenate([jnp.ones_like(s[..., :1], bool), s[..., 1:] != s[..., :-1]], -1) & (s != big)
  s = jnp.sort(jnp.where(first, s, big), axis=-1)[..., :min(queries_per_tile * n, num_blocks)]
  count = first.sum(-1).astype(jnp.int32)
  last = jnp.take_along_axis(s, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  pos = jnp.arange(s.shape[-1])
  union = jnp.where(pos < count[..., None], s, jnp.where(count[..., None] > 0, last, 0))
  return union.astype(jnp.int32), count


def _masked_scores(q, k, idx, j, tile, *, scale, slc_block, group):
  """scale * q k^T [R, l'] in fp32 for KV block j, -inf where a row's query did not choose block
  j or the key is in its future. Row r is query tile*(R/G) + r//G."""
  rows = q.shape[0]
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
  chosen = jnp.max(jnp.where(idx == j, 1, 0), axis=1, keepdims=True) > 0                # [R, 1]
  query_pos = tile * (rows // group) + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // group
  key_pos = j * slc_block + jax.lax.broadcasted_iota(jnp.int32, (1, slc_block), 1)
  return jnp.where(chosen & (key_pos <= query_pos), s, -jnp.inf)


def _union_position(group_ref, grid_shape):
  """At grid step (b, h, i, u) of a union walk: (this call's flat tile index into the prefetch
  lists, u, the tile's index in the whole sequence; group_ref holds the call's first one)."""
  b, h, i, u = (pl.program_id(a) for a in range(4))
  _, hkv, nq, _ = grid_shape
  return (b * hkv + h) * nq + i, u, group_ref[0] + i


def _selection_fwd_kernel(group_ref, union_ref, count_ref, q_ref, idx_ref, k_ref, v_ref, o_ref, lse_ref,
                          m_scratch, l_scratch, acc_scratch, *, scale, slc_block, group, num_union,
                          grid_shape):
  tile, u, query_tile = _union_position(group_ref, grid_shape)

  @pl.when(u == 0)
  def _init():
    softmax_init(m_scratch, l_scratch, acc_scratch)

  @pl.when(u < count_ref[tile])
  def _step():
    j = union_ref[tile * num_union + u]
    s = _masked_scores(q_ref[...], k_ref[...], idx_ref[...], j, query_tile,
                       scale=scale, slc_block=slc_block, group=group)
    softmax_step(s, v_ref[...], m_scratch, l_scratch, acc_scratch)

  @pl.when(u == num_union - 1)
  def _finish():
    softmax_finish(o_ref, lse_ref, m_scratch, l_scratch, acc_scratch)


class _Shape(NamedTuple):
  b: int
  t: int                  # queries
  hkv: int
  group: int
  dk: int
  dv: int
  n: int
  slc_block: int
  scale: float
  options: KernelOptions
  tk: int = 0             # keys (0: t); more than t when the queries are a chunk of the sequence

  @property
  def num_blocks(self):
    return (self.tk or self.t) // self.slc_block

  @property
  def interpret(self):
    return self.options.interpret_params()

  @property
  def queries_per_tile(self):
    return ROWS // self.group

  @property
  def num_tiles(self):
    return self.t // self.queries_per_tile

  def rows(self, x):
    return to_rows(x, self.hkv)

  def unrows(self, x):
    return from_rows(x, self.t)


def check_supported(t: int, hq: int, hkv: int, slc_block: int) -> int:
  """The selection kernels' rules: the row tiling's, and T a multiple of the block size."""
  group = check_rows(t, hq, hkv)
  if t % slc_block:
    raise Unsupported("seq_len", t, f"must be a multiple of the selection block size {slc_block}")
  return group


def _shape(q, k, v, block_indices, slc_block, scale, options) -> _Shape:
  b, t, hq, dk = q.shape
  hkv, dv = k.shape[2], v.shape[-1]
  group = check_supported(t, hq, hkv, slc_block)
  check_supported(k.shape[1], hq, hkv, slc_block)
  return _Shape(b, t, hkv, group, dk, dv, block_indices.shape[-1], slc_block,
                dk ** -0.5 if scale is None else scale, options or DEFAULT_OPTIONS, k.shape[1])


def _selection_cost(sh: _Shape, tiles: int, num_union: int, *, matmul_width: int, row_bytes: int,
                    kv_passes: int = 1) -> pl.CostEstimate:
  """One selection pallas_call over `tiles` query tiles. FLOPs: each of the 128 rows of a tile
  against its own n selected blocks (the work that counts: masked-out columns of the union are
  not useful work), `matmul_width` = the summed widths of the step's matmuls (fwd: Dk + Dv).
  Bytes: the rows in and out, plus K/V for a typical union of min(U, 2n) blocks per tile (the
  traffic model measures 1.6n for realistic selections at 64k: scripts/bench_attention.py),
  `kv_passes` times (dK/dV: K/V in bf16, the fp32 accumulators in and out: 5)."""
  rows = sh.b * sh.hkv * tiles * ROWS
  keys = sh.n * sh.slc_block
  kv = sh.b * sh.hkv * tiles * min(num_union, 2 * sh.n) * sh.slc_block * (sh.dk + sh.dv) * 2
  return cost(2 * rows * keys * matmul_width, rows * keys, rows * row_bytes + kv_passes * kv)


def _tile_groups(sh: _Shape, entries_per_tile: int) -> int:
  """Query tiles per pallas_call so that its scalar-prefetch lists stay within prefetch_bytes."""
  per_tile = sh.b * sh.hkv * entries_per_tile * 4
  nq = sh.num_tiles
  return max(d for d in range(1, nq + 1) if nq % d == 0 and (d == 1 or d * per_tile <= sh.options.prefetch_bytes))


def _map_tile_groups(sh: _Shape, call, tiles: int, per_tile_lists, per_row_inputs, shared, first_tile):
  """Runs `call(first tile [1], lists..., row inputs..., shared...)` over groups of `tiles` query
  tiles (a lax.map: one pallas_call per group; the group's first tile is its global index, from
  first_tile, the global index of tile 0) and joins the per-row outputs."""
  groups = sh.num_tiles // tiles
  # Axis 2 holds NQ tiles (lists, tile rows) or NQ * 128 rows; either splits into `groups`.
  split = lambda x: jnp.moveaxis(x.reshape(sh.b, sh.hkv, groups, -1, *x.shape[3:]), 2, 0)
  outs = jax.lax.map(
      lambda a: call(a[0], *(x.reshape(-1) for x in a[1]), *a[2], *shared),
      ((first_tile + jnp.arange(groups, dtype=jnp.int32) * tiles)[:, None], [split(x) for x in per_tile_lists],
       [split(x) for x in per_row_inputs]))
  return [jnp.moveaxis(x, 0, 2).reshape(sh.b, sh.hkv, -1, *x.shape[4:]) for x in outs]


def _forward_rows(sh: _Shape, first_tile, q_rows, k_t, v_t, idx_rows, union, count):
  tiles = _tile_groups(sh, union.shape[-1])
  call = _selection_fwd_call(sh, tiles, union.shape[-1], q_rows.dtype)
  return _map_tile_groups(sh, call, tiles, [union, count[..., None]], [q_rows, idx_rows], [k_t, v_t], first_tile)


def _unions(sh: _Shape, block_indices, q_offset):
  """(first tile: the global index of query tile 0, union, count)."""
  first_tile = jnp.asarray(q_offset, jnp.int32) // sh.queries_per_tile
  union, count = tile_unions(block_indices, slc_block=sh.slc_block, seq_len=sh.tk,
                             queries_per_tile=sh.queries_per_tile, first_tile=first_tile)
  return first_tile, union, count


def selection_forward(q, k, v, block_indices, *, slc_block: int, scale=None, options=None, q_offset=0):
  """Pallas selection attention forward: (out [B,T,HQ,Dv] in q's dtype, lse [B,T,HQ] float32),
  the same numbers as kernels.nsa.selection_attention(impl="xla"), for queries at global
  positions q_offset + [0, T) (a multiple of 128/G) against all keys k, v [B, Tk]. Needs
  G = HQ/HKV dividing 128, T and Tk multiples of 128/G and of slc_block."""
  sh = _shape(q, k, v, block_indices, slc_block, scale, options)
  first_tile, union, count = _unions(sh, block_indices, q_offset)
  out, lse = _forward_rows(sh, first_tile, sh.rows(q), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                           sh.rows(jnp.repeat(block_indices, sh.group, axis=2)), union, count)
  return sh.unrows(out), from_tile_rows(lse, sh.t)


def _union_grid(sh: _Shape, kernel, tiles, num_union):
  """What the forward and dq calls share: grid (B, HKV, tiles, U), the kernel with its static
  arguments, the K/V BlockSpec walking each tile's union (scalar prefetch: group id, union,
  count) and the row map (b, h, tile) of a tile's row inputs and outputs."""
  grid = (sh.b, sh.hkv, tiles, num_union)
  kernel = functools.partial(kernel, scale=sh.scale, slc_block=sh.slc_block, group=sh.group,
                             num_union=num_union, grid_shape=grid)
  flat = lambda bi, h, i: (bi * sh.hkv + h) * tiles + i
  kv_map = lambda bi, h, i, u, g, union, count: (bi, h, union[flat(bi, h, i) * num_union + u], 0)
  kv_spec = lambda width: pl.BlockSpec((None, None, sh.slc_block, width), kv_map)
  row_map = lambda bi, h, i, u, g, union, count: (bi, h, i)
  return grid, kernel, kv_spec, row_map


def _selection_fwd_call(sh: _Shape, tiles, num_union, dtype):
  """The pallas_call for one group of `tiles` query tiles: (first tile [1], union, count, q rows,
  index rows, k, v) -> (out rows, lse rows)."""
  b, hkv, dk, dv = sh.b, sh.hkv, sh.dk, sh.dv
  grid, kernel, kv_spec, row_map = _union_grid(sh, _selection_fwd_kernel, tiles, num_union)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=grid,
      in_specs=[row_spec(row_map, dk), row_spec(row_map, sh.n), kv_spec(dk), kv_spec(dv)],
      out_specs=[row_spec(row_map, dv), tile_row_spec(row_map)],
      scratch_shapes=[pltpu.VMEM((ROWS, LANES), jnp.float32), pltpu.VMEM((ROWS, LANES), jnp.float32),
                      pltpu.VMEM((ROWS, dv), jnp.float32)])
  return pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((b, hkv, tiles * ROWS, dv), dtype),
                 jax.ShapeDtypeStruct((b, hkv, tiles, 1, ROWS), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=_selection_cost(sh, tiles, num_union, matmul_width=dk + dv,
                                    row_bytes=2 * (dk + dv) + 4 * sh.n + 4),
      interpret=sh.interpret)


# ---- backward ----
# dq: the forward's grid again (query-stationary over each tile's union), recomputing
#   p = exp(s - lse) and ds = p * (dO V^T - delta), dq += scale * ds K.
# dk/dv: KV-stationary over the inverted selection: every (block j, tile i) pair with j in tile
#   i's union, sorted by j, plus one work-free pair per block (so every block is written). A
#   block's pairs are consecutive grid steps, so its dK/dV accumulate in VMEM and are written
#   back once; no scatter-add in HBM. The pair list is cut into windows of options.prefetch_bytes; a block
#   whose pairs straddle two windows continues from what the first wrote (the outputs alias the
#   inputs, which start at zero).

def _selection_dq_kernel(group_ref, union_ref, count_ref, q_ref, idx_ref, do_ref, lse_ref, delta_ref,
                         k_ref, v_ref, dq_ref, acc_scratch, *, scale, slc_block, group, num_union, grid_shape):
  tile, u, query_tile = _union_position(group_ref, grid_shape)

  @pl.when(u == 0)
  def _init():
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

  @pl.when(u < count_ref[tile])
  def _step():
    j = union_ref[tile * num_union + u]
    s = _masked_scores(q_ref[...], k_ref[...], idx_ref[...], j, query_tile,
                       scale=scale, slc_block=slc_block, group=group)
    accumulate_dq(s, do_ref[...], k_ref[...], v_ref[...], lse_ref, delta_ref, acc_scratch, scale)

  @pl.when(u == num_union - 1)
  def _finish():
    dq_ref[...] = acc_scratch[...].astype(dq_ref.dtype)


def _selection_dq_call(sh: _Shape, tiles, num_union, dtype):
  b, hkv, dk, dv = sh.b, sh.hkv, sh.dk, sh.dv
  grid, kernel, kv_spec, row_map = _union_grid(sh, _selection_dq_kernel, tiles, num_union)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=grid,
      in_specs=[row_spec(row_map, dk), row_spec(row_map, sh.n), row_spec(row_map, dv), tile_row_spec(row_map),
                tile_row_spec(row_map),
                kv_spec(dk), kv_spec(dv)],
      out_specs=row_spec(row_map, dk),
      scratch_shapes=[pltpu.VMEM((ROWS, dk), jnp.float32)])
  call = pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((b, hkv, tiles * ROWS, dk), dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=_selection_cost(sh, tiles, num_union, matmul_width=2 * dk + dv,      # s, dP, dq
                                    row_bytes=2 * (2 * dk + dv) + 4 * sh.n + 8),
      interpret=sh.interpret)
  return lambda *args: [call(*args)]


def block_pairs(union, count, num_blocks: int):
  """The inverted selection per (batch, KV head): (block [B, HKV, L], tile [B, HKV, L]) sorted by
  block then tile, L = NQ*U + num_blocks: every (j, i) with j in tile i's union, and one pair
  (j, -1) per block (no work: it makes sure block j is initialised and written)."""
  b, hkv, nq, u = union.shape
  real = jnp.arange(u)[None, None, None, :] < count[..., None]
  tiles = jnp.broadcast_to(jnp.arange(nq, dtype=jnp.int32)[:, None], (nq, u))
  block = jnp.where(real, union, num_blocks).reshape(b, hkv, nq * u)      # unused slots sort last
  tile = jnp.where(real, tiles[None, None], -1).reshape(b, hkv, nq * u)
  block, tile, _ = inverted_pairs(block, tile, num_blocks)
  return block, tile


def _selection_dkv_kernel(block_ref, tile_ref, first_tile_ref, q_ref, idx_ref, do_ref, lse_ref, delta_ref, k_ref,
                          v_ref, dk_in_ref, dv_in_ref, dk_ref, dv_ref, dk_scratch, dv_scratch, *,
                          scale, slc_block, group, window, grid_shape):
  b, h, p = (pl.program_id(a) for a in range(3))
  _, hkv, _ = grid_shape
  at = (b * hkv + h) * window + p
  j, tile = block_ref[at], tile_ref[at]
  starts = (p == 0) | (block_ref[jnp.maximum(at - 1, 0)] != j)
  ends = (p == window - 1) | (block_ref[jnp.minimum(at + 1, (b * hkv + h + 1) * window - 1)] != j)

  @pl.when(starts)
  def _init():
    dk_scratch[...] = dk_in_ref[...]
    dv_scratch[...] = dv_in_ref[...]

  @pl.when(tile >= 0)
  def _step():
    q = q_ref[...]
    s = _masked_scores(q, k_ref[...], idx_ref[...], j, first_tile_ref[0] + tile, scale=scale,
                       slc_block=slc_block, group=group)                              # [R, l']
    accumulate_dkv(s, q, do_ref[...], v_ref[...], lse_ref, delta_ref, dk_scratch, dv_scratch, scale)

  @pl.when(ends)
  def _finish():
    dk_ref[...] = dk_scratch[...]
    dv_ref[...] = dv_scratch[...]


def _selection_dkv(sh: _Shape, first_tile, q_rows, idx_rows, do_rows, lse_rows, delta_rows, k_t, v_t, union,
                   count):
  """dK, dV [B, HKV, Tk, D] float32 from the pair list, window by window (pair tiles are local;
  first_tile, in scalar prefetch, places them in the sequence)."""
  b, hkv, dk, dv, bs = sh.b, sh.hkv, sh.dk, sh.dv, sh.slc_block
  (block, tile), window = pair_windows(block_pairs(union, count, sh.num_blocks), sh.options.prefetch_bytes)
  windows = block.shape[-1] // window
  grid = (b, hkv, window)
  kernel = functools.partial(_selection_dkv_kernel, scale=sh.scale, slc_block=bs, group=sh.group,
                             window=window, grid_shape=grid)
  at = lambda bi, h, p: (bi * hkv + h) * window + p
  kv_map = lambda bi, h, p, block, tile, first: (bi, h, block[at(bi, h, p)], 0)
  row_map = lambda bi, h, p, block, tile, first: (bi, h, jnp.maximum(tile[at(bi, h, p)], 0))
  kv_spec = lambda width: pl.BlockSpec((None, None, bs, width), kv_map)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=grid,
      in_specs=[row_spec(row_map, dk), row_spec(row_map, sh.n), row_spec(row_map, dv), tile_row_spec(row_map),
                tile_row_spec(row_map),
                kv_spec(dk), kv_spec(dv), kv_spec(dk), kv_spec(dv)],
      out_specs=[kv_spec(dk), kv_spec(dv)],
      scratch_shapes=[pltpu.VMEM((bs, dk), jnp.float32), pltpu.VMEM((bs, dv), jnp.float32)])
  call = pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(k_t.shape, jnp.float32), jax.ShapeDtypeStruct(v_t.shape, jnp.float32)],
      input_output_aliases={10: 0, 11: 1},     # operands counted with the 3 prefetch arrays
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=window_share(_selection_cost(sh, sh.num_tiles, union.shape[-1], kv_passes=5,
                                                  matmul_width=2 * (dk + dv),        # s, dP, dV, dK
                                                  row_bytes=2 * (dk + dv) + 4 * sh.n + 8), windows),
      interpret=sh.interpret)

  def one_window(carry, lists):
    dk_acc, dv_acc = carry
    blk, til = lists
    dk_acc, dv_acc = call(blk.reshape(-1), til.reshape(-1), first_tile.reshape(1), q_rows, idx_rows, do_rows,
                          lse_rows, delta_rows, k_t, v_t, dk_acc, dv_acc)
    return (dk_acc, dv_acc), None
  split = lambda x: jnp.moveaxis(x.reshape(b, hkv, windows, window), 2, 0)
  (dk_t, dv_t), _ = jax.lax.scan(one_window, (jnp.zeros(k_t.shape, jnp.float32), jnp.zeros(v_t.shape, jnp.float32)),
                                 (split(block), split(tile)))
  return dk_t, dv_t


def selection_attention(q, k, v, block_indices, q_offset, slc_block: int, scale=None, options=None):
  """Differentiable Pallas selection attention: out [B,T,HQ,Dv], the contract of
  kernels.nsa.selection_attention for queries at global positions q_offset + [0, T) (int or
  traced int32) against all keys k, v [B, Tk]. Forward, dq and dk/dv are Pallas kernels."""
  return _selection(q, k, v, block_indices, jnp.asarray(q_offset, jnp.int32), slc_block, scale, options)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _selection(q, k, v, block_indices, q_offset, slc_block, scale, options):
  return selection_forward(q, k, v, block_indices, slc_block=slc_block, scale=scale, options=options,
                           q_offset=q_offset)[0]


def _selection_vjp_fwd(q, k, v, block_indices, q_offset, slc_block, scale, options):
  sh = _shape(q, k, v, block_indices, slc_block, scale, options)
  first_tile, union, count = _unions(sh, block_indices, q_offset)
  k_t, v_t = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  idx_rows = sh.rows(jnp.repeat(block_indices, sh.group, axis=2))
  out_rows, lse_rows = _forward_rows(sh, first_tile, sh.rows(q), k_t, v_t, idx_rows, union, count)
  return sh.unrows(out_rows), (q, k, v, block_indices, first_tile, out_rows, lse_rows, union, count)


def _selection_vjp_bwd(slc_block, scale, options, residuals, dout):
  q, k, v, block_indices, first_tile, out_rows, lse_rows, union, count = residuals
  sh = _shape(q, k, v, block_indices, slc_block, scale, options)
  k_t, v_t = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  q_rows, idx_rows = sh.rows(q), sh.rows(jnp.repeat(block_indices, sh.group, axis=2))
  do_rows = sh.rows(dout.astype(q.dtype))
  delta = jnp.sum(out_rows.astype(jnp.float32) * do_rows.astype(jnp.float32), -1)
  delta_rows = delta.reshape(lse_rows.shape)
  tiles = _tile_groups(sh, union.shape[-1])
  dq_rows, = _map_tile_groups(sh, _selection_dq_call(sh, tiles, union.shape[-1], q.dtype), tiles,
                              [union, count[..., None]], [q_rows, idx_rows, do_rows, lse_rows, delta_rows],
                              [k_t, v_t], first_tile)
  dk_t, dv_t = _selection_dkv(sh, first_tile, q_rows, idx_rows, do_rows, lse_rows, delta_rows, k_t, v_t, union,
                              count)
  return (sh.unrows(dq_rows), dk_t.transpose(0, 2, 1, 3).astype(k.dtype),
          dv_t.transpose(0, 2, 1, 3).astype(v.dtype), None, None)


_selection.defvjp(_selection_vjp_fwd, _selection_vjp_bwd)
