"""Pallas TPU kernels for NSA's selection and sliding-window branches (docs/design.md §7): one block
walk, forward and backward behind custom_vjps (`kernels.nsa.selection_attention` and
`kernels.nsa.window_attention` with impl="pallas"). The compressed branch is
kernels/nsa/compressed_pallas.py; the row layout is kernels/nsa/rows.py; perf/nsa_time.py counts
what these kernels cost from `walk`, which reads the same lists the kernels read.

Both branches are the same walk over key blocks; only the mask differs:
  selection  blocks of l' keys; query t keeps key s iff its KV group chose block s // l' and s <= t.
  window     blocks of `block` keys (64 or fewer); query t keeps s iff t - w < s <= t and s is in
             t's document (doc_start).

rows     a tile is bq = 128 // G query positions x the G heads of a KV group: 128 matmul rows
         (kernels/nsa/rows.py). A tile's *union* is the sorted set of blocks any of its rows needs.
grid     (B, HKV, S): a step is options.step_rows rows (TPS = step_rows / 128 tiles, 256 positions
         at G = 16 by default), so that one step carries microseconds of MXU work; B and HKV are
         parallel (both v5p TensorCores), S sequential (the backward accumulates dK/dV along it).
lists    per step one int32 row in HBM, copied to SMEM at the step's start (one DMA):
         [U, the step's union of blocks (sorted, U of them), each tile's union length, each tile
         entry's position in the step's union]. Built in XLA from the selection (tile_unions) or
         from the window's geometry (window_unions); at most S * (1 + SU + TPS + TPS * TU) ints.
slabs    the step's union is copied HBM -> VMEM in slabs of options.slab_keys keys (K and V: two
         DMAs per block), double-buffered: slab i + 1 is in flight while slab i computes. A
         realistic NSA selection needs one slab per step (about 40 distinct blocks per 256 queries
         at 64k); a random one needs many, each block still copied once per step.
compute  per slab, every tile walks its own union entries that lie in the slab (an in-kernel
         loop over real entries only: no padded steps): a [128, Dk] x [Dk, block] score matmul,
         the row mask, an fp32 online softmax into the tile's accumulators (VMEM, [TPS, 128, .]).
backward one kernel, one walk: per entry the scores and p again, dP = dO V^T, dS; dq accumulates
         per tile in VMEM, dK/dV (fp32) per slab block in VMEM: a slab's dK/dV are read from HBM
         with its K/V and written back after it (all writes awaited before the next step, which may
         read the same blocks). Five matmuls per entry.
bytes    forward: q, mask rows, out, lse once; K/V of each step's union once per step. Backward:
         q, mask, dO, lse, delta, dq once; per step-union block K/V plus dK/dV read and written.
DMAs     per step 1 (lists) + forward 2 per union block, backward 4 in + 2 out per union block;
         q and the row inputs arrive by the BlockSpec pipeline (one copy per step each).
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import DEFAULT_OPTIONS, KernelOptions, Unsupported
from kernels.nsa.rows import check_rows, from_rows, from_tile_rows, tiles_per_step, to_rows
from kernels.pallas_common import LANES, ROWS, cost, probs_and_dscores, softmax_finish, softmax_init, softmax_step

SELECTION, WINDOW = "selection", "window"
WINDOW_BLOCK = 64          # keys per window block: a tile of 8 queries walks w + 8 keys in blocks of 64
MAX_PIECE = 8              # blocks per coalesced copy: a run of consecutive blocks costs at most 4 DMAs per 8


class Walk(NamedTuple):
  """Static geometry of one block walk (selection or window) over queries at a global offset."""
  kind: str               # SELECTION | WINDOW
  b: int
  t: int                  # queries
  tk: int                 # keys
  hkv: int
  group: int
  dk: int
  dv: int
  block: int              # keys per block
  n: int                  # selection: indices per query (window: 1, the doc_start column)
  window: int             # window: keys per query (selection: 0)
  scale: float
  options: KernelOptions
  itemsize: int = 2

  @property
  def bq(self) -> int:
    return ROWS // self.group

  @property
  def num_tiles(self) -> int:
    return self.t // self.bq

  @property
  def tiles_per_step(self) -> int:
    return tiles_per_step(self.num_tiles, self.options.step_rows)

  @property
  def num_steps(self) -> int:
    return self.num_tiles // self.tiles_per_step

  @property
  def num_blocks(self) -> int:
    return self.tk // self.block

  @property
  def tile_union(self) -> int:
    """Most blocks one tile walks."""
    if self.kind == SELECTION:
      return min(self.bq * self.n, self.num_blocks)
    return min(-(-(self.window + self.bq - 1) // self.block) + 1, self.num_blocks)

  @property
  def step_union(self) -> int:
    return min(self.tiles_per_step * self.tile_union, self.num_blocks)

  @property
  def slab(self) -> int:
    """Blocks per VMEM slab."""
    return max(1, min(self.options.slab_keys // self.block, self.step_union))

  @property
  def group_blocks(self) -> int:
    """Blocks per score matmul: options.mxu_keys keys (one MXU width), at least one block."""
    return max(1, self.options.mxu_keys // self.block)

  @property
  def max_piece(self) -> int:
    """Blocks per coalesced copy: the largest power of two <= MAX_PIECE that fits a slab."""
    return 1 << (min(MAX_PIECE, self.slab).bit_length() - 1)

  @property
  def num_slabs(self) -> int:
    return -(-self.step_union // self.slab)

  @property
  def list_len(self) -> int:
    """int32 per step's list row: see `step_lists` (one spare: the walk may peek one past a tile's end)."""
    return 2 + self.num_slabs + 1 + 4 * self.step_union + self.tiles_per_step * (1 + self.tile_union) + 1

  @property
  def interpret(self):
    return self.options.interpret_params()


def check_supported(t: int, hq: int, hkv: int, slc_block: int) -> int:
  """The selection kernels' rules: the row tiling's, and T a multiple of the block size (itself a
  multiple of 8, the sublane tile). Returns G; raises kernels.Unsupported."""
  group = check_rows(t, hq, hkv)
  if slc_block % 8:
    raise Unsupported("slc_block", slc_block, "the selection block must be a multiple of 8 for the Pallas kernels")
  if t % slc_block:
    raise Unsupported("seq_len", t, f"must be a multiple of the selection block size {slc_block}")
  return group


def window_block(tk: int) -> int:
  """Keys per window block: 64, or the largest power of two >= 8 dividing Tk."""
  block = WINDOW_BLOCK
  while tk % block and block > 8:
    block //= 2
  return block


def check_window(t: int, tk: int, hq: int, hkv: int) -> int:
  group = check_rows(t, hq, hkv)
  if tk % 8:
    raise Unsupported("seq_len", tk, "must be a multiple of 8 for the Pallas window kernel")
  return group


# ---- the lists: per tile, per step ----

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


def window_unions(w: Walk, first_tile):
  """(union [B, HKV, NQ, TU], count): tile i's window blocks, from the block of its first query's
  first key to the block of its last query."""
  t0 = (first_tile + jnp.arange(w.num_tiles, dtype=jnp.int32)) * w.bq
  lo = jnp.maximum(t0 - w.window + 1, 0) // w.block
  count = (t0 + w.bq - 1) // w.block - lo + 1
  union = lo[:, None] + jnp.minimum(jnp.arange(w.tile_union), count[:, None] - 1)
  grow = lambda x: jnp.broadcast_to(x, (w.b, w.hkv, *x.shape)).astype(jnp.int32)
  return grow(union), grow(count)


def step_lists(w: Walk, union, count):
  """int32 [B, HKV, S, list_len]: each step's list row from the tile unions:
    [U, P, the first piece of each slab (num_slabs + 1), the step's union of blocks (SU, sorted),
     per piece its first slot, first block and length in blocks (3 x SU), each tile's union length
     (TPS), each tile entry's slot in the step's union (TPS x TU), a spare].
  A piece is a run of consecutive blocks within one slab, at most max_piece long: one DMA per
  power of two of its length."""
  b, hkv, tps, tu, su = w.b, w.hkv, w.tiles_per_step, union.shape[-1], w.step_union
  lead = (b, hkv, w.num_steps)
  flat = union.reshape(*lead, tps * tu)
  count = count.reshape(*lead, tps)
  valid = (jnp.arange(tu)[None, :] < count[..., None]).reshape(flat.shape)
  big = jnp.int32(w.num_blocks)
  s = jnp.sort(jnp.where(valid, flat, big), axis=-1)
  first = jnp.concatenate([jnp.ones_like(s[..., :1], bool), s[..., 1:] != s[..., :-1]], -1) & (s != big)
  blocks = jnp.sort(jnp.where(first, s, big), axis=-1)[..., :su]
  blocks = jnp.pad(blocks, [(0, 0)] * 3 + [(0, su - blocks.shape[-1])], constant_values=big)
  slots = jax.vmap(jnp.searchsorted)(blocks.reshape(-1, su), flat.reshape(-1, tps * tu)).reshape(flat.shape)
  # Pieces: a slot starts one where its run of consecutive blocks starts (or a slab does), or every
  # MAX_PIECE slots into a run.
  slot = jnp.arange(su)
  real = blocks < big
  prev = jnp.concatenate([jnp.full((*lead, 1), -2, jnp.int32), blocks[..., :-1]], -1)
  run_start = real & ((blocks != prev + 1) | (slot % w.slab == 0))
  start_slot = jax.lax.cummax(jnp.where(run_start, slot, 0), axis=3)
  begins = real & (run_start | ((slot - start_slot) % w.max_piece == 0))
  piece_slot = jnp.sort(jnp.where(begins, slot, su), axis=-1)                    # pieces first, in order
  next_slot = jnp.concatenate([piece_slot[..., 1:], jnp.full((*lead, 1), su, jnp.int32)], -1)
  union_size = first.sum(-1, keepdims=True)
  length = jnp.where(piece_slot < su, jnp.minimum(next_slot, union_size) - piece_slot, 0)
  piece_block = jnp.take_along_axis(blocks, jnp.minimum(piece_slot, su - 1), -1)
  slab_first = jax.vmap(jnp.searchsorted, (0, None))(piece_slot.reshape(-1, su),
                                                     jnp.arange(w.num_slabs + 1) * w.slab).reshape(*lead, -1)
  row = [union_size, begins.sum(-1, keepdims=True), slab_first, jnp.where(real, blocks, 0),
         jnp.where(piece_slot < su, piece_slot, 0), jnp.where(piece_slot < su, piece_block, 0), length, count,
         jnp.where(valid, slots, 0), jnp.zeros((*lead, 1), jnp.int32)]
  return jnp.concatenate([x.astype(jnp.int32) for x in row], -1)


# ---- the walk inside a step ----

class _Lists:
  """The step's list row in SMEM (layout: step_lists)."""

  def __init__(self, w: Walk, ref):
    self.w, self.ref = w, ref
    self.blocks_at = 3 + w.num_slabs
    self.pieces_at = self.blocks_at + w.step_union
    self.counts_at = self.pieces_at + 3 * w.step_union
    self.slots_at = self.counts_at + w.tiles_per_step

  @property
  def union(self):
    return self.ref[0]

  def slab_first(self, s):
    return self.ref[2 + s]

  def block(self, i):
    return self.ref[self.blocks_at + i]

  def piece(self, p):
    """(first slot, first block, length in blocks) of piece p."""
    su = self.w.step_union
    return self.ref[self.pieces_at + p], self.ref[self.pieces_at + su + p], self.ref[self.pieces_at + 2 * su + p]

  def count(self, tile):
    return self.ref[self.counts_at + tile]

  def slot(self, tile, u):
    return self.ref[self.slots_at + tile * self.w.tile_union + u]


