"""DSA's selected-row traffic on the SparseCores: rows = table[indices] (the forward's gather) and
table[indices] += rows (the backward's dkv), by indirect DMA streams, so that no TensorCore scalar
unit issues one descriptor per selected row (docs/design.md §7, §11).

Chips (jax's `pltpu.get_tpu_info().sparse_core`, tpu_info.py, jax 0.10.2; the same table is in the
Pallas guide "SparseCore Kernel Writing"): v5p 4 SparseCores x 16 vector subcores, 512 KiB VMEM per
subcore, 8 lanes; v6e 2 x 16, 256 KiB; v5e none. The compiled call names SparseCores 0-3 on
v5p (shared by the chip's two TensorCores) and 0-1 on v6e.

What the hardware and Mosaic accept (jax 0.10.2 with its libtpu, ahead-of-time compiles):
  words    an indirect DMA moves 32-bit elements only ("'tpu.enqueue_indirect_dma' op Not
           implemented: only 32-bit elements are supported"), so a bf16 row of D values is
           gathered as W = D/2 uint32 words (`pack_words`: pairs of neighbouring columns).
  tiling   with TensorCore tiling (8, 128) the row's W words must be a multiple of 128 ("expected
           slice size (288) to be aligned with source (gather operand) tiling (128)"): the
           512-wide latent (W=256) gathers in place. V3.2's full 576-wide row (W=288) needs
           SparseCore tiling (rows stored linearly, 1152 B each, no padding); XLA then copies the
           table into that layout and the gathered rows back out of it around the call (one pass
           each, visible in the compiled HLO). Split rows avoid both: the latent in place, the
           64-wide rope part (W=32) linear, its copies 1/9 of the row bytes.
  indices  must sit in the subcore's VMEM and be a ref (an index *value* must be exactly 8
           lanes: "Only 1D vectors with lane_count elements are supported for offsets").
  HBM      a gather cannot go HBM -> HBM: rows land in VMEM, then a plain DMA writes them out.

Split: the M indices are cut evenly over every vector subcore of every SparseCore (64 workers on
v5p, 32 on v6e); a worker walks its part in windows of `window` rows (at most 64 KiB of words:
32 rows of 288 words, 64 of 256). Per
window it issues 3 descriptors: the window's indices HBM -> VMEM, ONE indirect stream of `window`
rows HBM -> VMEM, and one contiguous write VMEM -> HBM. Two slots: window s+1's indices and
rows are in flight while window s is written out.

Bytes per gathered row of D bf16 (1152 B at V3.2): the SC reads it (1152 B) and writes the copy
(1152 B); the TensorCore kernel reads the copy back in large contiguous blocks (1152 B): 3456 B,
3x an ideal direct gather and more than the TensorCore walk's 2560 B per row (XLA pads
[T, 1, 576] bf16 to 2-row tiles). The SparseCores win on descriptors, not on bytes.

How the TensorCore consumes it (overlap): gather one chunk of queries' rows ahead. For query
chunk c+1 the SC kernel writes rows [64 queries x 2048, W] while the TensorCore's attention
kernel reads chunk c's rows with ordinary BlockSpec blocks (one query's 2048 rows = 2.4 MB, one
DMA per block, no scalar-core row loop). Both calls sit in one jit: XLA runs the SparseCore call
asynchronously (its HLO is a `call-start` with async_execution_thread="sparsecore" and a
`call-done`) and schedules TensorCore work between them (checked ahead-of-time for v6e: a
TensorCore fusion sits between the two). The TensorCore kernel reads the
uint32 words and splits them in VMEM (low half: even columns, high half: odd columns); apply the
same column order to q (and undo it on out) instead of interleaving back, as a dot product is
indifferent to the order of its terms.

Time per V3.2 layer walk (an ESTIMATE, no TPU measured here): T=131072 queries x 2048 rows x
1152 B = 309 GB gathered, 927 GB of HBM traffic with the copy: HBM-bound at the chip's bandwidth
(perf/chips.py; perf/dsa_time.py prices the whole layer, XLA's unpack pass included). SparseCore
rate: the guide's benchmark gathers 4,194,304 rows of 512 B in 4.05 ms (~1.0 TB/s read+write,
the notebook's printed chip is a TPU 7x) vs 18.1 ms for jnp.take on the TensorCore; at that rate
the walk's 618 GB of SC traffic takes ~0.6 s, overlapped with TensorCore work. Descriptors: 3
per 32-row window, 25M per walk spread over 64 (v5p) or 32 (v6e) subcores, against 268M
row DMAs issued by TensorCore scalar cores (~20 ns each, docs/design.md §7: 5.4 s).

Scatter-add (`scatter_add_rows`): fp32 gradient rows [M, D] added into the table [N, D] with
`pltpu.make_async_copy(rows_vmem, table_hbm.at[idx_vmem]).start(add=True)`, an indirect stream whose
DMA engine adds into the destination (tpu.enqueue_indirect_dma add=true). The table is a jax Ref,
aliased in and out of the kernel: donated, no copy (memory analysis: temp 0 B at D=512).
  accepted (ahead-of-time, jax 0.10.2 and its libtpu, probed by hand 2026-12-07; the tests pin 512
           and 576): TensorCore tiling with D a multiple of 128 and at least 256 (compiled: 256, 512,
           640 on v5p and v6e, 384 on v6e). D=576 and D=64 fail ("'tpu.
           enqueue_indirect_dma' op Not implemented: expected slice size (576) to be aligned with
           target (scatter operand) tiling (128)"), and so do D=128 and every SparseCore (linear)
           layout: "IndirectStreamAddStartOp doesn't support transfer from source memory space
           TileSpmem to destination memory space HBM with offset memory space TileSpmem" (the same
           for 8-row offset vectors, IndirectVectorStreamAddStartOp). So `add_width` pads: 576 -> 640,
           64 -> 256. Padding inside the call costs XLA a copy of the table in and out (at N=131072,
           D=576: 0.8-1.0 GB of temporaries, 3 copies in the HLO); hold dkv as [N, 640] across calls
           instead, and the calls chain in place.
  interpreted the plain interpreter has no DMA with add ("DMA partial discharge add=True not yet
           implemented.") and drops writes into an aliased ref, so there the kernel takes the table
           as an input, copies it to its output and adds row after row (`_interpret_add`): it checks
           the windows, the split and the pipeline, not the DMA engine's add.
Windows: the same split as the gather (every vector subcore, `window` rows per stream, 16 rows of
640 words, 32 of 512). Per window 3 descriptors: the indices HBM -> VMEM, the rows HBM -> VMEM (one
contiguous copy), ONE indirect add stream VMEM -> HBM. Window s+1 loads while window s adds.
Races, who adds to a row:
  - one worker: its add streams run one at a time (window s's starts after s-1's wait).
  - one stream: repeated indices inside one window rely on the DMA engine applying each offset's
    add in turn. Not verified here (no TPU). The DSA layout has none: the rows are query-major, a
    window (16 or 32) divides the 2048 rows of one query, and one query's top-k rows are distinct,
    except the top-k's -1 padding mapped to a real row, whose gradient is zero but still a repeat.
  - across workers (64 on v5p, 32 on v6e, all concurrent): repeats are the rule (a key chosen by
    many queries). Correct only if the engine's add is an atomic read-modify-write per 32-bit
    element. X
    subcores add into the same 32 offsets of shared VMEM at once and asserts exact sums; an HBM
    destination is the same op but unverified here. If a TPU shows lost adds, sort the indices and
    give each worker whole runs, or segment-sum first.
  The order of fp32 adds to one row is then unspecified: results match np.add.at to rounding
  (bitwise in the interpreter, which adds in index order).
Bytes per added row of D fp32 (2304 B at D=576, 2560 B padded to 640): the SC reads the row
(2560 B) and the add stream reads and writes the table row (2 x 2560 B): 7680 B, 3x the row.
Per V3.2 layer (an ESTIMATE, no TPU measured here): T=131072 queries x 2048 rows = 268M rows x
2560 B = 687 GB of gradient rows, 2062 GB of HBM traffic (1855 GB if 576 lowered unpadded),
HBM-bound at the chip's bandwidth (perf/chips.py: 0.75 s on v5p, 1.26 s on v6e). At the guide's
measured SparseCore gather rate (~1.06 TB/s read+write, 4,194,304 rows of 512 B in 4.05 ms on a
TPU 7x; no scatter-add rate is published) it is ~1.9 s. Descriptors:
3 per 16-row window, 50M per layer, 0.79M per subcore on v5p, 1.6M on v6e; the TensorCore walk's
one DMA per row each way would be 537M. Per call of 2048 x 64 rows: 335 MB of rows,
1.0 GB of traffic, 0.36 ms on v5p at the HBM bound.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import tpu_sc as plsc

from kernels import DEFAULT_OPTIONS, KernelOptions, Unsupported

WINDOW_BYTES = 64 * 1024   # rows per indirect stream: at most this many bytes of words
INTERPRET_CHIP = jax.sharding.AbstractDevice(device_kind="TPU v5", num_cores=2, platform="tpu")
INTERPRET_WORKERS = (2, 2)  # (cores, subcores) emulated by a loop in Pallas's plain interpreter


def device_kind() -> str:
  """The chip the kernels target: the current mesh's device (ahead-of-time) or the local one."""
  abstract = jax.sharding.get_abstract_mesh().abstract_device
  return abstract.device_kind if abstract is not None else jax.devices()[0].device_kind


