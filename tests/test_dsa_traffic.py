"""The DSA kernels' traffic model (perf/dsa_traffic.py) on selections whose numbers are known by hand."""
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.dsa.pallas import KEY_CHUNK, KEY_TILE, tile_selection
from perf import dsa_traffic as dt


def _same_keys(t, keys):
  """[1, t, len(keys)]: every query chooses the same keys."""
  return np.broadcast_to(np.asarray(keys, np.int32), (1, t, len(keys))).copy()


def test_shared_selection_reads_each_row_once_per_tile():
  # H=16: 8 queries x 16 heads per tile. 64 queries at 256..319 all choose keys 0..127.
  heads, dk, dv, t, k = 16, 64, 32, 64, 128
  r = dt.sparse_traffic(_same_keys(t, range(k)), heads=heads, dk=dk, dv=dv, q_offset=256)
  assert r["queries_per_tile"] == 8 and r["tiles"] == 8 and r["rows"] == 128
  assert r["union_slots"] == 384                        # round_up(min(8 * 128, 320 keys), 128)
  assert r["selected_pairs"] == t * k and r["union_rows"] == 8 * k and r["walked_rows"] == 8 * k
  lists = (1 + 384) * 4 + (384 + KEY_CHUNK) * 4
  q_tile = 128 * dk * 2
  fwd = r["forward"]
  assert fwd["in"] == 8 * (lists + q_tile) + 8 * k * dk * 2          # the union once per tile ...
  assert fwd["min_in"] == t * heads * dk * 2 + t * k * dk * 2         # ... not once per query
  assert fwd["out"] == 8 * (q_tile + 128 * 4) and fwd["min_out"] == t * heads * (dv * 2 + 4)
  assert fwd["row_fill"] == 1.0 and r["dq"]["row_fill"] == 1.0
  assert fwd["flops"] == 2 * 2 * dk * 128 * 8 * k and r["dq"]["flops"] == 3 * fwd["flops"] / 2
  assert fwd["intensity"] == pytest.approx(fwd["flops"] / (fwd["in"] + fwd["out"]))
  # dq+dkv (the default backward): dq's walk plus each union row's fp32 gradient read and written.
  both = r["dq+dkv"]
  assert both["in"] == r["dq"]["in"] + 8 * k * dk * 4 and both["out"] == r["dq"]["out"] + 8 * k * dk * 4
  assert both["flops"] == 5 * fwd["flops"] / 2 and both["min_out"] == r["dq"]["min_out"] + 320 * dk * 2
  # dkv: keys 0..127 are one key tile: one pair per query tile.
  assert r["pairs"] == 8 and r["dkv"]["work_steps"] == 8
  assert r["dkv"]["flops"] == 2 * 128 * KEY_TILE * (5 * dk + 2 * KEY_CHUNK) * 8
  assert r["dkv"]["row_fill"] == 1.0
  assert r["dkv"]["grid_steps"] == 8 * 384 + 3          # NT * U slots + a work-free pair per key tile
  # One pallas_call (3075 pairs fit the SMEM window): rows per pair, per key tile and per call;
  # kv and the fp32 accumulator once per key tile.
  per_pair = 2 * q_tile + 2 * 128 * 4 + 2 * (384 + KEY_CHUNK) * 4
  assert r["dkv"]["pallas_calls"] == 1 and r["dkv_window"] == 3075
  assert r["dkv"]["in"] == (8 + 3 + 1) * per_pair + 3 * KEY_TILE * dk * (2 + 4) + 3075 * 12
  assert r["dkv"]["out"] == 3 * KEY_TILE * dk * 4 and r["dkv"]["min_out"] == 320 * dk * 2


def test_row_fill_counts_the_rows_that_chose_a_key():
  # Only the first query of each 8-query tile chooses anything: 1 of 8 queries' rows work.
  idx = _same_keys(64, range(128))
  idx[:, np.arange(64) % 8 != 0] = -1
  r = dt.sparse_traffic(idx, heads=16, dk=64, dv=32, q_offset=256)
  assert r["forward"]["row_fill"] == pytest.approx(1 / 8)
  assert r["dkv"]["row_fill"] == pytest.approx(1 / 8)
  # H=128: a query's own keys, 200 of them: two chunks walked, 200 of 256 keys chosen.
  r = dt.sparse_traffic(_same_keys(4, range(200)), heads=128, dk=64, dv=32, q_offset=500)
  assert r["walked_rows"] == 4 * 256 and r["forward"]["row_fill"] == pytest.approx(200 / 256)
  assert r["pairs"] == 4 * 2                    # keys 0..199 span key tiles 0 and 1
  assert r["dkv"]["row_fill"] == pytest.approx(200 / 256)