def _walk(w: Walk, lists: _Lists, cursor, loads, sem, group, writes=None, wsem=None):
  """Walks one step's union slab by slab. loads: [(hbm [B, HKV, Tk, D], buf [2, slab*block, D])]
  copied in piece by piece; writes: [(buf, hbm)] copied back the same way after the slab computed.
  group(tile, slab buffer, [(block j, real, key offset in the slab)] * group_blocks) runs over each
  tile's entries in the slab, group_blocks at a time (the last group padded with its last entry,
  not real); cursor (SMEM [TPS]) keeps where each tile's walk stands between slabs."""
  b, h = pl.program_id(0), pl.program_id(1)
  bk, union = w.block, lists.union
  slabs = (union + w.slab - 1) // w.slab
  keys = lambda first, size: pl.ds(pl.multiple_of(first * bk, bk), size * bk)

  def each_copy(s, fn):
    """fn(slot in the slab, block, size) per DMA of slab s: a power-of-two part of each piece."""
    def one(p, carry):
      first_slot, first_block, length = lists.piece(p)
      for size in (8, 4, 2, 1):
        if size > w.max_piece:
          continue
        offset = length // (2 * size) * (2 * size)

        @pl.when(length & size != 0)
        def _copy():
          fn(first_slot - s * w.slab + offset, first_block + offset, size)
      return carry
    jax.lax.fori_loop(lists.slab_first(s), lists.slab_first(s + 1), one, 0)

  def load(s, buf, wait=False):
    def copy(slot, j, size):
      for k, (hbm, vbuf) in enumerate(loads):
        c = pltpu.make_async_copy(hbm.at[b, h, keys(j, size)], vbuf.at[buf, keys(slot, size)], sem.at[k, buf])
        c.wait() if wait else c.start()
    each_copy(s, copy)

  def store(s, buf, wait=False):
    def copy(slot, j, size):
      for k, (vbuf, hbm) in enumerate(writes):
        c = pltpu.make_async_copy(vbuf.at[buf, keys(slot, size)], hbm.at[b, h, keys(j, size)], wsem.at[k, buf])
        c.wait() if wait else c.start()
    each_copy(s, copy)

  @pl.when(slabs > 0)
  def _first():
    load(0, 0)

  def slab_body(s, carry):
    buf = s % 2
    load(s, buf, wait=True)

    @pl.when(s + 1 < slabs)
    def _next():
      if writes:
        @pl.when(s >= 1)
        def _drain():          # slab s-1's stores read buffer 1 - buf: finish them before refilling it
          store(s - 1, 1 - buf, wait=True)
      load(s + 1, 1 - buf)

    limit = jnp.minimum((s + 1) * w.slab, union)

    def tile_body(tile, carry):
      count, start = lists.count(tile), cursor[tile]
      in_slab = lambda u: (u < count) & (lists.slot(tile, jnp.minimum(u, w.tile_union - 1)) < limit)
      end = jax.lax.while_loop(in_slab, lambda u: u + 1, start)
      cursor[tile] = end

      def one_group(g, carry):
        entries = []
        for i in range(w.group_blocks):
          u = start + g * w.group_blocks + i
          slot = lists.slot(tile, jnp.minimum(u, end - 1))
          entries.append((lists.block(slot), u < end, pl.multiple_of((slot - s * w.slab) * bk, bk)))
        group(tile, buf, entries)
        return carry
      jax.lax.fori_loop(0, (end - start + w.group_blocks - 1) // w.group_blocks, one_group, 0)
      return carry
    jax.lax.fori_loop(0, w.tiles_per_step, tile_body, 0)
    if writes:
      store(s, buf)
    return carry

  def reset(tile, carry):
    cursor[tile] = 0
    return carry
  jax.lax.fori_loop(0, w.tiles_per_step, reset, 0)
  jax.lax.fori_loop(0, slabs, slab_body, 0)
  if writes:                   # the last two slabs' stores (the loop awaited the others)
    @pl.when(slabs >= 2)
    def _second_last():
      store(slabs - 2, slabs % 2, wait=True)

    @pl.when(slabs >= 1)
    def _last():
      store(slabs - 1, (slabs - 1) % 2, wait=True)


def _tile_rows(tile):
  return pl.ds(pl.multiple_of(tile * ROWS, ROWS), ROWS)


def _join(parts):
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)


