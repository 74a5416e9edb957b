"""Facts about TPU chips, and the one parser of accelerator names that every script uses.

Sources, per field (fetched 2026-12-06):
  [cloud]  the Cloud TPU pages docs.cloud.google.com/tpu/docs/v4, /v5e, /v5p-training, /v6e: HBM,
           peak bf16 and int8, HBM bandwidth ("16 GB, 819 GBps"; "95 GB, 2765 GBps"; "1638 GBps"),
           bidirectional ICI per chip, TensorCores per chip, MXU size.
  [jax]    jax/_src/pallas/mosaic/tpu_info.py (jax 0.10.2; rendered at
           docs.jax.dev/en/latest/pallas/tpu/hardware.html): VMEM per core (v5e 128 MiB, v5p 64 MiB,
           v6e 128 MiB, v4 16 MiB), SMEM 1 MiB, int8 rates, v4 int8 "Not Available"; SparseCores
           (`sparse_core`: v5p 4 x 16 vector subcores, v6e 2 x 16, v5e and v4 none).
  [aot]    measured here with libtpu 0.0.42.1 ahead-of-time compiles: the default scoped VMEM limit
           ("exceeded scoped vmem limit ... limit 16.00M" on v5e and v5p, 32.00M on v6e) and the
           usable VMEM (63.94M on v5p).
  [book]   "How to Scale Your Model" (jax-ml.github.io/scaling-book/tpus): "each core of the TPU is
           only capable of creating one DMA request per cycle"; v5p clock about 1.75 GHz.
Assumptions (no public number; the time model's 3x-worse columns cover them):
  step_us  Pallas pipeline cost per grid step. The project's brief says about 0.35 us; libtpu's
           static cost model (--xla_jf_dump_static_llo_profile_to, a copy-plus-one kernel with 4 KiB
           blocks, slope over 64 -> 512 steps) gives 598 cycles on v5e (0.40 us at 1.5 GHz), 454 on
           v5p (0.26 us), 358 on v6e (~0.2 us). We take 0.35 us for every chip; range 0.2-1 us.
  dma_issue_ns  scalar-core cost to issue one DMA descriptor: [book]'s floor is one cycle; the
           generated code spends about 10-30 bundles of address arithmetic per descriptor. We take
           20 ns; range 5-50 ns.
  dma_latency_us  HBM -> VMEM latency of a DMA (paid when a kernel waits on a copy it could not
           start early): libtpu's static model implies 0.2-0.35 us; we take 0.5 us; range 0.2-1 us.

Accelerator names as gcloud spells them: `v4-N` and `v5p-N` count TensorCores (2 per chip, 4
chips per host), `v5litepod-N` (alias `v5e-N`) and `v6e-N` count chips (up to 8 on one host,
else 4 per host). A raw topology (`v5p:2x4x4`, `v5e:2x2`) names the same slices by shape.
"""
import math
import re
from typing import NamedTuple


class Chip(NamedTuple):
  hbm_gib: float          # HBM per chip [cloud]
  peak_tflops: float      # dense bf16 TFLOP/s per chip [cloud]
  hbm_tbs: float          # HBM bandwidth, TB/s [cloud]
  ici_gbs: float          # bidirectional ICI bandwidth per chip, GB/s [cloud]
  mxu: int                # the MXU is mxu x mxu [cloud]
  cores: int              # TensorCores per chip (megacore on v4 and v5p) [cloud]
  int8_tops: float        # dense int8 TOP/s per chip [cloud], [jax] (v4: no faster int8 path)
  vmem_mib: int           # VMEM per TensorCore [jax]
  scoped_vmem_mib: int    # Mosaic's default VMEM limit per kernel [aot]
  smem_kib: int = 1024    # SMEM per TensorCore [jax]
  step_us: float = 0.35   # per grid step (assumption, see above)
  dma_issue_ns: float = 20.0    # per DMA descriptor issued (assumption)
  dma_latency_us: float = 0.5   # one HBM -> VMEM copy waited on (assumption)
  sparse_cores: int = 0   # SparseCores per chip [jax]
  sc_subcores: int = 16   # vector subcores per SparseCore, each issuing its own DMAs [jax]

  @property
  def ridge(self) -> float:
    """FLOPs per HBM byte above which a kernel is compute-bound at peak."""
    return self.peak_tflops / self.hbm_tbs


