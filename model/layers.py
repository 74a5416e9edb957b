"""Building blocks shared by every attention kind: RMSNorm, RoPE, SwiGLU MLP, projections.

Parameters are float32 and carry logical axis names only (`embed`, `heads`, `mlp`, ...); the rules
table in parallel/rules.py maps them to mesh axes. Compute runs in `dtype` (bf16 by default).
"""
import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = jnp.dtype


def param_with_axes(module: nn.Module, name: str, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _rms_normalise(x32, eps):
  return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
  eps: float = 1e-6
  dtype: Dtype = jnp.bfloat16
  param_dtype: Dtype = jnp.float32
  axis_name: str = "embed"

  def _param(self, name, init, x):
    return param_with_axes(self, name, init, (x.shape[-1],), (self.axis_name,), self.param_dtype)

  @nn.compact
  def __call__(self, x):
    y = _rms_normalise(x.astype(jnp.float32), self.eps)
    return (y * self._param("scale", nn.initializers.ones, x)).astype(self.dtype)


class LayerNorm(RMSNorm):
  """LayerNorm with a scale and a bias, statistics in float32."""

  @nn.compact
  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = _rms_normalise(x32 - jnp.mean(x32, axis=-1, keepdims=True), self.eps)
    return (y * self._param("scale", nn.initializers.ones, x)
            + self._param("bias", nn.initializers.zeros, x)).astype(self.dtype)


def rope_angles(positions, dim: int, theta: float):
  """cos, sin of shape positions.shape + [dim // 2], in float32."""
  inv_freq = theta ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BTHD, positions_BT, theta: float, dims: int | None = None):
  """Rotary embedding in half-split (non-interleaved) form over the first `dims` (default: all)
  of the last dim of x; the rest passes through."""
  if dims is not None and dims < x_BTHD.shape[-1]:
    rotated = apply_rope(x_BTHD[..., :dims], positions_BT, theta)
    return jnp.concatenate([rotated, x_BTHD[..., dims:]], axis=-1)
  cos, sin = rope_angles(positions_BT, x_BTHD.shape[-1], theta)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]          # broadcast over heads
  x1, x2 = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHD.dtype)


class Projection(nn.Module):
  """x[..., in] -> [..., *out_shape] with a float32 kernel named by logical axes."""
  out_shape: tuple[int, ...]
  axes: tuple[str, ...]                 # logical names of (in_dim, *out_shape)
  dtype: Dtype = jnp.bfloat16
  param_dtype: Dtype = jnp.float32
  in_axes: int = 1                      # how many trailing dims of x are contracted

  @nn.compact
  def __call__(self, x):
    in_shape = x.shape[x.ndim - self.in_axes:]
    fan_in = 1
    for d in in_shape:
      fan_in *= d
    init = nn.initializers.normal(stddev=fan_in ** -0.5)
    kernel = param_with_axes(self, "kernel", init, (*in_shape, *self.out_shape), self.axes,
                             self.param_dtype)
    contract = tuple(range(x.ndim - self.in_axes, x.ndim))
    return jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                               ((contract, tuple(range(self.in_axes))), ((), ())))


class SwiGLU(nn.Module):
  d_model: int
  mlp_dim: int
  dtype: Dtype = jnp.bfloat16
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda n, shape, axes, **kw: Projection(shape, axes, self.dtype, self.param_dtype, name=n, **kw)
    gate = dense("gate", (self.mlp_dim,), ("embed", "mlp"))(x)
    up = dense("up", (self.mlp_dim,), ("embed", "mlp"))(x)
    h = nn.with_logical_constraint(nn.silu(gate) * up, ("act_batch", "act_seq", "act_mlp"))
    return dense("down", (self.d_model,), ("mlp", "embed"))(h)