def _masked_scores(w: Walk, q, k, mask_rows, entries, query_tile):
  """scale * q k^T [128, E * block] in fp32 for a group of E key blocks, -inf where the row may not
  see the key. mask_rows: selection [128, n] block indices of each row's query; window [128, 1]
  doc_start. entries: [(block j, real, offset)]; keys of entries that are not real are masked."""
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * w.scale
  query_pos = query_tile * w.bq + jax.lax.broadcasted_iota(jnp.int32, (ROWS, 1), 0) // w.group
  column = jax.lax.broadcasted_iota(jnp.int32, (1, len(entries) * w.block), 1)
  part = column // w.block                      # which entry a column's key belongs to (no concatenation:
  pick = lambda values: functools.reduce(      # Mosaic cannot concatenate boolean vectors)
      lambda acc, i: jnp.where(part == i, values[i], acc), range(1, len(values)), values[0])
  key_pos = pick([j for j, _, _ in entries]) * w.block + column % w.block
  visible = (key_pos <= query_pos) & (pick([real.astype(jnp.int32) for _, real, _ in entries]) > 0)
  if w.kind == SELECTION:   # int32 throughout: Mosaic cannot widen narrow boolean vectors either
    visible &= pick([jnp.max(jnp.where(mask_rows == j, 1, 0), axis=1, keepdims=True) for j, _, _ in entries]) > 0
  else:
    visible &= (key_pos > query_pos - w.window) & (key_pos >= mask_rows)
  return jnp.where(visible, s, -jnp.inf)


