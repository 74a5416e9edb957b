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
from kernels.nsa.rows import check_rows, from_rows, from_tile_rows, to_rows
from kernels.pallas_common import LANES, ROWS, cost, probs_and_dscores, softmax_finish, softmax_init, softmax_step

SELECTION, WINDOW = "selection", "window"
WINDOW_BLOCK = 64          # keys per window block: a tile of 8 queries walks w + 8 keys in blocks of 64


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
    """The largest number of tiles <= step_rows / 128 that divides the tiles."""
    most = max(1, min(self.options.step_rows // ROWS, self.num_tiles))
    return max(d for d in range(1, most + 1) if self.num_tiles % d == 0)

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
  def list_len(self) -> int:
    """int32 per step's list row (one spare: the walk may peek one past a tile's last entry)."""
    return 1 + self.step_union + self.tiles_per_step * (1 + self.tile_union) + 1

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
  """int32 [B, HKV, S, list_len]: each step's list row (module docstring) from the tile unions."""
  b, hkv, tps, tu, su = w.b, w.hkv, w.tiles_per_step, union.shape[-1], w.step_union
  flat = union.reshape(b, hkv, w.num_steps, tps * tu)
  count = count.reshape(b, hkv, w.num_steps, tps)
  valid = (jnp.arange(tu)[None, :] < count[..., None]).reshape(flat.shape)
  big = jnp.int32(w.num_blocks)
  s = jnp.sort(jnp.where(valid, flat, big), axis=-1)
  first = jnp.concatenate([jnp.ones_like(s[..., :1], bool), s[..., 1:] != s[..., :-1]], -1) & (s != big)
  blocks = jnp.sort(jnp.where(first, s, big), axis=-1)[..., :su]
  blocks = jnp.pad(blocks, [(0, 0)] * 3 + [(0, su - blocks.shape[-1])], constant_values=big)
  slots = jax.vmap(jnp.searchsorted)(blocks.reshape(-1, su), flat.reshape(-1, tps * tu)).reshape(flat.shape)
  row = [first.sum(-1, keepdims=True), jnp.where(blocks == big, 0, blocks), count, jnp.where(valid, slots, 0),
         jnp.zeros((b, hkv, w.num_steps, 1), jnp.int32)]
  return jnp.concatenate([x.astype(jnp.int32) for x in row], -1)


# ---- the walk inside a step ----

class _Lists:
  """The step's list row in SMEM."""

  def __init__(self, w: Walk, ref):
    self.w, self.ref = w, ref

  @property
  def union(self):
    return self.ref[0]

  def block(self, i):
    return self.ref[1 + i]

  def count(self, tile):
    return self.ref[1 + self.w.step_union + tile]

  def slot(self, tile, u):
    w = self.w
    return self.ref[1 + w.step_union + w.tiles_per_step + tile * w.tile_union + u]


def _walk(w: Walk, lists: _Lists, cursor, loads, sem, entry, writes=None, wsem=None):
  """Walks one step's union slab by slab. loads: [(hbm [B, HKV, Tk, D], buf [2, slab*block, D])]
  copied in per block; writes: [(buf, hbm)] copied back per block after the slab computed.
  entry(tile, block j, slab buffer, key offset in the slab) runs for every tile entry; cursor
  (SMEM [TPS]) keeps where each tile's walk stands between slabs."""
  b, h = pl.program_id(0), pl.program_id(1)
  union = lists.union
  slabs = (union + w.slab - 1) // w.slab
  blocks_in = lambda s: jnp.minimum(w.slab, union - s * w.slab)

  def each_block(s, fn):
    def one(i, carry):
      fn(i, lists.block(s * w.slab + i))
      return carry
    jax.lax.fori_loop(0, blocks_in(s), one, 0)

  def copy(src, dst, sem_ref):
    return pltpu.make_async_copy(src, dst, sem_ref)

  def at_block(j):
    return pl.ds(pl.multiple_of(j * w.block, w.block), w.block)

  def load(s, buf):
    each_block(s, lambda i, j: [copy(hbm.at[b, h, at_block(j)], vbuf.at[buf, at_block(i)], sem.at[k, buf]).start()
                                for k, (hbm, vbuf) in enumerate(loads)])

  def wait_loads(s, buf):
    each_block(s, lambda i, j: [copy(hbm.at[b, h, at_block(0)], vbuf.at[buf, at_block(0)], sem.at[k, buf]).wait()
                                for k, (hbm, vbuf) in enumerate(loads)])

  def store(s, buf):
    each_block(s, lambda i, j: [copy(vbuf.at[buf, at_block(i)], hbm.at[b, h, at_block(j)], wsem.at[k, buf]).start()
                                for k, (vbuf, hbm) in enumerate(writes)])

  def wait_stores(s, buf):
    each_block(s, lambda i, j: [copy(vbuf.at[buf, at_block(0)], hbm.at[b, h, at_block(0)], wsem.at[k, buf]).wait()
                                for k, (vbuf, hbm) in enumerate(writes)])

  @pl.when(slabs > 0)
  def _first():
    load(0, 0)

  def slab_body(s, carry):
    buf = s % 2
    wait_loads(s, buf)

    @pl.when(s + 1 < slabs)
    def _next():
      if writes:
        @pl.when(s >= 1)
        def _drain():          # slab s-1's stores read buffer 1 - buf: finish them before refilling it
          wait_stores(s - 1, 1 - buf)
      load(s + 1, 1 - buf)

    limit = jnp.minimum((s + 1) * w.slab, union)

    def tile_body(tile, carry):
      count = lists.count(tile)
      in_slab = lambda u: (u < count) & (lists.slot(tile, jnp.minimum(u, w.tile_union - 1)) < limit)

      def one(u):
        slot = lists.slot(tile, u)
        entry(tile, lists.block(slot), buf, pl.multiple_of((slot - s * w.slab) * w.block, w.block))
        return u + 1
      cursor[tile] = jax.lax.while_loop(in_slab, one, cursor[tile])
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
      wait_stores(slabs - 2, slabs % 2)

    @pl.when(slabs >= 1)
    def _last():
      wait_stores(slabs - 1, (slabs - 1) % 2)


def _tile_rows(tile):
  return pl.ds(pl.multiple_of(tile * ROWS, ROWS), ROWS)


def _masked_scores(w: Walk, q, k, mask_rows, j, query_tile):
  """scale * q k^T [128, block] in fp32 for key block j, -inf where the row may not see the key.
  mask_rows: selection [128, n] block indices of each row's query; window [128, 1] doc_start."""
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * w.scale
  query_pos = query_tile * w.bq + jax.lax.broadcasted_iota(jnp.int32, (ROWS, 1), 0) // w.group
  key_pos = j * w.block + jax.lax.broadcasted_iota(jnp.int32, (1, w.block), 1)
  visible = key_pos <= query_pos
  if w.kind == SELECTION:
    visible &= jnp.max(jnp.where(mask_rows == j, 1, 0), axis=1, keepdims=True) > 0
  else:
    visible &= (key_pos > query_pos - w.window) & (key_pos >= mask_rows)
  return jnp.where(visible, s, -jnp.inf)


def _fwd_kernel(first_tile_ref, lists_hbm, q_ref, mask_ref, k_hbm, v_hbm, o_ref, lse_ref, lists_smem, cursor, kbuf,
                vbuf, sem, m_s, l_s, acc_s, *, w: Walk):
  pltpu.sync_copy(lists_hbm.at[pl.program_id(0), pl.program_id(1), pl.program_id(2)], lists_smem)
  first = first_tile_ref[0] + pl.program_id(2) * w.tiles_per_step
  softmax_init(m_s, l_s, acc_s)

  def entry(tile, j, buf, off):
    rows = _tile_rows(tile)
    s = _masked_scores(w, q_ref[rows, :], kbuf[buf, pl.ds(off, w.block), :], mask_ref[rows, :], j, first + tile)
    softmax_step(s, vbuf[buf, pl.ds(off, w.block), :], m_s.at[tile], l_s.at[tile], acc_s.at[tile])
  _walk(w, _Lists(w, lists_smem), cursor, [(k_hbm, kbuf), (v_hbm, vbuf)], sem, entry)

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

  def entry(tile, j, buf, off):
    rows, keys = _tile_rows(tile), pl.ds(off, w.block)
    q, do, k, v = q_ref[rows, :], do_ref[rows, :], kbuf[buf, keys, :], vbuf[buf, keys, :]
    s = _masked_scores(w, q, k, mask_ref[rows, :], j, first + tile)
    p, ds = probs_and_dscores(s, lse_ref.at[tile], do, v, delta_ref.at[tile])
    dq_s[tile] += w.scale * dot(ds.astype(k.dtype), k, ((1,), (0,)))
    dkbuf[buf, keys, :] += w.scale * dot(ds.astype(q.dtype), q, ((0,), (0,)))
    dvbuf[buf, keys, :] += dot(p.astype(do.dtype), do, ((0,), (0,)))
  _walk(w, _Lists(w, lists_smem), cursor, [(k_hbm, kbuf), (v_hbm, vbuf), (dk_hbm, dkbuf), (dv_hbm, dvbuf)], sem, entry,
        writes=[(dkbuf, dk_hbm), (dvbuf, dv_hbm)], wsem=wsem)
  dq_ref[...] = dq_s[...].reshape(dq_ref.shape).astype(dq_ref.dtype)


# ---- counting: what a walk does (the CostEstimates, and perf/nsa_time.py) ----

def walk(w: Walk, lists, backward: bool = False) -> dict:
  """What one walk over these lists ([B, HKV, S, list_len], numpy or jax) costs: grid steps,
  tile entries, step-union blocks, MXU FLOPs, exps, HBM bytes and DMA descriptors."""
  lists = np.asarray(lists)
  tps, su = w.tiles_per_step, w.step_union
  union = lists[..., 0].astype(np.int64)
  entries = lists[..., 1 + su:1 + su + tps].astype(np.int64).sum()
  blocks = union.sum()
  steps = w.b * w.hkv * w.num_steps
  rows = steps * tps * ROWS
  bf, f32 = w.itemsize, 4
  per_entry = 2 * ROWS * w.block
  list_bytes = steps * w.list_len * 4
  mask_bytes = rows * 4 * w.n               # selection: n indices per row; window: doc_start per row
  kv_block = w.block * (w.dk + w.dv)
  if not backward:
    flops = entries * per_entry * (w.dk + w.dv)
    hbm = list_bytes + rows * (w.dk + w.dv) * bf + mask_bytes + rows * f32 + blocks * kv_block * bf
    dmas = steps + 2 * blocks
  else:
    flops = entries * per_entry * (3 * w.dk + 2 * w.dv)
    hbm = (list_bytes + rows * (2 * w.dk + w.dv) * bf + mask_bytes + 2 * rows * f32
           + blocks * kv_block * (bf + 2 * f32))
    dmas = steps + 6 * blocks
  return {"steps": steps, "entries": int(entries), "union_blocks": int(blocks), "flops": int(flops),
          "transcendentals": int(entries * ROWS * w.block), "bytes": int(hbm), "dmas": int(dmas)}


def _bound_lists(w: Walk) -> np.ndarray:
  """The lists of the most expensive selection the geometry allows: every tile's union full."""
  row = np.zeros((w.b, w.hkv, w.num_steps, w.list_len), np.int32)
  row[..., 0] = w.step_union
  row[..., 1 + w.step_union:1 + w.step_union + w.tiles_per_step] = w.tile_union
  return row


def _estimate(w: Walk, first_tile, backward: bool) -> pl.CostEstimate:
  """Window: exact where the queries' offset is static. Selection: the bound (every union full);
  the selection is data, so perf/nsa_time.py counts a real one with `walk`."""
  if w.kind == WINDOW:
    with jax.ensure_compile_time_eval():
      lists = np.asarray(step_lists(w, *window_unions(w, first_tile if isinstance(first_tile, int) else 0)))
  else:
    lists = _bound_lists(w)
  c = walk(w, lists, backward)
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
      scratch_shapes=[pltpu.SMEM((w.list_len,), jnp.int32), pltpu.SMEM((tps,), jnp.int32), pltpu.VMEM((2, slab_keys, w.dk), k_t.dtype),
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
      scratch_shapes=[pltpu.SMEM((w.list_len,), jnp.int32), pltpu.SMEM((tps,), jnp.int32), pltpu.VMEM((2, slab_keys, w.dk), k_t.dtype),
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
