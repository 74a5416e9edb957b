"""The GQA row layout every NSA Pallas kernel shares (docs/design.md §7): a KV group's G query heads
of 128 // G consecutive positions make one 128-row matmul tile ("union query tiling"), and per-row
statistics (lse, delta) travel as lane-dense tile rows.
"""
from jax.experimental import pallas as pl

from kernels import Unsupported
from kernels.pallas_common import ROWS


def to_rows(x, hkv: int):
  """[B, T, HKV*G, D] -> [B, HKV, T*G, D]: row t*G + g is query t, head g of its KV group."""
  b, t, h, d = x.shape
  return x.reshape(b, t, hkv, h // hkv, d).transpose(0, 2, 1, 3, 4).reshape(b, hkv, t * (h // hkv), d)


def from_rows(x, t: int):
  """[B, HKV, T*G, D] -> [B, T, HKV*G, D], the inverse of to_rows."""
  b, hkv, rows, d = x.shape
  return x.reshape(b, hkv, t, rows // t, d).transpose(0, 2, 1, 3, 4).reshape(b, t, hkv * (rows // t), d)


# Per-row statistics (lse, delta) live as "tile rows" [B, HKV, NQ, 1, 128]: one lane-dense row per
# query tile (splash keeps its lse as [H, 1, T] for the same reason), 4 bytes per row in HBM.

def to_tile_rows(x_BTH, hkv: int):
  """[B, T, HQ] -> [B, HKV, NQ, 1, 128] in the row order of to_rows."""
  r = to_rows(x_BTH[..., None], hkv)
  return r.reshape(r.shape[0], hkv, -1, 1, ROWS)


def from_tile_rows(x, t: int):
  """[B, HKV, NQ, 1, 128] -> [B, T, HQ], the inverse of to_tile_rows."""
  return from_rows(x.reshape(*x.shape[:2], -1, 1), t)[..., 0]


def row_spec(index_map, width: int):
  """BlockSpec of one tile's [128, width] rows of a [B, HKV, T*G, width] array; index_map gives
  (b, h, tile)."""
  return pl.BlockSpec((None, None, ROWS, width), lambda *a: (*index_map(*a), 0))


def tile_row_spec(index_map):
  """BlockSpec of one tile's [1, 128] row; index_map gives (b, h, tile)."""
  return pl.BlockSpec((None, None, None, 1, ROWS), lambda *a: (*index_map(*a), 0, 0))


def check_rows(t: int, hq: int, hkv: int) -> int:
  """The row tiling's rule for every NSA Pallas kernel: G = HQ/HKV divides 128 and T is a
  multiple of 128/G. Returns G; raises kernels.Unsupported."""
  group = hq // hkv
  if ROWS % group:
    raise Unsupported("n_heads", hq, f"the query group HQ/HKV={group} must divide {ROWS}")
  if t % (ROWS // group):
    raise Unsupported("seq_len", t, f"must be a multiple of {ROWS // group} (128 rows / G={group})")
  return group


def tiles_per_step(num_tiles: int, step_rows: int) -> int:
  """Query tiles per grid step: the largest divisor of num_tiles that is at most step_rows / 128."""
  most = max(1, min(step_rows // ROWS, num_tiles))
  return max(d for d in range(1, most + 1) if num_tiles % d == 0)