def _fwd_kernel(first_tile_ref, lists_hbm, q_ref, mask_ref, k_hbm, v_hbm, o_ref, lse_ref, lists_smem, cursor, kbuf,
                vbuf, sem, m_s, l_s, acc_s, *, w: Walk):
  pltpu.sync_copy(lists_hbm.at[pl.program_id(0), pl.program_id(1), pl.program_id(2)], lists_smem)
  first = first_tile_ref[0] + pl.program_id(2) * w.tiles_per_step
  softmax_init(m_s, l_s, acc_s)

  def group(tile, buf, entries):
    rows = _tile_rows(tile)
    k = _join([kbuf[buf, pl.ds(off, w.block), :] for _, _, off in entries])
    v = _join([vbuf[buf, pl.ds(off, w.block), :] for _, _, off in entries])
    s = _masked_scores(w, q_ref[rows, :], k, mask_ref[rows, :], entries, first + tile)
    softmax_step(s, v, m_s.at[tile], l_s.at[tile], acc_s.at[tile])
  _walk(w, _Lists(w, lists_smem), cursor, [(k_hbm, kbuf), (v_hbm, vbuf)], sem, group)

  def finish(tile, carry):
    softmax_finish(o_ref.at[_tile_rows(tile)], lse_ref.at[tile], m_s.at[tile], l_s.at[tile], acc_s.at[tile])
    return carry
  jax.lax.fori_loop(0, w.tiles_per_step, finish, 0)


