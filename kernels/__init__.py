"""Attention math behind one API: pure-JAX references (`impl="xla"`) and Pallas TPU kernels.

Every public function takes `impl = "xla" | "pallas" | "auto"` and `options` (a KernelOptions):
`auto` is Pallas when the kernels target a TPU and XLA elsewhere. On a CPU, `impl="pallas"` runs
the TPU kernel in TPU interpret mode (simulated VMEM, SMEM, DMAs and semaphores; seconds per tiny
train step), in Pallas's plain interpreter with `options.pallas_mode="interpret"` (the same
numbers, looser checks, milliseconds per step), or compiles it for TPU chips with
`pallas_mode="compiled"` (ahead-of-time compiles from any host, docs/design.md §8).

How the kernels run is an explicit, hashable value, never a module-level switch: a jitted
function that closes over other options is another function and traces again.
"""
import dataclasses

import jax

IMPLS = ("xla", "pallas", "auto")
PALLAS_MODES = ("auto", "compiled", "interpret")
DSA_DKV = ("rows", "tiles")
DSA_GATHERS = ("auto", "tensorcore", "sparsecore")
DSA_INDEXER_DTYPES = ("bfloat16", "int8")


class Unsupported(ValueError):
  """A shape a kernel cannot run: `dim` names the kernel's own argument (seq_len, n_heads, ...)
  so that config validation can name the config field."""

  def __init__(self, dim: str, value, allowed: str):
    super().__init__(f"{dim}={value}: {allowed}")
    self.dim, self.value, self.allowed = dim, value, allowed


@dataclasses.dataclass(frozen=True)
class KernelOptions:
  """Static knobs of the kernels: the Pallas target and the chunk and tile sizes."""
  pallas_mode: str = "auto"       # auto: compiled on a TPU backend, TPU interpret mode elsewhere;
                                  # interpret: Pallas's plain interpreter
  query_chunk: int = 256          # XLA references: queries per chunk (NSA selection: half of it)
  window_chunk: int = 256         # XLA window branch: its cost per query is (chunk + w) keys
  select_chunk: int = 1024        # Pallas NSA select_blocks and DSA indexer_topk: queries per score call and top-k
  dsa_query_chunk: int = 128      # XLA DSA: the indexer's chunk scores are [chunk, H_I, T] fp32
  unroll_chunks: bool = False     # unroll the chunk loops (XLA's cost analysis then counts every chunk)
  prefetch_bytes: int = 256 * 1024   # NSA selection: union lists per pallas_call (SMEM ~1 MiB)
  matmul_keys: int = 0            # NSA selection and window: keys per score matmul (blocks grouped); 0: the
                                  # MXU width of the TPU the kernels run on (256 on v6e, else 128)
  slab_keys: int = 2048           # NSA selection and window: K/V keys per VMEM slab of a step's block union
  step_rows: int = 4096           # NSA kernels: matmul rows per grid step (query positions x G heads; a
                                  # multiple of 128): a step must carry microseconds of MXU work
  key_tile: int = 512             # NSA compressed: compressed keys per K/V chunk (one DMA per array)
  score_blocks: int = 128         # NSA block scores: selection blocks per score step
  dsa_tile_rows: int = 128        # DSA sparse attention: matmul rows per tile (queries x heads); 256
                                  # fills v6e's MXU (two V3.2 queries, one union: fewer bytes if they overlap)
  dsa_dkv: str = "rows"           # DSA's kv gradient: rows (added per chosen row in the dq walk) or
                                  # tiles (KV-stationary over the inverted selection)
  topk_recall: float = 1.0        # DSA indexer_topk on Pallas: 1 exact; < 1 an approximate top-k with
                                  # this expected recall (kernels/chunking.top_k), a smaller sort
  dsa_index_queries: int = 64     # DSA indexer on Pallas: query positions per score grid step
  dsa_indexer_dtype: str = "bfloat16"   # DSA indexer's QK product: bfloat16, or int8 (per-row scales;
                                        # v5e/v5p/v6e MXUs run int8 at twice the bf16 rate)
  dsa_tiles_per_step: int = 8     # DSA sparse attention: query tiles per grid step (one gather stream)
  dsa_gather: str = "auto"        # DSA's row gathers: tensorcore DMAs, or the SparseCores (v5p, v6e);
                                  # auto: SparseCore where the chip has one

  def __post_init__(self):
    if self.pallas_mode not in PALLAS_MODES:
      raise ValueError(f"pallas_mode={self.pallas_mode!r}: allowed values are {', '.join(PALLAS_MODES)}")
    if self.dsa_tile_rows not in (128, 256):
      raise ValueError(f"dsa_tile_rows={self.dsa_tile_rows}: allowed values are 128, 256")
    if self.dsa_dkv not in DSA_DKV:
      raise ValueError(f"dsa_dkv={self.dsa_dkv!r}: allowed values are {', '.join(DSA_DKV)}")
    if self.dsa_gather not in DSA_GATHERS:
      raise ValueError(f"dsa_gather={self.dsa_gather!r}: allowed values are {', '.join(DSA_GATHERS)}")
    if self.dsa_indexer_dtype not in DSA_INDEXER_DTYPES:
      raise ValueError(f"dsa_indexer_dtype={self.dsa_indexer_dtype!r}: allowed values are "
                       f"{', '.join(DSA_INDEXER_DTYPES)}")
    if self.matmul_keys < 0:
      raise ValueError(f"matmul_keys={self.matmul_keys}: must be 0 (the MXU width) or a positive number of keys")
    if self.step_rows < 128 or self.step_rows % 128:
      raise ValueError(f"step_rows={self.step_rows}: must be a positive multiple of 128")
    if not 0.0 < self.topk_recall <= 1.0:
      raise ValueError(f"topk_recall={self.topk_recall}: must be in (0, 1] (1: exact top-k)")

  @property
  def targets_tpu(self) -> bool:
    """Pallas kernels are compiled for TPU chips (a TPU backend, or an ahead-of-time compile)."""
    return self.pallas_mode == "compiled" or (self.pallas_mode == "auto" and jax.default_backend() == "tpu")

  @property
  def mxu_keys(self) -> int:
    """matmul_keys, or the MXU width of the local TPU (256 on v6e; 128 elsewhere and off TPU)."""
    if self.matmul_keys:
      return self.matmul_keys
    kind = jax.devices()[0].device_kind.lower() if jax.default_backend() == "tpu" else ""
    return 256 if "v6" in kind else 128

  @property
  def interpret(self) -> bool:
    return not self.targets_tpu

  def interpret_params(self):
    """pallas_call's `interpret`: False (compile for TPU), TPU interpret mode (simulated DMAs,
    SMEM and VMEM), or Pallas's plain interpreter when asked for and per device of a
    multi-device mesh: there TPU interpret mode synchronises the devices' kernels through host
    callbacks, which deadlocks XLA:CPU's multi-device execution of a whole train step (jax 0.10.2)."""
    if not self.interpret:
      return False
    mesh = jax.sharding.get_abstract_mesh()
    if self.pallas_mode == "interpret" or (not mesh.empty and mesh.size > 1):
      return True
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.InterpretParams()


DEFAULT_OPTIONS = KernelOptions()


def options_from_config(config) -> KernelOptions:
  """The run's KernelOptions: config.kernels holds one field per option."""
  return KernelOptions(**config.kernels)


def resolve_impl(impl: str, options: KernelOptions | None = None) -> str:
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}: allowed values are {', '.join(IMPLS)}")
  if impl == "auto":
    return "pallas" if (options or DEFAULT_OPTIONS).targets_tpu else "xla"
  return impl