def sparse_cores():
  """The target chip's SparseCoreInfo (cores, subcores, lanes, VMEM), or None: no SparseCores,
  or no TPU target."""
  try:
    return pltpu.get_tpu_info().sparse_core
  except ValueError:           # "Unsupported TPU device kind: cpu"
    return None


def resolve_gather(options: KernelOptions) -> str:
  """options.dsa_gather resolved: sparsecore or tensorcore (auto: sparsecore where the target
  TPU has SparseCores). Forced sparsecore on a TPU without them raises kernels.Unsupported."""
  has_sc = options.targets_tpu and sparse_cores() is not None
  if options.dsa_gather == "auto":
    return "sparsecore" if has_sc else "tensorcore"
  if options.dsa_gather == "sparsecore" and options.targets_tpu and not has_sc:
    raise _no_sparsecores()
  return options.dsa_gather


def _no_sparsecores() -> Unsupported:
  return Unsupported("kernels.dsa_gather", "sparsecore",
                     f"the target chip ({device_kind()}) has no SparseCores (v5p and v6e have them); "
                     "use tensorcore or auto")


def pack_words(table):
  """[N, D] 16-bit -> [N, D/2] uint32: columns 2j (low half) and 2j+1 (high half) in word j."""
  n, d = table.shape
  return jax.lax.bitcast_convert_type(table.reshape(n, d // 2, 2), jnp.uint32)


def unpack_words(words, dtype):
  """pack_words' inverse: [M, W] uint32 -> [M, 2W] dtype."""
  return jax.lax.bitcast_convert_type(words, dtype).reshape(words.shape[0], -1)


def gather_rows(table, indices, *, options=None):
  """table [N, D], indices int32 [M] -> [M, D] = table[indices]. On the SparseCores
  (options.dsa_gather, `resolve_gather`) a 16-bit table goes as words (`pack_words`, D even; two
  XLA passes, over the table and over the gathered rows: a consumer kernel should take
  `gather_words` and split the words itself), M must be a multiple of `row_multiple()`, and every
  index must lie in [0, N): map the top-k's -1 padding to a real row and mask it where the rows are
  used. On the tensorcore path, jnp.take."""
  options = options or DEFAULT_OPTIONS
  if resolve_gather(options) == "tensorcore":
    return jnp.take(table, indices, axis=0)
  if table.dtype.itemsize == 4:
    return gather_words(table, indices, options=options)
  return unpack_words(gather_words(pack_words(table), indices, options=options), table.dtype)


@dataclasses.dataclass(frozen=True)
class _Plan:
  cores: int
  subcores: int
  window: int               # rows per indirect stream
  rows: int                 # M
  words: int                # W, 32-bit words per row
  compiled: bool

  @property
  def workers(self):
    return self.cores * self.subcores

  @property
  def steps(self):
    return self.rows // (self.workers * self.window)


def _window(words: int) -> int:
  """Rows per stream: a power of two, 8 to 128, at most WINDOW_BYTES of words (two slots fit v6e's 256 KiB)."""
  rows = 8
  while rows < 128 and 2 * rows * words * 4 <= WINDOW_BYTES:
    rows *= 2
  return rows


def _workers(options: KernelOptions) -> tuple[int, int]:
  """(SparseCores, vector subcores per core) of the target chip; INTERPRET_WORKERS off TPU."""
  if not options.targets_tpu:
    return INTERPRET_WORKERS
  info = sparse_cores()
  if info is None:
    raise _no_sparsecores()
  return info.num_cores, info.num_subcores


def row_multiple(words: int, options=None) -> int:
  """M must be a multiple of this: every subcore of every SparseCore gets whole windows."""
  cores, subcores = _workers(options or DEFAULT_OPTIONS)
  return cores * subcores * _window(words)


def gather_words(words, indices, *, options=None):
  """words [N, W] 32-bit, indices int32 [M] -> [M, W] = words[indices], on the SparseCores:
  compiled for the target TPU, or in Pallas's plain interpreter (CPU; TPU interpret mode cannot
  simulate an indirect DMA in jax 0.10.2) with INTERPRET_WORKERS emulated by a loop."""
  options = options or DEFAULT_OPTIONS
  (_, w), (m,) = words.shape, indices.shape
  if words.dtype.itemsize != 4:
    raise ValueError(f"gather_words: {words.dtype} rows; the SparseCores' indirect DMAs move 32-bit words")
  plan = _Plan(*_workers(options), window=_window(w), rows=m, words=w, compiled=options.targets_tpu)
  if m % (plan.workers * plan.window):
    raise Unsupported("rows", m, f"a multiple of {plan.workers * plan.window} (SparseCore workers x rows per stream)")
  return _call(plan, words.dtype)(words, indices.astype(jnp.int32))


def _mesh(plan: _Plan):
  if plan.compiled:
    return plsc.VectorSubcoreMesh(core_axis_name="core", subcore_axis_name="subcore")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("chip",), abstract_device=INTERPRET_CHIP)):
    return plsc.VectorSubcoreMesh(core_axis_name="core", subcore_axis_name="subcore", num_cores=1, num_subcores=1)


