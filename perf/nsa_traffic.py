"""A traffic model of NSA's selection kernels (kernels/nsa/selection_pallas.py): what each one moves between
HBM and VMEM, computed from their own index maps and prefetch lists (numpy). Pallas copies an
input block when its block index differs from the previous grid step's (each pallas_call starts
a fresh pipeline) and writes an output block back when its index changes."""
import jax.numpy as jnp
import numpy as np

from kernels import DEFAULT_OPTIONS
from kernels.nsa.selection_pallas import _Shape, _tile_groups, block_pairs, tile_unions
from kernels.pallas_common import ROWS, pair_windows


def _copies(index_seq) -> int:
  """Copies one BlockSpec makes over calls [calls, grid steps in order, block-index dims]."""
  index_seq = np.asarray(index_seq)
  return int(np.any(index_seq[:, 1:] != index_seq[:, :-1], axis=-1).sum()) + index_seq.shape[0]


def _with_bh(lists):
  """[calls, B, HKV, steps] block indices -> [calls, B*HKV*steps, 3] (b, h, index) in grid order."""
  calls, b, hkv, steps = lists.shape
  keys = np.stack(np.broadcast_arrays(np.arange(b)[None, :, None, None], np.arange(hkv)[None, None, :, None],
                                      lists), -1)
  return keys.reshape(calls, b * hkv * steps, 3)


def selection_traffic(block_indices, *, slc_block: int, hq: int, dk: int, dv: int, itemsize: int = 2,
                      options=None) -> dict:
  """HBM <-> VMEM bytes of the selection kernels for these indices [B, T, HKV, n].

  Returns the forward's K/V bytes ("kv_bytes") against the minimum ("min_kv_bytes": each selected
  block once per query tile) and against a one-query-at-a-time kernel ("per_query_kv_bytes":
  every valid selected block per query), grid and executed steps, the MXU row fill (rows whose
  query chose the step's block / 128, over executed steps; the same steps in all three kernels),
  and per kernel ("forward", "dq", "dkv") bytes "in", "out" and the minimum "min_in":
    forward  K/V blocks + a tile's q and index rows; out + lse rows.
    dq       the forward's grid: K/V + q, index, dO, lse, delta rows; dq rows.
    dkv      KV-stationary pair list, window by window: K/V and the fp32 dK/dV accumulators once
             per run of a block's pairs, a tile's q, index, dO, lse, delta rows per pair; dK/dV
             written once per run. Minimum: each block's K/V once, each pair's rows once."""
  b, t, hkv, n = block_indices.shape
  sh = _Shape(b, t, hkv, hq // hkv, dk, dv, n, slc_block, 1.0, options or DEFAULT_OPTIONS)
  union, count = tile_unions(jnp.asarray(block_indices), slc_block=slc_block, seq_len=t,
                             queries_per_tile=sh.queries_per_tile)
  union, count = np.asarray(union), np.asarray(count)
  nq, num_union = sh.num_tiles, union.shape[-1]
  tiles = _tile_groups(sh, num_union)
  # kv_map of forward and dq: step (b, h, i, u) of tile group g reads block union[b, h, g*tiles + i, u].
  groups = union.reshape(b, hkv, nq // tiles, tiles * num_union).transpose(2, 0, 1, 3)
  kv_copies = _copies(_with_bh(groups))
  executed = int(count.sum())
  block_bytes = slc_block * (dk + dv) * itemsize
  q_and_idx = ROWS * (dk * itemsize + n * 4)
  stats = ROWS * 4                                 # one [1, 128] fp32 tile row (lse or delta)
  bwd_rows = q_and_idx + ROWS * dv * itemsize + 2 * stats
  forward_rows, dq_rows = b * hkv * nq * q_and_idx, b * hkv * nq * bwd_rows
  # dkv: the pair list and its windows exactly as _selection_dkv builds them.
  num_blocks = t // slc_block
  pairs = block_pairs(jnp.asarray(union), jnp.asarray(count), num_blocks)
  (block, tile), window = pair_windows(pairs, sh.options.prefetch_bytes)
  block, tile = np.asarray(block), np.asarray(tile)
  per_call = lambda x: x.reshape(b, hkv, -1, window).transpose(2, 0, 1, 3)
  pair_kv_copies = _copies(_with_bh(per_call(block)))
  pair_row_copies = _copies(_with_bh(per_call(np.maximum(tile, 0))))
  f32_block = slc_block * (dk + dv) * 4
  idx = np.asarray(block_indices).reshape(b, nq, sh.queries_per_tile, hkv, n).transpose(0, 3, 1, 2, 4)
  used_rows = 0
  for bi in range(b):
    for h in range(hkv):          # queries of the tile that chose each union entry, x G heads
      chose = (idx[bi, h][:, None, :, :] == union[bi, h][:, :, None, None]).any(-1).sum(-1)
      used_rows += (chose * (np.arange(num_union)[None, :] < count[bi, h][:, None])).sum() * sh.group
  indices = np.asarray(block_indices)
  valid = (indices >= 0) & (indices <= (np.arange(t) // slc_block)[None, :, None, None])
  return {
      "kv_bytes": kv_copies * block_bytes,
      "min_kv_bytes": executed * block_bytes,
      "per_query_kv_bytes": int(valid.sum()) * block_bytes,
      "grid_steps": b * hkv * nq * num_union,
      "executed_steps": executed,
      "mxu_row_fill": used_rows / max(executed * ROWS, 1),
      "forward": {"in": kv_copies * block_bytes + forward_rows, "min_in": executed * block_bytes + forward_rows,
                  "out": b * hkv * nq * (ROWS * dv * itemsize + stats)},
      "dq": {"in": kv_copies * block_bytes + dq_rows, "min_in": executed * block_bytes + dq_rows,
             "out": b * hkv * nq * ROWS * dk * itemsize},
      "dkv": {"in": pair_kv_copies * (block_bytes + f32_block) + pair_row_copies * bwd_rows,
              "min_in": b * hkv * num_blocks * block_bytes + executed * bwd_rows,
              "out": pair_kv_copies * f32_block},
  }
