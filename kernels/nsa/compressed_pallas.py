"""Pallas TPU kernels for NSA's compressed branch (docs/design.md §4, §7): attention over the compressed
keys (forward with lse, and one backward kernel for dq, dK and dV, behind a custom_vjp) and the
group-summed, overlap-mapped block scores that select_blocks ranks. Query t sees compressed token c
iff c*d + l - 1 <= t, c < C and c >= first[t], the first compressed token of t's document (packed
documents only: ceil(doc_start[t] / d)). The fused forward gives the attention and the block
scores in one kernel (NSA reuses the compressed branch's probabilities; kernels.nsa.
compressed_attention_and_selection runs it); the separate score kernel stays for select_blocks and
where the fused one does not apply. `walk` counts what each pallas_call does from the loop bounds
the kernels use (Geometry's methods): its numbers are the calls' CostEstimates; `walks` gives them
for the kernels a layer may run (what perf/ reports). pallas_call names: nsa_compressed_fwd,
nsa_compressed_fwd_scores (fused), nsa_compressed_bwd, nsa_compressed_scores.

rows     a tile is bq = 128 // G query positions x the G heads of one KV group: 128 matmul rows
         (kernels/nsa/rows.py). Per-row statistics (lse, delta, first) are tile rows [1, 128].
grid     (B, HKV, S), backward (B, HKV, R, S). A step is TPS tiles, the largest divisor of the tiles
         <= options.step_rows / 128 (default: 32 tiles = 256 positions at G = 16), a whole query
         range, so each step carries microseconds of MXU work. Paper shape (B=1, HKV=4, G=16):
         B * HKV * T * G / 4096 steps per kernel, 1024 at T = 65536, 2048 at T = 131072 (block
         scores: 16 per select chunk of 1024 queries, the same in total).
chunks   compressed K/V stay in HBM (memory_space ANY) as [B, HKV, C', D] in chunks of KC =
         options.key_tile tokens (512 suits a TPU best: see walk's numbers). A step walks the chunks
         its last tile sees, double-buffered: chunk k + 1 is copied while chunk k computes. The
         first chunk of a (b, h) (of a key range) stays in VMEM as a pipelined block, copied from
         HBM once and into the chunk buffer by a local DMA each step; every other chunk is one DMA
         per array and step. Nothing holds all C in VMEM: C may be 65536 (context parallelism).
walk     chunks are the outer loop, so a step copies each once; per chunk the tiles that see any
         of its tokens (from the first such tile to the step's last: later tiles see more), masked
         until the first tile that sees all of the chunk, unmasked after (packed documents: always
         masked). A tile computes a chunk over the whole sub-chunks of SUB = 128 tokens it sees (the
         chunk's first 128, 256, ...: one static width per tile loop), so nothing past a tile's last
         partial sub-chunk is computed while the DMAs stay per chunk. 128 rather than 256: v5p's
         MXU is 128 wide (a 128-key product fills it), and on average a row computes half a
         sub-chunk it cannot see, 64 of the 2048 tokens a row sees on average at T = 64k (1.03x;
         256: 1.06x). Chunks before a tile's document are walked (masked): packed rows cost what one
         document of T does.

forward  grid (B, HKV, S), all parallel. Per (tile, chunk): s = q k^T [128, width], the mask, the
         fp32 online softmax (as pallas_common's; m, l [128 * TPS, 128] and acc [128 * TPS, Dv] in
         VMEM for the step's tiles); then per tile out and lse (one log per row). HBM: q, out, lse
         (+ first) once, a chunk of K and V per step and chunk but the first, which is read once per
         (b, h). DMAs per step: 3 (+ 1) pipelined blocks, 2 per HBM chunk, 2 local.
fused    the forward, and per (tile, chunk) p = exp(s - m) (the online softmax's, m its running max
         after the chunk) mapped to the chunk's NBC = KC*d/l' blocks per ROW (each head has its own
         lse): [128, width] x [width, NBC] overlap (the chunk's first width tokens of the [KC, NBC]
         matrix every chunk shares, p in q's dtype as for p V), written to a VMEM buffer [128 * TPS,
         NBP] fp32 at the chunk's lanes (each (tile, chunk) once: no accumulation), m to [128 * TPS,
         chunks] and, for a whole chunk with l > d, its last tokens' share of the next chunk's first
         block (a VPU column) beside it. At the end of the step, per tile and chunk k: the G heads
         summed by a [bq, 128] x [128, NBC] product with the 0/1 head sum times exp(m_k - lse) per
         row (bf16: three bf16 products of split operands, ~fp32; p's bf16 rounding leaves ~2e-4 of
         a score: near-ties may swap against XLA, 99.9% of the choices agree), the spill added at the
         next chunk's first block; [TPS, bq, NBP] written once. VMEM: the buffer is 16 MiB at
         T = 64k, 32 MiB at 128k (NB = T/64): fewer tiles per step where the buffers pass
         FUSED_VMEM_LIMIT (60 MiB, vmem_limit_bytes at most that), none (the scores run
         separately) below FUSED_MIN_ROWS rows (1M tokens under context parallelism, NB = 16384).
         Chunks must cover whole blocks (on a TPU NBC a multiple of 128: KC = 512, d = 16, l' = 64
         gives 128). HBM and DMAs: the forward's, the scores' block per step, the overlap matrix
         (and spill weights) once.
backward grid (B, HKV, R, S), S sequential. A key range of chunks (R = 1 unless the fp32 dK/dV of
         all C pass DKV_RANGE_BYTES: C = 8191 at 128k fits) keeps its dK/dV in VMEM over the steps;
         the range's last step copies them to HBM, fp32 (two DMAs; XLA casts them, they are small).
         Per (tile, chunk) five matmuls: s = q k^T, dP = dO v^T, dS = p (dP - (delta - dlse)) (the
         lse cotangent enters through delta), dq += dS k (per tile, VMEM), dV += p^T dO, dK +=
         dS^T q. dq is written per step (R > 1: fp32 partials per range, summed in XLA). HBM: q,
         dO, lse, delta (+ first) and dq once per range; per step its chunks of the range; dK, dV
         once. DMAs per step: 5 (+ 1) pipelined blocks, 2 per HBM chunk, 2 local; 2 per range.
scores   grid (B, HKV, S) over one select chunk of queries, parallel. Chunks are KS = nbt * l'/d
         tokens, exactly those starting in selection blocks [k * nbt, (k + 1) * nbt) (nbt =
         options.score_blocks, on a TPU rounded up to whole lanes of 128), so one [KS, nbt]
         overlap matrix maps any chunk to its blocks. Per
         (tile, chunk): s = q k^T, p = exp(s - lse) with the attention's lse, a 0/1 [bq, 128]
         matmul sums each query's G heads (G > 1), [bq, KS] x [KS, nbt] adds the chunk's block
         scores, and where l > d a second [KS, nbt] matrix adds the tokens that reach into the next
         tile of blocks there. The step's scores [TPS, bq, NB] stay in VMEM (fewer tiles per step
         when NB is large: SCORES_OUT_BYTES) and are written once; nothing [T, C] reaches HBM.
         HBM: q, lse (+ first), the scores, K chunks as in the forward, the overlap matrices once.
         DMAs per step: 3 (+ 1) pipelined blocks, 1 per HBM chunk, 1 local.
estimate flops are the MXU products executed (masked elements of computed pairs included),
         transcendentals every exp and log, bytes every HBM copy. Exact for a static q_offset; a
         traced one is counted as the most work, the queries being the last T positions of the
         sequence the keys cover (a scan's last chunk, the last device under context parallelism).
         Paper shape, T = 65536, key_tile 512: forward 5.67 TFLOP executed for 5.49 useful (1.031x),
         12.3k DMAs, 3.6 GiB; backward 14.73 for 14.28 TFLOP, 14.4k DMAs, 5.1 GiB; block scores (64
         calls) 3.71 TFLOP, 8.1k DMAs, 3.3 GiB; fused forward 8.05 TFLOP (the forward's 5.67, the
         overlap 2.27, the head sums 0.12), 13.3k DMAs, 4.6 GiB, for the 9.38 of forward and scores.
         (Whole 512-token chunks: 1.125x; key_tile 128: 1.03x with 37k DMAs per kernel.)
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import DEFAULT_OPTIONS, KernelOptions, Unsupported
from kernels.nsa.rows import check_rows, from_rows, from_tile_rows, tiles_per_step, to_rows, to_tile_rows
from kernels.pallas_common import LANES, ROWS, column, cost, probs, probs_and_dscores, softmax_init

FORWARD, BACKWARD, SCORES, FUSED = "forward", "backward", "scores", "fused"
NAMES = {FORWARD: "nsa_compressed_fwd", BACKWARD: "nsa_compressed_bwd", SCORES: "nsa_compressed_scores",
         FUSED: "nsa_compressed_fwd_scores"}                                   # pallas_call names
DKV_RANGE_BYTES = 12 << 20      # backward: fp32 dK/dV one key range keeps in VMEM (8192 keys of 192 + 128)
SCORES_OUT_BYTES = 4 << 20      # block scores: a step's [TPS, bq, NB] fp32 output block
SUB_KEYS = 128                  # compressed tokens per sub-chunk: a tile computes the sub-chunks of a chunk it sees
VMEM_LIMIT = 64 << 20           # the most any kernel asks for (v5e, v5p and v6e have more)
FUSED_VMEM_LIMIT = 60 << 20     # the fused forward: its buffers + 4 MiB must fit (v5p: 64 MiB per core)
FUSED_MIN_ROWS = 1024           # fused forward: fewer rows per step for VMEM than this, and the scores run separately
_NEVER = np.iinfo(np.int32).max


# Geometry's index arithmetic runs on ints and numpy arrays (walk) and on traced int32 (the kernels).

def _traced(*xs) -> bool:
  return any(isinstance(x, jax.Array) for x in xs)


def _max(a, b):
  return jnp.maximum(a, b) if _traced(a, b) else np.maximum(a, b)


def _min(a, b):
  return jnp.minimum(a, b) if _traced(a, b) else np.minimum(a, b)


def _where(c, a, b):
  return jnp.where(c, a, b) if _traced(c, a, b) else np.where(c, a, b)


def _clip(x, lo, hi):
  return _min(_max(x, lo), hi)


def _div(a, b: int):
  """a // b for a >= 0: truncating lax.div when traced (jnp's floor division lowers through `sign`,
  which Mosaic can lower only knowing the chip)."""
  return jax.lax.div(a, jnp.int32(b)) if _traced(a) else a // b


class Geometry(NamedTuple):
  """Static geometry of one compressed-branch pallas_call (queries of one call, all its keys)."""
  b: int
  t: int                  # query positions
  hkv: int
  group: int
  dk: int
  dv: int                 # 0 for block scores
  c: int                  # compressed tokens the kernel may read
  block_len: int          # l
  stride: int             # d
  chunk: int              # compressed tokens per K/V DMA
  tiles_per_step: int
  chunks_per_range: int   # backward: chunks of one key range (whose fp32 dK/dV stay in VMEM)
  dtype: np.dtype         # q, K, V, out and dq (lse, scores and the kernel's dK, dV are fp32)
  scale: float
  options: KernelOptions
  blocks_per_chunk: int = 0   # scores: nbt selection blocks per chunk
  num_blocks: int = 0         # scores: NB
  sub: int = 0                # compressed tokens per sub-chunk (what a tile computes of a chunk: whole sub-chunks)
  slc_block: int = 0          # fused forward: l' (blocks_per_chunk = NBC blocks per chunk, num_blocks = NB)

  @property
  def bq(self) -> int:
    return ROWS // self.group

  @property
  def num_tiles(self) -> int:
    return self.t // self.bq

  @property
  def num_steps(self) -> int:
    return self.num_tiles // self.tiles_per_step

  @property
  def step_rows(self) -> int:
    return self.tiles_per_step * ROWS

  @property
  def num_chunks(self) -> int:
    return -(-self.c // self.chunk)

  @property
  def subs(self) -> int:
    """Sub-chunks per chunk."""
    return self.chunk // self.sub

  @property
  def num_ranges(self) -> int:
    return -(-self.num_chunks // self.chunks_per_range)

  @property
  def padded_keys(self) -> int:
    """Compressed tokens of the [B, HKV, C', D] copies the kernels read (whole chunks and ranges)."""
    return self.num_ranges * self.chunks_per_range * self.chunk

  @property
  def block_tiles(self) -> int:
    """Scores: tiles of nbt selection blocks, one per chunk of keys."""
    return -(-self.num_blocks // self.blocks_per_chunk)

  @property
  def spills(self) -> bool:
    """Scores: compressed tokens reach into the next chunk's blocks (l > d), and there is one."""
    return self.block_len > self.stride and self.block_tiles > 1

  @property
  def score_lanes(self) -> int:
    """Fused forward: NBP >= NB, the blocks of the step's scores (whole chunks' windows of NBC)."""
    nbc = self.blocks_per_chunk
    return -(-max(self.num_blocks, self.num_chunks * nbc) // nbc) * nbc

  @property
  def score_windows(self) -> int:
    return self.score_lanes // self.blocks_per_chunk

  @property
  def chunk_lanes(self) -> int:
    """Fused forward: lanes of the per-(row, chunk) statistics (whole lanes of 128)."""
    return -(-self.num_chunks // LANES) * LANES

  @property
  def fused_spills(self) -> bool:
    """Fused forward: a chunk's last tokens reach into the next chunk's first block (l > d)."""
    return self.block_len > self.stride

  @property
  def spill_keys(self) -> int:
    """Scores: the chunk's last tokens whose spill into the next tile of blocks is computed (the
    last sub-chunk, or the whole chunk if more tokens than that reach past it)."""
    reach = max(0, -(-(self.block_len - self.stride) // self.stride))
    return self.sub if reach <= self.sub else self.chunk

  @property
  def itemsize(self) -> int:
    return np.dtype(self.dtype).itemsize

  @property
  def interpret(self):
    return self.options.interpret_params()

  def visible(self, tile):
    """Compressed tokens the last query of global tile `tile` sees (int, or traced int32)."""
    return _min(_div(_max((tile + 1) * self.bq - self.block_len + self.stride, 0), self.stride), self.c)

  def chunks(self, tile):
    """Chunks global tile `tile` needs."""
    return _div(self.visible(tile) + self.chunk - 1, self.chunk)

  def full_tile(self, chunk):
    """The first global tile whose every query sees all of `chunk` (a huge number if it has padding)."""
    last = (chunk + 1) * self.chunk - 1
    return _where(last < self.c, _div(last * self.stride + self.block_len - 1 + self.bq - 1, self.bq), _NEVER // 2)

  def first_tile(self, chunk):
    """The first global tile that sees a token of `chunk` (its first query is c*d + l - 1)."""
    return _div(chunk * self.chunk * self.stride + self.block_len - 1, self.bq)

  def token_tile(self, token):
    """The first global tile that sees compressed token `token` (a huge number past C)."""
    return _where(token < self.c, _div(token * self.stride + self.block_len - 1, self.bq), _NEVER // 2)

  def width_bounds(self, tile0, chunk, first, full):
    """[first, b_1, ..., b_{subs-1}, full]: the step's masked tiles [first, full) of `chunk` (step
    tiles from global tile0) computed over i whole sub-chunks are [b_{i-1}, b_i): those that see a
    token of sub-chunk i - 1 but none of sub-chunk i (the tiles from `full` on see all of it)."""
    inner = [_clip(self.token_tile(chunk * self.chunk + i * self.sub) - tile0, first, full) for i in range(1, self.subs)]
    return [first, *inner, full]


def _chunk(key_tile: int, c: int) -> int:
  """options.key_tile, or fewer when C is smaller (whole bf16 sublane tiles of 16)."""
  return max(1, min(key_tile, -(-c // 16) * 16))


def _sub(chunk: int) -> int:
  """SUB_KEYS tokens per sub-chunk where they divide the chunk, else the whole chunk."""
  sub = min(SUB_KEYS, chunk)
  return sub if chunk % sub == 0 else chunk


def attention_geometry(b, t, hq, hkv, dk, dv, c, block_len, stride, *, dtype=jnp.bfloat16, scale=None,
                       options=None) -> Geometry:
  """The geometry of compressed_attention's forward and backward calls (raises kernels.Unsupported)."""
  options = options or DEFAULT_OPTIONS
  group = check_rows(t, hq, hkv)
  chunk = _chunk(options.key_tile, c)
  num_chunks = -(-c // chunk)
  per_range = max(1, min(num_chunks, DKV_RANGE_BYTES // (_padded_bytes((chunk, dk), 4) + _padded_bytes((chunk, dv), 4))))
  per_range = -(-num_chunks // -(-num_chunks // per_range))          # balance the ranges
  return Geometry(b, t, hkv, group, dk, dv, c, block_len, stride, chunk,
                  tiles_per_step(t // (ROWS // group), options.step_rows), per_range, np.dtype(dtype),
                  dk ** -0.5 if scale is None else scale, options, sub=_sub(chunk))


def scores_geometry(b, qc, hq, hkv, dk, c, block_len, stride, slc_block, num_blocks, *, dtype=jnp.bfloat16,
                    scale=None, options=None) -> Geometry:
  """The geometry of one block_scores call over a select chunk of qc queries."""
  options = options or DEFAULT_OPTIONS
  group = check_rows(qc, hq, hkv)
  nbt = options.score_blocks if options.interpret else -(-options.score_blocks // LANES) * LANES   # aligned lanes
  nbt = min(nbt, num_blocks)
  chunk = nbt * slc_block // stride
  block_tiles = -(-num_blocks // nbt)
  bq = ROWS // group
  most = min(options.step_rows // ROWS, max(1, SCORES_OUT_BYTES // (bq * block_tiles * nbt * 4)))
  c = min(c, block_tiles * chunk)
  return Geometry(b, qc, hkv, group, dk, 0, c, block_len, stride, chunk, tiles_per_step(qc // bq, most * ROWS),
                  -(-c // chunk), np.dtype(dtype), dk ** -0.5 if scale is None else scale, options, nbt, num_blocks,
                  _sub(chunk))


def fused_geometry(b, t, hq, hkv, dk, dv, c, block_len, stride, slc_block, num_blocks, *, dtype=jnp.bfloat16,
                   scale=None, options=None, docs: bool = True):
  """The geometry of the fused forward (attention and block scores of NB = num_blocks selection
  blocks), or None where it does not apply and the scores run separately (block_scores): chunks
  must cover whole blocks (KC*d a multiple of l', on a TPU NBC = KC*d/l' a multiple of 128 lanes),
  the spill of a chunk reach only the next chunk's first block from its last sub-chunk, and the
  step's buffers fit FUSED_VMEM_LIMIT with at least FUSED_MIN_ROWS rows per step (fewer tiles per
  step than the attention's where NB is large)."""
  options = options or DEFAULT_OPTIONS
  g = attention_geometry(b, t, hq, hkv, dk, dv, c, block_len, stride, dtype=dtype, scale=scale, options=options)
  if slc_block % stride or (g.chunk * stride) % slc_block:
    return None
  nbc = g.chunk * stride // slc_block
  reach = max(0, -(-(block_len - stride) // stride))
  if reach > g.sub or block_len - stride > slc_block:
    return None
  if options.targets_tpu and (nbc % LANES or g.sub % LANES):
    return None
  g = g._replace(blocks_per_chunk=nbc, num_blocks=num_blocks, slc_block=slc_block)
  for tps in sorted((d for d in range(1, g.tiles_per_step + 1) if g.num_tiles % d == 0), reverse=True):
    fg = g._replace(tiles_per_step=tps)
    blocks, scratch, f32 = _forward_buffers(fg, docs, True)
    if _vmem_need(blocks, scratch + f32) + (4 << 20) <= FUSED_VMEM_LIMIT:
      return fg if tps * ROWS >= FUSED_MIN_ROWS or tps == g.tiles_per_step else None
  return None


def _static_offset(q_offset):
  """q_offset as a Python int, or None when it is traced."""
  try:
    return int(q_offset)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def offset_tiles(g: Geometry, q_offset=None) -> int:
  """The global index of the call's first tile; q_offset None (traced): the estimates' assumption,
  the queries are the last T positions of the (C - 1) * d + l the keys cover."""
  if q_offset is None:
    covered = (g.c - 1) * g.stride + g.block_len
    q_offset = max(0, -(-covered // g.bq) * g.bq - g.t)
  return q_offset // g.bq


# ---- what a call does, counted from the kernels' loop bounds ----

def walk(g: Geometry, kernel: str, q_offset=None, docs: bool = False) -> dict:
  """What one pallas_call of `kernel` (FORWARD, BACKWARD or SCORES) does, from the loops the kernel
  runs: grid steps, MXU flops, transcendentals (exp and log), HBM bytes (the CostEstimate), DMA
  descriptors issued and the bytes they move (the BlockSpec pipeline's block copies, the scalar
  prefetch, the in-kernel K/V chunk copies from HBM and each step's local copy of its lead chunk,
  VMEM to VMEM), the HBM chunk copies alone (chunk_dmas, chunk_bytes) and the (tile, chunk) pairs
  computed. q_offset: an int, or None for the traced case (offset_tiles). The pipeline copies a
  block when its index changes: per step the row blocks, per (b, h) (per key range in the
  backward) the lead chunk and dK/dV, once per call the overlap matrices."""
  tile0, tps, isz, kc, rows = offset_tiles(g, q_offset), g.tiles_per_step, g.itemsize, g.chunk, ROWS
  ranges = g.num_ranges if kernel == BACKWARD else 1
  pairs = subs = spills = copied = local = 0
  for step in range(g.num_steps):
    first = tile0 + step * tps
    needed = int(g.chunks(first + tps - 1))
    for r in range(ranges):
      lo = r * g.chunks_per_range
      hi = min(lo + g.chunks_per_range, needed) if kernel == BACKWARD else needed
      copied += max(0, hi - lo - 1)                # from HBM; the lead chunk from its pipeline block
      local += hi > lo
      chunks = np.arange(lo, hi)
      tiles, widths, whole = _tile_widths(g, first, chunks, docs)      # per chunk, as the kernels' tile loops
      pairs += int(tiles.sum())
      subs += int(widths.sum())
      spills += int(whole[chunks + 1 < g.block_tiles].sum()) if kernel == SCORES else 0
  heads = g.b * g.hkv
  stats = tps * rows * 4                                  # a step's tile rows (lse, delta, first)
  kv = [kc * g.dk * isz] + ([kc * g.dv * isz] if kernel != SCORES else [])   # a chunk's K (and V)
  sub = g.sub
  if kernel in (FORWARD, FUSED):
    flops = subs * 2 * rows * sub * (g.dk + g.dv)
    exps = subs * rows * sub + pairs * rows + g.num_steps * tps * rows      # exp(s - m) and alpha; log l per row
    step_bytes = [g.step_rows * g.dk * isz, g.step_rows * g.dv * isz, stats] + [stats] * docs
    range_bytes = kv
    if kernel == FUSED:      # p x overlap per (tile, sub-chunk); per (tile, chunk) the head sum; exp(m - lse)
      nbc, passes = g.blocks_per_chunk, 1 if g.dtype == np.float32 else 3       # _split_dot
      flops += subs * 2 * rows * sub * nbc + pairs * passes * 2 * g.bq * rows * nbc
      exps += g.num_steps * tps * rows * g.chunk_lanes
      step_bytes += [tps * g.bq * g.score_lanes * 4]
  elif kernel == BACKWARD:
    flops = subs * 2 * rows * sub * (3 * g.dk + 2 * g.dv)
    exps = subs * rows * sub
    dq_bytes = g.step_rows * g.dk * (isz if ranges == 1 else 4)
    step_bytes = [g.step_rows * g.dk * isz, g.step_rows * g.dv * isz, stats, stats, dq_bytes] + [stats] * docs
    range_keys = g.chunks_per_range * kc
    range_bytes = kv + [range_keys * g.dk * 4, range_keys * g.dv * 4]          # lead chunk in, fp32 dK and dV out
  elif kernel == SCORES:
    nbt, bq = g.blocks_per_chunk, g.bq
    per_sub = 2 * rows * sub * g.dk + (2 * bq * rows * sub if g.group > 1 else 0) + 2 * bq * sub * nbt
    flops = subs * per_sub + (spills * 2 * bq * g.spill_keys * nbt if g.spills else 0)
    exps = subs * rows * sub
    step_bytes = [g.step_rows * g.dk * isz, stats, tps * bq * g.block_tiles * nbt * 4] + [stats] * docs
    range_bytes = kv
  else:
    raise ValueError(f"kernel={kernel!r}: one of {FORWARD}, {BACKWARD}, {SCORES}, {FUSED}")
  call_bytes = [4] + ([kc * g.blocks_per_chunk * 4] * (1 + g.spills) if kernel == SCORES else [])
  call_bytes += ([kc * g.blocks_per_chunk * isz] + [g.sub * 4] * g.fused_spills) if kernel == FUSED else []
  steps = heads * ranges * g.num_steps
  chunk_dmas, chunk_bytes = heads * copied * len(kv), heads * copied * sum(kv)
  total = steps * sum(step_bytes) + heads * ranges * sum(range_bytes) + chunk_bytes + sum(call_bytes)
  dmas = steps * len(step_bytes) + heads * ranges * len(range_bytes) + chunk_dmas + len(call_bytes)
  return dict(steps=steps, flops=heads * flops, transcendentals=heads * exps, bytes=total,
              dmas=dmas + heads * local * len(kv), dma_bytes=total + heads * local * sum(kv), chunk_dmas=chunk_dmas,
              chunk_bytes=chunk_bytes, pairs=heads * pairs, sub_pairs=heads * subs)


def _tile_widths(g: Geometry, first: int, chunks: np.ndarray, docs: bool):
  """Per chunk of a step whose tiles start at global tile `first`: (tiles computed, (tile,
  sub-chunk) pairs computed, tiles computed over the whole chunk), from the kernels' loop bounds."""
  tps = g.tiles_per_step
  lo = np.clip(g.first_tile(chunks) - first, 0, tps)
  full = np.full_like(lo, tps) if docs else np.clip(g.full_tile(chunks) - first, lo, tps)
  bounds = g.width_bounds(first, chunks, lo, full)
  widths = sum((i + 1) * (bounds[i + 1] - bounds[i]) for i in range(g.subs)) + (tps - full) * g.subs
  return tps - lo, widths, tps - bounds[-2]


def walks(b: int, t: int, hq: int, hkv: int, dk: int, dv: int, block_len: int, stride: int, slc_block: int, *,
          dtype=jnp.bfloat16, options=None, docs: bool = False) -> dict:
  """{pallas_call name: walk} of every kernel one layer's compressed branch may run on one device,
  queries at 0: the backward, and either the fused forward (nsa_compressed_fwd_scores, where
  fused_geometry applies: kernels.nsa.compressed_attention_and_selection runs it) or the forward
  and block scores (compressed_attention + select_blocks; the scores summed over select_blocks'
  calls, one per chunk of options.select_chunk queries, the last padded). A layer runs one of the
  two: look its traced pallas_calls up by name, do not sum the dict."""
  options = options or DEFAULT_OPTIONS
  c = (t - block_len) // stride + 1
  num_blocks = -(-t // slc_block)
  g = attention_geometry(b, t, hq, hkv, dk, dv, c, block_len, stride, dtype=dtype, options=options)
  qc = min(options.select_chunk, t)
  sg = scores_geometry(b, qc, hq, hkv, dk, c, block_len, stride, slc_block, num_blocks, dtype=dtype,
                       options=options)
  scores = [walk(sg, SCORES, start, docs) for start in range(0, t, qc)]
  fg = fused_geometry(b, t, hq, hkv, dk, dv, c, block_len, stride, slc_block, num_blocks, dtype=dtype,
                      options=options, docs=docs)
  return {NAMES[FORWARD]: walk(g, FORWARD, 0, docs), NAMES[BACKWARD]: walk(g, BACKWARD, 0, docs),
          NAMES[SCORES]: {k: sum(w[k] for w in scores) for k in scores[0]},
          **({NAMES[FUSED]: walk(fg, FUSED, 0, docs)} if fg else {})}


def _estimate(g: Geometry, kernel: str, q_offset, docs: bool) -> pl.CostEstimate:
  w = walk(g, kernel, q_offset, docs)
  return cost(w["flops"], w["transcendentals"], w["bytes"])


def _padded_bytes(shape, itemsize: int) -> int:
  """VMEM bytes of an array: the last dim in lanes of 128, the one before in sublane tiles."""
  *lead, rows, lanes = shape
  sublanes = 8 * (4 // itemsize)
  return int(np.prod(lead, dtype=np.int64)) * -(-rows // sublanes) * sublanes * -(-lanes // LANES) * LANES * itemsize


def _vmem_need(blocks, scratch) -> int:
  """VMEM bytes of the buffers: pipelined blocks twice, scratch once."""
  return 2 * sum(_padded_bytes(s, i) for s, i in blocks) + sum(_padded_bytes(s, i) for s, i in scratch)


def _compiler_params(semantics, blocks, scratch, most: int = VMEM_LIMIT) -> pltpu.CompilerParams:
  """vmem_limit_bytes from the buffers, and a quarter more plus 4 MiB for the compiler's
  temporaries (a pair's [128, KC] fp32 scores and products), at most `most`."""
  need = _vmem_need(blocks, scratch)
  return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=min(most, need + need // 4 + (4 << 20)))


# ---- the loop every kernel shares ----

def _walk_chunks(g: Geometry, tile0, lo, hi, lead, copies_from, sem, pair, docs: bool):
  """Chunks [lo, hi) of one (b, h), double-buffered: chunk k + 1 is in flight while chunk k computes.
  Chunk lo comes from `lead` (its K (and V) [KC, D] blocks, which the BlockSpec pipeline keeps per
  (b, h) or key range) by a local VMEM copy; the others from HBM. Per chunk, pair(k, j, refs, masked,
  width) for the step's tiles j from the first that sees a token of chunk k to the last: masked up
  to the first tile that sees all of it, unmasked from there (with documents, masked throughout),
  over the chunk's first `width` tokens: the whole sub-chunks the tile sees (static, one loop each).
  copies_from: (HBM [C', D] ref, VMEM [2, KC, D] buffer) per array."""
  def copies(ch, slot):
    return [pltpu.make_async_copy(src.at[pl.ds(pl.multiple_of(ch * g.chunk, g.chunk), g.chunk)], buf.at[slot],
                                  sem.at[i, slot]) for i, (src, buf) in enumerate(copies_from)]
  lead_copies = [pltpu.make_async_copy(src.at[0, 0], buf.at[0], sem.at[i, 0]) for i, (src, (_, buf)) in
                 enumerate(zip(lead, copies_from))]     # a squeezed block cannot be a DMA source

  def tiles(ch, refs):
    def loop(lo, hi, masked, width):
      def tile(j, carry):
        pair(ch, j, refs, masked, width)
        return carry
      jax.lax.fori_loop(lo, hi, tile, 0)
    first = jnp.clip(g.first_tile(ch) - tile0, 0, g.tiles_per_step)
    full = g.tiles_per_step if docs else jnp.clip(g.full_tile(ch) - tile0, first, g.tiles_per_step)
    bounds = g.width_bounds(tile0, ch, first, full)
    for i in range(g.subs):        # masked tiles over the sub-chunks they see: 1, 2, ... of them
      loop(bounds[i], bounds[i + 1], True, (i + 1) * g.sub)
    if not docs:
      loop(full, g.tiles_per_step, False, g.chunk)

  @pl.when(lo < hi)
  def _start():
    for copy in lead_copies:
      copy.start()

  def chunk(ch, carry):
    slot = jax.lax.rem(ch - lo, 2)

    @pl.when(ch == lo)
    def _wait_lead():
      for copy in lead_copies:
        copy.wait()

    @pl.when(ch > lo)
    def _wait():
      for copy in copies(ch, slot):
        copy.wait()

    @pl.when(ch + 1 < hi)
    def _prefetch():
      for copy in copies(ch + 1, 1 - slot):
        copy.start()
    tiles(ch, [buf.at[slot] for _, buf in copies_from])
    return carry
  jax.lax.fori_loop(lo, hi, chunk, 0)


def _tile_rows(j):
  return pl.ds(pl.multiple_of(j * ROWS, ROWS), ROWS)


def _scores(g: Geometry, q, k, tile, ch, masked: bool, first=None):
  """scale * q k^T [128, KC] fp32 for global tile `tile` and chunk `ch`; masked: -inf where the
  row's query cannot see the token (in its future, past C, or before first [128, 1], its document's)."""
  keys = k.shape[0]
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * g.scale
  if not masked:
    return s
  row = jax.lax.broadcasted_iota(jnp.int32, (ROWS, 1), 0)
  pos = tile * g.bq + jax.lax.shift_right_logical(row, g.group.bit_length() - 1)    # G | 128: a power of two
  token = ch * g.chunk + jax.lax.broadcasted_iota(jnp.int32, (1, keys), 1)
  last = jnp.where(token < g.c, token * g.stride + g.block_len - 1, _NEVER)       # its block's last position
  seen = last <= pos
  if first is not None:
    seen = seen & (token >= first)
  return jnp.where(seen, s, -jnp.inf)


def _dot(a, b, contract=(1, 0)):
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=jnp.float32)


def first_rows(doc_start, b: int, t: int, group: int, stride: int):
  """int32 [B, 1, T*G, 1]: per row (query t, head g) the first compressed token of its document."""
  first = jnp.zeros((b, t), jnp.int32) if doc_start is None else -(-doc_start.astype(jnp.int32) // stride)
  return to_rows(jnp.broadcast_to(first[:, :, None, None], (b, t, group, 1)), 1)


def _first_tile_rows(g: Geometry, doc_start):
  """first_rows as tile rows [B, 1, NQ, 1, 128] (one lane-dense row per tile, shared by the KV heads)."""
  return first_rows(doc_start, g.b, g.t, g.group, g.stride).reshape(g.b, 1, g.num_tiles, 1, ROWS)


def _keys_t(g: Geometry, x_BCHD):
  """[B, C, HKV, D] -> [B, HKV, C', D]: a head's compressed tokens contiguous, padded to C'."""
  x = x_BCHD.transpose(0, 2, 1, 3)[:, :, :g.c]
  return jnp.pad(x, [(0, 0), (0, 0), (0, g.padded_keys - x.shape[2]), (0, 0)])


# ---- attention: forward (and, fused, the block scores) ----

def _online_step(s, v, m_ref, l_ref, acc_ref):
  """pallas_common.softmax_step over masked scores s [R, keys] (fp32), also returning p = exp(s - m)
  [R, keys] and the running max m [R, 1] it used (-inf where the row has seen nothing yet, p = 0)."""
  m_prev = m_ref[...][:, :1]
  m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
  p = jnp.exp(s - m_safe)
  alpha = jnp.exp(m_prev - m_safe)
  l_ref[...] = jnp.broadcast_to(alpha * l_ref[...][:, :1] + jnp.sum(p, axis=1, keepdims=True), l_ref.shape)
  acc_ref[...] = alpha * acc_ref[...] + _dot(p.astype(v.dtype), v)
  m_ref[...] = jnp.broadcast_to(m_next, m_ref.shape)
  return p, m_next


def _split_dot(a, b, dtype):
  """a b for fp32 a, b: one product in `dtype` where that is fp32, else (bf16) three: a_hi b_hi +
  a_lo b_hi + a_hi b_lo, each operand split into its rounding to dtype and the rest (the products'
  relative error ~2^-16 rather than 2^-8)."""
  if dtype == jnp.float32:
    return _dot(a, b)
  hi = lambda x: x.astype(dtype)
  a_hi, b_hi = hi(a), hi(b)
  a_lo, b_lo = hi(a - a_hi.astype(jnp.float32)), hi(b - b_hi.astype(jnp.float32))
  return _dot(a_hi, b_hi) + _dot(a_lo, b_hi) + _dot(a_hi, b_lo)


def _head_sum(g: Geometry):
  """[bq, 128] float32 0/1: row q sums tile rows q*G .. q*G + G - 1 (query q's heads; G = 1: identity)."""
  row_query = jax.lax.shift_right_logical(jax.lax.broadcasted_iota(jnp.int32, (g.bq, ROWS), 1),
                                          g.group.bit_length() - 1)
  return (row_query == jax.lax.broadcasted_iota(jnp.int32, (g.bq, ROWS), 0)).astype(jnp.float32)


def _forward_kernel(offset_ref, q_ref, k_lead, v_lead, k_hbm, v_hbm, *refs, g, docs, fused):
  first_ref, refs = (refs[0], refs[1:]) if docs else (None, refs)
  spill = fused and g.fused_spills
  if fused:
    own_ref, refs = refs[0], refs[1:]
    spill_ref, refs = (refs[0], refs[1:]) if spill else (None, refs)
    o_ref, lse_ref, scores_ref, k_buf, v_buf, sem, m_scratch, l_scratch, acc_scratch, *fused_refs = refs
    buf, m_chunks, spill_chunks, f_t, spill_t = fused_refs if spill else (*fused_refs[:2], None, fused_refs[2], None)
  else:
    o_ref, lse_ref, k_buf, v_buf, sem, m_scratch, l_scratch, acc_scratch = refs
  b, h, step = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  tile0 = offset_ref[0] + step * g.tiles_per_step
  softmax_init(m_scratch, l_scratch, acc_scratch)
  nbc = g.blocks_per_chunk
  window = lambda k: pl.ds(pl.multiple_of(k * nbc, nbc), nbc)
  chunk_lane = lambda ch: jax.lax.broadcasted_iota(jnp.int32, (1, g.chunk_lanes), 1) == ch
  if fused:
    scores_ref[...] = jnp.zeros(scores_ref.shape, jnp.float32)
    m_chunks[...] = jnp.full(m_chunks.shape, -jnp.inf, jnp.float32)
    if spill:
      spill_chunks[...] = jnp.zeros(spill_chunks.shape, jnp.float32)

  def pair(ch, j, kv, masked, width):
    rows = _tile_rows(j)
    s = _scores(g, q_ref[rows], kv[0][:width], tile0 + j, ch, masked, column(first_ref.at[j]) if docs else None)
    p, m = _online_step(s, kv[1][:width], m_scratch.at[rows], l_scratch.at[rows], acc_scratch.at[rows])
    if fused:         # per row: the chunk's blocks from p = exp(s - m), and the m used (rescaled at the end)
      buf[rows, window(ch)] = _dot(p.astype(own_ref.dtype), own_ref[:width])
      m_chunks[rows] = jnp.where(chunk_lane(ch), m, m_chunks[rows])
      if spill and width == g.chunk:      # the last tokens' share of the next chunk's first block
        reach = jnp.sum(p[:, g.chunk - g.sub:] * spill_ref[...], axis=1, keepdims=True)
        spill_chunks[rows] = jnp.where(chunk_lane(ch), reach, spill_chunks[rows])
  _walk_chunks(g, tile0, 0, g.chunks(tile0 + g.tiles_per_step - 1), (k_lead, v_lead),
               [(k_hbm.at[b, h], k_buf), (v_hbm.at[b, h], v_buf)], sem, pair, docs)
  heads = _head_sum(g) if fused else None

  def finish_scores(j, rows, lse_row):
    """Block scores of tile j's queries: chunk k's blocks times exp(m_k - lse) per row, the G heads
    summed by one [bq, 128] x [128, NBC] product per chunk ((0/1 head sum) * the row factors)."""
    m_t = m_chunks[rows].T                                                  # [chunks, 128]
    live = (m_t > -jnp.inf) & (lse_row > -jnp.inf)
    f_t[...] = jnp.where(live, jnp.exp(jnp.where(live, m_t - lse_row, 0.0)), 0.0)
    if spill:
      spill_t[...] = spill_chunks[rows].T * f_t[...]
      first_lane = jax.lax.broadcasted_iota(jnp.int32, (g.bq, nbc), 1) == 0
      spilled = lambda k: jnp.where(first_lane, jnp.sum(heads * spill_t[pl.ds(k, 1), :], axis=1, keepdims=True), 0.0)
    chunks = g.chunks(tile0 + j)

    def chunk(k, carry):
      w = _split_dot(heads * f_t[pl.ds(k, 1), :], buf[rows, window(k)], g.dtype)
      if spill:
        w = w + jnp.where(k > 0, spilled(jnp.maximum(k - 1, 0)), 0.0)
      scores_ref[j, :, window(k)] = w
      return carry
    jax.lax.fori_loop(0, chunks, chunk, 0)
    if spill:
      @pl.when((chunks > 0) & (chunks < g.score_windows))
      def _last_spill():
        scores_ref[j, :, window(chunks)] = spilled(chunks - 1)

  def finish(j, carry):       # out = acc / l, lse = m + log l (one log per row); 0 and -inf if unseen
    rows = _tile_rows(j)
    l, m = l_scratch[rows][:, :1], m_scratch[rows][:, :1]
    seen = l > 0
    o_ref[rows] = jnp.where(seen, acc_scratch[rows] / jnp.where(seen, l, 1.0), 0.0).astype(o_ref.dtype)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
    lse_row = jnp.broadcast_to(lse, (ROWS, LANES)).T[:1]
    lse_ref[j] = lse_row
    if fused:
      finish_scores(j, rows, lse_row)
    return carry
  jax.lax.fori_loop(0, g.tiles_per_step, finish, 0)


def _row_specs(g: Geometry, widths, index):
  """BlockSpecs of a step's rows [B, HKV, T*G, width] per width, then ("stats") tile rows."""
  return [pl.BlockSpec((None, None, g.step_rows, w), lambda *a: (*index(*a), 0)) if w != "stats" else
          pl.BlockSpec((None, None, g.tiles_per_step, 1, ROWS), lambda *a: (*index(*a), 0, 0)) for w in widths]


def _first_spec(g: Geometry, index):
  return pl.BlockSpec((None, None, g.tiles_per_step, 1, ROWS), lambda *a: (index(*a)[0], 0, index(*a)[2], 0, 0))


def _forward_buffers(g: Geometry, docs: bool, fused: bool):
  """(pipelined blocks, scratch in q's dtype, fp32 scratch) of the forward, as (shape, itemsize)."""
  stats = ((g.tiles_per_step, 1, ROWS), 4)
  blocks = [((g.step_rows, g.dk), g.itemsize), ((g.chunk, g.dk), g.itemsize), ((g.chunk, g.dv), g.itemsize),
            ((g.step_rows, g.dv), g.itemsize), stats] + [stats] * docs
  scratch = [((2, g.chunk, g.dk), g.itemsize), ((2, g.chunk, g.dv), g.itemsize)]
  f32 = [((g.step_rows, LANES), 4), ((g.step_rows, LANES), 4), ((g.step_rows, g.dv), 4)]
  if fused:
    spill = g.fused_spills
    blocks += [((g.chunk, g.blocks_per_chunk), g.itemsize)] + [((1, g.sub), 4)] * spill
    blocks += [((g.tiles_per_step, g.bq, g.score_lanes), 4)]
    f32 += [((g.step_rows, g.score_lanes), 4)] + [((g.step_rows, g.chunk_lanes), 4)] * (1 + spill)
    f32 += [((g.chunk_lanes, ROWS), 4)] * (1 + spill)
  return blocks, scratch, f32


def _forward(g: Geometry, offset, static_offset, q_rows, first, k_t, v_t):
  """(out rows [B, HKV, T*G, Dv], lse tile rows [B, HKV, NQ, 1, 128] fp32); fused (g.num_blocks):
  also the block scores [B, HKV, NQ, bq, NBP] fp32."""
  docs, fused = first is not None, g.num_blocks > 0
  spill = fused and g.fused_spills
  index = lambda b, h, s, offset: (b, h, s)
  hbm = pl.BlockSpec(memory_space=pl.ANY)
  lead = lambda w: pl.BlockSpec((1, 1, g.chunk, w), lambda b, h, s, offset: (b, h, 0, 0))
  blocks, scratch, f32 = _forward_buffers(g, docs, fused)
  fixed = lambda shape: pl.BlockSpec(shape, lambda *a: (0, 0))
  in_specs = _row_specs(g, [g.dk], index) + [lead(g.dk), lead(g.dv), hbm, hbm] + ([_first_spec(g, index)] if docs else [])
  out_specs = _row_specs(g, [g.dv, "stats"], index)
  out_shape = [jax.ShapeDtypeStruct((g.b, g.hkv, g.t * g.group, g.dv), q_rows.dtype),
               jax.ShapeDtypeStruct((g.b, g.hkv, g.num_tiles, 1, ROWS), jnp.float32)]
  extra = []
  if fused:
    own, reach = overlap_tiles(g.block_len, g.stride, g.slc_block, g.blocks_per_chunk)
    extra = [jnp.asarray(own, g.dtype)] + [jnp.asarray(reach[g.chunk - g.sub:, :1].T)] * spill
    in_specs += [fixed((g.chunk, g.blocks_per_chunk))] + [fixed((1, g.sub))] * spill
    out_specs += [pl.BlockSpec((None, None, g.tiles_per_step, g.bq, g.score_lanes), lambda b, h, s, o: (b, h, s, 0, 0))]
    out_shape += [jax.ShapeDtypeStruct((g.b, g.hkv, g.num_tiles, g.bq, g.score_lanes), jnp.float32)]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(g.b, g.hkv, g.num_steps), in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM(s, g.dtype) for s, _ in scratch] + [pltpu.SemaphoreType.DMA((2, 2))]
                     + [pltpu.VMEM(s, jnp.float32) for s, _ in f32])
  kernel = FUSED if fused else FORWARD
  return pl.pallas_call(
      functools.partial(_forward_kernel, g=g, docs=docs, fused=fused), grid_spec=grid_spec, name=NAMES[kernel],
      out_shape=out_shape,
      compiler_params=_compiler_params(("parallel",) * 3, blocks, scratch + f32,
                                       FUSED_VMEM_LIMIT if fused else VMEM_LIMIT),
      cost_estimate=_estimate(g, kernel, static_offset, docs), interpret=g.interpret,
  )(offset, q_rows, k_t, v_t, k_t, v_t, *([first] if docs else []), *extra)


# ---- attention: backward (dq, dK, dV in one walk) ----

def _backward_kernel(offset_ref, q_ref, do_ref, lse_ref, delta_ref, k_lead, v_lead, k_hbm, v_hbm, *refs, g, docs):
  first_ref, refs = (refs[0], refs[1:]) if docs else (None, refs)
  dq_ref, dk_hbm, dv_hbm, k_buf, v_buf, sem, out_sem, dq_scratch, dk_scratch, dv_scratch = refs
  b, h, r, step = (pl.program_id(i) for i in range(4))
  tile0 = offset_ref[0] + step * g.tiles_per_step

  @pl.when(step == 0)
  def _init_range():
    dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
    dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)
  dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)
  lo = r * g.chunks_per_range

  def pair(ch, j, kv, masked, width):
    rows, keys = _tile_rows(j), pl.ds(pl.multiple_of((ch - lo) * g.chunk, g.chunk), width)
    q, do, k, v = q_ref[rows], do_ref[rows], kv[0][:width], kv[1][:width]
    s = _scores(g, q, k, tile0 + j, ch, masked, column(first_ref.at[j]) if docs else None)
    p, ds = probs_and_dscores(s, lse_ref.at[j], do, v, delta_ref.at[j])   # delta - dlse: the lse cotangent
    ds = ds * g.scale
    dq_scratch[rows] += _dot(ds.astype(k.dtype), k)
    dv_scratch[keys] += _dot(p.astype(do.dtype), do, (0, 0))
    dk_scratch[keys] += _dot(ds.astype(q.dtype), q, (0, 0))
  hi = jnp.minimum(lo + g.chunks_per_range, g.chunks(tile0 + g.tiles_per_step - 1))
  _walk_chunks(g, tile0, lo, hi, (k_lead, v_lead), [(k_hbm.at[b, h], k_buf), (v_hbm.at[b, h], v_buf)], sem, pair,
               docs)
  dq_ref[...] = dq_scratch[...].astype(dq_ref.dtype)

  @pl.when(step == pl.num_programs(3) - 1)
  def _finish_range():       # fp32 straight from the accumulators (dK/dV are small; no output block)
    keys = pl.ds(pl.multiple_of(lo * g.chunk, g.chunk), g.chunks_per_range * g.chunk)
    copies = [pltpu.make_async_copy(acc, out.at[b, h, keys], out_sem.at[i])
              for i, (acc, out) in enumerate([(dk_scratch, dk_hbm), (dv_scratch, dv_hbm)])]
    for copy in copies:
      copy.start()
    for copy in copies:
      copy.wait()


def _backward(g: Geometry, offset, static_offset, q_rows, do_rows, lse_rows, delta_rows, first, k_t, v_t):
  """(dq rows [B, HKV, T*G, Dk] in q's dtype (R > 1: fp32 partials summed), dK, dV [B, HKV, C', D] fp32)."""
  docs, ranges, keys = first is not None, g.num_ranges, g.chunks_per_range * g.chunk
  index = lambda b, h, r, s, offset: (b, h, s)
  hbm = pl.BlockSpec(memory_space=pl.ANY)
  dq_dtype = g.dtype if ranges == 1 else jnp.float32
  dq_spec = pl.BlockSpec((None, None, None, g.step_rows, g.dk), lambda b, h, r, s, offset: (r, b, h, s, 0))
  lead = lambda w: pl.BlockSpec((1, 1, g.chunk, w), lambda b, h, r, s, offset: (b, h, r * g.chunks_per_range, 0))
  stats = ((g.tiles_per_step, 1, ROWS), 4)
  blocks = [((g.step_rows, g.dk), g.itemsize), ((g.step_rows, g.dv), g.itemsize), stats, stats,
            ((g.chunk, g.dk), g.itemsize), ((g.chunk, g.dv), g.itemsize),
            ((g.step_rows, g.dk), np.dtype(dq_dtype).itemsize)] + [stats] * docs
  scratch = [((2, g.chunk, g.dk), g.itemsize), ((2, g.chunk, g.dv), g.itemsize), ((g.step_rows, g.dk), 4),
             ((keys, g.dk), 4), ((keys, g.dv), 4)]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(g.b, g.hkv, ranges, g.num_steps),
      in_specs=_row_specs(g, [g.dk, g.dv, "stats", "stats"], index) + [lead(g.dk), lead(g.dv), hbm, hbm]
               + ([_first_spec(g, index)] if docs else []),
      out_specs=[dq_spec, hbm, hbm],
      scratch_shapes=[pltpu.VMEM(s, g.dtype) for s, _ in scratch[:2]]
                     + [pltpu.SemaphoreType.DMA((2, 2)), pltpu.SemaphoreType.DMA((2,))]
                     + [pltpu.VMEM(s, jnp.float32) for s, _ in scratch[2:]])
  dq, dk_t, dv_t = pl.pallas_call(
      functools.partial(_backward_kernel, g=g, docs=docs), grid_spec=grid_spec, name=NAMES[BACKWARD],
      out_shape=[jax.ShapeDtypeStruct((ranges, g.b, g.hkv, g.t * g.group, g.dk), dq_dtype),
                 jax.ShapeDtypeStruct(k_t.shape, jnp.float32), jax.ShapeDtypeStruct(v_t.shape, jnp.float32)],
      compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary"), blocks, scratch),
      cost_estimate=_estimate(g, BACKWARD, static_offset, docs), interpret=g.interpret,
  )(offset, q_rows, do_rows, lse_rows, delta_rows, k_t, v_t, k_t, v_t, *([first] if docs else []))
  return (dq[0] if ranges == 1 else jnp.sum(dq, 0).astype(g.dtype)), dk_t, dv_t


# ---- attention: the custom_vjp ----

def compressed_attention(q, k_cmp, v_cmp, q_offset, block_len: int, stride: int, scale=None, options=None,
                         doc_start=None):
  """(out [B,T,HQ,Dv] in q's dtype, lse [B,T,HQ] fp32, -inf where nothing is visible): the contract
  of kernels.nsa.compressed_attention for queries at global positions q_offset + [0, T) (an int
  or traced int32, a multiple of 128/G), doc_start [B, T] of packed documents or None; forward and
  backward are Pallas kernels. q, k_cmp, v_cmp share a dtype. Needs C >= 1."""
  b, t, hq, dk = q.shape
  g = attention_geometry(b, t, hq, k_cmp.shape[2], dk, v_cmp.shape[-1], k_cmp.shape[1], block_len, stride,
                         dtype=q.dtype, scale=scale, options=options)
  first = None if doc_start is None else _first_tile_rows(g, doc_start)
  return _compressed(q, k_cmp, v_cmp, jnp.asarray(q_offset, jnp.int32), first, g, _static_offset(q_offset))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _compressed(q, k_cmp, v_cmp, q_offset, first, g, static_offset):
  return _compressed_fwd(q, k_cmp, v_cmp, q_offset, first, g, static_offset)[0]


def _offset(g: Geometry, q_offset):
  """int32 [1] scalar prefetch: the global index of the first query tile."""
  return (q_offset // g.bq).reshape(1)


def _compressed_fwd(q, k_cmp, v_cmp, q_offset, first, g, static_offset):
  out_rows, lse_rows = _forward(g, _offset(g, q_offset), static_offset, to_rows(q, g.hkv), first,
                                _keys_t(g, k_cmp), _keys_t(g, v_cmp))
  return (from_rows(out_rows, g.t), from_tile_rows(lse_rows, g.t)), (q, k_cmp, v_cmp, q_offset, first, out_rows,
                                                                     lse_rows)


def _compressed_bwd(g, static_offset, residuals, cotangents):
  q, k_cmp, v_cmp, q_offset, first, out_rows, lse_rows = residuals
  dout, dlse = cotangents
  do_rows = to_rows(dout.astype(q.dtype), g.hkv)
  # d lse / d s = p, so the lse cotangent enters as dS = p * (dO V^T - (delta - dlse)).
  delta = jnp.sum(out_rows.astype(jnp.float32) * do_rows.astype(jnp.float32), -1).reshape(lse_rows.shape)
  delta_rows = delta - to_tile_rows(dlse.astype(jnp.float32), g.hkv)
  dq_rows, dk_t, dv_t = _backward(g, _offset(g, q_offset), static_offset, to_rows(q, g.hkv), do_rows, lse_rows,
                                  delta_rows, first, _keys_t(g, k_cmp), _keys_t(g, v_cmp))
  unpad = lambda x, like: x[:, :, :like.shape[1]].transpose(0, 2, 1, 3).astype(like.dtype)
  return from_rows(dq_rows, g.t).astype(q.dtype), unpad(dk_t, k_cmp), unpad(dv_t, v_cmp), None, None


_compressed.defvjp(_compressed_fwd, _compressed_bwd)


def compressed_attention_and_scores(q, k_cmp, v_cmp, q_offset, block_len: int, stride: int, slc_block: int,
                                    num_blocks: int, scale=None, options=None, doc_start=None, geometry=None):
  """compressed_attention's (out, lse) and float32 block scores [B, HKV, T, num_blocks] (as
  block_scores gives them, per KV head: its G heads summed) from one forward kernel: the online
  softmax's p = exp(s - m) mapped to blocks per row and rescaled by exp(m - lse) at the end of the
  step. The scores get no gradient. geometry: fused_geometry's (None: it is computed; raises
  kernels.Unsupported where it does not apply)."""
  b, t, hq, dk = q.shape
  args = (b, t, hq, k_cmp.shape[2], dk, v_cmp.shape[-1], k_cmp.shape[1], block_len, stride)
  kw = dict(dtype=q.dtype, scale=scale, options=options)
  g = attention_geometry(*args, **kw)
  fg = geometry or fused_geometry(*args, slc_block, num_blocks, docs=doc_start is not None, **kw)
  if fg is None:
    raise Unsupported("slc_block", slc_block, "the fused block scores do not apply here (see fused_geometry)")
  first = None if doc_start is None else _first_tile_rows(g, doc_start)
  out, lse, scores = _compressed_scored(q, k_cmp, v_cmp, jnp.asarray(q_offset, jnp.int32), first, g, fg,
                                        _static_offset(q_offset))
  return out, lse, jax.lax.stop_gradient(scores.reshape(b, g.hkv, t, -1)[..., :num_blocks])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _compressed_scored(q, k_cmp, v_cmp, q_offset, first, g, fg, static_offset):
  return _scored_fwd(q, k_cmp, v_cmp, q_offset, first, g, fg, static_offset)[0]


def _scored_fwd(q, k_cmp, v_cmp, q_offset, first, g, fg, static_offset):
  out_rows, lse_rows, scores = _forward(fg, _offset(fg, q_offset), static_offset, to_rows(q, g.hkv), first,
                                        _keys_t(fg, k_cmp), _keys_t(fg, v_cmp))
  return ((from_rows(out_rows, g.t), from_tile_rows(lse_rows, g.t), scores),
          (q, k_cmp, v_cmp, q_offset, first, out_rows, lse_rows))


def _scored_bwd(g, fg, static_offset, residuals, cotangents):
  return _compressed_bwd(g, static_offset, residuals, cotangents[:2])        # the scores have no gradient


_compressed_scored.defvjp(_scored_fwd, _scored_bwd)


# ---- block scores for select_blocks ----

@functools.cache
def overlap_tiles(block_len: int, stride: int, slc_block: int, blocks_per_tile: int):
  """(own [KS, nbt], previous [KS, nbt]) float32: |tokens of compressed c ∩ selection block j| / d
  for c in a chunk of KS = nbt*l'/d tokens and j in its tile of nbt blocks (own), and for the same
  tokens and the next tile's blocks (previous: what the previous chunk spills into a tile). Every
  chunk looks the same because it covers exactly its blocks' span (KS*d = nbt*l')."""
  keys = blocks_per_tile * slc_block // stride
  c = np.arange(-keys, keys)[:, None]
  j = np.arange(blocks_per_tile)[None, :]
  w = np.maximum(0, np.minimum(c * stride + block_len, (j + 1) * slc_block)
                 - np.maximum(c * stride, j * slc_block)) / stride
  return w[keys:].astype(np.float32), w[:keys].astype(np.float32)


def _scores_kernel(offset_ref, q_ref, lse_ref, k_lead, k_hbm, own_ref, *refs, g, docs, spill):
  prev_ref, refs = (refs[0], refs[1:]) if spill else (None, refs)
  first_ref, refs = (refs[0], refs[1:]) if docs else (None, refs)
  out_ref, k_buf, sem = refs
  b, h, step = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  tile0 = offset_ref[0] + step * g.tiles_per_step
  nbt = g.blocks_per_chunk
  out_ref[...] = jnp.zeros(out_ref.shape, jnp.float32)
  heads = _head_sum(g)
  blocks = lambda ch: pl.ds(pl.multiple_of(ch * nbt, nbt), nbt) if g.block_tiles > 1 else slice(None)

  def pair(ch, j, kv, masked, width):
    s = _scores(g, q_ref[_tile_rows(j)], kv[0][:width], tile0 + j, ch, masked,
                column(first_ref.at[j]) if docs else None)
    p = probs(s, lse_ref.at[j])                                         # [128, width]
    if g.group > 1:     # each query's G heads summed: [bq, 128] 0/1 times p
      p = _dot(heads, p)
    out_ref[j, :, blocks(ch)] += _dot(p, own_ref[:width])
    if spill and width == g.chunk:      # only the chunk's last tokens reach into the next tile of blocks (l > d)
      @pl.when(ch + 1 < g.block_tiles)
      def _spill():
        out_ref[j, :, blocks(ch + 1)] += _dot(p[:, g.chunk - g.spill_keys:], prev_ref[g.chunk - g.spill_keys:])
  _walk_chunks(g, tile0, 0, g.chunks(tile0 + g.tiles_per_step - 1), (k_lead,), [(k_hbm.at[b, h], k_buf)], sem,
               pair, docs)


def block_scores(q_chunk, lse_chunk, k_cmp, chunk_start, *, block_len: int, stride: int, slc_block: int,
                 num_blocks: int, scale=None, options=None, doc_start=None):
  """float32 [B, Qc, HKV, num_blocks]: for queries chunk_start + [0, Qc) the selection-block
  importance sum_{g, c} w(c, j) p_cmp[g, c] of NSA (the XLA reference's block_scores of the
  group-summed compressed probabilities), with p_cmp = exp(s - lse) from the compressed
  attention's lse. chunk_start (int or traced int32) must be a multiple of 128/G, as must Qc.
  doc_start [B, Qc]: packed documents (a document's tokens count from its first compressed token)."""
  b, qc, hq, dk = q_chunk.shape
  g = scores_geometry(b, qc, hq, k_cmp.shape[2], dk, k_cmp.shape[1], block_len, stride, slc_block, num_blocks,
                      dtype=q_chunk.dtype, scale=scale, options=options)
  docs, spill, nbt = doc_start is not None, g.spills, g.blocks_per_chunk
  own, prev = (jnp.asarray(w) for w in overlap_tiles(block_len, stride, slc_block, nbt))
  k_t = k_cmp.transpose(0, 2, 1, 3)[:, :, :g.c]
  k_t = jnp.pad(k_t, [(0, 0), (0, 0), (0, g.num_chunks * g.chunk - g.c), (0, 0)])
  padded_blocks = g.block_tiles * nbt
  index = lambda b, h, s, offset: (b, h, s)
  fixed = pl.BlockSpec((g.chunk, nbt), lambda *a: (0, 0))
  out_block = (g.tiles_per_step, g.bq, padded_blocks)
  blocks = [((g.step_rows, dk), g.itemsize), ((g.tiles_per_step, 1, ROWS), 4), ((g.chunk, dk), g.itemsize),
            ((g.chunk, nbt), 4),
            (out_block, 4)] + [((g.chunk, nbt), 4)] * spill + [((g.tiles_per_step, 1, ROWS), 4)] * docs
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(g.b, g.hkv, g.num_steps),
      in_specs=_row_specs(g, [dk, "stats"], index)
               + [pl.BlockSpec((1, 1, g.chunk, dk), lambda b, h, s, offset: (b, h, 0, 0)),
                  pl.BlockSpec(memory_space=pl.ANY), fixed]
               + [fixed] * spill + ([_first_spec(g, index)] if docs else []),
      out_specs=pl.BlockSpec((None, None, *out_block), lambda b, h, s, offset: (b, h, s, 0, 0)),
      scratch_shapes=[pltpu.VMEM((2, g.chunk, dk), g.dtype), pltpu.SemaphoreType.DMA((1, 2))])
  out = pl.pallas_call(
      functools.partial(_scores_kernel, g=g, docs=docs, spill=spill), grid_spec=grid_spec, name=NAMES[SCORES],
      out_shape=jax.ShapeDtypeStruct((g.b, g.hkv, g.num_tiles, g.bq, padded_blocks), jnp.float32),
      compiler_params=_compiler_params(("parallel",) * 3, blocks, [((2, g.chunk, dk), g.itemsize)]),
      cost_estimate=_estimate(g, SCORES, _static_offset(chunk_start), docs), interpret=g.interpret,
  )(_offset(g, jnp.asarray(chunk_start, jnp.int32)), to_rows(q_chunk, g.hkv), to_tile_rows(lse_chunk, g.hkv), k_t,
    k_t, own, *([prev] if spill else []), *([_first_tile_rows(g, doc_start)] if docs else []))
  return out.reshape(g.b, g.hkv, g.t, -1)[..., :num_blocks].transpose(0, 2, 1, 3)