def _call(plan: _Plan, dtype):
  tc_tiling = plan.words % 128 == 0       # tiled rows gather in place; others need linear rows
  return pl.kernel(
      functools.partial(_kernel, plan=plan),
      out_type=jax.ShapeDtypeStruct((plan.rows, plan.words), dtype),
      mesh=_mesh(plan),
      scratch_types=[pltpu.VMEM((2, plan.window), jnp.int32), pltpu.VMEM((2, plan.window, plan.words), dtype),
                     pltpu.SemaphoreType.DMA((3, 2))],
      compiler_params=pltpu.CompilerParams(use_tc_tiling_on_sc=tc_tiling) if plan.compiled else None,
      interpret=not plan.compiled,
      cost_estimate=pl.CostEstimate(flops=0, transcendentals=0, bytes_accessed=plan.rows * (8 * plan.words + 4)),
  )


def _kernel(table_hbm, idx_hbm, out_hbm, idx_vmem, rows_vmem, sem, *, plan: _Plan):
  if plan.compiled:
    worker = jax.lax.axis_index("core") * plan.subcores + jax.lax.axis_index("subcore")
    _walk(table_hbm, idx_hbm, out_hbm, idx_vmem, rows_vmem, sem, plan, worker)
  else:                                   # the interpreter binds no core axes: one worker at a time
    for worker in range(plan.workers):
      _walk(table_hbm, idx_hbm, out_hbm, idx_vmem, rows_vmem, sem, plan, worker)


