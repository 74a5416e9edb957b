"""NSA's Pallas TPU kernels against the XLA reference on CPU, and ahead-of-time compiles for real
TPU chips (libtpu, docs/design.md §8). fp32 cases run in TPU interpret mode (DMAs, SMEM, VMEM and
semaphores simulated); bf16 cases, the same kernel code for its numerics, in Pallas's faster
plain interpreter."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kernels
from kernels import KernelOptions, nsa
from kernels.nsa import reference as nsa_reference
from kernels.nsa import selection_pallas
from perf import time_model
from tests.nsa_cases import assert_grads_close, options_for


def _inputs(b, t, hq, hkv, dk, dv, block, n, dtype, seed=0, local=False):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, t, hq, dk)).astype(dtype)
  k = jax.random.normal(ks[1], (b, t, hkv, dk)).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, hkv, dv)).astype(dtype)
  # -1, future and out-of-range entries included; `local` adds NSA's forced own block.
  idx = jax.random.randint(ks[3], (b, t, hkv, n), -1, t // block + 2).astype(jnp.int32)
  if local:
    idx = idx.at[..., 0].set((jnp.arange(t) // block)[None, :, None])
  return q, k, v, idx


@pytest.mark.parametrize("t,hq,hkv,dk,dv,block,n,dtype,tol", [
    (128, 1, 1, 128, 128, 32, 3, jnp.float32, 1e-5),      # G=1: 128 query positions per tile
    (256, 8, 2, 192, 128, 64, 4, jnp.float32, 1e-5),      # G=4, Dk=192
    (256, 16, 1, 128, 128, 128, 2, jnp.bfloat16, 2e-2),   # G=16: 8 positions x 16 heads
    (384, 16, 1, 192, 128, 32, 5, jnp.bfloat16, 2e-2),
])
def test_selection_forward_matches_xla(t, hq, hkv, dk, dv, block, n, dtype, tol):
  q, k, v, idx = _inputs(1, t, hq, hkv, dk, dv, block, n, dtype, seed=t, local=True)
  out, lse = selection_pallas.selection_forward(q, k, v, idx, slc_block=block, options=options_for(dtype))
  ref = nsa.selection_attention(q, k, v, idx, slc_block=block, impl="xla")
  assert out.dtype == dtype and lse.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)
  assert np.isfinite(np.asarray(lse)).all()       # every query chose its own block


def test_selection_forward_rows_with_nothing_over_several_steps_and_slabs():
  """Queries whose indices are all -1 give 0 and lse -inf; step_rows=128 and slabs of 2 blocks:
  4 grid steps per KV head, a step's union walked over several slabs."""
  q, k, v, idx = _inputs(2, 128, 4, 2, 32, 16, 16, 3, jnp.float32, seed=3)
  idx = idx.at[:, 40:].set(-1)
  options = KernelOptions(step_rows=128, slab_keys=32)
  out, lse = selection_pallas.selection_forward(q, k, v, idx, slc_block=16, options=options)
  ref = nsa.selection_attention(q, k, v, idx, slc_block=16, impl="xla")
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
  assert not np.asarray(out[:, 40:]).any() and np.isneginf(np.asarray(lse[:, 40:])).all()


def test_tile_unions_are_sorted_distinct_and_padded_by_repeats():
  idx = jnp.array([[5, 1, -1], [1, 9, 0], [3, 3, 2], [-1, -1, -1]], jnp.int32)   # 4 queries, n=3
  union, count = selection_pallas.tile_unions(idx.reshape(1, 4, 1, 3), slc_block=1, seq_len=8,
                                        queries_per_tile=2)
  # tile 0 (queries 0-1): {0, 1} (5 is after its last query, 9 out of range, -1 empty);
  # tile 1 (queries 2-3): {2, 3}.
  np.testing.assert_array_equal(np.asarray(count[0, 0]), [2, 2])
  np.testing.assert_array_equal(np.asarray(union[0, 0]), [[0, 1, 1, 1, 1, 1], [2, 3, 3, 3, 3, 3]])


