"""Building blocks shared by every attention kind: RMSNorm, RoPE (with its context scalings),
SwiGLU MLP, projections.

Parameters are float32 and carry logical axis names only (`embed`, `heads`, `mlp`, ...); the rules
table in parallel/rules.py maps them to mesh axes. Compute runs in `dtype` (bf16 by default).
"""
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
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


def head_rms_norm(model_config, name: str) -> RMSNorm:
  """RMSNorm over each head's head_dim (Qwen3's q and k norms: model.qk_norm)."""
  return RMSNorm(model_config.norm_eps, jnp.dtype(model_config.dtype), jnp.dtype(model_config.param_dtype),
                 axis_name="head_dim", name=name)


class LayerNorm(RMSNorm):
  """LayerNorm with a scale and a bias, statistics in float32."""

  @nn.compact
  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = _rms_normalise(x32 - jnp.mean(x32, axis=-1, keepdims=True), self.eps)
    return (y * self._param("scale", nn.initializers.ones, x)
            + self._param("bias", nn.initializers.zeros, x)).astype(self.dtype)


ROPE_SCALINGS = ("none", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class Rope:
  """Rotary embedding frequencies: theta, optionally rescaled for a longer context.

  scaling "none"; "linear" (every frequency / factor, i.e. positions / factor); "llama3"
  (Llama 3.1: wavelengths beyond original_max_len / low_freq_factor are stretched by factor,
  those under original_max_len / high_freq_factor are kept, the band between is interpolated)."""
  theta: float = 10_000.0
  scaling: str = "none"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_len: int = 8192

  @classmethod
  def from_config(cls, model_config) -> "Rope":
    s = model_config.rope_scaling
    return cls(float(model_config.rope_theta), s.type, float(s.factor), float(s.low_freq_factor),
               float(s.high_freq_factor), int(s.original_max_len))

  def inv_freq(self, dim: int) -> np.ndarray:
    """float32 [dim // 2]; computed in float64 on the host (static per shape)."""
    inv_freq = self.theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    if self.scaling == "linear":
      inv_freq = inv_freq / self.factor
    elif self.scaling == "llama3":
      wavelen = 2 * np.pi / inv_freq
      smooth = (self.original_max_len / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
      interpolated = (1 - smooth) * inv_freq / self.factor + smooth * inv_freq
      inv_freq = np.where(wavelen > self.original_max_len / self.low_freq_factor, inv_freq / self.factor,
                          np.where(wavelen < self.original_max_len / self.high_freq_factor, inv_freq, interpolated))
    return inv_freq.astype(np.float32)


def rope_angles(positions, dim: int, rope: Rope):
  """cos, sin of shape positions.shape + [dim // 2], in float32."""
  angles = positions.astype(jnp.float32)[..., None] * rope.inv_freq(dim)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BTHD, positions_BT, rope: Rope, dims: int | None = None):
  """Rotary embedding in half-split (non-interleaved) form over the first `dims` (default: all)
  of the last dim of x; the rest passes through."""
  if dims is not None and dims < x_BTHD.shape[-1]:
    rotated = apply_rope(x_BTHD[..., :dims], positions_BT, rope)
    return jnp.concatenate([rotated, x_BTHD[..., dims:]], axis=-1)
  cos, sin = rope_angles(positions_BT, x_BTHD.shape[-1], rope)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]          # broadcast over heads
  x1, x2 = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHD.dtype)


class Projection(nn.Module):
  """x[..., in] -> [..., *out_shape] with a float32 kernel named by logical axes (and a bias of
  out_shape when use_bias)."""
  out_shape: tuple[int, ...]
  axes: tuple[str, ...]                 # logical names of (in_dim, *out_shape)
  dtype: Dtype = jnp.bfloat16
  param_dtype: Dtype = jnp.float32
  in_axes: int = 1                      # how many trailing dims of x are contracted
  use_bias: bool = False
  bias_init: Callable = nn.initializers.zeros

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
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                            ((contract, tuple(range(self.in_axes))), ((), ())))
    if self.use_bias:
      bias = param_with_axes(self, "bias", self.bias_init, self.out_shape, self.axes[self.in_axes:],
                             self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


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