def _walk(table_hbm, idx_hbm, out_hbm, idx_vmem, rows_vmem, sem, plan: _Plan, worker):
  """One worker's part: windows s = 0..steps-1 of `window` rows, slot s % 2. Window s+1's
  indices and rows stream in while window s is written out; a slot is refilled only after its
  write finished."""
  first, steps, win = worker * plan.steps * plan.window, plan.steps, plan.window
  span = lambda s: pl.ds(first + s * win, win)
  index_copy = lambda s, slot: pltpu.make_async_copy(idx_hbm.at[span(s)], idx_vmem.at[slot], sem.at[0, slot])
  # Compiled, the indices are a VMEM ref; the interpreter reads them as a value.
  offsets = lambda slot: idx_vmem.at[slot] if plan.compiled else idx_vmem[slot]
  gather = lambda slot: pltpu.make_async_copy(table_hbm.at[offsets(slot)], rows_vmem.at[slot], sem.at[1, slot])
  write = lambda s, slot: pltpu.make_async_copy(rows_vmem.at[slot], out_hbm.at[span(s)], sem.at[2, slot])

  index_copy(0, 0).start()
  index_copy(0, 0).wait()
  gather(0).start()
  if steps > 1:
    index_copy(1, 1).start()

  @pl.loop(0, steps)
  def _(s):
    slot = s % 2

    @pl.when(s + 1 < steps)
    def _next():
      index_copy(s + 1, 1 - slot).wait()

      @pl.when(s >= 1)
      def _drain():
        write(s - 1, 1 - slot).wait()
      gather(1 - slot).start()
    gather(slot).wait()
    write(s, slot).start()

    @pl.when(s + 2 < steps)
    def _indices():
      index_copy(s + 2, slot).start()

  if steps > 1:
    write(steps - 2, steps % 2).wait()
  write(steps - 1, (steps - 1) % 2).wait()