def _bwd_kernel(first_tile_ref, lists_hbm, q_ref, mask_ref, do_ref, lse_ref, delta_ref, k_hbm, v_hbm, dk_zero,
                dv_zero, dq_ref, dk_hbm, dv_hbm, lists_smem, cursor, kbuf, vbuf, dkbuf, dvbuf, sem, wsem, dq_s, *,
                w: Walk):
  del dk_zero, dv_zero       # aliased to dk_hbm, dv_hbm: the accumulators start at zero
  pltpu.sync_copy(lists_hbm.at[pl.program_id(0), pl.program_id(1), pl.program_id(2)], lists_smem)
  first = first_tile_ref[0] + pl.program_id(2) * w.tiles_per_step
  dq_s[...] = jnp.zeros(dq_s.shape, jnp.float32)
  dot = lambda a, b, dims: jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=jnp.float32)

  def group(tile, buf, entries):
    rows = _tile_rows(tile)
    q, do = q_ref[rows, :], do_ref[rows, :]
    k = _join([kbuf[buf, pl.ds(off, w.block), :] for _, _, off in entries])
    v = _join([vbuf[buf, pl.ds(off, w.block), :] for _, _, off in entries])
    s = _masked_scores(w, q, k, mask_ref[rows, :], entries, first + tile)
    p, ds = probs_and_dscores(s, lse_ref.at[tile], do, v, delta_ref.at[tile])
    dq_s[tile] += w.scale * dot(ds.astype(k.dtype), k, ((1,), (0,)))
    dk = w.scale * dot(ds.astype(q.dtype), q, ((0,), (0,)))
    dv = dot(p.astype(do.dtype), do, ((0,), (0,)))
    for i, (_, _, off) in enumerate(entries):      # entries that are not real add zeros
      keys, part = pl.ds(off, w.block), slice(i * w.block, (i + 1) * w.block)
      dkbuf[buf, keys, :] += dk[part]
      dvbuf[buf, keys, :] += dv[part]
  _walk(w, _Lists(w, lists_smem), cursor, [(k_hbm, kbuf), (v_hbm, vbuf), (dk_hbm, dkbuf), (dv_hbm, dvbuf)], sem, group,
        writes=[(dkbuf, dk_hbm), (dvbuf, dv_hbm)], wsem=wsem)
  dq_ref[...] = dq_s[...].reshape(dq_ref.shape).astype(dq_ref.dtype)


# ---- counting: what a walk does (the CostEstimates, and perf/nsa_time.py) ----

def _counts(w: Walk, groups: int, blocks: int, copies: int, backward: bool) -> dict:
  """What a walk costs from its totals: matmul groups (each [128, Dk] x [Dk, E*block] and the
  rest), step-union blocks copied in, DMA copies (power-of-two parts of pieces) per array."""
  steps = w.b * w.hkv * w.num_steps
  rows = steps * w.tiles_per_step * ROWS
  keys = groups * w.group_blocks * w.block                  # per row of a tile: keys computed
  row_inputs = rows * (w.dk * w.itemsize + 4 * w.n)          # q and the mask rows (int32)
  kv = blocks * w.block * (w.dk + w.dv)
  lists = steps * w.list_len * 4
  if not backward:
    flops = 2 * ROWS * keys * (w.dk + w.dv)
    hbm = lists + row_inputs + rows * (w.dv * w.itemsize + 4) + kv * w.itemsize      # + out, lse
    dmas = steps + 2 * copies
  else:
    flops = 2 * ROWS * keys * (3 * w.dk + 2 * w.dv)
    hbm = (lists + row_inputs + rows * ((w.dv + w.dk) * w.itemsize + 8)              # + dO, lse, delta, dq
           + kv * (w.itemsize + 2 * 4))                                              # K/V; dK/dV in and out
    dmas = steps + 6 * copies
  return {"steps": steps, "groups": int(groups), "union_blocks": int(blocks), "flops": int(flops),
          "transcendentals": int(ROWS * keys), "bytes": int(hbm), "dmas": int(dmas)}