CHIPS = {
    "v4": Chip(hbm_gib=32, peak_tflops=275, hbm_tbs=1.2, ici_gbs=300, mxu=128, cores=2, int8_tops=275, vmem_mib=16,
               scoped_vmem_mib=16),
    "v5e": Chip(hbm_gib=16, peak_tflops=197, hbm_tbs=0.82, ici_gbs=400, mxu=128, cores=1, int8_tops=394, vmem_mib=128,
                scoped_vmem_mib=16),
    "v5p": Chip(hbm_gib=95, peak_tflops=459, hbm_tbs=2.76, ici_gbs=1200, mxu=128, cores=2, int8_tops=918, vmem_mib=64,
                scoped_vmem_mib=16, sparse_cores=4),
    "v6e": Chip(hbm_gib=32, peak_tflops=918, hbm_tbs=1.64, ici_gbs=800, mxu=256, cores=1, int8_tops=1836,
                vmem_mib=128, scoped_vmem_mib=32, sparse_cores=2),
}
_GENERATION = {"v4": "v4", "v5p": "v5p", "v5e": "v5litepod", "v6e": "v6e"}   # chip -> gcloud's name
_CHIP = {"v4": "v4", "v5p": "v5p", "v5": "v5p", "v5litepod": "v5e", "v5e": "v5e", "v6e": "v6e"}
_CHIPS_2D = (1, 4, 8, 16, 32, 64, 128, 256)   # v5e and v6e slice sizes
ALLOWED = ("v4-N or v5p-N (N TensorCores, a multiple of 8: 8, 16, 24, 32, ...), v5litepod-N, v5e-N or v6e-N "
           "(N chips: 1, 4, 8, 16, ..., 256), or a topology such as v5p:2x4x4 or v5e:2x2")


class Accelerator(NamedTuple):
  name: str               # the gcloud accelerator type, e.g. v5p-64, v5litepod-16
  chip: str               # the CHIPS key: v4 | v5e | v5p | v6e
  dims: tuple             # the slice's chip grid: (x, y, z) for v4/v5p, (x, y) for v5e/v6e
  hosts: int              # TPU VMs (workers) in the slice

  @property
  def generation(self) -> str:
    """gcloud's generation name (v5e slices are `v5litepod`)."""
    return _GENERATION[self.chip]

  @property
  def chips(self) -> int:
    return math.prod(self.dims)

  @property
  def topology(self) -> str:
    """The topology name libtpu takes, e.g. v5p:2x4x4."""
    return f"{self.chip}:{'x'.join(map(str, self.dims))}"

  @property
  def facts(self) -> Chip:
    return CHIPS[self.chip]


def _dims_3d(chips: int) -> list[int] | None:
  """The torus Cloud TPU gives v4/v5p slices: from 2x2x1 double the smallest axis (the last of
  equals) for powers of two (2x2x2, 2x2x4, 2x4x4, 4x4x4, ...); other multiples of 4 chips are
  2x2xK."""
  if chips < 4 or chips % 4:
    return None
  if chips & (chips - 1):
    return [2, 2, chips // 4]
  dims = [2, 2, 1]
  while math.prod(dims) < chips:
    i = max(i for i, d in enumerate(dims) if d == min(dims))
    dims[i] *= 2
  return dims


def _dims_2d(chips: int) -> list[int] | None:
  """v5e/v6e slices: 1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16."""
  if chips not in _CHIPS_2D:
    return None
  dims = [1, 1] if chips == 1 else [2, 2]
  while math.prod(dims) < chips:
    dims[1 if dims[0] == dims[1] else 0] *= 2
  return dims


def _accelerator(chip: str, dims: list[int]) -> Accelerator:
  chips = math.prod(dims)
  three_d = chip in ("v4", "v5p")
  count = 2 * chips if three_d else chips          # v4 and v5p names count TensorCores
  hosts = max(1, chips // 4) if three_d or chips > 8 else 1
  return Accelerator(f"{_GENERATION[chip]}-{count}", chip, tuple(dims), hosts)


def parse_accelerator(name: str) -> Accelerator | None:
  """'v5p-64' -> v5p 2x4x4 (32 chips, 8 hosts); 'v5e-16' -> v5litepod-16 (4x4); 'v5p:2x2x1' -> v5p-8;
  None for a name that is not a Cloud TPU slice."""
  if m := re.fullmatch(r"(v4|v5p|v5|v5litepod|v5e|v6e):(\d+(?:x\d+)*)", name):
    chip, dims = _CHIP[m[1]], [int(d) for d in m[2].split("x")]
    ok = len(dims) == (3 if chip in ("v4", "v5p") else 2) and min(dims) >= 1
    return _accelerator(chip, dims) if ok else None
  if not (m := re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name)):
    return None
  chip, n = _CHIP[m[1]], int(m[2])
  if chip in ("v4", "v5p"):
    dims = _dims_3d(n // 2) if n % 8 == 0 else None
  else:
    dims = _dims_2d(n)
  return _accelerator(chip, dims) if dims else None
