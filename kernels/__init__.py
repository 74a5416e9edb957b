"""Attention math behind one API: pure-JAX references (`impl="xla"`) and Pallas TPU kernels.

Every public function takes `impl = "xla" | "pallas" | "auto"`; `auto` is Pallas on TPU and XLA
elsewhere. On a CPU, `impl="pallas"` runs the TPU kernel in TPU interpret mode.
"""
import contextlib

import jax

IMPLS = ("xla", "pallas", "auto")
_COMPILE_FOR_TPU = False


def interpret() -> bool:
  """Whether Pallas kernels run in TPU interpret mode: off a TPU, unless compile_for_tpu()."""
  return not _COMPILE_FOR_TPU and jax.default_backend() != "tpu"


@contextlib.contextmanager
def compile_for_tpu():
  """Trace Pallas kernels for real TPU chips from any host (ahead-of-time compiles, DESIGN §8)."""
  global _COMPILE_FOR_TPU
  previous, _COMPILE_FOR_TPU = _COMPILE_FOR_TPU, True
  try:
    yield
  finally:
    _COMPILE_FOR_TPU = previous


def resolve_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}: allowed values are {', '.join(IMPLS)}")
  if impl == "auto":
    return "pallas" if jax.default_backend() == "tpu" else "xla"
  return impl