def scatter_add_rows(table, indices, rows, *, options=None):
  """table float32 [N, D], indices int32 [M] in [0, N), rows float32 [M, D] -> table with
  table[indices[m]] += rows[m] for every m, repeats included (the DSA backward's dkv: each query's
  chosen rows' gradients added into the keys). On the tensorcore path `table.at[indices].add`; on the
  SparseCores (`resolve_gather`) indirect DMA streams with add, M a multiple of
  `row_multiple(add_width(D))`: the module docstring's scatter-add part says what Mosaic accepts,
  the races and the costs.
  Donate `table` to the enclosing jit, or XLA copies it first."""
  options = options or DEFAULT_OPTIONS
  if resolve_gather(options) == "tensorcore":
    return table.at[indices].add(rows)
  (n, d), (m,) = table.shape, indices.shape
  if table.dtype != jnp.float32 or rows.dtype != jnp.float32:
    raise ValueError(f"scatter_add_rows: {table.dtype} table, {rows.dtype} rows; the SparseCore path adds float32")
  width = add_width(d)
  plan = _Plan(*_workers(options), window=_window(width), rows=m, words=width, compiled=options.targets_tpu)
  if m % (plan.workers * plan.window):
    raise Unsupported("rows", m, f"a multiple of {plan.workers * plan.window} (SparseCore workers x rows per stream)")
  if width != d:                          # the add stream's rows must be whole (8, 128) tiles wide
    table, rows = (jnp.pad(a, ((0, 0), (0, width - d))) for a in (table, rows))
  if not plan.compiled:                   # the plain interpreter drops writes to an aliased ref (jax 0.10.2)
    out = _add_call(plan, n)(table, indices.astype(jnp.int32), rows)
  else:
    ref = jax.new_ref(table)              # aliased in and out of the kernel: no copy of the table
    _add_call(plan, n)(ref, indices.astype(jnp.int32), rows)
    out = jax.freeze(ref)
  return out[:, :d] if width != d else out


