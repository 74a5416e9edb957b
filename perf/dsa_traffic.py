"""A traffic model of DSA's sparse-attention Pallas kernels (kernels/dsa/pallas.py): per kernel
(forward, dq, dkv) the bytes moved between HBM and VMEM against the minimum, the MXU row fill, the
FLOPs executed against dense causal MLA, and the arithmetic intensity against each chip's ridge
point; and how much neighbouring queries' selections overlap (what a union of g queries' rows would
save a memory-bound chip). numpy; the kernels as written (their BlockSpecs, DMA walks and pair
lists), from the selection alone.

Tiles: `queries_per_tile(H)` queries x H heads = R rows (H=128: one query, R=128); a tile's union is
the sorted distinct valid keys its queries chose (`count`), walked in whole KEY_CHUNK chunks (the
last chunk's padding slots repeat the last key and are DMA'd too).

  forward  per tile: the union list (1 + U int32, to SMEM), the bits row (U + KC int32), q (R x Dk),
           the walked rows gathered by DMA (chunks x KC x Dk); out R x Dk (the value is the first
           dv columns, written at Dk) and lse R fp32. FLOPs 2 matmuls of width Dk per walked
           (row, key).
  dq       the same walk; q, dO (zero-padded to Dk), lse, delta in; dq R x Dk out. 3 matmuls.
  dq+dkv   the default backward (dsa_dkv="rows"): dq's walk, plus each walked row's fp32 kv
           gradient read (Dk x 4 B) and each union row's written back; 5 matmuls. Minimum: dq's
           plus the kv gradient written once.
  teacher  the indexer loss's teacher (sparse stage): the forward's walk with its lse, the QK
           product and the head mean; out [qpt, U] fp32 per tile. Minimum: the forward's rows,
           one fp32 per selected key.
  dkv      dsa_dkv="tiles": KV-stationary over the pair list: per tile one (key tile, query tile) pair per run of its
           union keys in one KEY_TILE-key tile, plus a work-free pair per key tile; the list has
           NT*U + key-tiles entries (unused union slots sort last) cut into windows of
           prefetch_bytes / (12 B) pairs, one pallas_call each, run up to the window holding the
           last real entry. Per pair: q and dO
           (R x Dk each), lse, delta (R fp32 each) and the keys and bits rows (the whole U + KC row
           each: that is the BlockSpec; the kernel then slices a 256-slot window from it); per key
           tile and window: kv (KT x Dk) and the fp32 accumulator in and out. FLOPs per pair
           2 R KT (5 Dk + 2 KC): 5 products of width Dk plus the 0/1 mask product over the window.
           Row copies are counted per pair (Pallas skips a copy when two consecutive steps name the
           same query tile; here only work-free steps, which name tile 0, can): an upper bound by
           at most (key tiles + windows) copies per batch row.

Minimum: forward and dq read each query's valid selected rows once (Dk wide) and q (and dO at dv,
lse, delta) once; they write out (dv wide) + lse, or dq, once. dkv reads kv, q, dO, lse and delta
once and writes the kv gradient once (itemsize). The kv operand of the DMA walks is kv as
[B, T, 1, Dk] (`gather_rows`): bytes here count Dk * itemsize per gathered row, but XLA stores that
array with 2-row tiles in bf16 (twice kv's bytes, one copy per walk kernel call: `kv_relayout_bytes`,
not in the kernels' totals), and a tiled layout may also pad 576 lanes to 640.

Sampling: indices may cover only some query tiles of a long sequence (`q_offset` an array of their
positions, `seq_len` the sequence): per-tile sums are then scaled to all tiles, and the dkv list's
length, windows and per-key-tile terms are computed for the whole sequence.
"""
import math

import numpy as np

from kernels import DEFAULT_OPTIONS
from kernels.dsa.pallas import KEY_CHUNK, KEY_TILE
from kernels.dsa.pallas import queries_per_tile as _queries_per_tile
from perf.chips import CHIPS

