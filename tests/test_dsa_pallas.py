"""DSA's Pallas TPU kernels (TPU interpret mode on CPU) against the XLA reference: sparse MLA
attention (outputs and all gradients) and the teacher; the indexer's top-k: test_dsa_indexer_pallas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_dsa_kernels import SCALE, _indexer_inputs, _indices, _rand

from kernels import KernelOptions, Unsupported, dsa
from kernels.dsa import pallas as dsa_pallas
from kernels.dsa import sparsecore
from perf.time_model import pallas_calls

SPARSE_CASES = [
    # t, heads, dk, v_dim, k, dtype, tol, kernel options (TPU interpret mode unless "interpret")
    (45, 16, 48, 32, 12, jnp.float32, 2e-5, {}),          # 8 queries a tile; T not a multiple of it
    (70, 4, 40, 24, 90, jnp.float32, 2e-5,                # k > T; 32 queries a tile; KV-stationary dkv
     {"prefetch_bytes": 96, "pallas_mode": "interpret", "dsa_dkv": "tiles"}),    # in 8-pair windows
    (6, 128, 576, 512, 8, jnp.bfloat16, 3e-2,             # the V3.2 head shape, one query a tile
     {"pallas_mode": "interpret"}),
    (7, 128, 576, 512, 8, jnp.bfloat16, 3e-2,             # two a tile (v6e's 256 rows), T odd
     {"pallas_mode": "interpret", "dsa_tile_rows": 256}),
    (300, 4, 64, 32, 150, jnp.bfloat16, 3e-2,             # unions of 3 gathered chunks (dkv rows:
     {"pallas_mode": "interpret"}),                       # a slot's writes drained before its refill)
]


@pytest.mark.parametrize("t,heads,dk,v_dim,k,dtype,tol,options", SPARSE_CASES,
                         ids=["H16", "k-over-T-windows-tiles", "V3.2-heads-bf16", "V3.2-256-rows", "three-chunks-bf16"])
def test_sparse_attention_matches_xla_forward_and_gradients(t, heads, dk, v_dim, k, dtype, tol, options):
  """Index lists with -1, repeated, future and out-of-range entries and a row that sees nothing
  (0 output, 0 gradient): outputs and the q and kv gradients equal the reference's."""
  b = 1
  options = KernelOptions(**options)
  ks = jax.random.split(jax.random.key(t), 3)
  q, kv = _rand(ks[0], (b, t, heads, dk), dtype), _rand(ks[1], (b, t, dk), dtype)
  indices = _indices(b, t, k, seed=t)
  cot = _rand(ks[2], (b, t, heads, v_dim), jnp.float32)
  run = lambda impl: lambda q, kv: dsa.sparse_attention(q, kv, indices, v_dim=v_dim, scale=SCALE, impl=impl,
                                                        options=options)
  out, want = run("pallas")(q, kv), run("xla")(q, kv)
  assert out.dtype == dtype and out.shape == want.shape
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)
  assert not np.asarray(out[:, 0]).any()
  loss = lambda impl: lambda q, kv: jnp.sum(run(impl)(q, kv).astype(jnp.float32) * cot)
  grads = jax.grad(loss("pallas"), argnums=(0, 1))(q, kv)
  grads_want = jax.grad(loss("xla"), argnums=(0, 1))(q, kv)
  for g, g_want in zip(grads, grads_want):
    scale = float(jnp.abs(g_want.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(g, np.float32) / scale, np.asarray(g_want, np.float32) / scale,
                               atol=2 * tol)
  assert not np.asarray(grads[0][:, 0]).any()


def _sparse_stage(b, t, heads, dk, v_dim, k, options, seed):
  """(objective(impl): value_and_grad of sum(out * cot) + 10 x the indexer loss over the sparse
  stage's five inputs, those inputs)."""
  ks = jax.random.split(jax.random.key(seed), 3)
  q, kv = _rand(ks[0], (b, t, heads, dk), jnp.float32), _rand(ks[1], (b, t, dk), jnp.float32)
  q_idx, k_idx, w = _indexer_inputs(b, t, 3, 8, seed=seed + 1)
  indices = _indices(b, t, k, seed=seed + 2)
  cot = _rand(ks[2], (b, t, heads, v_dim), jnp.float32)

  def objective(impl):
    def f(q, kv, q_idx, k_idx, w):
      out, loss = dsa.sparse_attention_and_indexer_loss(q, kv, q_idx, k_idx, w, indices, v_dim=v_dim, scale=SCALE,
                                                        impl=impl, options=options)
      return jnp.sum(out * cot) + 10.0 * loss, (out, loss)
    return jax.value_and_grad(f, argnums=range(5), has_aux=True)
  return objective, (q, kv, q_idx, k_idx, w), indices


@pytest.mark.parametrize("b,t,heads,k,options,fused",
                         [(1, 45, 16, 12, {"dsa_dkv": "tiles", "pallas_mode": "interpret"}, True),
                          (2, 40, 4, 50, {"pallas_mode": "interpret"}, False)],
                         ids=["H16-8-queries-a-tile-dkv-tiles", "H4-k-over-T-batch2-teacher-walk"])
def test_indexer_loss_teacher_from_the_kernels(b, t, heads, k, options, fused, monkeypatch):
  """The sparse stage's attention and indexer loss in one pass, the teacher from the Pallas
  forward's lse (computed by the forward itself, or by its own walk when a tile's scores would not
  fit VMEM: forced here): output, loss and the gradients of every input equal the reference's
  (the loss reaches the indexer only)."""
  if not fused:
    monkeypatch.setattr(dsa_pallas, "TEACHER_SCORES_BYTES", 0)
  options = KernelOptions(**options)
  objective, args, indices = _sparse_stage(b, t, heads, 40, 24, k, options, seed=t)
  q, kv, q_idx, k_idx, w = args
  names = {call.name for call in pallas_calls(objective("pallas"), *args)}
  assert ("dsa_sparse_fwd_teacher" in names, "dsa_teacher" in names) == (fused, not fused), names
  (_, (out, loss)), grads = objective("pallas")(*args)
  (_, (out_want, loss_want)), grads_want = objective("xla")(*args)
  np.testing.assert_allclose(out, out_want, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(loss, loss_want, rtol=1e-5)
  assert float(loss_want) > 0.05
  np.testing.assert_allclose(loss, dsa.indexer_loss(q, kv, q_idx, k_idx, w, indices, scale=SCALE, impl="pallas",
                                                    options=options), rtol=1e-6)
  for name, g, g_want in zip(["q", "kv", "q_idx", "k_idx", "w"], grads, grads_want):
    scale = float(jnp.abs(g_want).max())
    assert scale > 0, name
    np.testing.assert_allclose(np.asarray(g) / scale, np.asarray(g_want) / scale, atol=5e-5, err_msg=name)


def test_sparse_attention_on_gathered_rows(monkeypatch):
  """kernels.dsa_gather=sparsecore: each query chunk's union rows gathered into one buffer (the
  SparseCore kernel in Pallas's interpreter), the walks reading whole chunks of it and the kv
  gradient added back per slot: with chunks of 4 tiles (3 chunks here), the teacher from the
  forward or from its own walk, out, the teacher's loss and every gradient equal the reference's.
  On a TPU the SparseCore kernels run compiled (a v5e, which has none, refuses with the error
  naming kernels.dsa_gather)."""
  monkeypatch.setattr(dsa_pallas, "GATHER_ROWS", 256)
  options = KernelOptions(dsa_gather="sparsecore", dsa_tiles_per_step=2)
  b, t, heads, dk, v_dim, k = 1, 72, 16, 64, 32, 30
  objective, args, _ = _sparse_stage(b, t, heads, dk, v_dim, k, options, seed=5)
  q, kv = args[:2]
  if jax.default_backend() == "tpu" and sparsecore.sparse_cores() is None:      # a v5e: no SparseCores
    with pytest.raises(Unsupported, match="kernels.dsa_gather"):
      objective("pallas")(*args)
    return
  g = dsa_pallas._geometry(q, kv, k, v_dim, SCALE, options)
  assert g.gathered and g.num_tiles // g.chunk_tiles == 3, g
  (_, (out_want, loss_want)), grads_want = objective("xla")(*args)
  for fused, kernel in ((True, "dsa_sparse_fwd_teacher"), (False, "dsa_teacher")):     # the teacher's two ways
    if not fused:
      monkeypatch.setattr(dsa_pallas, "TEACHER_SCORES_BYTES", 0)
    names = {call.name for call in pallas_calls(objective("pallas"), *args)}
    assert {kernel, "dsa_sparse_bwd_gathered"} <= names, names
    (_, (out, loss)), grads = objective("pallas")(*args)
    np.testing.assert_allclose(out, out_want, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(loss, loss_want, rtol=1e-5)
    for name, grad, want in zip(["q", "kv", "q_idx", "k_idx", "w"], grads, grads_want):
      scale = float(jnp.abs(want).max())
      assert scale > 0, name
      np.testing.assert_allclose(np.asarray(grad) / scale, np.asarray(want) / scale, atol=5e-5, err_msg=name)


def test_tile_selection_unions_and_choosers():
  """Two queries a tile: the union is the sorted distinct valid keys of both, each key's bits
  say which query chose it; future, -1, out-of-range and repeated entries are dropped."""
  indices = jnp.array([[[0, 0, -1], [1, 0, 9], [3, 2, 2], [2, 4, 1]]], jnp.int32)    # T=4, k=3
  keys, bits, count = dsa_pallas.tile_selection(indices, 0, num_keys=8, queries_per_tile=2, slots=4)
  # tile 0: q0 {0}, q1 {0, 1} (9 out of range); tile 1: q2 {2} (3 is future), q3 {1, 2} (4 future)
  np.testing.assert_array_equal(count, [[2, 2]])
  np.testing.assert_array_equal(keys, [[[0, 1, 1, 1], [1, 2, 2, 2]]])
  np.testing.assert_array_equal(bits, [[[0b11, 0b10, 0, 0], [0b10, 0b11, 0, 0]]])


@pytest.mark.parametrize("chip", ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"])
def test_dsa_forward_and_backward_compile_for_tpu(chip):
  """DSA's kernels at the V3.2 shape (H=128, Dk=576, v_dim=512, H_I=64, d_I=128, k=2048,
  T=4096, bf16), one sequence per chip inside shard_map: sparse attention with the indexer loss's
  teacher and all gradients compile with Mosaic for the chip (SparseCore gathers where it has
  them) and fit in a few GiB of HBM (the top-k's compile: tests/test_dsa_indexer_pallas.py)."""
  topo = topologies.get_topology_desc(platform="tpu", topology_name=chip, chip_config_name="default",
                                      chips_per_host_bounds=(2, 2, 1), num_slices=1)
  mesh = jax.make_mesh((len(topo.devices),), ("data",), devices=topo.devices)
  options = KernelOptions(pallas_mode="compiled")
  h, dk, dv, hi, di, k, t = 128, 576, 512, 64, 128, 2048, 4096

  def loss(q, kv, q_idx, k_idx, w, idx):
    out, indexer_loss = dsa.sparse_attention_and_indexer_loss(q, kv, q_idx, k_idx, w, idx, v_dim=dv, scale=SCALE,
                                                              impl="pallas", options=options)
    return jnp.sum(out.astype(jnp.float32) ** 2) + indexer_loss
  grads = jax.shard_map(jax.grad(loss, argnums=range(5)), mesh=mesh, in_specs=(P("data"),) * 6,
                        out_specs=(P("data"),) * 5, check_vma=False)
  b, sharded = len(topo.devices), NamedSharding(mesh, P("data"))
  spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sharded)
  lowered = jax.jit(grads).lower(spec(b, t, h, dk), spec(b, t, dk), spec(b, t, hi, di), spec(b, t, di),
                                 spec(b, t, hi, dtype=jnp.float32), spec(b, t, k, dtype=jnp.int32))
  assert lowered.as_text().count("tpu_custom_call") >= 2      # forward with the teacher, dq+dkv
  compiled = lowered.compile()
  # kernels.dsa_gather=auto: the rows are gathered and the kv gradient added on the SparseCores
  # where the chip has them (v5p, v6e), by TensorCore DMAs on v5e.
  assert ('async_execution_thread="sparsecore"' in compiled.as_text()) == (not chip.startswith("v5e")), chip
  mem = compiled.memory_analysis()
  print(f"{chip}: args {mem.argument_size_in_bytes / 2**20:.0f} MiB, out {mem.output_size_in_bytes / 2**20:.0f} MiB, "
        f"temp {mem.temp_size_in_bytes / 2**20:.0f} MiB")
  assert 0 < mem.temp_size_in_bytes < 8 * 2**30, mem.temp_size_in_bytes
