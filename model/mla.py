"""Multi-head Latent Attention (DeepSeek-V2/V3, docs/design.md §5), in its two equivalent forms.

  c_q = RMSNorm(W_dq x)                      [q_lora_rank]
  q   = W_uq c_q -> per head [q_nope | q_rope]   (q_rope RoPE'd)
  [c_kv | k_rope] = W_dkv x;  c_kv = RMSNorm(c_kv)   [kv_lora_rank], k_rope RoPE'd, one for all heads
  MHA form: k_h = [W_uk_h c_kv | k_rope], v_h = W_uv_h c_kv; causal attention per head.
  MQA form ("absorbed"): q_h' = [W_uk_h^T q_nope_h | q_rope_h] against the shared rows
    kv_s = [c_kv_s | k_rope_s]; the value is c_kv_s and W_uv_h maps each head's output back.
Both use scale (qk_nope_dim + qk_rope_dim) ** -0.5. The MHA form is cheaper for dense training;
DSA's sparse attention uses the MQA form (one row per selected token shared by all heads).
RoPE is the half-split form used everywhere in this repo.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from kernels import dense, options_from_config
from model.layers import Projection, RMSNorm, Rope, apply_rope, param_with_axes


class Projected(NamedTuple):
  c_q: jax.Array        # [B, T, q_lora_rank]
  q: jax.Array          # [B, T, H, nope + rope], q_rope rotated
  c_kv: jax.Array       # [B, T, kv_lora_rank]
  k_rope: jax.Array     # [B, T, rope], rotated


class MLAAttention(nn.Module):
  """Dense causal MLA (attention.kind = "mla"); DSA's layer extends it."""
  config: ml_collections.FrozenConfigDict

  def setup(self):
    m, a = self.config.model, self.config.mla
    dtype, param_dtype = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
    proj = lambda shape, axes, **kw: Projection(shape, axes, dtype, param_dtype, **kw)
    norm = lambda axis: RMSNorm(m.norm_eps, dtype, param_dtype, axis_name=axis)
    self.q_down = proj((a.q_lora_rank,), ("embed", "q_lora"))
    self.q_norm = norm("q_lora")
    self.q_up = proj((m.n_heads, a.qk_nope_dim + a.qk_rope_dim), ("q_lora", "heads", "head_dim"))
    self.kv_down = proj((a.kv_lora_rank + a.qk_rope_dim,), ("embed", "kv_lora"))
    self.kv_norm = norm("kv_lora")
    init = lambda fan_in: nn.initializers.normal(fan_in ** -0.5)
    self.k_up = param_with_axes(self, "k_up", init(a.kv_lora_rank), (a.kv_lora_rank, m.n_heads, a.qk_nope_dim),
                                ("kv_lora", "heads", "head_dim"), param_dtype)
    self.v_up = param_with_axes(self, "v_up", init(a.kv_lora_rank), (a.kv_lora_rank, m.n_heads, a.v_head_dim),
                                ("kv_lora", "heads", "head_dim"), param_dtype)
    self.o = proj((m.d_model,), ("heads", "head_dim", "embed"), in_axes=2)

  @property
  def kernel_args(self) -> dict:
    """impl and options for every kernel call (how the kernels run is part of the config)."""
    return dict(impl=self.config.attention.impl, options=options_from_config(self.config))

  @property
  def scale(self) -> float:
    a = self.config.mla
    return (a.qk_nope_dim + a.qk_rope_dim) ** -0.5

  def project(self, x_BTE, positions_BT) -> Projected:
    m, a = self.config.model, self.config.mla
    c_q = self.q_norm(self.q_down(x_BTE))
    q = self.q_up(c_q)
    q = jnp.concatenate([q[..., :a.qk_nope_dim], apply_rope(q[..., a.qk_nope_dim:], positions_BT, Rope.from_config(m))], -1)
    q = nn.with_logical_constraint(q, ("act_batch", "act_seq", "act_heads", None))
    kv = self.kv_down(x_BTE)
    c_kv = self.kv_norm(kv[..., :a.kv_lora_rank])
    k_rope = apply_rope(kv[:, :, None, a.kv_lora_rank:], positions_BT, Rope.from_config(m))[:, :, 0]
    return Projected(c_q, q, c_kv, k_rope)

  def mha(self, p: Projected, segment_ids_BT=None):
    """Dense causal attention in the MHA form: [B, T, H, v_head_dim]."""
    a, dtype = self.config.mla, jnp.dtype(self.config.model.dtype)
    k_nope = jnp.einsum("btr,rhd->bthd", p.c_kv, self.k_up.astype(dtype))
    k_rope = jnp.broadcast_to(p.k_rope[:, :, None], (*k_nope.shape[:3], a.qk_rope_dim))
    k = nn.with_logical_constraint(jnp.concatenate([k_nope, k_rope], -1),
                                   ("act_batch", "act_seq", "act_heads", None))
    v = jnp.einsum("btr,rhd->bthd", p.c_kv, self.v_up.astype(dtype))
    return dense.attention(p.q, k, v, segment_ids=segment_ids_BT, scale=self.scale, **self.kernel_args)

  def mqa_inputs(self, p: Projected):
    """(absorbed queries [B, T, H, kv_lora + rope], shared rows kv [B, T, kv_lora + rope])."""
    a, dtype = self.config.mla, jnp.dtype(self.config.model.dtype)
    q_latent = jnp.einsum("bthd,rhd->bthr", p.q[..., :a.qk_nope_dim], self.k_up.astype(dtype))
    q = jnp.concatenate([q_latent.astype(dtype), p.q[..., a.qk_nope_dim:]], -1)
    return q, jnp.concatenate([p.c_kv, p.k_rope], -1)

  def mqa_output(self, o_latent_BTHR):
    """Each head's latent output (a mix of c_kv rows) through W_uv: [B, T, H, v_head_dim]."""
    dtype = jnp.dtype(self.config.model.dtype)
    return jnp.einsum("bthr,rhd->bthd", o_latent_BTHR, self.v_up.astype(dtype)).astype(dtype)

  def mqa(self, p: Projected):
    """Dense causal attention in the MQA form (the same numbers as `mha`, up to rounding)."""
    q, kv = self.mqa_inputs(p)
    r = self.config.mla.kv_lora_rank
    o = dense.attention(q, kv[:, :, None], kv[:, :, None, :r], scale=self.scale, **self.kernel_args)
    return self.mqa_output(o)

  def __call__(self, x_BTE, positions_BT, segment_ids_BT=None, form: str = "mha"):
    p = self.project(x_BTE, positions_BT)
    return self.o(self.mha(p, segment_ids_BT) if form == "mha" else self.mqa(p))

  @staticmethod
  def projection_flops(config) -> float:
    """Forward FLOPs per token of the down/up/out projections (MHA form)."""
    m, a = config.model, config.mla
    qk = a.qk_nope_dim + a.qk_rope_dim
    return 2 * (m.d_model * (a.q_lora_rank + a.kv_lora_rank + a.qk_rope_dim) + a.q_lora_rank * m.n_heads * qk
                + a.kv_lora_rank * m.n_heads * (a.qk_nope_dim + a.v_head_dim) + m.n_heads * a.v_head_dim * m.d_model)

  @staticmethod
  def flops_per_token(config) -> float:
    """Projections, then causal QK^T and PV over (T+1)/2 visible keys on average."""
    m, a = config.model, config.mla
    per_key = 2 * m.n_heads * (a.qk_nope_dim + a.qk_rope_dim + a.v_head_dim)
    return MLAAttention.projection_flops(config) + per_key * (config.seq_len + 1) / 2
