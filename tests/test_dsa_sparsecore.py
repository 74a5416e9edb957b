"""DSA's SparseCore row gather: the jnp path, the kernel in Pallas's interpreter against jnp.take,
ahead-of-time compiles for the chips with SparseCores, and the error on a chip without them."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kernels import KernelOptions, Unsupported
from kernels.dsa import sparsecore

SPARSECORE = KernelOptions(dsa_gather="sparsecore")


def _chip_mesh(chip: str):
  topo = topologies.get_topology_desc(platform="tpu", topology_name=chip, chip_config_name="default",
                                      chips_per_host_bounds=(2, 2, 1), num_slices=1)
  return jax.make_mesh((len(topo.devices),), ("data",), devices=topo.devices)


def _compile_per_chip(mesh, fn, table, rows: int):
  """fn(table, indices) per device of the mesh: the table replicated, `rows` indices per device."""
  f = jax.shard_map(fn, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"), check_vma=False)
  indices = jax.ShapeDtypeStruct((rows * mesh.size,), jnp.int32, sharding=NamedSharding(mesh, P("data")))
  table = jax.ShapeDtypeStruct(table.shape, table.dtype, sharding=NamedSharding(mesh, P()))
  return jax.jit(f).lower(table, indices).compile()


def test_tensorcore_path_is_take_and_auto_picks_it_off_tpu():
  table = jax.random.normal(jax.random.key(0), (37, 576), jnp.bfloat16)
  indices = jnp.asarray([0, 36, 5, 5, 17], jnp.int32)
  assert sparsecore.resolve_gather(KernelOptions()) == "tensorcore"
  got = sparsecore.gather_rows(table, indices, options=KernelOptions(dsa_gather="tensorcore"))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.take(table, indices, axis=0)))


def test_words_hold_neighbouring_columns():
  """pack_words: word j = column 2j in the low half, 2j+1 in the high half; unpack_words undoes it."""
  table = jnp.asarray([[1.0, 2.0, -3.0, 0.5]], jnp.bfloat16)
  words = sparsecore.pack_words(table)
  bits = np.asarray(jax.lax.bitcast_convert_type(table, jnp.uint16)).astype(np.uint32)
  np.testing.assert_array_equal(np.asarray(words), bits[:, 0::2] | (bits[:, 1::2] << 16))
  np.testing.assert_array_equal(np.asarray(sparsecore.unpack_words(words, jnp.bfloat16)), np.asarray(table))


@pytest.mark.parametrize("n,d,dtype", [(50, 576, jnp.bfloat16), (9, 32, jnp.uint32)], ids=["bf16-576", "u32-32"])
def test_sparsecore_kernel_equals_take(n, d, dtype):
  """The kernel in Pallas's interpreter (4 emulated workers, two windows each, both slots reused):
  every row equals jnp.take's, the first and last table rows and repeats included."""
  words = d // 2 if dtype == jnp.bfloat16 else d
  m = 2 * sparsecore.row_multiple(words, SPARSECORE)
  assert m == {288: 256, 32: 1024}[words]
  table = jax.random.normal(jax.random.key(1), (n, d), jnp.float32).astype(dtype) if dtype == jnp.bfloat16 else \
      jax.random.randint(jax.random.key(1), (n, d), 0, 2**31 - 1, jnp.int32).astype(jnp.uint32)
  indices = jax.random.randint(jax.random.key(2), (m,), 0, n, jnp.int32).at[:3].set(jnp.asarray([0, n - 1, n - 1]))
  got = jax.jit(lambda t, i: sparsecore.gather_rows(t, i, options=SPARSECORE))(table, indices)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.take(table, indices, axis=0)))


def test_rows_must_fill_every_worker_window():
  table = jnp.zeros((8, 64), jnp.uint32)
  with pytest.raises(Unsupported, match=re.escape("rows=100: a multiple of 512 (SparseCore workers x rows per stream)")):
    sparsecore.gather_words(table, jnp.zeros((100,), jnp.int32), options=SPARSECORE)