def walk(w: Walk, lists, backward: bool = False) -> dict:
  """What one walk over these lists ([B, HKV, S, list_len], numpy or jax) costs, counted from the
  lists the kernel reads: grid steps, matmul groups, step-union blocks, MXU FLOPs, exps, HBM bytes
  and DMA descriptors."""
  rows = np.asarray(lists).reshape(-1, w.list_len).astype(np.int64)
  at = _Lists(w, None)
  tps, tu, su = w.tiles_per_step, w.tile_union, w.step_union
  count = rows[:, at.counts_at:at.counts_at + tps]
  slots = rows[:, at.slots_at:at.slots_at + tps * tu].reshape(-1, tps, tu)
  real = np.arange(tu)[None, None, :] < count[..., None]
  per_slab = ((slots[..., None] // w.slab == np.arange(w.num_slabs)) & real[..., None]).sum(2)   # [N, TPS, slabs]
  groups = (-(-per_slab // w.group_blocks)).sum()
  lengths = rows[:, at.pieces_at + 2 * su:at.pieces_at + 3 * su]
  copies = sum(((lengths >> bit) & 1).sum() for bit in range(4))                # MAX_PIECE = 8: 4 bits
  return _counts(w, groups, rows[:, 0].sum(), copies, backward)


def _window_counts(w: Walk, first_tile: int, backward: bool) -> dict:
  """`walk` of the window's lists, counted in numpy from its geometry (the lists cannot be built
  eagerly while tracing for a TPU): a step's union is one run of blocks, cut by slabs into pieces."""
  t0 = (first_tile + np.arange(w.num_tiles)) * w.bq
  lo, hi = np.maximum(t0 - w.window + 1, 0) // w.block, (t0 + w.bq - 1) // w.block
  lo, hi = lo.reshape(w.num_steps, -1), hi.reshape(w.num_steps, -1)
  first = lo.min(1, keepdims=True)
  union = hi.max(1) - first[:, 0] + 1
  edges = np.arange(w.num_slabs + 1) * w.slab                                  # slab s: slots [s*slab, (s+1)*slab)
  per_slab = np.clip(np.minimum((hi - first + 1)[..., None], edges[1:]) - np.maximum((lo - first)[..., None], edges[:-1]),
                     0, None)                                                  # [S, TPS, slabs]
  groups = (-(-per_slab // w.group_blocks)).sum()
  in_slab = np.clip(np.minimum(union[:, None], edges[None, 1:]) - edges[None, :-1], 0, None)   # [S, slabs]
  full, rest = in_slab // w.max_piece, in_slab % w.max_piece
  copies = full.sum() + sum(((rest >> bit) & 1).sum() for bit in range(4))
  c = _counts(w, groups * w.b * w.hkv, union.sum() * w.b * w.hkv, copies * w.b * w.hkv, backward)
  return c


def _estimate(w: Walk, first_tile, backward: bool) -> pl.CostEstimate:
  """Window: exact where the queries' offset is static (else at offset 0). Selection: the bound
  (every tile's and step's union full, nothing coalesced): the selection is data, so
  perf/nsa_time.py counts a real one with `walk`."""
  if w.kind == WINDOW:
    c = _window_counts(w, first_tile if isinstance(first_tile, int) else 0, backward)
  else:
    steps = w.b * w.hkv * w.num_steps
    c = _counts(w, steps * w.tiles_per_step * -(-w.tile_union // w.group_blocks), steps * w.step_union,
                steps * w.step_union, backward)
  return cost(c["flops"], c["transcendentals"], c["bytes"])


# ---- the pallas_calls ----

def _vmem_limit(nbytes: int) -> int:
  return int(min(48 * 2**20, max(32 * 2**20, 2 * nbytes)))   # v5p has 64 MiB per core


def _row_spec(w: Walk, width: int):
  return pl.BlockSpec((None, None, w.tiles_per_step * ROWS, width), lambda b, h, s, first: (b, h, s, 0))


def _mask_spec(w: Walk):
  if w.kind == SELECTION:
    return _row_spec(w, w.n)
  return pl.BlockSpec((None, None, w.tiles_per_step * ROWS, 1), lambda b, h, s, first: (b, 0, s, 0))


def _stat_spec(w: Walk):
  return pl.BlockSpec((None, None, w.tiles_per_step, 1, ROWS), lambda b, h, s, first: (b, h, s, 0, 0))


_ANY = pl.BlockSpec(memory_space=pl.ANY)
_PARAMS = dict(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _forward_call(w: Walk, first_tile, lists, q_rows, mask_rows, k_t, v_t):
  tps, slab_keys = w.tiles_per_step, w.slab * w.block
  vmem = (2 * tps * ROWS * (w.dk * w.itemsize + LANES * 4 + w.dv * w.itemsize) + 2 * 2 * slab_keys * (w.dk + w.dv)
          * w.itemsize + tps * ROWS * (2 * LANES + w.dv) * 4)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(w.b, w.hkv, w.num_steps),
      in_specs=[_ANY, _row_spec(w, w.dk), _mask_spec(w), _ANY, _ANY],
      out_specs=[_row_spec(w, w.dv), _stat_spec(w)],
      scratch_shapes=[pltpu.SMEM((w.list_len,), jnp.int32), pltpu.SMEM((tps,), jnp.int32),
                      pltpu.VMEM((2, slab_keys, w.dk), k_t.dtype),
                      pltpu.VMEM((2, slab_keys, w.dv), v_t.dtype), pltpu.SemaphoreType.DMA((2, 2)),
                      pltpu.VMEM((tps, ROWS, LANES), jnp.float32), pltpu.VMEM((tps, ROWS, LANES), jnp.float32),
                      pltpu.VMEM((tps, ROWS, w.dv), jnp.float32)])
  return pl.pallas_call(
      functools.partial(_fwd_kernel, w=w), grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((w.b, w.hkv, w.t * w.group, w.dv), q_rows.dtype),
                 jax.ShapeDtypeStruct((w.b, w.hkv, w.num_tiles, 1, ROWS), jnp.float32)],
      compiler_params=pltpu.CompilerParams(**_PARAMS, vmem_limit_bytes=_vmem_limit(vmem)),
      cost_estimate=_estimate(w, first_tile, backward=False), interpret=w.interpret, name=f"nsa_{w.kind}_fwd",
  )(jnp.reshape(first_tile, (1,)).astype(jnp.int32), lists, q_rows, mask_rows, k_t, v_t)


def _backward_call(w: Walk, first_tile, lists, q_rows, mask_rows, do_rows, lse_rows, delta_rows, k_t, v_t):
  tps, slab_keys = w.tiles_per_step, w.slab * w.block
  vmem = (2 * tps * ROWS * ((2 * w.dk + w.dv) * w.itemsize + LANES * 4) + 2 * slab_keys * (w.dk + w.dv)
          * (2 * w.itemsize + 2 * 4) + tps * ROWS * w.dk * 4)
  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(w.b, w.hkv, w.num_steps),
      in_specs=[_ANY, _row_spec(w, w.dk), _mask_spec(w), _row_spec(w, w.dv), _stat_spec(w), _stat_spec(w),
                _ANY, _ANY, _ANY, _ANY],
      out_specs=[_row_spec(w, w.dk), _ANY, _ANY],
      scratch_shapes=[pltpu.SMEM((w.list_len,), jnp.int32), pltpu.SMEM((tps,), jnp.int32),
                      pltpu.VMEM((2, slab_keys, w.dk), k_t.dtype),
                      pltpu.VMEM((2, slab_keys, w.dv), v_t.dtype), pltpu.VMEM((2, slab_keys, w.dk), jnp.float32),
                      pltpu.VMEM((2, slab_keys, w.dv), jnp.float32), pltpu.SemaphoreType.DMA((4, 2)),
                      pltpu.SemaphoreType.DMA((2, 2)), pltpu.VMEM((tps, ROWS, w.dk), jnp.float32)])
  return pl.pallas_call(
      functools.partial(_bwd_kernel, w=w), grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((w.b, w.hkv, w.t * w.group, w.dk), q_rows.dtype),
                 jax.ShapeDtypeStruct(k_t.shape, jnp.float32), jax.ShapeDtypeStruct(v_t.shape, jnp.float32)],
      input_output_aliases={9: 1, 10: 2},      # operands counted with the scalar-prefetch one
      compiler_params=pltpu.CompilerParams(**_PARAMS, vmem_limit_bytes=_vmem_limit(vmem)),
      cost_estimate=_estimate(w, first_tile, backward=True), interpret=w.interpret, name=f"nsa_{w.kind}_bwd",
  )(jnp.reshape(first_tile, (1,)).astype(jnp.int32), lists, q_rows, mask_rows, do_rows, lse_rows, delta_rows,
    k_t, v_t, zeros(k_t), zeros(v_t))


# ---- the two branches: lists, layout, custom_vjp ----

def _geometry(kind, q, k, v, *, block, n, window, scale, options) -> Walk:
  b, t, hq, dk = q.shape
  hkv = k.shape[2]
  group = hq // hkv
  return Walk(kind, b, t, k.shape[1], hkv, group, dk, v.shape[-1], block, n, window,
              dk ** -0.5 if scale is None else scale, options or DEFAULT_OPTIONS, jnp.dtype(k.dtype).itemsize)


def _first_tile(w: Walk, q_offset):
  if isinstance(q_offset, int):
    return q_offset // w.bq
  return jnp.asarray(q_offset, jnp.int32) // w.bq


def _lists(w: Walk, first_tile, mask_input):
  if w.kind == SELECTION:
    union, count = tile_unions(mask_input, slc_block=w.block, seq_len=w.tk, queries_per_tile=w.bq,
                               first_tile=first_tile)
  else:
    union, count = window_unions(w, first_tile)
  return step_lists(w, union, count)


def _mask_rows(w: Walk, mask_input):
  """Selection: [B, HKV, T*G, n] block indices per row; window: [B, 1, T*G, 1] doc_start per row."""
  if w.kind == SELECTION:
    return to_rows(jnp.repeat(mask_input, w.group, axis=2), w.hkv)
  doc = jnp.zeros((w.b, w.t), jnp.int32) if mask_input is None else mask_input.astype(jnp.int32)
  return to_rows(jnp.broadcast_to(doc[:, :, None, None], (w.b, w.t, w.group, 1)), 1)


def _forward(w: Walk, q, k, v, mask_input, q_offset):
  first_tile = _first_tile(w, q_offset)
  lists = _lists(w, first_tile, mask_input)
  k_t, v_t = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  out_rows, lse_rows = _forward_call(w, first_tile, lists, to_rows(q, w.hkv), _mask_rows(w, mask_input), k_t, v_t)
  return out_rows, lse_rows, lists


def _backward(w: Walk, q, k, v, mask_input, q_offset, out_rows, lse_rows, lists, dout):
  k_t, v_t = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  do_rows = to_rows(dout.astype(q.dtype), w.hkv)
  delta = jnp.sum(out_rows.astype(jnp.float32) * do_rows.astype(jnp.float32), -1).reshape(lse_rows.shape)
  dq_rows, dk_t, dv_t = _backward_call(w, _first_tile(w, q_offset), lists, to_rows(q, w.hkv),
                                       _mask_rows(w, mask_input), do_rows, lse_rows, delta, k_t, v_t)
  return (from_rows(dq_rows, w.t), dk_t.transpose(0, 2, 1, 3).astype(k.dtype),
          dv_t.transpose(0, 2, 1, 3).astype(v.dtype))


def _selection_walk(q, k, v, block_indices, slc_block, scale, options) -> Walk:
  check_supported(q.shape[1], q.shape[2], k.shape[2], slc_block)
  check_supported(k.shape[1], q.shape[2], k.shape[2], slc_block)
  return _geometry(SELECTION, q, k, v, block=slc_block, n=block_indices.shape[-1], window=0, scale=scale,
                   options=options)


def selection_forward(q, k, v, block_indices, *, slc_block: int, scale=None, options=None, q_offset=0):
  """Pallas selection attention forward: (out [B,T,HQ,Dv] in q's dtype, lse [B,T,HQ] float32),
  the same numbers as kernels.nsa.selection_attention(impl="xla"), for queries at global
  positions q_offset + [0, T) (a multiple of 128/G) against all keys k, v [B, Tk]. Needs
  G = HQ/HKV dividing 128, T and Tk multiples of 128/G and of slc_block."""
  w = _selection_walk(q, k, v, block_indices, slc_block, scale, options)
  out_rows, lse_rows, _ = _forward(w, q, k, v, block_indices, q_offset)
  return from_rows(out_rows, w.t), from_tile_rows(lse_rows, w.t)


def selection_attention(q, k, v, block_indices, q_offset, slc_block: int, scale=None, options=None):
  """Differentiable Pallas selection attention: out [B,T,HQ,Dv], the contract of
  kernels.nsa.selection_attention for queries at global positions q_offset + [0, T) (int or
  traced int32) against all keys k, v [B, Tk]."""
  w = _selection_walk(q, k, v, block_indices, slc_block, scale, options)
  return _branch(w, q, k, v, block_indices, q_offset)


def window_attention(q, k, v, doc_start, q_offset, window: int, scale=None, options=None):
  """Differentiable Pallas sliding-window attention: out [B,T,HQ,Dv], the contract of
  kernels.nsa.window_attention (query t sees t - window < s <= t, s >= doc_start[t] when given)
  for queries at q_offset + [0, T) against all keys k, v [B, Tk]."""
  check_window(q.shape[1], k.shape[1], q.shape[2], k.shape[2])
  w = _geometry(WINDOW, q, k, v, block=window_block(k.shape[1]), n=1, window=window, scale=scale, options=options)
  return _branch(w, q, k, v, doc_start, q_offset)


def _branch(w: Walk, q, k, v, mask_input, q_offset):
  if isinstance(q_offset, int):
    return _static_offset(w, q_offset)(q, k, v, mask_input)
  return _traced_offset(w)(q, k, v, mask_input, jnp.asarray(q_offset, jnp.int32))


@functools.cache
def _static_offset(w: Walk, q_offset: int):
  """The branch at a static offset (exact cost estimates); mask_input gets no gradient."""
  @jax.custom_vjp
  def branch(q, k, v, mask_input):
    return from_rows(_forward(w, q, k, v, mask_input, q_offset)[0], w.t)

  def fwd(q, k, v, mask_input):
    out_rows, lse_rows, lists = _forward(w, q, k, v, mask_input, q_offset)
    return from_rows(out_rows, w.t), (q, k, v, mask_input, out_rows, lse_rows, lists)

  def bwd(residuals, dout):
    q, k, v, mask_input, out_rows, lse_rows, lists = residuals
    return (*_backward(w, q, k, v, mask_input, q_offset, out_rows, lse_rows, lists, dout), _no_grad(mask_input))
  branch.defvjp(fwd, bwd)
  return branch


@functools.cache
def _traced_offset(w: Walk):
  @jax.custom_vjp
  def branch(q, k, v, mask_input, q_offset):
    return from_rows(_forward(w, q, k, v, mask_input, q_offset)[0], w.t)

  def fwd(q, k, v, mask_input, q_offset):
    out_rows, lse_rows, lists = _forward(w, q, k, v, mask_input, q_offset)
    return from_rows(out_rows, w.t), (q, k, v, mask_input, q_offset, out_rows, lse_rows, lists)

  def bwd(residuals, dout):
    q, k, v, mask_input, q_offset, out_rows, lse_rows, lists = residuals
    return (*_backward(w, q, k, v, mask_input, q_offset, out_rows, lse_rows, lists, dout), _no_grad(mask_input),
            _no_grad(q_offset))
  branch.defvjp(fwd, bwd)
  return branch


def _no_grad(x):
  """The cotangent of an integer input (block indices, doc_start, offsets): float0 zeros; None stays None."""
  if x is None:
    return None
  return np.zeros(np.shape(x), jax.dtypes.float0)