def test_selection_shape_errors_say_what_is_needed():
  q, k, v, idx = _inputs(1, 100, 16, 1, 32, 32, 32, 2, jnp.float32)
  with pytest.raises(kernels.Unsupported, match="seq_len=100: must be a multiple of 8"):
    selection_pallas.selection_forward(q, k, v, idx, slc_block=32)
  q, k, v, idx = _inputs(1, 96, 3, 1, 32, 32, 32, 2, jnp.float32)
  with pytest.raises(kernels.Unsupported, match="HQ/HKV=3 must divide 128"):
    selection_pallas.selection_forward(q, k, v, idx, slc_block=32)


@pytest.mark.parametrize("t,hq,hkv,dk,dv,block,n,dtype,tol", [
    (128, 4, 4, 128, 128, 32, 3, jnp.float32, 1e-5),      # G=1
    (256, 8, 2, 192, 128, 64, 4, jnp.float32, 1e-5),      # G=4, Dk=192
    (256, 16, 1, 192, 128, 128, 2, jnp.bfloat16, 3e-2),   # G=16
])
def test_selection_gradients_match_xla(t, hq, hkv, dk, dv, block, n, dtype, tol):
  q, k, v, idx = _inputs(1, t, hq, hkv, dk, dv, block, n, dtype, seed=t, local=True)
  idx = idx.at[:, 3].set(-1)                      # a query that sees nothing: zero gradient
  cot = jax.random.normal(jax.random.key(9), (1, t, hq, dv))
  loss = lambda attend: lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) * cot)
  attend = lambda impl: lambda q, k, v: nsa.selection_attention(q, k, v, idx, slc_block=block, impl=impl,
                                                                options=options_for(dtype))
  got = jax.grad(loss(attend("pallas")), argnums=(0, 1, 2))(q, k, v)    # the contract's Pallas path
  ref = jax.grad(loss(attend("xla")), argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(got, ref):
    assert g.dtype == r.dtype
    scale = float(jnp.abs(r.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(g, np.float32) / scale, np.asarray(r, np.float32) / scale,
                               atol=2 * tol)   # bf16: both sides round dK/dV sums differently
  assert not np.asarray(got[0][:, 3]).any()


def test_selection_gradients_over_several_steps_and_slabs_at_an_offset():
  """step_rows=128 and slabs of 2 blocks (dK/dV read, added to and written back slab by slab and
  step by step), for the last half of the queries at q_offset=64, traced, as context parallelism
  calls it: against the XLA reference on the same chunk."""
  options = KernelOptions(step_rows=128, slab_keys=32)
  q, k, v, idx = _inputs(2, 128, 4, 2, 32, 16, 16, 3, jnp.float32, seed=4, local=True)
  q, idx = q[:, 64:], idx[:, 64:]
  loss = lambda attend: lambda q, k, v: jnp.sum(attend(q, k, v) ** 2)
  pallas = jax.jit(lambda q, k, v, offset: selection_pallas.selection_attention(q, k, v, idx, offset, 16, None, options))
  got = jax.grad(loss(lambda q, k, v: pallas(q, k, v, 64)), argnums=(0, 1, 2))(q, k, v)
  xla = lambda q, k, v: nsa_reference.selection(q, k, v, idx, q_offset=64, slc_block=16, scale=None, options=options)
  ref = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(got, ref):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("t,hq,hkv,dk,dv,window,dtype,tol", [
    (256, 4, 2, 128, 128, 100, jnp.float32, 1e-5),
    (384, 16, 1, 192, 128, 128, jnp.bfloat16, 3e-2),      # G=16, Dk=192 with Dv=128
])
def test_window_attention_pallas_matches_xla(t, hq, hkv, dk, dv, window, dtype, tol):
  q, k, v, _ = _inputs(1, t, hq, hkv, dk, dv, 64, 1, dtype, seed=t)
  cot = jax.random.normal(jax.random.key(2), (1, t, hq, dv))
  attend = lambda impl: lambda q, k, v: nsa.window_attention(q, k, v, window=window, impl=impl,
                                                             options=options_for(dtype))
  np.testing.assert_allclose(np.asarray(attend("pallas")(q, k, v), np.float32),
                             np.asarray(attend("xla")(q, k, v), np.float32), atol=tol, rtol=tol)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * cot)
  got = jax.grad(loss(attend("pallas")), argnums=(0, 1, 2))(q, k, v)
  ref = jax.grad(loss(attend("xla")), argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(got, ref):
    scale = float(jnp.abs(r.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(g, np.float32) / scale, np.asarray(r, np.float32) / scale, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_window_attention_pallas_with_documents_and_offset_matches_xla(dtype, tol):
  """Packed documents (doc_start) and a query chunk at a traced offset (context parallelism),
  several steps and slabs: outputs and gradients against the XLA reference."""
  t, window = 256, 40
  q, k, v, _ = _inputs(1, t, 8, 2, 32, 16, 16, 1, dtype, seed=7)
  doc_start = jnp.asarray([[0] * 64 + [64] * 128 + [192] * 64], jnp.int32)
  options = options_for(dtype, step_rows=128, slab_keys=64)
  q_half, doc_half = q[:, 128:], doc_start[:, 128:]
  pallas = jax.jit(lambda q, k, v, offset: selection_pallas.window_attention(q, k, v, doc_half, offset, window,
                                                                               None, options))
  xla = lambda q, k, v: nsa_reference.window(q, k, v, doc_half, q_offset=128, window=window, scale=32 ** -0.5,
                                             options=options)
  np.testing.assert_allclose(np.asarray(pallas(q_half, k, v, 128), np.float32),
                             np.asarray(xla(q_half, k, v), np.float32), atol=tol, rtol=tol)
  cot = jax.random.normal(jax.random.key(2), q_half.shape[:3] + (16,))
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * cot)
  got = jax.grad(loss(lambda q, k, v: pallas(q, k, v, 128)), argnums=(0, 1, 2))(q_half, k, v)
  assert_grads_close(got, jax.grad(loss(xla), argnums=(0, 1, 2))(q_half, k, v), tol)


def test_step_lists_hold_each_steps_union_pieces_and_every_entrys_slot():
  """Two steps of two tiles (G=16: 8 queries a tile, blocks of 8 keys, slabs of 2 blocks). Tile
  unions {0, 2}, {1, 2} | {3}, {} give step unions [0, 1, 2] and [3]; pieces are runs of
  consecutive blocks cut at slab boundaries: [0, 1] and [2] (slab 1), then [3]; entries point
  into the step's union."""
  w = selection_pallas.Walk("selection", 1, 32, 32, 1, 16, 8, 8, 8, 2, 0, 1.0,
                            KernelOptions(step_rows=256, slab_keys=16))
  assert (w.tiles_per_step, w.tile_union, w.step_union, w.slab, w.num_slabs) == (2, 4, 4, 2, 2)
  union = jnp.array([[[[0, 2, 2, 2], [1, 2, 2, 2], [3, 3, 3, 3], [0, 0, 0, 0]]]], jnp.int32)
  count = jnp.array([[[2, 2, 1, 0]]], jnp.int32)
  lists = np.asarray(selection_pallas.step_lists(w, union, count))[0, 0]
  # U, pieces, first piece of slabs 0, 1, (end); blocks; piece slots, blocks, lengths; counts; slots
  np.testing.assert_array_equal(lists[0], [3, 2, 0, 1, 2, 0, 1, 2, 0, 0, 2, 0, 0, 0, 2, 0, 0, 2, 1, 0, 0,
                                           2, 2, 0, 2, 0, 0, 1, 2, 0, 0, 0])
  np.testing.assert_array_equal(lists[1], [1, 1, 0, 1, 1, 3, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0,
                                           1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])


def _brute_force_walk(idx, t, group, block, dk, dv, step_rows, slab, group_blocks, backward):
  """Matmul groups and step-union blocks counted query by query from the definition: a tile of
  128 // G queries walks every distinct chosen, not wholly future block; a step of step_rows rows
  loads the distinct blocks of its tiles, in slabs of `slab` blocks; a tile's blocks within one
  slab go group_blocks to a matmul."""
  bq = 128 // group
  idx = np.asarray(idx)[0, :, 0]
  tiles = [{j for q in range(i, i + bq) for j in idx[q] if 0 <= j <= (i + bq - 1) // block and j < t // block}
           for i in range(0, t, bq)]
  per_step = step_rows // 128
  groups = blocks = 0
  for s in range(0, len(tiles), per_step):
    union = sorted(set().union(*tiles[s:s + per_step]))
    blocks += len(union)
    for tile in tiles[s:s + per_step]:
      in_slab = np.bincount([union.index(j) // slab for j in tile], minlength=1)
      groups += sum(-(-n // group_blocks) for n in in_slab)
  width = 3 * dk + 2 * dv if backward else dk + dv
  return groups * 2 * 128 * group_blocks * block * width, blocks


def test_walk_counts_what_the_definition_says_and_the_estimate_is_exact_for_the_window():
  t, group, block, dk, dv = 256, 16, 16, 32, 16
  q, k, v, idx = _inputs(1, t, group, 1, dk, dv, block, 2, jnp.float32, seed=1)
  options = KernelOptions(step_rows=256, slab_keys=64, matmul_keys=32)
  w = selection_pallas.Walk("selection", 1, t, t, 1, group, dk, dv, block, 2, 0, 1.0, options, 4)
  lists = selection_pallas.step_lists(w, *selection_pallas.tile_unions(idx, slc_block=block, seq_len=t,
                                                                       queries_per_tile=8))
  for backward in (False, True):
    counted = selection_pallas.walk(w, lists, backward)
    flops, blocks = _brute_force_walk(idx, t, group, block, dk, dv, 256, 4, 2, backward)
    assert (counted["flops"], counted["union_blocks"]) == (flops, blocks)
    assert counted["steps"] == t * group // 256
  # The window's CostEstimate (a static offset) is the walk of its lists; t=256, w=40, blocks of 64.
  estimate, = time_model.pallas_calls(lambda q, k, v: selection_pallas.window_attention(q, k, v, None, 0, 40, None,
                                                                                       options), q, k, v)
  # tile i (queries 8i..8i+7) walks blocks (8i - 39) // 64 .. (8i + 7) // 64: 1 or 2 blocks, one matmul each
  # (matmul_keys=32 < 64: one block per matmul; slab_keys=64: one block per slab).
  groups = sum((8 * i + 7) // 64 - max(8 * i - 39, 0) // 64 + 1 for i in range(t // 8))
  assert estimate.flops == groups * 2 * 128 * 64 * (dk + dv)
  wnd = selection_pallas.Walk("window", 1, t, t, 1, group, dk, dv, 64, 1, 40, 1.0, options, 4)
  half = wnd._replace(t=128)                                          # the last 128 queries: tiles from 16
  for geometry, first_tile, backward in [(wnd, 0, False), (wnd, 0, True), (half, 16, False)]:
    lists = selection_pallas.step_lists(geometry, *selection_pallas.window_unions(geometry, first_tile))
    assert (selection_pallas._window_counts(geometry, first_tile, backward)
            == selection_pallas.walk(geometry, lists, backward))        # the geometry's count is the lists' walk
  # Bytes: q, doc_start rows, out and lse once; each step's (16 queries') window blocks of K/V once; the lists.
  blocks = sum((16 * s + 15) // 64 - max(16 * s - 39, 0) // 64 + 1 for s in range(t // 16))
  assert estimate.grid == (1, 1, 16)
  assert estimate.bytes == t * group * (dk * 4 + 4 + dv * 4 + 4) + blocks * 64 * (dk + dv) * 4 + 16 * wnd.list_len * 4


def _nsa_layer(q, k, v, k_cmp, v_cmp, gates, *, window=512, num_selected=16, impl="pallas", options=None):
  """One NSA layer's attention from the kernel contract, as model/nsa.py composes it (paper
  settings: l=32, d=16, l'=64, n=16, w=512): the three branches, gated."""
  kw = dict(impl=impl, options=options)
  o_cmp, lse = nsa.compressed_attention(q, k_cmp, v_cmp, block_len=32, stride=16, **kw)
  idx = nsa.select_blocks(q, k_cmp, block_len=32, stride=16, slc_block=64, num_selected=num_selected, lse=lse,
                          **kw)
  o_slc = nsa.selection_attention(q, k, v, idx, slc_block=64, **kw)
  o_win = nsa.window_attention(q, k, v, window=window, **kw)
  g = jax.nn.sigmoid(gates.astype(jnp.float32))
  return g[..., :1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:] * o_win


def test_nsa_layer_pallas_matches_xla(dtype=jnp.float32, tol=1e-5):
  """All four kernels together (l=32, d=16, l'=64, T=512: 8 blocks, 5 selected, w=200), outputs
  and every gradient, fp32, in Pallas's interpreter (each kernel's own tests simulate the TPU)."""
  b, t, hq, hkv, dk, dv = 1, 512, 4, 2, 64, 32
  ks = jax.random.split(jax.random.key(3), 7)
  q, k, v = (jax.random.normal(ks[i], (b, t, h, d)).astype(dtype)
             for i, (h, d) in enumerate([(hq, dk), (hkv, dk), (hkv, dv)]))
  c = nsa.num_compressed(t, 32, 16)
  k_cmp = jax.random.normal(ks[3], (b, c, hkv, dk)).astype(dtype)
  v_cmp = jax.random.normal(ks[4], (b, c, hkv, dv)).astype(dtype)
  gates, cot = jax.random.normal(ks[5], (b, t, hq, 3)), jax.random.normal(ks[6], (b, t, hq, dv))
  layer = lambda impl: lambda *a: _nsa_layer(*a, window=200, num_selected=5, impl=impl,
                                             options=KernelOptions(pallas_mode="interpret"))
  args = (q, k, v, k_cmp, v_cmp, gates)
  np.testing.assert_allclose(np.asarray(layer("pallas")(*args)), np.asarray(layer("xla")(*args)), atol=tol, rtol=tol)
  loss = lambda impl: lambda *a: jnp.sum(layer(impl)(*a) * cot)
  got = jax.grad(loss("pallas"), argnums=range(6))(*args)
  assert_grads_close(got, jax.grad(loss("xla"), argnums=range(6))(*args), tol)


@pytest.mark.parametrize("chip", ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"])
def test_nsa_layer_forward_and_backward_compile_for_tpu(chip):
  """One NSA layer (all four Pallas kernels) fwd+bwd at the paper's shape: T=8192, HQ=64, HKV=4,
  Dk=192, Dv=128, one sequence per chip, inside shard_map. Mosaic lowers and checks every kernel
  for the chip; the compiled step must fit in a few GiB of HBM."""
  topo = topologies.get_topology_desc(platform="tpu", topology_name=chip, chip_config_name="default",
                                      chips_per_host_bounds=(2, 2, 1), num_slices=1)
  mesh = jax.make_mesh((len(topo.devices),), ("data",), devices=topo.devices)
  loss = lambda *a: jnp.sum(_nsa_layer(*a, options=KernelOptions(pallas_mode="compiled")) ** 2)
  grads = jax.shard_map(jax.grad(loss, argnums=range(6)), mesh=mesh, in_specs=(P("data"),) * 6,
                        out_specs=(P("data"),) * 6, check_vma=False)
  b, t, c, sharded = len(topo.devices), 8192, nsa.num_compressed(8192, 32, 16), NamedSharding(mesh, P("data"))
  shapes = [((b, t, 64, 192), jnp.bfloat16), ((b, t, 4, 192), jnp.bfloat16), ((b, t, 4, 128), jnp.bfloat16),
            ((b, c, 4, 192), jnp.bfloat16), ((b, c, 4, 128), jnp.bfloat16), ((b, t, 64, 3), jnp.float32)]
  lowered = jax.jit(grads).lower(*[jax.ShapeDtypeStruct(s, d, sharding=sharded) for s, d in shapes])
  mosaic = lowered.as_text().count("tpu_custom_call")
  assert mosaic >= 7, mosaic      # compressed fwd, bwd and scores; selection and window fwd and bwd
  mem = lowered.compile().memory_analysis()
  print(f"{chip}: args {mem.argument_size_in_bytes / 2**20:.0f} MiB, out {mem.output_size_in_bytes / 2**20:.0f} MiB, "
        f"temp {mem.temp_size_in_bytes / 2**20:.0f} MiB")
  assert 0 < mem.temp_size_in_bytes < 6 * 2**30, mem.temp_size_in_bytes