BIG = np.iinfo(np.int64).max


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _positions(t: int, q_offset) -> np.ndarray:
  pos = np.asarray(q_offset, np.int64)
  if pos.ndim == 0:
    return int(pos) + np.arange(t, dtype=np.int64)
  if pos.shape != (t,):
    raise ValueError(f"q_offset: an int or one position per query ({t}), got shape {pos.shape}")
  return pos


def _sorted_valid(indices, positions, num_keys: int) -> np.ndarray:
  """[..., n] int64 sorted, invalid entries (-1, out of range, after the entry's query position,
  `positions` broadcast against indices) as BIG."""
  idx = np.asarray(indices).astype(np.int64)
  valid = (idx >= 0) & (idx < num_keys) & (idx <= positions)
  return np.sort(np.where(valid, idx, BIG), axis=-1)


def _distinct(sorted_keys) -> np.ndarray:
  """Per row of a sorted [..., n] array (BIG = none): how many distinct real entries."""
  real = sorted_keys != BIG
  first = np.concatenate([np.ones_like(real[..., :1]), sorted_keys[..., 1:] != sorted_keys[..., :-1]], -1)
  return (real & first).sum(-1)


def _tiles(indices, positions, qpt: int):
  """(indices [B, NT, qpt*k], positions [NT, qpt]) of whole tiles: the last tile padded with -1."""
  b, t, k = indices.shape
  nt = -(-t // qpt)
  pad = nt * qpt - t
  idx = np.concatenate([np.asarray(indices), np.full((b, pad, k), -1, np.int64)], 1) if pad else np.asarray(indices)
  pos = np.concatenate([positions, positions[-1] + 1 + np.arange(pad)]) if pad else positions
  pos = pos.reshape(nt, qpt)
  if np.any(np.diff(pos, axis=-1) != 1):
    raise ValueError("each tile's queries must be consecutive positions")
  return idx.reshape(b, nt, qpt * k), pos


def sparse_traffic(indices, *, heads: int, dk: int, dv: int, q_offset=0, itemsize: int = 2, queries_per_tile=None,
                   seq_len=None, num_keys=None, prefetch_bytes=None, dense_dims=(192, 128)) -> dict:
  """HBM <-> VMEM bytes, MXU row fill and FLOPs of the sparse MLA kernels for indices [B, T, k].

  Queries are at positions q_offset + [0, T) (or q_offset [T], whole tiles of consecutive
  positions, for a sample), keys [0, num_keys) (default: seq_len, else the last query + 1).
  seq_len: the sequence the indices sample (default: exactly these queries).
  dense_dims: (qk, v) head dims of dense MLA in its MHA (training) form, for `dense_mha_flops`
  (DeepSeek-V3: 192, 128); `dense_mqa_flops` is dense causal attention in the kernels' absorbed
  form (widths Dk, dv).

  Returns per kernel ("forward", "dq", "dkv", "dq+dkv", "teacher") a dict: in, out, min_in, min_out (bytes), flops
  (executed), dense_mha_flops, dense_mqa_flops, row_fill, intensity (flops / (in + out)),
  grid_steps, work_steps; and the selection's totals (union_rows, walked_rows, selected_pairs,
  pairs, ...). Totals are over the whole (scaled) sequence and batch."""
  b, t, k = np.shape(indices)
  qpt = queries_per_tile or _queries_per_tile(heads)
  positions = _positions(t, q_offset)
  sampled = seq_len is not None
  seq = int(seq_len) if sampled else int(positions[-1]) + 1
  tk = int(num_keys) if num_keys is not None else seq
  prefetch = prefetch_bytes or DEFAULT_OPTIONS.prefetch_bytes
  rows = qpt * heads
  union_slots = _round_up(min(qpt * k, tk), KEY_CHUNK)          # U, as _geometry sizes it

  # Per query: distinct valid keys; per tile: union size, chunks walked, key-tile runs (dkv pairs).
  valid_q = _distinct(_sorted_valid(indices, positions[None, :, None], tk))                 # [B, T]
  tile_idx, tile_pos = _tiles(indices, positions, qpt)
  tile_pos_rep = np.repeat(tile_pos, k, axis=-1)                                      # [NT, qpt*k]
  union_sorted = _sorted_valid(tile_idx, tile_pos_rep[None], tk)                      # [B, NT, qpt*k]
  count = _distinct(union_sorted)
  walked = -(-count // KEY_CHUNK) * KEY_CHUNK
  key_tiles_sorted = np.where(union_sorted == BIG, BIG, union_sorted // KEY_TILE)
  pairs_per_tile = _distinct(key_tiles_sorted)

  nt_given = tile_idx.shape[1]
  nt_total = -(-seq // qpt) if sampled else nt_given
  scale = nt_total / nt_given                    # per-tile sums -> the whole sequence
  tiles = b * nt_total
  s = lambda x: float(np.sum(x)) * scale
  selected, union_rows, walked_rows, pairs = s(valid_q), s(count), s(walked), s(pairs_per_tile)
  queries = tiles * qpt

  # dkv's pair list as _key_tile_pairs / inverted_pairs / pair_windows build it, per batch row.
  num_key_tiles = -(-tk // KEY_TILE)
  length = nt_total * union_slots + num_key_tiles
  window = max(1, min(length, prefetch // (4 * 3 * b)))
  windows = -(-(int(round(pairs / b)) + num_key_tiles) // window)    # only windows holding real entries run
  kv_runs = b * (num_key_tiles + windows - 1)          # a key tile's kv / accumulator per window
  row_copies = pairs + b * (num_key_tiles + windows)    # upper bound (see the module docstring)

  f32 = 4
  lists = (1 + union_slots) * 4 + (union_slots + KEY_CHUNK) * 4      # SMEM union list + bits row
  row_bytes = dk * itemsize
  q_tile = rows * dk * itemsize
  stats = rows * f32
  # Minimum traffic per query (H heads).
  q_min, do_min, stats_min = heads * dk * itemsize, heads * dv * itemsize, heads * f32

  # Dense causal attention over the same sequence: (query, key) pairs with key <= query.
  if sampled:
    dense_pairs = b * seq * (seq + 1) / 2
  else:
    dense_pairs = b * float(np.minimum(positions + 1, tk).sum())
  qk, v = dense_dims
  dense = lambda qk_dim, v_dim: {
      "forward": 2 * heads * dense_pairs * (qk_dim + v_dim),
      "dq": 2 * heads * dense_pairs * (2 * qk_dim + v_dim),
      "dkv": 2 * heads * dense_pairs * (2 * qk_dim + 2 * v_dim)}
  mha, mqa = dense(qk, v), dense(dk, dv)

  walk_cells = rows * walked_rows                # (row, key) cells the forward and dq compute
  chosen_cells = heads * selected                # (row, key) cells some query chose
  pair_cells = rows * KEY_TILE * pairs
  out = {
      "forward": {
          "in": tiles * (lists + q_tile) + walked_rows * row_bytes,
          "out": tiles * (q_tile + stats),
          "min_in": queries * q_min + selected * row_bytes,
          "min_out": queries * (do_min + stats_min),          # out (dv wide) + lse
          "flops": 2 * 2 * dk * walk_cells,
          "row_fill": chosen_cells / max(walk_cells, 1),
          "grid_steps": tiles, "work_steps": walked_rows / KEY_CHUNK},
      "dq": {
          "in": tiles * (lists + 2 * q_tile + 2 * stats) + walked_rows * row_bytes,
          "out": tiles * q_tile,
          "min_in": queries * (q_min + do_min + 2 * stats_min) + selected * row_bytes,
          "min_out": queries * q_min,
          "flops": 3 * 2 * dk * walk_cells,
          "row_fill": chosen_cells / max(walk_cells, 1),
          "grid_steps": tiles, "work_steps": walked_rows / KEY_CHUNK},
      "dkv": {
          "in": (row_copies * (2 * q_tile + 2 * stats + 2 * (union_slots + KEY_CHUNK) * 4)
                 + kv_runs * KEY_TILE * dk * (itemsize + f32) + b * windows * window * 12),
          "out": kv_runs * KEY_TILE * dk * f32,
          "min_in": b * tk * dk * itemsize + queries * (q_min + do_min + 2 * stats_min),
          "min_out": b * tk * dk * itemsize,
          "flops": 2 * pair_cells * (5 * dk + 2 * KEY_CHUNK),
          "row_fill": chosen_cells / max(pair_cells, 1),
          "grid_steps": b * windows * window, "work_steps": pairs, "pallas_calls": windows},
  }
  # The default backward (options.dsa_dkv = "rows"): dq's walk also reads each walked row's fp32
  # gradient (padding slots too) and writes the union's real rows back.
  out["dq+dkv"] = {
      "in": out["dq"]["in"] + walked_rows * dk * f32,
      "out": out["dq"]["out"] + union_rows * dk * f32,
      "min_in": out["dq"]["min_in"],
      "min_out": out["dq"]["min_out"] + out["dkv"]["min_out"],
      "flops": 5 * 2 * dk * walk_cells,
      "row_fill": chosen_cells / max(walk_cells, 1),
      "grid_steps": tiles, "work_steps": walked_rows / KEY_CHUNK}
  mha["dq+dkv"], mqa["dq+dkv"] = mha["dq"] + mha["dkv"], mqa["dq"] + mqa["dkv"]
  # The indexer loss's teacher (sparse stage): the forward's walk with its lse, the QK product
  # and the head mean ([qpt, R] x [R, KC]); out the fp32 union-space probabilities.
  out["teacher"] = {
      "in": out["forward"]["in"] + tiles * stats,
      "out": tiles * qpt * union_slots * f32,
      "min_in": out["forward"]["min_in"],
      "min_out": selected * f32,
      "flops": 2 * (dk + qpt) * walk_cells,
      "row_fill": chosen_cells / max(walk_cells, 1),
      "grid_steps": tiles, "work_steps": walked_rows / KEY_CHUNK}
  mha["teacher"], mqa["teacher"] = mha["forward"] / 2, mqa["forward"] / 2
  for name, kernel in out.items():
    kernel["dense_mha_flops"] = mha[name]
    kernel["dense_mqa_flops"] = mqa[name]
    kernel["intensity"] = kernel["flops"] / (kernel["in"] + kernel["out"])
  out.update({
      "queries": queries, "tiles": tiles, "queries_per_tile": qpt, "rows": rows, "union_slots": union_slots,
      "selected_pairs": selected, "union_rows": union_rows, "walked_rows": walked_rows, "pairs": pairs,
      "key_tiles": num_key_tiles, "dkv_window": window,
      "kv_relayout_bytes": b * tk * dk * itemsize * 3,     # read kv, write [B, T, 1, Dk] at 2 rows/tile
      "sampled_fraction": 1 / scale})
  return out


def overlap(indices, groups=(1, 2, 4, 8, 16), *, q_offset=0, num_keys=None, heads: int = 128, dk: int = 576,
            dv: int = 512, itemsize: int = 2, chip: str = "v6e") -> dict:
  """How much neighbouring queries' selections overlap, and what a union tile of g queries would
  move and cost on `chip`. Groups are g consecutive queries of indices [B, T, k] (positions
  q_offset + [0, T) or q_offset [T]; T a multiple of max(groups) and each group consecutive).

  Per g: union_over_sum = distinct valid rows of the group's union / the sum of its queries'
  valid rows (the bytes a g-query union tile gathers relative to per-query gathers; 1/g when
  neighbours choose the same keys); flop_per_byte = 2 H (Dk + dv) * sum of valid rows / (union
  rows * Dk * itemsize) (the useful FLOPs per gathered byte); and a model of one union tile on
  the chip: g*H rows over the union walked in KEY_CHUNK chunks (2 products of width Dk per
  (row, key): masked cells cost too) at peak * min(1, rows / MXU rows), and the walked rows plus
  q and out (R x Dk each) at HBM bandwidth: executed_flop_per_byte, bound ("compute" or
  "memory"), time_per_query (s) and its ratio to g=1 (speedup > 1: the union pays)."""
  b, t, k = np.shape(indices)
  positions = _positions(t, q_offset)
  tk = int(num_keys) if num_keys is not None else int(positions.max()) + 1
  facts = CHIPS[chip]
  peak, bandwidth, mxu_rows = facts.peak_tflops * 1e12, facts.hbm_tbs * 1e12, facts.mxu
  per_query = _distinct(_sorted_valid(indices, positions[None, :, None], tk))
  result = {}
  for g in groups:
    n = t // g * g
    pos = positions[:n].reshape(-1, g)
    if np.any(np.diff(pos, axis=-1) != 1):
      raise ValueError(f"groups of {g} queries must be consecutive positions")
    idx = np.asarray(indices)[:, :n].reshape(b, -1, g * k)
    union = _distinct(_sorted_valid(idx, np.repeat(pos, k, -1)[None], tk))
    total = per_query[:, :n].reshape(b, -1, g).sum(-1)
    rows = g * heads
    walked = -(-union // KEY_CHUNK) * KEY_CHUNK
    flops = 2 * 2 * dk * rows * walked.astype(np.float64)
    moved = (walked * dk + 2 * rows * dk) * itemsize + rows * 4
    compute_s = flops / (peak * min(1.0, rows / mxu_rows))
    memory_s = moved / bandwidth
    time = np.maximum(compute_s, memory_s).sum() / (b * n)
    result[g] = {
        "union_over_sum": float(union.sum() / max(total.sum(), 1)),
        "flop_per_byte": float(2 * heads * (dk + dv) * total.sum() / max(union.sum() * dk * itemsize, 1)),
        "executed_flop_per_byte": float(flops.sum() / moved.sum()),
        "bound": "compute" if compute_s.sum() > memory_s.sum() else "memory",
        "time_per_query": float(time)}
  base = result[groups[0]]["time_per_query"] if groups[0] == 1 else None
  for r in result.values():
    r["speedup"] = base / r["time_per_query"] if base else math.nan
  return result


# ---- synthetic selections ----

def sample_positions(seq_len: int, segments: int, length: int = 16) -> np.ndarray:
  """Positions of `segments` runs of `length` consecutive queries spread evenly over [0, seq_len)
  (stratified: one run per stratum, aligned to `length`): a sample of a long sequence's queries."""
  if segments * length >= seq_len:
    return np.arange(seq_len, dtype=np.int64)
  starts = ((np.arange(segments) + 0.5) * seq_len / segments).astype(np.int64) // length * length
  starts = np.minimum(starts, seq_len - length)
  return (starts[:, None] + np.arange(length)[None, :]).reshape(-1)


def synthetic_selection(seq_len: int, topk: int, positions, *, realistic: bool, seed: int = 0, window: int = 64,
                        decay: float = 4096.0, noise: float = 0.3) -> np.ndarray:
  """int32 [1, len(positions), topk]: top-k key indices per query at `positions` in a sequence of
  seq_len, as the indexer's contract makes them (S_t = {0..t} while t + 1 <= k; -1 padding).
  Random: k keys uniform over the visible ones. Realistic: the last `window` keys forced, the
  others ranked by a persistent per-key relevance (log-normal: a few hot keys), decaying with
  distance (1 per `decay` keys in log space), plus per-query noise: neighbouring queries then
  agree on most keys."""
  rng = np.random.default_rng(seed)
  positions = np.asarray(positions, np.int64)
  log_relevance = rng.normal(0.0, 1.0, seq_len) if realistic else None
  out = np.full((len(positions), topk), -1, np.int32)
  for n, t in enumerate(positions):
    visible = int(t) + 1
    if visible <= topk:
      out[n, :visible] = np.arange(visible)
    elif not realistic:
      out[n] = rng.choice(visible, topk, replace=False)
    else:
      s = np.arange(visible)
      scores = log_relevance[:visible] - (t - s) / decay + rng.normal(0.0, noise, visible)
      scores[max(0, visible - window):] = np.inf
      out[n] = np.argpartition(-scores, topk - 1)[:topk]
  return out[None]
