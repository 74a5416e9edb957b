"""What the NSA Pallas kernel tests share: how each dtype runs, inputs, and the gradient check."""
import jax
import jax.numpy as jnp
import numpy as np

from kernels import KernelOptions, nsa


def options_for(dtype, **kw) -> KernelOptions:
  """TPU interpret mode for fp32, Pallas's interpreter for bf16 (see the module docstring)."""
  return KernelOptions(pallas_mode="interpret" if dtype == jnp.bfloat16 else "auto", **kw)


def compressed_inputs(b, t, hq, hkv, dk, dv, block_len, stride, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  c = nsa.num_compressed(t, block_len, stride)
  return (jax.random.normal(ks[0], (b, t, hq, dk)).astype(dtype),
          jax.random.normal(ks[1], (b, c, hkv, dk)).astype(dtype),
          jax.random.normal(ks[2], (b, c, hkv, dv)).astype(dtype))


def assert_grads_close(got, ref, tol):
  for g, r in zip(got, ref):
    assert g.dtype == r.dtype and g.shape == r.shape
    scale = float(jnp.abs(r.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(g, np.float32) / scale, np.asarray(r, np.float32) / scale, atol=tol)


