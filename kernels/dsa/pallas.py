"""Pallas TPU kernels for DSA's sparse MLA attention in MQA form (docs/design.md §5-§7): forward
(with the indexer loss's teacher), dq and dkv, behind a custom_vjp. The indexer's top-k is
kernels/dsa/indexer_pallas.py; the SparseCore gathers kernels/dsa/sparsecore.py; perf/dsa_time.py
counts what these kernels cost from `step_lists`.

Sparse attention (MQA: every head of query t over the rows kv[s], s in S_t):
  rows     a tile is qpt = min(32, rows / H) queries x their H heads, rows = options.dsa_tile_rows
           (128: H=128 one query, H=16 8; 256 fills v6e's MXU: two V3.2 queries share a union),
           R rows (32 queries at most: a key's choosers are the bits of one int32).
  union    per tile, the sorted distinct keys any of its queries may read (valid: >= 0, < Tk,
           <= the query's position; repeats dropped) with a bitmask per key of the queries that
           chose it (`tile_selection`), walked in chunks of KC = 128 slots; a last chunk's slots
           past the count are not copied (their bits are 0; the ring is zeroed per step, so they
           hold finite rows). H=128: a query's own sorted set.
  grid     (B, NS): a step is TPS = options.dsa_tiles_per_step tiles (8: 8 V3.2 queries; fewer
           where the step's list would pass options.prefetch_bytes of SMEM), so a step carries
           microseconds of MXU work: T / 8 steps per walk at H=128 (16,384 at 128k, not 131,072).
  lists    per step one int32 row in HBM (`step_lists`), copied to SMEM at the step's start (one
           DMA): its tiles' union chunks as one stream, each chunk's pieces. A piece is a run of
           consecutive keys within a chunk, at most MAX_PIECE = 32 long, copied by one DMA per
           power of two of its length (a random selection: one per key; a run of 128: four).
  walk     the stream flows through a ring of RING = 3 chunk buffers: two chunks in flight while
           one computes, across tile boundaries (forward, teacher), and one wait per chunk and
           source (DMA semaphores count bytes: a power of two of rows per wait descriptor, so at
           most 8 for a partial chunk, 1 for a full one). kv is gathered from [B, T, 1, Dk]
           (`gather_rows`: Mosaic DMAs start only at whole tiles of the tiled dims; bf16 rows sit
           in 2-row tiles, 2,560 B a 576-wide row).
  forward  per chunk s = q rows^T [R, KC] masked by the bits, an fp32 online softmax per tile,
           out and lse at the tile's end. Bytes: q R*Dk, each union row once (padded), out R*Dk,
           lse R fp32, bits, the lists.
  dq+dkv   (options.dsa_dkv = "rows", the default) the same walk: p = exp(s - lse),
           dS = p (dO V^T - delta), dq += scale dS rows; and per chunk the chosen rows' kv gradient
           scale dS^T q + p^T dO, added to their fp32 rows in HBM: read by DMA with the kv rows,
           written back after the chunk by the same pieces. Grid (B, 2, NS / 2): two halves of the
           steps in parallel (both v5p TensorCores), each into its own fp32 gradient copy (summed
           after); the walk does not prefetch across tiles, so a tile's writes land before the next
           tile may read the same key; a union's keys are distinct: no races, no atomics.
           Bytes: dq's plus 2 padded fp32 rows (2,560 B each at Dk=576) per union row.
  teacher  (the indexer loss, sparse stage) the forward's walk with its lse: p = exp(s - lse),
           its mean over each query's H heads as one [qpt, R] x [R, KC] product, [qpt, U] fp32
           per tile. Half the forward's FLOPs, its bytes.
  DMAs     per step 1 (list) + one per blocked operand; per piece one per power of two of its
           length and source; per chunk one wait per power of two of its rows and source
           (perf/dsa_time.py counts them from `step_lists`).
  gathered (options.dsa_gather resolving to sparsecore: v5p, v6e) per query chunk of about
           GATHER_ROWS union slots, the SparseCores gather every slot's row into one [M, Dk]
           buffer (chunk c + 1 while the TensorCores walk chunk c, `_by_chunk`); the walks then copy
           each 128-slot chunk with one aligned DMA and one wait. The backward writes each slot's
           fp32 kv gradient to its own row (`_dq_grads`, no read-modify-write) and the SparseCores
           add them into dkv (sparsecore.scatter_add_rows).
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
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import DEFAULT_OPTIONS, KernelOptions, Unsupported
from kernels.dsa import sparsecore
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
MAX_PIECE = 32         # keys per coalesced copy: a run of consecutive keys costs at most 6 DMAs per 32
GATHER_ROWS = 64 * 2048   # SparseCore path: union rows gathered per query chunk (151 MB at V3.2)
RING = 3               # chunk buffers of the gather walk: two chunks in flight while one computes
TEACHER_SCORES_BYTES = 4 * 2**20   # VMEM for a tile's fp32 scores when the forward computes the teacher
VMEM_LIMIT_BYTES = 32 * 2**20      # the walks' scoped VMEM (v5e's default is 16 MiB; every chip has >= 64 MiB)
KEY_TILE = 128         # keys per dkv tile
BIG = jnp.iinfo(jnp.int32).max


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


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
  tiles_per_step: int     # TPS: query tiles per grid step
  chunk_tiles: int = 0    # SparseCore gathers (kernels.dsa_gather): tiles per gathered query chunk; 0: TensorCore

  @property
  def gathered(self) -> bool:
    """Rows come from a contiguous buffer of the chunk's union rows, gathered by the SparseCores."""
    return self.chunk_tiles > 0

  @property
  def max_piece(self) -> int:
    return KEY_CHUNK if self.gathered else MAX_PIECE

  @property
  def rows(self):
    return self.queries_per_tile * self.heads

  @property
  def num_tiles(self):
    return self.t // self.queries_per_tile

  @property
  def num_steps(self):
    return self.num_tiles // self.tiles_per_step

  @property
  def itemsize(self):
    return jnp.dtype(self.kv_dtype).itemsize

  @property
  def list_len(self):
    """int32s in a step's list row (step_lists)."""
    return 3 + 2 * self.tiles_per_step + self.tiles_per_step * self.union // KEY_CHUNK + 2 * self.tiles_per_step * self.union

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


