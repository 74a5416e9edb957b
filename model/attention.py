"""Attention layers behind one interface, chosen by `config.attention.kind`.

Interface every kind implements (NSA and DSA layers register here too):
  layer = ATTENTION_KINDS[kind](config, name="attn")
  y_BTE = layer(x_BTE, positions_BT, segment_ids_BT)       # same shape and dtype as x;
                                                           # segment_ids None: one document per row
  ATTENTION_KINDS[kind].flops_per_token(config)            # forward FLOPs per token of the layer
Collections a layer may sow into (DSA does): "aux_loss" (terms added to the training objective),
"metrics" (reported, averaged over layers) and "diagnostics" (costly metrics, computed only when
the caller makes the collection mutable).
"""
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from kernels import dense, options_from_config
from model.dsa import DSAAttention
from model.layers import Projection, Rope, apply_rope, head_rms_norm
from model.mla import MLAAttention
from model.nsa import NSAAttention


class DenseAttention(nn.Module):
  """Causal GQA attention with RoPE: HQ query heads share HKV key/value heads."""
  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x_BTE, positions_BT, segment_ids_BT=None):
    m = self.config.model
    dtype, param_dtype = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
    proj = lambda name, shape, axes, **kw: Projection(shape, axes, dtype, param_dtype, name=name, **kw)
    head_norm = lambda name, x: head_rms_norm(m, name)(x) if m.qk_norm else x
    rope = Rope.from_config(m)
    q = head_norm("q_norm", proj("q", (m.n_heads, m.head_dim), ("embed", "heads", "head_dim"),
                                 use_bias=m.qkv_bias)(x_BTE))
    k = head_norm("k_norm", proj("k", (m.n_kv_heads, m.head_dim), ("embed", "kv_heads", "head_dim"),
                                 use_bias=m.qkv_bias)(x_BTE))
    v = nn.with_logical_constraint(proj("v", (m.n_kv_heads, m.head_dim), ("embed", "kv_heads", "head_dim"),
                                        use_bias=m.qkv_bias)(x_BTE),
                                   ("act_batch", "act_seq", "act_kv_heads", None))
    q = nn.with_logical_constraint(apply_rope(q, positions_BT, rope), ("act_batch", "act_seq", "act_heads", None))
    k = nn.with_logical_constraint(apply_rope(k, positions_BT, rope), ("act_batch", "act_seq", "act_kv_heads", None))
    out = dense.attention(q, k, v, segment_ids=segment_ids_BT, impl=self.config.attention.impl,
                          options=options_from_config(self.config))
    return proj("o", (m.d_model,), ("heads", "head_dim", "embed"), in_axes=2)(out)

  @staticmethod
  def flops_per_token(config) -> float:
    """Forward FLOPs per token of the layer: q/k/v/o projections, then causal QK^T and PV
    (2 matmuls x 2 FLOPs x HQ x D x (T+1)/2 visible keys on average)."""
    m = config.model
    projections = 2 * m.d_model * m.head_dim * (2 * m.n_heads + 2 * m.n_kv_heads)
    return projections + 2 * 2 * m.n_heads * m.head_dim * (config.seq_len + 1) / 2


ATTENTION_KINDS = {"dense": DenseAttention, "nsa": NSAAttention, "mla": MLAAttention, "dsa": DSAAttention}
