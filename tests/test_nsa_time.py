"""The time model (perf/time_model.py, perf/nsa_time.py): grid steps counted from the traced program,
the model's terms, the honest minimum, and the NSA layer's grid-step bound at the paper's shape."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from perf import nsa_time, time_model
from perf.chips import CHIPS


def _copy_kernel(x_ref, o_ref):
  o_ref[...] = x_ref[...] + 1


def _tiled_copy(x):
  """grid (4, 2) over [32, 256] in [8, 128] blocks, with a CostEstimate."""
  return pl.pallas_call(_copy_kernel, grid=(4, 2), in_specs=[pl.BlockSpec((8, 128), lambda i, j: (i, j))],
                        out_specs=pl.BlockSpec((8, 128), lambda i, j: (i, j)),
                        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), name="tiled_copy", interpret=True,
                        cost_estimate=pl.CostEstimate(flops=32 * 256, transcendentals=0, bytes_accessed=2 * 32 * 256 * 4))(x)


def test_pallas_calls_multiply_each_grid_by_the_scans_around_it():
  """A call inside lax.map over 3 chunks, inside a scan of length 5, plus one outside: 8 x 15 + 8
  steps, and the CostEstimate read as traced (the scans' trip counts are not in it)."""
  def fn(x):
    def body(carry, _):
      return carry + jax.lax.map(_tiled_copy, x).sum(), None
    total, _ = jax.lax.scan(body, 0.0, None, length=5)
    return total + _tiled_copy(x[0]).sum()
  calls = time_model.pallas_calls(jax.jit(fn), jax.ShapeDtypeStruct((3, 32, 256), jnp.float32))
  assert [(c.name, c.grid, c.repeats) for c in calls] == [("tiled_copy", (4, 2), 15), ("tiled_copy", (4, 2), 1)]
  assert sum(c.steps for c in calls) == 8 * 15 + 8
  assert calls[0].flops == 32 * 256 and calls[0].bytes == 2 * 32 * 256 * 4


def test_terms_add_steps_and_dmas_to_the_larger_of_compute_and_memory():
  v5e, v5p = CHIPS["v5e"], CHIPS["v5p"]
  cost = time_model.Cost("k", steps=1000, flops=197e12 * 1e-3, bytes=0.82e12 * 2e-3, dmas=10_000)
  terms = time_model.terms(cost, v5e)
  assert terms.compute == pytest.approx(1e-3) and terms.memory == pytest.approx(2e-3)
  assert terms.steps == pytest.approx(1000 * v5e.step_us * 1e-6)
  assert terms.dmas == pytest.approx(10_000 * v5e.dma_issue_ns * 1e-9)
  assert terms.total == pytest.approx(2e-3 + terms.steps + terms.dmas)
  worse = time_model.terms(cost, v5e, step_factor=3, dma_factor=3)
  assert worse.steps == pytest.approx(3 * terms.steps) and worse.dmas == pytest.approx(3 * terms.dmas)
  assert time_model.terms(cost, v5p).steps == pytest.approx(1000 * v5p.step_us * 1e-6 / 2)   # megacore
  assert time_model.roofline(459e12, 0, v5p) == pytest.approx(1.0)


def test_the_minimum_counts_each_querys_keys_from_the_definition():
  """T=128, one KV head of 2 query heads, blocks of 16, l=32, d=16, w=20; query t chose blocks
  {0, t // 16} (and -1): its selected keys are 16 + (t % 16 + 1) past block 0, t + 1 in it."""
  s = nsa_time.Shape(hq=2, hkv=1, dk=8, dv=4, block_len=32, stride=16, slc_block=16, num_selected=3, window=20,
                     itemsize=2)
  t = np.arange(128)
  idx = np.stack([np.zeros(128, np.int32), t // 16, np.full(128, -1)], -1)[None, :, None, :].astype(np.int32)
  got = nsa_time.minimum(128, idx, s)
  sel = np.where(t < 16, t + 1, 16 + t % 16 + 1)
  cmp = np.clip((t - 31) // 16 + 1, 0, nsa_time.nsa.num_compressed(128, 32, 16))
  win = np.minimum(20, t + 1)
  assert got.flops == 3 * 2 * (8 + 4) * 2 * (sel + cmp + win).sum()


@pytest.mark.parametrize("seq_len,bound", [(65536, 18_000), (131072, 36_000)])
def test_an_nsa_layer_runs_few_grid_steps_at_the_papers_shape(seq_len, bound):
  """One layer, forward and backward, all Pallas calls (window included), traced at the paper's
  shape (B=1, HQ=64, HKV=4, Dk=192, Dv=128, l=32, d=16, l'=64, n=16, w=512, bf16, compiled for
  TPU): at most `bound` grid steps, each step carrying 4096 rows' work."""
  calls = nsa_time.layer_calls(seq_len)
  steps = sum(c.steps for c in calls)
  assert steps <= bound, [(c.name, c.grid, c.repeats) for c in calls]
  assert {c.name for c in calls} >= {"nsa_selection_fwd", "nsa_selection_bwd", "nsa_window_fwd", "nsa_window_bwd"}
