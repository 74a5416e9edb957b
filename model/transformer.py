"""Decoder-only transformer: embed -> n_layers x [RMSNorm, attention, RMSNorm, SwiGLU] -> logits.

Layers are stacked with `nn.scan` (one compiled block, parameters with a leading `layers` axis) and
optionally rematerialised. The attention layer is whatever `config.attention.kind` names.
"""
import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from model.attention import ATTENTION_KINDS
from model.layers import RMSNorm, SwiGLU, param_with_axes

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nn.Module):
  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x_BTE, positions_BT, segment_ids_BT):
    m = self.config.model
    dtype, param_dtype = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
    attn = ATTENTION_KINDS[self.config.attention.kind](self.config, name="attn")
    h = RMSNorm(m.norm_eps, dtype, param_dtype, name="attn_norm")(x_BTE)
    x_BTE = x_BTE + attn(h, positions_BT, segment_ids_BT)
    h = RMSNorm(m.norm_eps, dtype, param_dtype, name="mlp_norm")(x_BTE)
    x_BTE = x_BTE + SwiGLU(m.d_model, m.mlp_dim, dtype, param_dtype, name="mlp")(h)
    x_BTE = nn.with_logical_constraint(x_BTE, ("act_batch", "act_seq", "act_embed"))
    return x_BTE, None


class Transformer(nn.Module):
  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None):
    """tokens int32 [B, T] -> logits float32 [B, T, vocab]. With packed documents, positions
    restart in each document and segment_ids keep attention inside it (0 = padding)."""
    m = self.config.model
    dtype, param_dtype = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    embedding = param_with_axes(self, "embedding", nn.initializers.normal(1.0),
                                (m.vocab_size, m.d_model), ("vocab", "embed"), param_dtype)
    x = jnp.take(embedding, tokens_BT, axis=0).astype(dtype)
    x = nn.with_logical_constraint(x, ("act_batch", "act_seq", "act_embed"))

    block = Block
    if m.remat != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[m.remat], prevent_cse=not m.scan_layers)
    if m.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0, "aux_loss": 0, "metrics": 0, "diagnostics": 0, "intermediates": 0},
                      split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast), length=m.n_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(self.config, name="layers")(x, positions_BT, segment_ids_BT)
    else:
      for i in range(m.n_layers):
        x, _ = block(self.config, name=f"layer_{i}")(x, positions_BT, segment_ids_BT)

    x = RMSNorm(m.norm_eps, dtype, param_dtype, name="final_norm")(x)
    if m.tie_embeddings:
      unembed = embedding.T * (m.tied_unembed_scale or m.d_model ** -0.5)
    else:
      unembed = param_with_axes(self, "unembed", nn.initializers.normal(m.d_model ** -0.5),
                                (m.d_model, m.vocab_size), ("embed", "vocab"), param_dtype)
    logits = jnp.einsum("bte,ev->btv", x, unembed.astype(dtype), preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits, ("act_batch", "act_seq", "act_vocab"))


def build(config) -> Transformer:
  return Transformer(ml_collections.FrozenConfigDict(config))


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def flops_per_token(config, params) -> float:
  """Training FLOPs per token: 3 x the forward FLOPs. Forward: 2 per weight of every matmul
  outside attention (an untied input embedding is a gather, not a matmul), plus what the
  attention layer reports for itself (projections and attention math)."""
  m = config.model
  attention_params = count_params(params["layers"]["attn"]) if m.scan_layers else sum(
      count_params(params[f"layer_{i}"]["attn"]) for i in range(m.n_layers))
  other = count_params(params) - attention_params - (0 if m.tie_embeddings else m.vocab_size * m.d_model)
  attention = ATTENTION_KINDS[config.attention.kind].flops_per_token(config)
  return 3 * (2 * other + m.n_layers * attention)