@pytest.mark.parametrize("chip,cores", [("v6e:2x2", 2)])    # v5p: the DSA layer compile test
def test_gather_compiles_for_chips_with_sparsecores(chip, cores):
  """At V3.2's row count per call (2048 rows x 8 queries per device) over a 16k-row table: the
  512-wide latent as 256 words gathers in place on every SparseCore of the chip (an async
  SparseCore call, no copies, no temporaries), and the full 576-wide bf16 row compiles too, with
  XLA's copies into and out of the linear layout it needs."""
  mesh = _chip_mesh(chip)
  options = KernelOptions(pallas_mode="compiled")
  with jax.set_mesh(mesh):
    assert sparsecore.resolve_gather(options) == "sparsecore"
    assert sparsecore.row_multiple(256, options) == cores * 16 * 64
  latent = _compile_per_chip(mesh, lambda t, i: sparsecore.gather_words(t, i, options=options),
                             jax.ShapeDtypeStruct((16384, 256), jnp.uint32), 2048 * 8)
  hlo = latent.as_text()
  assert 'async_execution_thread="sparsecore"' in hlo
  assert f'"core_ids":[{",".join(f"{chr(34)}{c}{chr(34)}" for c in range(cores))}]' in hlo
  assert re.search(r"= \S+ copy\(", hlo) is None
  assert latent.memory_analysis().temp_size_in_bytes == 0
  full = _compile_per_chip(mesh, lambda t, i: sparsecore.gather_rows(t, i, options=options),
                           jax.ShapeDtypeStruct((16384, 576), jnp.bfloat16), 2048 * 8)
  assert '"tiling":"TILING_SPARSE_CORE"' in full.as_text()
  assert full.memory_analysis().output_size_in_bytes == 2048 * 8 * 576 * 2


def test_forced_sparsecore_on_v5e_names_the_option_and_the_chip():
  mesh = _chip_mesh("v5e:2x2")
  compiled = KernelOptions(pallas_mode="compiled", dsa_gather="sparsecore")
  with jax.set_mesh(mesh):
    assert sparsecore.resolve_gather(KernelOptions(pallas_mode="compiled")) == "tensorcore"
  with pytest.raises(Unsupported, match=re.escape(
      "kernels.dsa_gather=sparsecore: the target chip (TPU v5 lite) has no SparseCores (v5p and v6e have them); "
      "use tensorcore or auto")):
    _compile_per_chip(mesh, lambda t, i: sparsecore.gather_rows(t, i, options=compiled),
                      jax.ShapeDtypeStruct((1024, 576), jnp.bfloat16), 1024)


def _add_at(table, indices, rows):
  want = np.array(table)
  np.add.at(want, np.asarray(indices), np.asarray(rows))
  return want


def test_tensorcore_scatter_add_is_add_at():
  table = jax.random.normal(jax.random.key(3), (37, 576), jnp.float32)
  indices = jnp.asarray([0, 36, 5, 5, 17, 0], jnp.int32)
  rows = jax.random.normal(jax.random.key(4), (6, 576), jnp.float32)
  got = sparsecore.scatter_add_rows(table, indices, rows, options=KernelOptions(dsa_gather="tensorcore"))
  np.testing.assert_allclose(np.asarray(got), _add_at(table, indices, rows), rtol=0, atol=1e-6)


