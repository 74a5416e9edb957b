"""What a TPU pays for a Pallas kernel, counted from the program itself (docs/design.md §7):

  time >= max(FLOPs / peak, HBM bytes / bandwidth) + grid steps x step cost + DMA descriptors x issue cost

per kernel launch, each term reported. Grid steps are the traced `pallas_call` grids times the trip
counts of the scans around them (`pallas_calls`, from `jax.make_jaxpr`: nothing retyped); FLOPs and
bytes are the kernels' exact CostEstimates or, where they depend on data (NSA's selection), the
kernels' own walks over their lists; DMA descriptors come from the same walks. Chip facts and the
assumed step and DMA costs: perf/chips.py. Every time here is an estimate, never a measurement.

Megacore (v4, v5p): the two TensorCores split a kernel's parallel grid axes, so the per-step and
per-DMA terms are divided by the cores (every kernel modelled here keeps a parallel axis of at least
B x HKV >= 2 steps); peak FLOP/s and bandwidth are per chip already.
"""
import math
from typing import NamedTuple

import jax
from jax.extend import core as jax_core

from perf.chips import Chip


class PallasCall(NamedTuple):
  """One pallas_call as traced: its grid, how often the loops around it run it, its CostEstimate."""
  name: str
  grid: tuple
  repeats: int
  flops: int
  transcendentals: int
  bytes: int

  @property
  def steps(self) -> int:
    return math.prod(self.grid) * self.repeats


def _sub_jaxprs(params):
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jax_core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jax_core.Jaxpr):
        yield v


def _walk(jaxpr, repeats: int, found: list):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      estimate = eqn.params.get("cost_estimate")
      name = str(getattr(eqn.params.get("name"), "name", eqn.params.get("name")) or "pallas_call")
      grid = tuple(int(g) for g in eqn.params["grid_mapping"].grid)
      found.append(PallasCall(name, grid, repeats, *(int(getattr(estimate, f, 0) or 0) if estimate else 0
                                                     for f in ("flops", "transcendentals", "bytes_accessed"))))
      continue
    inner = repeats * int(eqn.params["length"]) if eqn.primitive.name == "scan" else repeats
    if eqn.primitive.name == "while":      # no static trip count: a kernel inside one is counted once
      inner = repeats
    for sub in _sub_jaxprs(eqn.params):
      _walk(sub, inner, found)


def pallas_calls(fn, *args, **kwargs) -> list[PallasCall]:
  """Every pallas_call `fn(*args)` runs, from its traced program (args may be ShapeDtypeStructs:
  nothing is computed). cond branches are all counted."""
  found = []
  _walk(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr, 1, found)
  return found


class Cost(NamedTuple):
  """What one kernel does: grid steps, MXU FLOPs, HBM bytes, DMA descriptors issued."""
  name: str
  steps: int
  flops: float
  bytes: float
  dmas: int = 0

  def __add__(self, other: "Cost") -> "Cost":
    return Cost(self.name, self.steps + other.steps, self.flops + other.flops, self.bytes + other.bytes,
                self.dmas + other.dmas)


class SparseCoreCost(NamedTuple):
  """Work the SparseCores do beside the kernels (DSA's row gathers and gradient adds): HBM bytes
  (shared with the TensorCores) and DMA descriptors, issued by every vector subcore in parallel."""
  name: str
  bytes: float
  dmas: int


class Terms(NamedTuple):
  """Seconds per term of the model, on one chip."""
  compute: float
  memory: float
  steps: float
  dmas: float

  @property
  def total(self) -> float:
    return max(self.compute, self.memory) + self.steps + self.dmas


def terms(cost, chip: Chip, *, step_factor: float = 1.0, dma_factor: float = 1.0) -> Terms:
  """The model's terms for `cost` (a Cost, or a SparseCoreCost: its bytes at the chip's bandwidth,
  its descriptors shared by all the SparseCores' subcores) on `chip`; step_factor / dma_factor
  scale the assumed step and DMA issue costs (3.0: what if they are 3x worse). Kernel and
  SparseCore rows add up (no overlap assumed: an upper bound)."""
  if isinstance(cost, SparseCoreCost):
    workers = chip.sparse_cores * chip.sc_subcores
    if not workers:
      raise ValueError(f"{cost.name}: this chip has no SparseCores")
    return Terms(0.0, cost.bytes / (chip.hbm_tbs * 1e12), 0.0, cost.dmas * chip.dma_issue_ns * 1e-9 * dma_factor / workers)
  return Terms(cost.flops / (chip.peak_tflops * 1e12), cost.bytes / (chip.hbm_tbs * 1e12),
               cost.steps * chip.step_us * 1e-6 * step_factor / chip.cores,
               cost.dmas * chip.dma_issue_ns * 1e-9 * dma_factor / chip.cores)


def measure_ms(step, structs, repeats: int = 5) -> float:
  """On a TPU: the median wall time of jitted `step` on random inputs of `structs` (milliseconds)."""
  import time

  import numpy as np
  keys = jax.random.split(jax.random.key(0), len(structs))
  args = [jax.random.normal(key, x.shape, "float32").astype(x.dtype) for key, x in zip(keys, structs)]
  compiled = jax.jit(step).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def roofline(flops: float, min_bytes: float, chip: Chip) -> float:
  """Seconds at peak: the larger of the useful FLOPs at peak and the least bytes at full bandwidth."""
  return max(flops / (chip.peak_tflops * 1e12), min_bytes / (chip.hbm_tbs * 1e12))
