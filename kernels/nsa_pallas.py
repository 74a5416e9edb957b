"""Pallas TPU kernels for NSA (DESIGN.md §7). Work in progress toward `impl="pallas"` (issue 6):
the selection branch's forward kernel. The public `kernels.nsa` functions do not call it yet.

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
           out 128*Dv, lse 128*128 fp32 (lane-replicated, as splash stores it).
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

ROWS = 128            # matmul rows per tile: query positions x heads of one KV group
LANES = 128
PREFETCH_BYTES = 256 * 1024   # union lists per pallas_call (SMEM is ~1 MiB on v5e/v5p/v6e)


def tile_unions(block_indices, *, block_size: int, seq_len: int, queries_per_tile: int):
  """(union [B, HKV, NQ, U] int32, count [B, HKV, NQ] int32): per query tile, the sorted distinct
  valid blocks its queries selected (-1, out-of-range and wholly-future blocks dropped), padded
  by repeating the last entry (0 when the tile selected nothing)."""
  b, t, hkv, n = block_indices.shape
  num_blocks = -(-seq_len // block_size)
  nq = t // queries_per_tile
  idx = block_indices.reshape(b, nq, queries_per_tile, hkv, n).transpose(0, 3, 1, 2, 4)
  idx = idx.reshape(b, hkv, nq, queries_per_tile * n)
  last_block = ((jnp.arange(nq) + 1) * queries_per_tile - 1) // block_size         # [NQ]
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


def _selection_fwd_kernel(group_ref, union_ref, count_ref, q_ref, k_ref, v_ref, idx_ref, o_ref, lse_ref,
                          m_scratch, l_scratch, acc_scratch, *, scale, block_size, group, num_union,
                          grid_shape):
  b, h, i, u = (pl.program_id(a) for a in range(4))
  _, hkv, nq, _ = grid_shape
  tile = (b * hkv + h) * nq + i

  @pl.when(u == 0)
  def _init():
    m_scratch[...] = jnp.full(m_scratch.shape, -jnp.inf, jnp.float32)
    l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

  @pl.when(u < count_ref[tile])
  def _step():
    j = union_ref[tile * num_union + u]
    rows = q_ref.shape[0]
    s = jax.lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * scale                # [R, l']
    chosen = jnp.max(jnp.where(idx_ref[...] == j, 1, 0), axis=1, keepdims=True) > 0  # [R, 1]
    first_query = (group_ref[0] * nq + i) * (rows // group)
    query_pos = first_query + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // group
    key_pos = j * block_size + jax.lax.broadcasted_iota(jnp.int32, (1, block_size), 1)
    visible = chosen & (key_pos <= query_pos)
    s = jnp.where(visible, s, -jnp.inf)
    m_prev = m_scratch[...][:, :1]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)          # rows with nothing seen yet
    p = jnp.exp(s - m_safe)
    alpha = jnp.exp(m_prev - m_safe)
    l_next = alpha * l_scratch[...][:, :1] + jnp.sum(p, axis=1, keepdims=True)
    acc_scratch[...] = alpha * acc_scratch[...] + jax.lax.dot_general(
        p.astype(v_ref.dtype), v_ref[...], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    m_scratch[...] = jnp.broadcast_to(m_next, m_scratch.shape)
    l_scratch[...] = jnp.broadcast_to(l_next, l_scratch.shape)

  @pl.when(u == num_union - 1)
  def _finish():
    l = l_scratch[...][:, :1]
    seen = l > 0
    o_ref[...] = jnp.where(seen, acc_scratch[...] / jnp.where(seen, l, 1.0), 0.0).astype(o_ref.dtype)
    lse = jnp.where(seen, m_scratch[...] + jnp.log(jnp.where(seen, l_scratch[...], 1.0)), -jnp.inf)
    lse_ref[...] = lse


def selection_forward(q, k, v, block_indices, *, block_size: int, scale=None, interpret=None):
  """Pallas selection attention forward: (out [B,T,HQ,Dv] in q's dtype, lse [B,T,HQ] float32),
  the same numbers as kernels.nsa.selection_attention(impl="xla"). Needs G = HQ/HKV dividing 128,
  T a multiple of 128/G and of block_size."""
  b, t, hq, dk = q.shape
  hkv, dv = k.shape[2], v.shape[-1]
  group = hq // hkv
  if ROWS % group:
    raise ValueError(f"selection kernel: the query group HQ/HKV={group} must divide {ROWS}")
  bq = ROWS // group
  if t % bq or t % block_size:
    raise ValueError(f"selection kernel: T={t} must be a multiple of {bq} (128 rows / G={group}) "
                     f"and of the block size {block_size}")
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  scale = dk ** -0.5 if scale is None else scale
  n, nq = block_indices.shape[-1], t // bq
  union, count = tile_unions(block_indices, block_size=block_size, seq_len=t, queries_per_tile=bq)
  num_union = union.shape[-1]

  rows = lambda x: x.reshape(b, t, hkv, group, x.shape[-1]).transpose(0, 2, 1, 3, 4).reshape(
      b, hkv, t * group, x.shape[-1])
  q_rows = rows(q)                                                       # [B, HKV, T*G, Dk]
  idx_rows = rows(jnp.repeat(block_indices, group, axis=2))              # [B, HKV, T*G, n]
  k_t, v_t = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)            # [B, HKV, T, D]

  # SMEM holds about 1 MiB: the union lists go in groups of query tiles, one pallas_call each
  # (a lax.map), every group's lists within PREFETCH_BYTES.
  per_tile = b * hkv * num_union * 4
  tiles = max(d for d in range(1, nq + 1) if nq % d == 0 and (d == 1 or d * per_tile <= PREFETCH_BYTES))
  groups = nq // tiles
  split = lambda x, per: jnp.moveaxis(x.reshape(b, hkv, groups, tiles * per, *x.shape[3:]), 2, 0)
  call = _selection_fwd_call(b, hkv, tiles, num_union, n, dk, dv, block_size, group, scale, q.dtype, interpret)
  out, lse = jax.lax.map(
      lambda a: call(a[0], a[1].reshape(-1), a[2].reshape(-1), a[3], k_t, v_t, a[4]),
      (jnp.arange(groups, dtype=jnp.int32)[:, None], split(union, 1), split(count[..., None], 1),
       split(q_rows, ROWS), split(idx_rows, ROWS)))
  join = lambda x: jnp.moveaxis(x, 0, 2).reshape(b, hkv, t * group, x.shape[-1])
  out, lse = join(out), join(lse)
  out = out.reshape(b, hkv, t, group, dv).transpose(0, 2, 1, 3, 4).reshape(b, t, hq, dv)
  lse = lse[..., 0].reshape(b, hkv, t, group).transpose(0, 2, 1, 3).reshape(b, t, hq)
  return out, lse


def _selection_fwd_call(b, hkv, tiles, num_union, n, dk, dv, block_size, group, scale, dtype, interpret):
  """The pallas_call for one group of `tiles` query tiles: (group id [1], union, count, q rows,
  k, v, index rows) -> (out rows, lse rows)."""
  grid = (b, hkv, tiles, num_union)
  kernel = functools.partial(_selection_fwd_kernel, scale=scale, block_size=block_size, group=group,
                             num_union=num_union, grid_shape=grid)
  flat = lambda bi, h, i: (bi * hkv + h) * tiles + i
  kv_map = lambda bi, h, i, u, g, union, count: (bi, h, union[flat(bi, h, i) * num_union + u], 0)
  row_map = lambda bi, h, i, u, g, union, count: (bi, h, i, 0)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=grid,
      in_specs=[pl.BlockSpec((None, None, ROWS, dk), row_map),
                pl.BlockSpec((None, None, block_size, dk), kv_map),
                pl.BlockSpec((None, None, block_size, dv), kv_map),
                pl.BlockSpec((None, None, ROWS, n), row_map)],
      out_specs=[pl.BlockSpec((None, None, ROWS, dv), row_map),
                 pl.BlockSpec((None, None, ROWS, LANES), row_map)],
      scratch_shapes=[pltpu.VMEM((ROWS, LANES), jnp.float32), pltpu.VMEM((ROWS, LANES), jnp.float32),
                      pltpu.VMEM((ROWS, dv), jnp.float32)])
  return pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((b, hkv, tiles * ROWS, dv), dtype),
                 jax.ShapeDtypeStruct((b, hkv, tiles * ROWS, LANES), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=pltpu.InterpretParams() if interpret else False)
