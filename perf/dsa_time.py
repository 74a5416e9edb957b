"""One DSA layer, forward + backward (top-k, sparse attention, the indexer loss's teacher), on the
time model (perf/time_model.py): grid steps from the traced layer, DMA descriptors and bytes from
the lists the kernels would read for a selection, and the honest minimum beside them.

Per kernel:
  steps  `jax.make_jaxpr` of value_and_grad over indexer_topk and
         sparse_attention_and_indexer_loss (impl="pallas", compiled for TPU: nothing runs);
  walks  the sparse kernels' (forward, teacher, backward) FLOPs, bytes and DMAs from
         kernels.dsa.pallas.step_lists itself, built for the selection (a sample of query runs
         scaled to the sequence, as perf/dsa_traffic.py samples): per piece one DMA per power of
         two of its length and source, per chunk one wait per power of two of its rows and source,
         per step the list copy and one copy per blocked operand; the MXU runs whole KC-key chunks;
         gathered rows cost their padded HBM size (kernels.dsa.pallas.padded_row_bytes);
  index  the indexer's kernel from its own walk (exact: no data in it) and XLA's sort of its
         candidates as their bytes;
  paths  traced for a chip (layer_calls' `chip`), kernels.dsa_gather=auto takes the SparseCores on
         v5p and v6e: the walks then copy whole 128-row chunks of a gathered buffer, and the
         SparseCores' gathers and gradient adds are SparseCoreCost rows (sparsecore_costs).
Minimum: FLOPs 3 x the sparse forward's useful FLOPs (every query's valid selected keys, Dk + dv
wide, all H heads) + the indexer's scores (each query against its visible keys, H_I heads, d_I
wide, and the head-weighted sum); bytes every operand read and every result written once per
pass at its unpadded size: q, kv, the indexer's q_I, k_I and weights, out, dO, dq, dkv, the indices.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kernels import KernelOptions, dsa
from kernels.dsa import indexer_pallas, sparsecore
from kernels.dsa import pallas as dsa_pallas
from perf import time_model
from perf.time_model import Cost, SparseCoreCost, pallas_calls


class Shape(NamedTuple):
  """One DSA layer's attention shape; DeepSeek-V3.2's by default (arXiv 2512.02556; its config)."""
  heads: int = 128
  dk: int = 576            # kv_lora_rank 512 + qk_rope_dim 64
  dv: int = 512
  index_heads: int = 64
  index_dim: int = 128
  topk: int = 2048
  itemsize: int = 2


V32 = Shape()


def _struct(shape, dtype=jnp.bfloat16):
  return jax.ShapeDtypeStruct(shape, dtype)


def layer_step(seq_len: int, s: Shape = V32, options: KernelOptions | None = None):
  """(value_and_grad of one DSA layer's sparse stage, its argument shapes), B = 1: the top-k, the
  sparse attention and the teacher's loss, as model/dsa.py calls them."""
  options = options or KernelOptions(pallas_mode="compiled")
  kw = dict(impl="pallas", options=options)

  def loss(q, kv, q_idx, k_idx, w):
    idx = dsa.indexer_topk(q_idx, k_idx, w, topk=s.topk, **kw)
    out, indexer_loss = dsa.sparse_attention_and_indexer_loss(q, kv, q_idx, k_idx, w, idx, v_dim=s.dv, **kw)
    return jnp.sum(out.astype(jnp.float32)) + indexer_loss
  args = [_struct((1, seq_len, s.heads, s.dk)), _struct((1, seq_len, s.dk)),
          _struct((1, seq_len, s.index_heads, s.index_dim)), _struct((1, seq_len, s.index_dim)),
          _struct((1, seq_len, s.index_heads), jnp.float32)]
  return jax.value_and_grad(loss, argnums=range(5)), args


DEVICE_KINDS = {"v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}


def layer_calls(seq_len: int, s: Shape = V32, options: KernelOptions | None = None, chip: str | None = None):
  """The traced pallas_calls of one DSA layer, forward and backward (B = 1); chip (v5e, v5p,
  v6e): traced for that chip, so kernels.dsa_gather=auto takes its SparseCores where it has them."""
  step, args = layer_step(seq_len, s, options)
  if chip is None:
    return pallas_calls(step, *args)
  device = jax.sharding.AbstractDevice(device_kind=DEVICE_KINDS[chip], num_cores=1, platform="tpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("chip",), abstract_device=device)):
    return pallas_calls(step, *args)


def measure_ms(seq_len: int, s: Shape = V32, repeats: int = 5) -> float:
  """On a TPU: the median wall time of layer_step, compiled, on random inputs (milliseconds)."""
  return time_model.measure_ms(*layer_step(seq_len, s, KernelOptions()), repeats)


def _popcount(x) -> np.ndarray:
  x = np.asarray(x, np.int64)
  return sum((x >> bit) & 1 for bit in range(16))


def walk_counts(indices, positions, seq_len: int, s: Shape = V32, options: KernelOptions | None = None,
                gathered: bool = False) -> dict:
  """What the sparse kernels do for a selection, from their own step lists: indices [1, n, k] of
  the queries at `positions` (runs of whole tiles of consecutive positions, e.g.
  perf.dsa_traffic.sample_positions), scaled to all seq_len queries. Returns {kernel name: Cost
  without steps} for dsa_sparse_fwd, dsa_teacher (its own walk), dsa_sparse_fwd_teacher (the
  forward computing the teacher, kernels.dsa.pallas.fused_teacher) and dsa_sparse_bwd (or, gathered:
  the SparseCore path, dsa_sparse_bwd_gathered), "sparsecore" ([SparseCoreCost] per layer: the
  row gathers of the forward and backward walks, the gradient adds; empty on TensorCores), and
  "pieces", "rows", "selected" (per layer): DMA pieces, gathered rows, valid selected pairs."""
  options = options or KernelOptions(pallas_mode="compiled")
  positions = np.asarray(positions, np.int64)
  kc = dsa_pallas.KEY_CHUNK
  qpt = dsa_pallas.queries_per_tile(s.heads, options.dsa_tile_rows)
  union = -(-min(qpt * s.topk, seq_len) // kc) * kc
  num_tiles = -(-seq_len // qpt)
  tps = dsa_pallas.tiles_per_step(union, options, num_tiles)
  chunk_tiles = dsa_pallas.gather_chunk_tiles(num_tiles, union, tps) if gathered else 0
  runs = positions.reshape(-1, qpt)
  if np.any(np.diff(runs, axis=-1) != 1):
    raise ValueError("positions: whole tiles of consecutive queries")
  idx = jnp.asarray(np.asarray(indices).reshape(runs.shape[0], qpt, -1))
  select = jax.jit(jax.vmap(lambda i, t0: dsa_pallas.tile_selection(
      i[None], t0, num_keys=seq_len, queries_per_tile=qpt, slots=union)))
  keys, _, count = select(idx, jnp.asarray(runs[:, 0], jnp.int32))                  # [n, 1, 1, U], [n, 1, 1]
  tiles = keys.shape[0]
  pad = -tiles % max(tps, chunk_tiles)
  keys = jnp.pad(keys[:, 0, 0], [(0, pad), (0, 0)])[None]
  count = jnp.pad(count[:, 0, 0], [(0, pad)])[None]
  g = dsa_pallas._Geometry(1, (tiles + pad) * qpt, s.heads, s.dk, s.dv, seq_len, qpt, union, 1.0, options,
                           jnp.bfloat16, tps, chunk_tiles)
  lists = np.asarray(jax.jit(dsa_pallas.step_lists, static_argnums=0)(g, keys, count))[0]   # [NS, list_len]
  words_at = 3 + 2 * tps + tps * union // kc
  lengths = lists[:, words_at:words_at + tps * union] // 256
  count = np.asarray(count)[0]
  walked = -(-count // kc) * kc if gathered else count                  # rows a chunk's waits count
  chunk_rows = np.maximum(np.minimum(kc, walked[:, None] - kc * np.arange(union // kc)), 0)
  scale = -(-seq_len // qpt) / tiles                       # sampled tiles -> every tile of the sequence
  pieces = float((lengths > 0).sum()) * scale
  copies = float(_popcount(lengths).sum()) * scale         # DMAs per source for the pieces
  waits = float(_popcount(chunk_rows).sum()) * scale
  rows = float(walked.sum()) * scale                       # rows copied into the ring
  chunks = float((chunk_rows > 0).sum()) * scale
  steps = -(-num_tiles // tps)
  # a gathered row sits in a [M, Dk] buffer (lanes padded); a DMA-gathered one in [T, 1, Dk]
  bf16_row = dsa_pallas._round_up(s.dk, 128) * s.itemsize if gathered else dsa_pallas.padded_row_bytes(s.dk, s.itemsize)
  fp32_row = dsa_pallas.padded_row_bytes(s.dk, 4)
  r = qpt * s.heads
  mxu = lambda matmuls: 2.0 * matmuls * chunks * kc * r * s.dk
  tile_bytes = lambda widths: num_tiles * (sum(widths) + 4 * (union + kc))        # blocked rows + bits
  list_bytes = steps * 4 * g.list_len
  forward = Cost("dsa_sparse_fwd", 0, mxu(2), rows * bf16_row + list_bytes
                 + tile_bytes([2 * r * s.dk * s.itemsize, 4 * r]), int(copies + waits + 5 * steps))
  costs = {
      "dsa_sparse_fwd": forward,
      "dsa_teacher": Cost("dsa_teacher", 0, mxu(1), rows * bf16_row + list_bytes
                          + tile_bytes([r * s.dk * s.itemsize, 4 * r, 4 * qpt * union]),
                          int(copies + waits + 5 * steps)),
      # The teacher computed by the forward from its kept scores: the head mean per chunk, [qpt, U] out.
      "dsa_sparse_fwd_teacher": forward._replace(name="dsa_sparse_fwd_teacher", flops=forward.flops
                                                 + 2.0 * chunks * kc * r * qpt,
                                                 bytes=forward.bytes + num_tiles * 4 * qpt * union),
      "dsa_sparse_bwd": Cost("dsa_sparse_bwd", 0, mxu(5), rows * (bf16_row + 2 * fp32_row) + list_bytes
                             + tile_bytes([3 * r * s.dk * s.itemsize, 8 * r]),
                             int(3 * (copies + waits) + 7 * steps)),
      "sparsecore": [],
  }
  if gathered:
    width = sparsecore.add_width(s.dk)
    costs["dsa_sparse_bwd_gathered"] = Cost(
        "dsa_sparse_bwd_gathered", 0, mxu(5), rows * (bf16_row + 4 * width) + list_bytes
        + tile_bytes([3 * r * s.dk * s.itemsize, 8 * r]), int(2 * (copies + waits) + 7 * steps))
    costs["sparsecore"] = sparsecore_costs(seq_len, s, num_tiles, chunk_tiles, union, width)
  valid = np.asarray(indices) >= 0
  selected = float(valid.sum()) * seq_len / positions.size
  return {**costs, "pieces": pieces, "rows": rows, "selected": selected}


def sparsecore_costs(seq_len: int, s: Shape, num_tiles: int, chunk_tiles: int, union: int, width: int):
  """[SparseCoreCost] of one layer on the SparseCore path (kernels/dsa/sparsecore.py's accounting):
  per walk (forward, backward) the table packed to words once and, per query chunk (one more for
  the pipeline's look-ahead), every union slot's row gathered (read and written as words) and
  unpacked by XLA (read as words, written as rows); per chunk of the backward every slot's fp32
  gradient row added into dkv (the row read, the dkv row read and written, `width` wide). Three
  descriptors per window of rows."""
  words = s.dk * s.itemsize // 4
  chunks = -(-num_tiles // chunk_tiles)
  m = chunk_tiles * union
  window = sparsecore._window(words)
  pack = 2 * seq_len * s.dk * s.itemsize
  gather = (chunks + 1) * m
  gather_bytes = gather * (2 * 4 * words + 4 * words + dsa_pallas._round_up(s.dk, 128) * s.itemsize) + pack
  add = chunks * m
  return [SparseCoreCost("sparsecore_gather (fwd)", gather_bytes, 3 * -(-gather // window)),
          SparseCoreCost("sparsecore_gather (bwd)", gather_bytes, 3 * -(-gather // window)),
          SparseCoreCost("sparsecore_add (bwd)", add * 3 * 4 * width, 3 * -(-add // sparsecore._window(width)))]


def layer_costs(seq_len: int, indices, positions, s: Shape = V32, options: KernelOptions | None = None,
                chip: str | None = None):
  """[Cost or SparseCoreCost] of one layer, forward + backward, for the selection indices [1, n, k]
  of the queries at `positions` (a sample, scaled to seq_len), as traced for `chip` (see
  layer_calls; None: TensorCore gathers). The indexer's kernel: its own walk (exact, no data in
  it) plus one copy per blocked operand and step; XLA's sort of its candidates: their bytes read
  once and the rows written (a lower bound: the sort's vector work is not modelled)."""
  options = options or KernelOptions(pallas_mode="compiled")
  calls = layer_calls(seq_len, s, options, chip)
  gathered = any(call.name == "dsa_sparse_bwd_gathered" for call in calls)
  walks = walk_counts(indices, positions, seq_len, s, options, gathered=gathered)
  costs = []
  for call in calls:
    if call.name in walks:
      w = walks[call.name]
      costs.append(Cost(call.name, call.steps, w.flops, w.bytes, w.dmas))
    elif call.name == "dsa_index_topk":
      q_idx = _struct((1, seq_len, s.index_heads, s.index_dim))
      g = indexer_pallas.geometry(q_idx, _struct((1, seq_len, s.index_dim)), s.topk, options)
      w = indexer_pallas.walk(g, 0)
      costs.append(Cost(call.name, call.steps, w.flops, w.bytes, w.dmas + 6 * call.steps))
      costs.append(Cost("xla_topk_sort", 0, 0, seq_len * (8 * g.width + 4 * s.topk), 0))
    else:
      costs.append(Cost(call.name, call.steps, call.flops * call.repeats, call.bytes * call.repeats, 3 * call.steps))
  return costs + walks["sparsecore"]


def minimum(seq_len: int, indices, positions, s: Shape = V32) -> Cost:
  """The honest minimum (module docstring) for this selection (sampled queries, scaled)."""
  positions = np.asarray(positions, np.int64)
  idx = np.asarray(indices)[0]
  valid = (idx >= 0) & (idx <= positions[:, None])
  keys = float(valid.sum()) * seq_len / positions.size
  sparse_fwd = 2 * s.heads * (s.dk + s.dv) * keys
  index_fwd = s.index_heads * (2 * s.index_dim + 2) * seq_len * (seq_len + 1) / 2
  q, kv, out = seq_len * s.heads * s.dk, seq_len * s.dk, seq_len * s.heads * s.dv
  index_inputs = seq_len * (s.index_heads * s.index_dim + s.index_dim) * s.itemsize + seq_len * s.index_heads * 4
  # forward: q, kv, indexer inputs read, out and indices written; backward: q, kv, out, dO read,
  # dq, dkv written.
  read_write = s.itemsize * (2 * q + 2 * kv + 2 * out + out + q + kv) + index_inputs + 4 * seq_len * s.topk
  return Cost("minimum", 0, 3 * sparse_fwd + index_fwd, read_write, 0)