def add_width(d: int) -> int:
  """Columns the SparseCore add stream moves per row: D rounded up to a multiple of 128, at least
  256: the add stream lowers for no other width (the module docstring)."""
  return max(256, -(-d // 128) * 128)


def _add_call(plan: _Plan, n: int):
  return pl.kernel(
      functools.partial(_add_kernel, plan=plan),
      out_type=() if plan.compiled else jax.ShapeDtypeStruct((n, plan.words), jnp.float32),
      mesh=_mesh(plan),
      scratch_types=[pltpu.VMEM((2, plan.window), jnp.int32), pltpu.VMEM((2, plan.window, plan.words), jnp.float32),
                     pltpu.SemaphoreType.DMA((3, 2))],
      compiler_params=pltpu.CompilerParams(use_tc_tiling_on_sc=True) if plan.compiled else None,
      interpret=not plan.compiled,
      cost_estimate=pl.CostEstimate(flops=plan.rows * plan.words, transcendentals=0,
                                    bytes_accessed=plan.rows * (12 * plan.words + 4)),
  )


def _add_kernel(*refs, plan: _Plan):
  if plan.compiled:                       # the table is aliased in and out
    table_hbm, idx_hbm, rows_hbm, idx_vmem, rows_vmem, sem = refs
    worker = jax.lax.axis_index("core") * plan.subcores + jax.lax.axis_index("subcore")
    _add_walk(table_hbm, idx_hbm, rows_hbm, idx_vmem, rows_vmem, sem, plan, worker)
  else:                                   # the interpreter binds no core axes: one worker at a time
    table_in, idx_hbm, rows_hbm, table_hbm, idx_vmem, rows_vmem, sem = refs
    pltpu.sync_copy(table_in, table_hbm)
    for worker in range(plan.workers):
      _add_walk(table_hbm, idx_hbm, rows_hbm, idx_vmem, rows_vmem, sem, plan, worker)


def _add_walk(table_hbm, idx_hbm, rows_hbm, idx_vmem, rows_vmem, sem, plan: _Plan, worker):
  """One worker's part: windows s = 0..steps-1 of `window` rows, slot s % 2. Window s+1's indices
  and rows stream in while window s's add stream runs; window s's stream starts only after window
  s-1's finished, so one worker never has two add streams in flight."""
  first, steps, win = worker * plan.steps * plan.window, plan.steps, plan.window
  span = lambda s: pl.ds(first + s * win, win)
  loads = lambda s, slot: (pltpu.make_async_copy(idx_hbm.at[span(s)], idx_vmem.at[slot], sem.at[0, slot]),
                           pltpu.make_async_copy(rows_hbm.at[span(s)], rows_vmem.at[slot], sem.at[1, slot]))
  add = lambda slot: pltpu.make_async_copy(rows_vmem.at[slot], table_hbm.at[idx_vmem.at[slot]], sem.at[2, slot])

  for copy in loads(0, 0):
    copy.start()

  @pl.loop(0, steps)
  def _(s):
    slot = s % 2

    @pl.when(s >= 1)
    def _drain():
      if plan.compiled:
        add(1 - slot).wait()

    @pl.when(s + 1 < steps)
    def _next():
      for copy in loads(s + 1, 1 - slot):
        copy.start()
    for copy in loads(s, slot):
      copy.wait()
    if plan.compiled:
      add(slot).start(add=True)
    else:
      _interpret_add(table_hbm, idx_vmem, rows_vmem, slot, win)

  if plan.compiled:
    add((steps - 1) % 2).wait()


def _interpret_add(table_hbm, idx_vmem, rows_vmem, slot, win):
  """What the add stream does, row after row: Pallas's plain interpreter has no DMA with add ("DMA
  partial discharge add=True not yet implemented.", jax 0.10.2)."""
  @pl.loop(0, win)
  def _(j):
    row = pl.ds(idx_vmem[slot, j], 1)
    table_hbm[row, :] = table_hbm[row, :] + rows_vmem[slot, pl.ds(j, 1), :]
