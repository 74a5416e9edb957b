"""Attention math behind one API: pure-JAX references (`impl="xla"`) and Pallas TPU kernels.

Every public function takes `impl = "xla" | "pallas" | "auto"`; `auto` is Pallas on TPU and XLA
elsewhere. On a CPU, `impl="pallas"` runs the TPU kernel in TPU interpret mode.
"""
import jax

IMPLS = ("xla", "pallas", "auto")


def resolve_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}: allowed values are {', '.join(IMPLS)}")
  if impl == "auto":
    return "pallas" if jax.default_backend() == "tpu" else "xla"
  return impl