def tiles_per_step(union: int, options: KernelOptions, num_tiles: int) -> int:
  """options.dsa_tiles_per_step, fewer where the step's list (2 ints per union slot of each tile)
  would pass options.prefetch_bytes of SMEM, or where the sequence has fewer than two steps' tiles
  (no steps of padding tiles)."""
  per_tile = 4 * (2 * union + union // KEY_CHUNK + 2)
  return max(1, min(options.dsa_tiles_per_step, options.prefetch_bytes // per_tile, -(-num_tiles // 2)))


def gather_chunk_tiles(num_tiles: int, union: int, tiles_per_step: int) -> int:
  """Tiles per query chunk on the SparseCore path: about GATHER_ROWS union rows, whole pairs of steps."""
  pair = 2 * tiles_per_step
  return min(max(pair, GATHER_ROWS // union // pair * pair), _round_up(num_tiles, pair))


def _geometry(q, kv, topk: int, v_dim, scale, options, union: int | None = None) -> _Geometry:
  """The walk's geometry; queries padded to whole pairs of steps (the backward splits the steps in
  two halves), or to whole gathered chunks on the SparseCore path."""
  b, t, heads, dk = q.shape
  check_supported(heads)
  options = options or DEFAULT_OPTIONS
  qpt = queries_per_tile(heads, options.dsa_tile_rows)
  if union is None:
    union = _round_up(min(qpt * topk, kv.shape[1]), KEY_CHUNK)
  num_tiles = -(-t // qpt)
  tps = tiles_per_step(union, options, num_tiles)
  chunk_tiles = gather_chunk_tiles(num_tiles, union, tps) if sparsecore.resolve_gather(options) == "sparsecore" else 0
  tiles = _round_up(num_tiles, chunk_tiles or 2 * tps)
  return _Geometry(b, tiles * qpt, heads, dk, v_dim, kv.shape[1], qpt, union, dk ** -0.5 if scale is None else scale,
                   options, kv.dtype, tps, chunk_tiles)


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
  """(step lists [B, NS, list_len] (step_lists), bits [B, NT, 1, U + KC], keys [B, NT, 1, U + KC]
  (-1 past the union), count [B, NT])."""
  pad = g.t - indices.shape[1]
  indices = jnp.pad(indices, [(0, 0), (0, pad), (0, 0)], constant_values=-1)
  keys, bits, count = tile_selection(indices, q_offset, num_keys=g.tk, queries_per_tile=g.queries_per_tile,
                                     slots=g.union)
  # KC empty slots past the end: dkv reads 256-slot windows from any 128-aligned slot.
  bits = jnp.pad(bits, [(0, 0), (0, 0), (0, KEY_CHUNK)])[:, :, None, :]
  keys_row = jnp.pad(keys, [(0, 0), (0, 0), (0, KEY_CHUNK)], constant_values=-1)[:, :, None, :]
  return step_lists(g, keys, count), bits, keys_row, count


def _tile_rows(g: _Geometry, x):
  """[B, T, H, D] -> [B, NT, R, D] (row = local query * H + head), queries zero-padded."""
  x = jnp.pad(x, [(0, 0), (0, g.t - x.shape[1]), (0, 0), (0, 0)])
  return x.reshape(g.b, g.num_tiles, g.rows, x.shape[-1])


def _untile_rows(g: _Geometry, x, t: int):
  return x.reshape(g.b, g.t, g.heads, x.shape[-1])[:, :t]


# ---- the gather walk: a step's tiles, their unions streamed chunk by chunk ----

def gather_rows(kv):
  """kv [B, T, Dk] as [B, T, 1, Dk]: each row its own (1, Dk) slab, so a DMA can start at any
  row (Mosaic slices the tiled (sublane) dims only at whole tiles: `Offsets along tiled dimensions
  must be aligned to tiles`). XLA stores it with 2-row tiles in bf16 (one padding row: a gathered
  row moves ROW_BYTES, 2.2x its 1,152 B at Dk=576; fp32 rows use 1-row tiles)."""
  return kv[:, :, None, :]


def padded_row_bytes(dk: int, itemsize: int) -> int:
  """HBM bytes of one [1, Dk] row of a [T, 1, Dk] array: lanes padded to 128, bf16 rows in 2-row tiles."""
  return _round_up(dk, LANES) * itemsize * (2 if itemsize == 2 else 1)


def step_lists(g: _Geometry, keys, count):
  """int32 [B, NS, list_len]: per grid step of TPS tiles the stream of their union chunks, copied
  to SMEM at the step's start (one DMA):
    [C = the step's chunks, the first chunk of each tile (TPS + 1), each tile's union count (TPS),
     the first piece of each chunk (TPS * U / KC + 1), per piece (slot in its chunk | length << 8)
     (TPS * U), per piece its first key (TPS * U)].
  A piece is a run of consecutive keys within one chunk, at most MAX_PIECE long: one DMA per
  power of two of its length (a random selection: one per key; a run of 128 keys: 4).
  Gathered (SparseCore) walks read the chunk's buffer of union rows instead: a tile's slot u is
  buffer row (tile within the chunk) * U + u, and every walked chunk is one whole KC-row piece."""
  b, tps, u, kc = g.b, g.tiles_per_step, g.union, KEY_CHUNK
  ns, cpt = g.num_steps, g.union // KEY_CHUNK
  if g.gathered:
    local = jnp.arange(g.num_tiles, dtype=jnp.int32) % g.chunk_tiles
    keys = jnp.broadcast_to(local[:, None] * u + jnp.arange(u, dtype=jnp.int32), (b, g.num_tiles, u))
    count = _round_up(count, kc)
  keys, count = keys.reshape(b, ns, tps, u), count.reshape(b, ns, tps)
  tile_start = jnp.concatenate([jnp.zeros((b, ns, 1), jnp.int32), jnp.cumsum((count + kc - 1) // kc, -1)], -1)
  slot = jnp.arange(u, dtype=jnp.int32)
  real = slot < count[..., None]
  prev = jnp.concatenate([jnp.full((b, ns, tps, 1), -2, jnp.int32), keys[..., :-1]], -1)
  run_start = real & ((keys != prev + 1) | (slot % kc == 0))
  start_slot = jax.lax.cummax(jnp.where(run_start, slot, 0), axis=3)
  begins = real & (run_start | ((slot - start_slot) % g.max_piece == 0))
  position = (jnp.arange(tps, dtype=jnp.int32)[:, None] * u + slot).reshape(tps * u)      # in the step's stream
  marked = jnp.where(begins.reshape(b, ns, tps * u), position, BIG)
  after = jnp.concatenate([marked[..., 1:], jnp.full((b, ns, 1), BIG, jnp.int32)], -1)
  next_begin = jax.lax.cummin(after, axis=2, reverse=True)
  tile_end = jnp.repeat(jnp.arange(tps, dtype=jnp.int32) * u + count, u, axis=-1)         # [b, ns, tps * u]
  length = jnp.minimum(next_begin, tile_end) - position
  piece = jnp.sort(marked, axis=-1)                                                      # pieces in stream order
  is_piece = piece < BIG
  at = lambda x: jnp.take_along_axis(x, jnp.where(is_piece, piece, 0), -1)
  piece_tile, piece_slot = piece // u, piece % u
  chunk = jnp.where(is_piece, jnp.take_along_axis(tile_start, jnp.where(is_piece, piece_tile, 0), -1)
                    + piece_slot // kc, BIG)
  first_piece = jax.vmap(jnp.searchsorted, (0, None))(chunk.reshape(-1, tps * u),
                                                    jnp.arange(tps * cpt + 1)).reshape(b, ns, -1)
  word = jnp.where(is_piece, piece_slot % kc + at(length) * 256, 0)
  first_key = jnp.where(is_piece, at(keys.reshape(b, ns, tps * u)), 0)
  row = [tile_start[..., -1:], tile_start, count, first_piece, word, first_key]
  return jnp.concatenate([x.astype(jnp.int32) for x in row], -1)


class _StepList:
  """A step's list row in SMEM (layout: step_lists)."""

  def __init__(self, g: _Geometry, ref):
    self.ref, tps = ref, g.tiles_per_step
    self.counts_at = 2 + tps
    self.pieces_at = self.counts_at + tps
    self.words_at = self.pieces_at + tps * g.union // KEY_CHUNK + 1
    self.keys_at = self.words_at + tps * g.union

  def chunks(self):
    return self.ref[0]

  def tile_start(self, tile):
    return self.ref[1 + tile]

  def count(self, tile):
    return self.ref[self.counts_at + tile]

  def first_piece(self, chunk):
    return self.ref[self.pieces_at + chunk]

  def piece(self, p):
    """(slot in its chunk, length, first key) of piece p."""
    word = self.ref[self.words_at + p]
    return word % 256, word // 256, self.ref[self.keys_at + p]


def _powers(n: int):
  return [1 << i for i in reversed(range(n.bit_length()))]


def _walk(g: _Geometry, lst: _StepList, loads, sem, compute, *, cross_tiles: bool, writes=(), wsem=None,
          tile_begin=lambda tile: None, tile_end=lambda tile: None):
  """Streams the step's tiles' union chunks through a ring of RING chunk buffers.
  loads: [(hbm [Tk, 1, D], ring [RING, KC, 1, D])] filled piece by piece; writes: [(ring, hbm)]
  copied back the same way after the chunk computed. Per chunk one wait per source (for the
  chunk's bytes: the semaphore counts bytes; a power of two of rows per wait descriptor, so at
  most 8) and RING - 1 chunks in flight ahead: across tile boundaries when cross_tiles (the
  forward and teacher read only); within a tile otherwise (the backward's written rows must
  land before a later tile may read the same key). compute(tile, chunk of the tile, slot);
  tile_begin/tile_end(tile) around each tile's chunks (also for a tile with none)."""
  total = lst.chunks()

  def pieces(chunk, slot, pairs, semaphores):
    def one(p, carry):
      first_slot, length, key = lst.piece(p)
      if g.gathered:                 # whole chunks of a contiguous buffer: aligned, one DMA each
        key = pl.multiple_of(key, KEY_CHUNK)
      for size in [KEY_CHUNK] if g.gathered else _powers(min(MAX_PIECE, g.tk)):
        offset = length // (2 * size) * (2 * size)

        @pl.when(length & size != 0)
        def _copy():
          for k, (src, dst, to_hbm) in enumerate(pairs):
            ring_rows = pl.ds(0, KEY_CHUNK) if g.gathered else pl.ds(first_slot + offset, size)
            hbm_rows = pl.ds(key + offset, size)
            copy = (pltpu.make_async_copy(src.at[slot, ring_rows], dst.at[hbm_rows], semaphores.at[k, slot]) if to_hbm
                    else pltpu.make_async_copy(src.at[hbm_rows], dst.at[slot, ring_rows], semaphores.at[k, slot]))
            copy.start()
      return carry
    jax.lax.fori_loop(lst.first_piece(chunk), lst.first_piece(chunk + 1), one, 0)

  def wait(rows, slot, pairs, semaphores):
    """One wait per source for the chunk's rows' bytes (in power-of-two descriptors: a wait needs
    only the semaphore and the size, so a ring slot stands for both ends)."""
    for size in [KEY_CHUNK] if g.gathered else _powers(KEY_CHUNK):
      @pl.when(rows & size != 0)
      def _wait():
        for k, (src, dst, to_hbm) in enumerate(pairs):
          ring = (src if to_hbm else dst).at[slot, pl.ds(0, size)]
          pltpu.make_async_copy(ring, ring, semaphores.at[k, slot]).wait()

  reads = [(hbm, ring, False) for hbm, ring in loads]
  stores = [(ring, hbm, True) for ring, hbm in writes]
  start = lambda chunk: pieces(chunk, chunk % RING, reads, sem)

  def prefetch(first, limit):
    for j in range(RING - 1):
      pl.when(first + j < limit)(lambda j=j: start(first + j))

  for _, ring in loads:        # slots past a chunk's real rows are never copied: keep them finite
    ring[...] = jnp.zeros(ring.shape, ring.dtype)
  if cross_tiles:
    prefetch(0, total)

  def tile_body(tile, carry):
    first, last = lst.tile_start(tile), lst.tile_start(tile + 1)
    rows = lambda chunk: jnp.minimum(KEY_CHUNK, lst.count(tile) - (chunk - first) * KEY_CHUNK)
    if not cross_tiles:
      prefetch(first, last)
    tile_begin(tile)

    def chunk_body(chunk, carry):
      slot = chunk % RING
      if writes:                   # the slot refilled next held chunk - 1: its rows must have left
        @pl.when(chunk > first)
        def _drain():
          wait(rows(chunk - 1), (chunk - 1) % RING, stores, wsem)
      pl.when(chunk + RING - 1 < (total if cross_tiles else last))(lambda: start(chunk + RING - 1))
      wait(rows(chunk), slot, reads, sem)
      compute(tile, chunk - first, slot)
      if writes:
        pieces(chunk, slot, stores, wsem)
      return carry
    jax.lax.fori_loop(first, last, chunk_body, 0)
    if writes:
      @pl.when(last > first)
      def _last():
        wait(rows(last - 1), (last - 1) % RING, stores, wsem)
    tile_end(tile)
    return carry
  jax.lax.fori_loop(0, g.tiles_per_step, tile_body, 0)


def _chosen(bits_ref, tile, c, rows: int, heads: int):
  """[R, KC] bool: row r's query (r // H) chose the key in chunk c's slot."""
  bits = bits_ref[tile, :, pl.ds(pl.multiple_of(c * KEY_CHUNK, KEY_CHUNK), KEY_CHUNK)]        # [1, KC]
  who = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // heads
  return jnp.bitwise_and(jnp.right_shift(bits, who), 1) == 1


def _scores(q, rows, chosen, scale):
  s = jax.lax.dot_general(q, rows, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
  return jnp.where(chosen, s, -jnp.inf)


def _chunk_rows(ring, slot):
  return ring[slot].reshape(KEY_CHUNK, ring.shape[-1])


def _step_list(g: _Geometry, lists_hbm, smem, step):
  pltpu.sync_copy(lists_hbm.at[pl.program_id(0), step], smem)
  return _StepList(g, smem)


def _head_mean(g: _Geometry):
  """[qpt, R] float32: 1/H where row r belongs to tile query q (the teacher's mean over heads)."""
  owner = jax.lax.broadcasted_iota(jnp.int32, (g.queries_per_tile, g.rows), 1) // g.heads
  return jnp.where(owner == jax.lax.broadcasted_iota(jnp.int32, (g.queries_per_tile, g.rows), 0), 1.0 / g.heads, 0.0)


def _forward_kernel(lists_hbm, bits_ref, q_ref, kv_hbm, o_ref, lse_ref, *refs, g, teacher: bool):
  """The forward walk; teacher: also the indexer loss's teacher, from the tile's masked scores
  kept in VMEM (scores [R, U] fp32) until its lse is known: no second walk, no second gather."""
  if teacher:
    teacher_ref, smem, ring, sem, m_scratch, l_scratch, acc_scratch, scores = refs
  else:
    smem, ring, sem, m_scratch, l_scratch, acc_scratch = refs
  lst = _step_list(g, lists_hbm, smem, pl.program_id(1))
  columns = lambda c: pl.ds(pl.multiple_of(c * KEY_CHUNK, KEY_CHUNK), KEY_CHUNK)

  def compute(tile, c, slot):
    rows, q = _chunk_rows(ring, slot), q_ref[tile]
    s = _scores(q, rows, _chosen(bits_ref, tile, c, g.rows, g.heads), g.scale)
    if teacher:
      scores[:, columns(c)] = s
    softmax_step(s, rows, m_scratch, l_scratch, acc_scratch)

  def begin(tile):
    softmax_init(m_scratch, l_scratch, acc_scratch)
    if teacher:                    # union slots past the count stay 0
      teacher_ref[tile] = jnp.zeros(teacher_ref.shape[1:], jnp.float32)

  def end(tile):
    softmax_finish(o_ref.at[tile], lse_ref.at[tile], m_scratch, l_scratch, acc_scratch)
    if teacher:
      mean = _head_mean(g)

      def one(c, carry):
        teacher_ref[tile, :, columns(c)] = jnp.dot(mean, probs(scores[:, columns(c)], lse_ref.at[tile]),
                                                   preferred_element_type=jnp.float32)
        return carry
      jax.lax.fori_loop(0, lst.tile_start(tile + 1) - lst.tile_start(tile), one, 0)
  _walk(g, lst, [(kv_hbm.at[pl.program_id(0)], ring)], sem, compute, cross_tiles=True, tile_begin=begin,
        tile_end=end)


def _teacher_kernel(lists_hbm, bits_ref, q_ref, lse_ref, kv_hbm, teacher_ref, smem, ring, sem, *, g):
  lst = _step_list(g, lists_hbm, smem, pl.program_id(1))
  mean = _head_mean(g)

  def compute(tile, c, slot):
    s = _scores(q_ref[tile], _chunk_rows(ring, slot), _chosen(bits_ref, tile, c, g.rows, g.heads), g.scale)
    p = probs(s, lse_ref.at[tile])                                                          # [R, KC]
    teacher_ref[tile, :, pl.ds(pl.multiple_of(c * KEY_CHUNK, KEY_CHUNK), KEY_CHUNK)] = jnp.dot(
        mean, p, preferred_element_type=jnp.float32)                                        # [qpt, KC]

  def zero(tile):                  # union slots past the count
    teacher_ref[tile] = jnp.zeros(teacher_ref.shape[1:], jnp.float32)
  _walk(g, lst, [(kv_hbm.at[pl.program_id(0)], ring)], sem, compute, cross_tiles=True, tile_begin=zero)


def _dq_step(g: _Geometry, tile, c, rows, q_ref, do_ref, lse_ref, delta_ref, bits_ref, acc_scratch):
  """dq's share of one chunk; returns (p, dS) for the kv gradient."""
  q = q_ref[tile]
  s = _scores(q, rows, _chosen(bits_ref, tile, c, g.rows, g.heads), g.scale)
  p, ds = probs_and_dscores(s, lse_ref.at[tile], do_ref[tile], rows, delta_ref.at[tile])
  acc_scratch[...] += g.scale * jnp.dot(ds.astype(rows.dtype), rows, preferred_element_type=jnp.float32)
  return p, ds


def _kv_grad(g: _Geometry, p, ds, q, do):
  """[KC, Dk] fp32: the chunk's rows' kv gradient from this tile, scale dS^T q + p^T dO."""
  contraction = (((0,), (0,)), ((), ()))
  return (g.scale * jax.lax.dot_general(ds.astype(q.dtype), q, contraction, preferred_element_type=jnp.float32)
          + jax.lax.dot_general(p.astype(do.dtype), do, contraction, preferred_element_type=jnp.float32))


def _dq_hooks(acc_scratch, dq_ref):
  """tile_begin / tile_end of the dq walks: a tile's dq accumulates in VMEM, written at its end."""
  def begin(tile):
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

  def end(tile):
    dq_ref[tile] = acc_scratch[...].astype(dq_ref.dtype)
  return dict(tile_begin=begin, tile_end=end)


def _dq_kernel(lists_hbm, bits_ref, q_ref, do_ref, lse_ref, delta_ref, kv_hbm, dq_ref, smem, ring, sem, acc_scratch,
               *, g):
  lst = _step_list(g, lists_hbm, smem, pl.program_id(1))

  def compute(tile, c, slot):
    _dq_step(g, tile, c, _chunk_rows(ring, slot), q_ref, do_ref, lse_ref, delta_ref, bits_ref, acc_scratch)
  _walk(g, lst, [(kv_hbm.at[pl.program_id(0)], ring)], sem, compute, cross_tiles=True,
        **_dq_hooks(acc_scratch, dq_ref))


def _dq_dkv_kernel(lists_hbm, bits_ref, q_ref, do_ref, lse_ref, delta_ref, kv_hbm, dkv_in_hbm, dq_ref, dkv_hbm,
                   smem, ring, grad_ring, sem, write_sem, acc_scratch, *, g):
  """dq as _dq_kernel, and per chunk the chosen rows' kv gradient, added into their fp32 rows of
  this core's half in HBM: read with the kv rows, written back after the chunk (dkv_in_hbm is
  dkv_hbm, aliased)."""
  del dkv_in_hbm
  b, half = pl.program_id(0), pl.program_id(1)
  lst = _step_list(g, lists_hbm, smem, half * pl.num_programs(2) + pl.program_id(2))

  def compute(tile, c, slot):
    rows = _chunk_rows(ring, slot)
    p, ds = _dq_step(g, tile, c, rows, q_ref, do_ref, lse_ref, delta_ref, bits_ref, acc_scratch)
    grad = _chunk_rows(grad_ring, slot) + _kv_grad(g, p, ds, q_ref[tile], do_ref[tile])
    grad_ring[slot] = grad.reshape(grad_ring.shape[1:])
  grads = dkv_hbm.at[b, half]
  _walk(g, lst, [(kv_hbm.at[b], ring), (grads, grad_ring)], sem, compute, cross_tiles=False,
        writes=[(grad_ring, grads)], wsem=write_sem, **_dq_hooks(acc_scratch, dq_ref))


def _tile_spec(g: _Geometry, width, index=None):
  """A step's TPS tiles of a [B, NT, R or 1, width or R] array."""
  index = index or (lambda b, s: (b, s, 0, 0))
  return pl.BlockSpec((None, g.tiles_per_step, 1 if width is None else g.rows, width or g.rows), index)


def _walk_call(g: _Geometry, kernel, row_inputs, outputs, scratch, estimate, name):
  """pallas_call over grid (B, NS): the step lists (HBM, copied to SMEM per step), bits and the row
  inputs as blocks of TPS tiles, kv in HBM (rows gathered by DMA; pass `gather_rows(kv)`); outputs
  are blocks of TPS tiles ([B, NT, R or qpt, width])."""
  out_specs, out_shape = [], []
  for width, dtype, rows in outputs:
    out_specs.append(pl.BlockSpec((None, g.tiles_per_step, rows, width), lambda b, s: (b, s, 0, 0)))
    out_shape.append(jax.ShapeDtypeStruct((g.b, g.num_tiles, rows, width), dtype))
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  return pl.pallas_call(
      functools.partial(kernel, g=g), grid=(g.b, g.num_steps),
      in_specs=[any_spec, _bits_spec(g),
                *[_tile_spec(g, w) for w in row_inputs], any_spec],
      out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=[*_ring_scratch(g), pltpu.SemaphoreType.DMA((1, RING)), *scratch],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"),
                                           vmem_limit_bytes=VMEM_LIMIT_BYTES),
      cost_estimate=estimate, interpret=g.interpret, name=name)


def _bits_spec(g: _Geometry, index=None):
  return pl.BlockSpec((None, g.tiles_per_step, 1, g.union + KEY_CHUNK), index or (lambda b, s: (b, s, 0, 0)))


def _ring_scratch(g: _Geometry, dtype=None):
  """The step list's SMEM and the ring: rows of [T, 1, Dk] (TensorCore gathers) or of the
  gathered chunk's [M, Dk] buffer."""
  rows = (KEY_CHUNK, g.dk) if g.gathered else (KEY_CHUNK, 1, g.dk)
  return [pltpu.SMEM((g.list_len,), jnp.int32), pltpu.VMEM((RING, *rows), dtype or g.kv_dtype)]


def _walk_cost(g: _Geometry, matmuls: int, row_bytes: int):
  """The union bound (a kernel's CostEstimate is static; the walked chunks are data: `walk`
  counts them for a selection): FLOPs R rows x every union slot of every tile x `matmuls`
  products of width Dk; bytes the tile rows plus each union slot's padded row once."""
  selected = g.b * g.num_tiles * g.rows * g.union
  return cost(2 * selected * g.dk * matmuls, selected,
              g.b * g.num_tiles * (g.rows * row_bytes + g.union * padded_row_bytes(g.dk, g.itemsize)))


def fused_teacher(g: _Geometry) -> bool:
  """The forward computes the teacher too when a tile's scores [R, U] fp32 fit TEACHER_SCORES_BYTES
  of VMEM (V3.2: 1 MiB; H=16 with top-2048, whose 8-query unions reach 16k keys: a second walk)."""
  return g.rows * g.union * 4 <= TEACHER_SCORES_BYTES


def _forward_rows(g: _Geometry, lists, bits, q_rows, source, teacher: bool = False):
  """(out rows [B, NT, R, Dk] (the first Dv columns are the output), lse [B, NT, 1, R]) and, with
  teacher (fused_teacher(g) must hold), the teacher's [B, NT, qpt, U] (_teacher_rows). source:
  `gather_rows(kv)`, or on the gathered path the chunk's buffer of union rows [B, M, Dk]."""
  outputs = [(g.dk, q_rows.dtype, g.rows), (g.rows, jnp.float32, 1)]
  scratch = [pltpu.VMEM((g.rows, LANES), jnp.float32), pltpu.VMEM((g.rows, LANES), jnp.float32),
             pltpu.VMEM((g.rows, g.dk), jnp.float32)]
  estimate = _walk_cost(g, 2, 4 * g.dk + 4)
  if teacher:
    outputs.append((g.union, jnp.float32, g.queries_per_tile))
    scratch.append(pltpu.VMEM((g.rows, g.union), jnp.float32))
    tiles = g.b * g.num_tiles
    estimate = cost(estimate.flops + 2 * tiles * g.queries_per_tile * g.rows * g.union, 2 * estimate.transcendentals,
                    estimate.bytes_accessed + 4 * tiles * g.queries_per_tile * g.union)
  kernel = functools.partial(_forward_kernel, teacher=teacher)
  return _walk_call(g, kernel, [g.dk], outputs, scratch, estimate,
                    "dsa_sparse_fwd_teacher" if teacher else "dsa_sparse_fwd")(lists, bits, q_rows, source)


def _teacher_rows(g: _Geometry, lists, bits, q_rows, lse_rows, source):
  """[B, NT, qpt, U] float32: per tile query and union slot, the attention probability of that
  key averaged over the query's H heads (0 where the query did not choose it). The forward's walk
  and gathers with the saved lse, the QK product only: half the forward's FLOPs, its bytes."""
  estimate = _walk_cost(g, 1, 2 * g.dk + 4 + 4 * g.union // g.heads)
  return _walk_call(g, _teacher_kernel, [g.dk, None], [(g.union, jnp.float32, g.queries_per_tile)], [], estimate,
                    "dsa_teacher")(lists, bits, q_rows, lse_rows, source)[0]


# ---- dq and dkv in one walk: each chosen row's gradient added into its fp32 row in HBM ----

def _dq_dkv(g: _Geometry, lists, bits, q_rows, do_rows, lse_rows, delta_rows, kv):
  """(dq rows [B, NT, R, Dk], d kv [B, Tk, Dk] float32) in one walk of the unions (options.dsa_dkv
  = "rows"). Per chunk the 5 products of a row tile against KC gathered rows and the chunk's fp32
  gradient rows read, added to and written back by DMA (coalesced as the kv rows). Grid
  (B, 2, NS / 2): the halves of the steps are parallel (both v5p TensorCores), each adding into
  its own fp32 copy of the gradient (summed after); along a half the steps run in order. No two
  writers race: a tile's rows are written back before the next tile reads (its walk does not
  prefetch across tiles), and a union's keys are distinct.
  Bytes per tile: q, dO R*Dk each, lse, delta; per union row kv plus the fp32 row read and
  written: 7.5 KB a row at Dk=576 (padded rows), against the KV-stationary dkv's q and dO rows of
  every (key tile, query tile) pair (R*Dk*4 bytes = 295 KB at H=128, for the few keys a query
  picks in one 128-key tile of a long sequence: the inverse of a token-level selection spreads)."""
  half = g.num_steps // 2
  grad = jnp.zeros((g.b, 2, g.tk, 1, g.dk), jnp.float32)
  index = lambda b, h, s: (b, h * half + s, 0, 0)
  tile = lambda width: _tile_spec(g, width, index)
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  estimate = _walk_cost(g, 5, 6 * g.dk + 8)
  estimate = cost(estimate.flops, estimate.transcendentals,
                  estimate.bytes_accessed + 2 * g.b * g.num_tiles * g.union * padded_row_bytes(g.dk, 4))
  dq_rows, grad = pl.pallas_call(
      functools.partial(_dq_dkv_kernel, g=g),
      grid=(g.b, 2, half),
      in_specs=[any_spec, _bits_spec(g, index), tile(g.dk), tile(g.dk), tile(None), tile(None), any_spec, any_spec],
      out_specs=[tile(g.dk), any_spec],
      out_shape=[jax.ShapeDtypeStruct((g.b, g.num_tiles, g.rows, g.dk), q_rows.dtype),
                 jax.ShapeDtypeStruct(grad.shape, jnp.float32)],
      scratch_shapes=[*_ring_scratch(g), pltpu.VMEM((RING, KEY_CHUNK, 1, g.dk), jnp.float32),
                      pltpu.SemaphoreType.DMA((2, RING)), pltpu.SemaphoreType.DMA((1, RING)),
                      pltpu.VMEM((g.rows, g.dk), jnp.float32)],
      input_output_aliases={7: 1},
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                           vmem_limit_bytes=VMEM_LIMIT_BYTES),
      cost_estimate=estimate, interpret=g.interpret, name="dsa_sparse_bwd",
  )(lists, bits, q_rows, do_rows, lse_rows, delta_rows, gather_rows(kv), grad)
  return dq_rows, grad.sum(1)[:, :, 0]


# ---- the SparseCore path: a query chunk's union rows gathered into one buffer ----

def _forward(g: _Geometry, lists, bits, keys_row, q_rows, kv, teacher: bool):
  """(out rows, lse rows, teacher probs or None), walking gathered rows or gathering by DMA."""
  fused = teacher and fused_teacher(g)
  if g.gathered:
    outs = _by_chunk(g, kv, keys_row, lambda gc, rows, lst, bits, q: _forward_rows(gc, lst, bits, q, rows, fused),
                     lists, bits, q_rows)
  else:
    outs = _forward_rows(g, lists, bits, q_rows, gather_rows(kv), teacher=fused)
  out_rows, lse_rows, *probs_union = outs
  if teacher and not fused:
    if g.gathered:
      probs_union = _by_chunk(g, kv, keys_row, lambda gc, rows, lst, bits, q, lse: (_teacher_rows(
          gc, lst, bits, q, lse, rows),), lists, bits, q_rows, lse_rows)
    else:
      probs_union = [_teacher_rows(g, lists, bits, q_rows, lse_rows, gather_rows(kv))]
  return out_rows, lse_rows, probs_union[0] if teacher else None


def _chunk_keys(g: _Geometry, keys_row):
  """[NC, B, chunk_tiles * U]: each query chunk's union slots as row indices (padding slots repeat
  the tile's last key: real rows, masked by their bits)."""
  keys = keys_row[:, :, 0, :g.union].reshape(g.b, -1, g.chunk_tiles * g.union)
  return keys.swapaxes(0, 1)


def _table_words(kv):
  """kv [B, Tk, Dk] as the SparseCores' 32-bit words, once per call (not per chunk)."""
  return kv if kv.dtype.itemsize == 4 else jax.vmap(sparsecore.pack_words)(kv)


def _gather_chunk(g: _Geometry, words, keys):
  """[B, M, Dk] in kv's dtype: the rows keys[b] of the packed table, gathered on the SparseCores
  (M padded to their row multiple)."""
  m = keys.shape[-1]
  pad = -m % sparsecore.row_multiple(words.shape[-1], g.options)
  rows = [sparsecore.gather_words(words[b], jnp.pad(keys[b], (0, pad)), options=g.options)[:m] for b in range(g.b)]
  rows = jnp.stack(rows)
  return rows if g.itemsize == 4 else jax.vmap(functools.partial(sparsecore.unpack_words, dtype=g.kv_dtype))(rows)


def _split_chunks(g: _Geometry, x):
  """[B, NT or NS, ...] -> [NC, B, per chunk, ...]."""
  return x.reshape(g.b, g.num_tiles // g.chunk_tiles, -1, *x.shape[2:]).swapaxes(0, 1)


def _join_chunks(x):
  return x.swapaxes(0, 1).reshape(x.shape[1], -1, *x.shape[3:])


def _by_chunk(g: _Geometry, kv, keys_row, walk, lists, *per_tile, carry=None, update=None):
  """Runs walk(chunk geometry, gathered rows, the chunk's lists, *per-tile blocks) per query chunk
  (a scan), the SparseCores gathering chunk c + 1's rows while the TensorCores walk chunk c
  (software-pipelined: the two calls are independent in one iteration). Returns the walks'
  outputs joined over chunks; with `update`, also carry = update(carry, chunk keys, outputs, c)."""
  keys, words = _chunk_keys(g, keys_row), _table_words(kv)
  chunks = keys.shape[0]
  gc = g._replace(t=g.chunk_tiles * g.queries_per_tile)

  def body(state, xs):
    rows, acc = state
    c, lst, *blocks = xs
    following = _gather_chunk(g, words, keys[jnp.minimum(c + 1, chunks - 1)])
    outs = walk(gc, rows, lst, *blocks)
    if update is not None:
      acc, outs = update(acc, keys[c], outs, c)
    return (following, acc), outs
  xs = (jnp.arange(chunks), _split_chunks(g, lists), *[_split_chunks(g, x) for x in per_tile])
  (_, acc), outs = jax.lax.scan(body, (_gather_chunk(g, words, keys[0]), carry), xs)
  outs = [_join_chunks(o) for o in outs]
  return outs if update is None else (outs, acc)


def _dq_grads_kernel(lists_hbm, bits_ref, q_ref, do_ref, lse_ref, delta_ref, rows_hbm, dq_ref, grads_hbm, smem, ring,
                     sem, grad_ring, write_sem, acc_scratch, *, g):
  """dq, and each walked union slot's kv gradient written to its own fp32 row of the chunk's
  buffer (no read-modify-write: the SparseCores add them into dkv after), the row padded to the
  add stream's width with zeros."""
  b = pl.program_id(0)
  lst = _step_list(g, lists_hbm, smem, pl.program_id(1))

  def compute(tile, c, slot):
    rows = _chunk_rows(ring, slot)
    p, ds = _dq_step(g, tile, c, rows, q_ref, do_ref, lse_ref, delta_ref, bits_ref, acc_scratch)
    grad_ring[slot, :, :g.dk] = _kv_grad(g, p, ds, q_ref[tile], do_ref[tile])
  grad_ring[...] = jnp.zeros(grad_ring.shape, jnp.float32)        # the padding columns stay 0
  _walk(g, lst, [(rows_hbm.at[b], ring)], sem, compute, cross_tiles=True, writes=[(grad_ring, grads_hbm.at[b])],
        wsem=write_sem, **_dq_hooks(acc_scratch, dq_ref))


def _dq_grads(g: _Geometry, lists, bits, q_rows, do_rows, lse_rows, delta_rows, source, width: int):
  """(dq rows [B, NT, R, Dk], grads [B, NT * U, width] float32: row tile * U + u is slot u's kv
  gradient (zero-padded past Dk), for the walked chunks' slots only)."""
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  tile = lambda w: _tile_spec(g, w)
  estimate = _walk_cost(g, 5, 6 * g.dk + 8)
  estimate = cost(estimate.flops, estimate.transcendentals, estimate.bytes_accessed + 4 * g.b * g.num_tiles * g.union * width)
  return pl.pallas_call(
      functools.partial(_dq_grads_kernel, g=g), grid=(g.b, g.num_steps),
      in_specs=[any_spec, _bits_spec(g), tile(g.dk), tile(g.dk), tile(None), tile(None), any_spec],
      out_specs=[tile(g.dk), any_spec],
      out_shape=[jax.ShapeDtypeStruct((g.b, g.num_tiles, g.rows, g.dk), q_rows.dtype),
                 jax.ShapeDtypeStruct((g.b, g.num_tiles * g.union, width), jnp.float32)],
      scratch_shapes=[*_ring_scratch(g), pltpu.SemaphoreType.DMA((1, RING)),
                      pltpu.VMEM((RING, KEY_CHUNK, width), jnp.float32), pltpu.SemaphoreType.DMA((1, RING)),
                      pltpu.VMEM((g.rows, g.dk), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"),
                                           vmem_limit_bytes=VMEM_LIMIT_BYTES),
      cost_estimate=estimate, interpret=g.interpret, name="dsa_sparse_bwd_gathered",
  )(lists, bits, q_rows, do_rows, lse_rows, delta_rows, source)


def _backward_gathered(g: _Geometry, lists, bits, keys_row, count, q_rows, do_rows, lse_rows, delta_rows, kv):
  """(dq rows, dkv [B, Tk, Dk] float32) on the SparseCore path: per query chunk the walk of its
  gathered rows writes dq and each slot's kv gradient; the SparseCores add the gradients into
  dkv (sparsecore.scatter_add_rows; slots past a tile's walked chunks go to a spare row Tk,
  dropped). dkv stays at the add stream's width for the whole backward (no copy per chunk)."""
  width = sparsecore.add_width(g.dk)
  walked = jnp.arange(g.union)[None, None, :] < _round_up(count, KEY_CHUNK)[..., None]       # [B, NT, U]
  walked = walked.reshape(g.b, -1, g.chunk_tiles * g.union).swapaxes(0, 1)
  m = g.chunk_tiles * g.union
  pad = -m % sparsecore.row_multiple(width, g.options)

  def update(dkv, keys, outs, c):
    dq, grads = outs
    index = jnp.pad(jnp.where(walked[c], keys, g.tk), [(0, 0), (0, pad)], constant_values=g.tk)
    grads = jnp.pad(grads, [(0, 0), (0, pad), (0, 0)])
    dkv = jnp.stack([sparsecore.scatter_add_rows(dkv[b], index[b], grads[b], options=g.options)
                     for b in range(g.b)])
    return dkv, (dq,)
  walk = lambda gc, rows, lst, *blocks: _dq_grads(gc, lst, *blocks, rows, width)
  (dq_rows,), dkv = _by_chunk(g, kv, keys_row, walk, lists, bits, q_rows, do_rows, lse_rows, delta_rows,
                              carry=jnp.zeros((g.b, g.tk + 1, width), jnp.float32), update=update)
  return dq_rows, dkv[:, :g.tk, :g.dk]


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
  lists, bits, keys_row, count = _selection(g, indices, jnp.asarray(q_offset, jnp.int32))
  out, probs_union = _sparse(q, kv, lists, bits, keys_row, count, v_dim, scale, options, teacher)
  if not teacher:
    return out
  return out, Teacher(keys_row[:, :, 0, :g.union], bits[:, :, 0, :g.union], probs_union)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _sparse(q, kv, lists, bits, keys_row, count, v_dim, scale, options, teacher):
  return _sparse_fwd(q, kv, lists, bits, keys_row, count, v_dim, scale, options, teacher)[0]


def _union_geometry(q, kv, bits, v_dim, scale, options) -> _Geometry:
  return _geometry(q, kv, 1, v_dim, scale, options, union=bits.shape[-1] - KEY_CHUNK)


def _sparse_fwd(q, kv, lists, bits, keys_row, count, v_dim, scale, options, teacher):
  g = _union_geometry(q, kv, bits, v_dim, scale, options)
  q_rows = _tile_rows(g, q)
  out_rows, lse_rows, probs_union = _forward(g, lists, bits, keys_row, q_rows, kv, teacher)
  out = _untile_rows(g, out_rows, q.shape[1])[..., :v_dim]
  return (out, probs_union), (q, kv, lists, bits, keys_row, count, out_rows, lse_rows)


def _sparse_bwd(v_dim, scale, options, teacher, residuals, cotangents):
  del teacher      # the teacher is a constant: its cotangent is dropped
  q, kv, lists, bits, keys_row, count, out_rows, lse_rows = residuals
  dout = cotangents[0]
  g = _union_geometry(q, kv, bits, v_dim, scale, options)
  q_rows = _tile_rows(g, q)
  # dO zero-padded to Dk: the value is kv's first v_dim columns.
  do_rows = _tile_rows(g, jnp.pad(dout.astype(q.dtype), [(0, 0), (0, 0), (0, 0), (0, g.dk - v_dim)]))
  delta = jnp.sum(out_rows.astype(jnp.float32) * do_rows.astype(jnp.float32), -1)                # [B, NT, R]
  delta_rows = delta[:, :, None, :]
  if g.gathered:
    dq_rows, dkv = _backward_gathered(g, lists, bits, keys_row, count, q_rows, do_rows, lse_rows, delta_rows, kv)
  elif g.options.dsa_dkv == "rows":
    dq_rows, dkv = _dq_dkv(g, lists, bits, q_rows, do_rows, lse_rows, delta_rows, kv)
  else:
    dq_rows, = _walk_call(g, _dq_kernel, [g.dk, g.dk, None, None], [(g.dk, q.dtype, g.rows)],
                          [pltpu.VMEM((g.rows, g.dk), jnp.float32)], _walk_cost(g, 3, 6 * g.dk + 8),
                          "dsa_sparse_dq")(lists, bits, q_rows, do_rows, lse_rows, delta_rows, gather_rows(kv))
    dkv = _dkv(g, keys_row, bits, count, q_rows, do_rows, lse_rows, delta_rows, kv)
  return _untile_rows(g, dq_rows, q.shape[1]), dkv.astype(kv.dtype), None, None, None, None


_sparse.defvjp(_sparse_fwd, _sparse_bwd)