def test_invalid_entries_are_dropped():
  # -1, repeats, future and out-of-range keys are not read (H=128: one query per tile).
  idx = np.array([[[0, 0, 3, -1, 7, 9]]], np.int32)          # query at position 5: keys 0, 3 valid
  r = dt.sparse_traffic(idx, heads=128, dk=64, dv=32, q_offset=5, num_keys=8)
  assert r["selected_pairs"] == 2 and r["union_rows"] == 2 and r["walked_rows"] == KEY_CHUNK
  assert r["forward"]["min_in"] == 128 * 64 * 2 + 2 * 64 * 2


def test_counts_match_the_kernels_tile_selection():
  rng = np.random.default_rng(0)
  t, k, heads = 64, 16, 32                                  # 4 queries per tile
  idx = rng.integers(-1, 80, (2, t, k)).astype(np.int32)     # -1s, repeats, future keys
  qpt = 4
  keys, _, count = tile_selection(jnp.asarray(idx), 10, num_keys=74, queries_per_tile=qpt, slots=128)
  keys, count = np.asarray(keys), np.asarray(count)
  pairs = sum(len(np.unique(keys[b, i, :count[b, i]] // KEY_TILE)) for b in range(2) for i in range(t // qpt))
  r = dt.sparse_traffic(idx, heads=heads, dk=64, dv=32, q_offset=10, num_keys=74)
  assert r["union_rows"] == count.sum()
  assert r["walked_rows"] == (-(-count // KEY_CHUNK) * KEY_CHUNK).sum()
  assert r["pairs"] == pairs


def test_a_sample_scales_to_the_whole_sequence():
  # Every query chooses its own position (twice): each tile is alike, so a sample is exact.
  seq_len = 2048
  pos = np.arange(seq_len)
  full_idx = np.stack([pos, pos], -1).astype(np.int32)[None]
  sample = dt.sample_positions(seq_len, 8)
  assert len(sample) == 128 and np.all(np.diff(sample.reshape(8, 16), axis=-1) == 1)
  full = dt.sparse_traffic(full_idx, heads=128, dk=64, dv=32)
  part = dt.sparse_traffic(full_idx[:, sample], heads=128, dk=64, dv=32, q_offset=sample, seq_len=seq_len)
  assert part["sampled_fraction"] == pytest.approx(1 / 16)
  for kernel in ("forward", "dq", "dkv"):
    for field in ("in", "out", "min_in", "min_out", "flops", "dense_mha_flops", "grid_steps"):
      assert part[kernel][field] == pytest.approx(full[kernel][field]), (kernel, field)
  assert full["forward"]["dense_mha_flops"] == 2 * 128 * seq_len * (seq_len + 1) / 2 * (192 + 128)


def test_overlap_of_identical_and_disjoint_neighbours():
  heads, dk, dv = 128, 576, 512
  same = dt.overlap(_same_keys(64, range(0, 4096, 2)), q_offset=5000, heads=heads, dk=dk, dv=dv)
  for g, x in same.items():
    assert x["union_over_sum"] == pytest.approx(1 / g)
    assert x["flop_per_byte"] == pytest.approx(g * 2 * heads * (dk + dv) / (dk * 2))
  assert same[1]["speedup"] == 1.0 and same[2]["speedup"] > 1.5      # v6e: memory-bound alone
  assert same[1]["bound"] == "memory" and same[16]["bound"] == "compute"
  # Disjoint selections: the union saves no bytes and its masked cells cost g x the FLOPs.
  disjoint = (np.arange(64)[:, None] * 512 + np.arange(512)[None, :]).astype(np.int32)[None]
  apart = dt.overlap(disjoint, (1, 4), q_offset=32768)
  assert apart[4]["union_over_sum"] == 1.0 and apart[4]["speedup"] < 1.0


def test_synthetic_selections_follow_the_contract():
  pos = np.array([0, 5, 100, 101, 4095])
  for realistic in (False, True):
    idx = dt.synthetic_selection(4096, 8, pos, realistic=realistic, seed=1)[0]
    assert np.array_equal(idx[0], [0] + [-1] * 7) and sorted(idx[1][:6]) == list(range(6))
    for row, t in zip(idx[2:], pos[2:]):
      assert len(set(row)) == 8 and row.min() >= 0 and row.max() <= t
  local = dt.synthetic_selection(4096, 128, [4095], realistic=True, window=64)[0, 0]
  assert set(range(4032, 4096)) <= set(local)                   # the local window is forced