@pytest.mark.parametrize("d,width,m", [(576, 640, 128), (64, 256, 512)])
def test_sparsecore_scatter_add_equals_add_at(d, width, m):
  """The kernel in Pallas's interpreter (4 emulated workers, two windows each): every table row
  equals np.add.at's, with rows repeated inside one window (0 and the last row twice each in the
  first four) and across workers; the pad to `add_width` columns is cut off again."""
  n = 50
  assert (sparsecore.add_width(d), 2 * sparsecore.row_multiple(width, SPARSECORE)) == (width, m)
  table = jax.random.normal(jax.random.key(5), (n, d), jnp.float32)
  rows = jax.random.normal(jax.random.key(6), (m, d), jnp.float32)
  indices = jax.random.randint(jax.random.key(7), (m,), 0, n, jnp.int32).at[:4].set(jnp.asarray([0, n - 1, n - 1, 0]))
  got = jax.jit(lambda t, i, r: sparsecore.scatter_add_rows(t, i, r, options=SPARSECORE))(table, indices, rows)
  assert got.shape == (n, d)
  np.testing.assert_array_equal(np.asarray(got), _add_at(table, indices, rows))


def test_scatter_add_rows_must_fill_every_worker_window():
  with pytest.raises(Unsupported, match=re.escape("rows=100: a multiple of 64 (SparseCore workers x rows per stream)")):
    sparsecore.scatter_add_rows(jnp.zeros((8, 576)), jnp.zeros((100,), jnp.int32), jnp.zeros((100, 576)),
                                options=SPARSECORE)


def _compile_add(mesh, options, n: int, d: int, m: int):
  """scatter_add_rows per device: a table of n rows (donated), m indices and rows per device."""
  fn = lambda t, i, r: sparsecore.scatter_add_rows(t, i, r, options=options)
  f = jax.shard_map(fn, mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P("data"), check_vma=False)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh):
    return jax.jit(f, donate_argnums=(0,)).lower(spec((n * mesh.size, d), jnp.float32),
                                                 spec((m * mesh.size,), jnp.int32),
                                                 spec((m * mesh.size, d), jnp.float32)).compile()


@pytest.mark.parametrize("chip,cores", [("v6e:2x2", 2)])    # v5p: the DSA layer compile test
def test_scatter_add_compiles_for_chips_with_sparsecores(chip, cores):
  """2048 rows x 8 queries per device into a 16k-row table: the 512-wide fp32 latent adds in place
  on every SparseCore of the chip (an async SparseCore call, the table aliased, no copies, no
  temporaries); 576 compiles padded to 640, with XLA's copies in and out."""
  mesh = _chip_mesh(chip)
  options = KernelOptions(pallas_mode="compiled")
  with jax.set_mesh(mesh):
    assert sparsecore.row_multiple(512, options) == cores * 16 * 32
  latent = _compile_add(mesh, options, 16384, 512, 2048 * 8)
  hlo = latent.as_text()
  assert 'async_execution_thread="sparsecore"' in hlo
  assert f'"core_ids":[{",".join(f"{chr(34)}{c}{chr(34)}" for c in range(cores))}]' in hlo
  assert re.search(r"= \S+ copy\(", hlo) is None
  memory = latent.memory_analysis()
  assert (memory.temp_size_in_bytes, memory.alias_size_in_bytes, memory.output_size_in_bytes) == \
      (0, 16384 * 512 * 4, 16384 * 512 * 4)
  full = _compile_add(mesh, options, 16384, 576, 2048 * 8)
  assert "f32[16384,640]" in full.as_text()
  assert full.memory_analysis().output_size_in_bytes == 16384 * 576 * 4


def test_forced_sparsecore_scatter_add_on_v5e_names_the_option_and_the_chip():
  mesh = _chip_mesh("v5e:2x2")
  auto = _compile_add(mesh, KernelOptions(pallas_mode="compiled"), 1024, 576, 1024)
  assert 'async_execution_thread="sparsecore"' not in auto.as_text()
  with pytest.raises(Unsupported, match=re.escape(
      "kernels.dsa_gather=sparsecore: the target chip (TPU v5 lite) has no SparseCores (v5p and v6e have them); "
      "use tensorcore or auto")):
    _compile_add(mesh, KernelOptions(pallas_mode="compiled", dsa_gather="sparsecore"), 1024, 576, 1024)
