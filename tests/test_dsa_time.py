"""The DSA layer on the time model (perf/dsa_time.py): grid steps from the traced layer at
DeepSeek-V3.2's shape, and the sparse walks' DMAs and FLOPs from the kernels' own step lists on
selections whose counts are known by hand."""
import numpy as np

from kernels.dsa import pallas as dsa_pallas
from perf import dsa_time, time_model
from perf.chips import CHIPS
from perf.dsa_traffic import sample_positions, synthetic_selection


def _popcount(n: int) -> int:
  return bin(n).count("1")


def test_grid_steps_are_a_small_share_of_the_roofline_at_128k():
  """V3.2 at T=131072 (traced, nothing runs): the indexer takes a few thousand steps, each sparse
  walk T / 8 (8 queries a step at H=128; the teacher comes from the forward's walk), and all
  steps x 0.35 us stay under 10% of the layer's roofline on v6e (so also on v5p, whose roofline
  is longer)."""
  t = 131072
  positions = sample_positions(t, 4)
  idx = synthetic_selection(t, 2048, positions, realistic=False)
  costs = {c.name: c for c in dsa_time.layer_costs(t, idx, positions)}
  assert set(costs) == {"dsa_index_topk", "xla_topk_sort", "dsa_sparse_fwd_teacher", "dsa_sparse_bwd"}, sorted(costs)
  assert costs["dsa_index_topk"].steps <= 4096
  assert costs["dsa_sparse_fwd_teacher"].steps == costs["dsa_sparse_bwd"].steps == t // 8
  minimum = dsa_time.minimum(t, idx, positions)
  for chip in ("v6e", "v5p"):
    steps = sum(time_model.terms(c, CHIPS[chip]).steps for c in costs.values())
    assert steps <= 0.1 * time_model.roofline(minimum.flops, minimum.bytes, CHIPS[chip]), chip


def test_walk_counts_coalesce_runs_of_consecutive_keys():
  """H=128 (a tile is one query), T=256, k=8. Runs: query t reads keys max(0, t-7)..t, one piece
  of min(t+1, 8) keys (one DMA per power of two of its length). Strided: t, t-2, ...: one
  piece per key. Each chunk (one per query here) also waits once per power of two of its rows,
  and each of the 32 steps (8 tiles) copies its list, bits, q, out and lse."""
  t, k = 256, 8
  positions = np.arange(t)
  shape = dsa_time.Shape(topk=k)
  run = np.array([[max(0, q - 7) + j if max(0, q - 7) + j <= q else -1 for j in range(k)] for q in range(t)])
  strided = np.array([[q - 2 * j if q - 2 * j >= 0 else -1 for j in range(k)] for q in range(t)])
  for idx, pieces in ((run, [1] * t), (strided, [min(k, q // 2 + 1) for q in range(t)])):
    rows = [min(k, q + 1) if idx is run else min(k, q // 2 + 1) for q in range(t)]
    w = dsa_time.walk_counts(idx[None], positions, t, shape)
    copies = sum(_popcount(r) for r in rows) if idx is run else sum(rows)
    waits = sum(_popcount(r) for r in rows)
    steps = t // 8
    assert w["pieces"] == sum(pieces)
    assert w["rows"] == w["selected"] == sum(rows)
    assert w["dsa_sparse_fwd"].dmas == copies + waits + 5 * steps
    assert w["dsa_sparse_bwd"].dmas == 3 * (copies + waits) + 7 * steps
    r = 128 * shape.dk                                   # every query's one chunk: 128 keys x R=128 rows
    assert w["dsa_sparse_fwd"].flops == 2 * 2 * t * 128 * r
    assert w["dsa_teacher"].flops == 2 * 1 * t * 128 * r
    row = dsa_pallas.padded_row_bytes(576, 2)
    assert row == 2560                                   # 640 lanes x 2 B x 2-row bf16 tiles
    assert w["dsa_sparse_fwd"].bytes >= sum(rows) * row


def test_sparsecore_path_walks_whole_chunks():
  """The SparseCore path (traced as for a v5p, kernels.dsa_gather=auto): the walks copy each
  query's chunk of gathered rows with one DMA and one wait (T=256, k=8: one chunk a query), the
  backward writes each chunk's gradient rows back with one more of each, and the SparseCores
  gather every union slot once per walk plus one look-ahead chunk, 3 descriptors per window."""
  t, k = 256, 8
  positions = np.arange(t)
  shape = dsa_time.Shape(topk=k)
  run = np.array([[max(0, q - 7) + j if max(0, q - 7) + j <= q else -1 for j in range(k)] for q in range(t)])
  costs = {c.name: c for c in dsa_time.layer_costs(t, run[None], positions, shape, chip="v5p")}
  assert {"dsa_sparse_fwd_teacher", "dsa_sparse_bwd_gathered", "sparsecore_add (bwd)"} <= set(costs), sorted(costs)
  steps = t // 8
  assert costs["dsa_sparse_fwd_teacher"].dmas == 2 * t + 5 * steps
  assert costs["dsa_sparse_bwd_gathered"].dmas == 4 * t + 7 * steps
  slots = t * 128                                        # one tile a query, one 128-slot chunk each
  window = 32                                            # rows of 288 words per indirect stream (64 KiB)
  assert costs["sparsecore_gather (fwd)"].dmas == 3 * 2 * slots // window      # one chunk + the look-ahead
  # A key-by-key (strided) selection costs the TensorCore walk one DMA per key, the SparseCore path the same.
  strided = np.array([[q - 2 * j if q - 2 * j >= 0 else -1 for j in range(k)] for q in range(t)])
  tensorcore = {c.name: c for c in dsa_time.layer_costs(t, strided[None], positions, shape)}
  assert tensorcore["dsa_sparse_fwd_teacher"].dmas > costs["dsa_sparse_fwd_teacher"].dmas + 2 * t
  gathered = {c.name: c for c in dsa_time.layer_costs(t, strided[None], positions, shape, chip="v6e")}
  assert gathered["dsa_sparse_fwd_teacher"].dmas == costs["dsa_sparse_fwd_teacher"].dmas
