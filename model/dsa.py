"""DeepSeek Sparse Attention on MLA (docs/design.md §5): the lightning indexer picks index_topk past
tokens per query and MLA in MQA form attends only to them.

Two stages (`dsa.stage`):
  dense_warmup  dense MLA (MHA form); the indexer learns to imitate the head-summed attention
                over all past tokens (trainer/optim.py freezes every other parameter);
  sparse        top-k MLA (MQA form); the indexer keeps learning over its own selection.
The indexer reads stop-gradient copies of x and c_q, and the choice of keys is discrete, so the
LM loss never reaches the indexer and the indexer loss (its teacher is stop-gradient too) never
reaches the rest of the model. The loss, times dsa.indexer_loss_coef, is sown into "aux_loss";
the unweighted value into "metrics"; the recall of the indexer's top-k into "diagnostics", only
when that collection is mutable (the trainer asks for it on logged batches).
"""
import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from kernels import dsa as dsa_kernels
from model import packing
from model.layers import LayerNorm, Projection, Rope, apply_rope
from model.mla import MLAAttention


class LightningIndexer(nn.Module):
  """q_I = W_qI c_q [H_I, d_I]; k_I = LayerNorm(W_kI x) [d_I]; both RoPE'd on their first
  qk_rope_dim dims; w = W_w x * H_I^-0.5 * d_I^-0.5. Inputs are taken as stop-gradient."""
  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x_BTE, c_q_BTR, positions_BT):
    m, c = self.config.model, self.config.dsa
    dtype, param_dtype = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
    proj = lambda name, shape, axes: Projection(shape, axes, dtype, param_dtype, name=name)
    rope = lambda x: apply_rope(x, positions_BT, Rope.from_config(m), dims=self.config.mla.qk_rope_dim)
    x_BTE, c_q_BTR = jax.lax.stop_gradient(x_BTE), jax.lax.stop_gradient(c_q_BTR)
    q = rope(proj("q", (c.index_heads, c.index_head_dim), ("q_lora", "index_heads", "index_head_dim"))(c_q_BTR))
    k = LayerNorm(1e-6, dtype, param_dtype, axis_name="index_head_dim", name="k_norm")(
        proj("k", (c.index_head_dim,), ("embed", "index_head_dim"))(x_BTE))
    k = rope(k[:, :, None])[:, :, 0]
    w = proj("weights", (c.index_heads,), ("embed", "index_heads"))(x_BTE).astype(jnp.float32)
    return q, k, w * (c.index_heads * c.index_head_dim) ** -0.5


def recall_buckets(seq_len: int, k: int) -> tuple[tuple[int, ...], list[str]]:
  """Key distances t - s in units of index_topk (what the local baseline covers): edges
  0, k, 4k, 16k, ... below seq_len, and their diagnostics names indexer_recall_0-1k, _1-4k, ..."""
  edges = [0, k]
  while edges[-1] * 4 < seq_len:
    edges.append(edges[-1] * 4)
  edges = [e for e in edges if e < seq_len]
  units = [e // k for e in edges] + [None]
  return tuple(edges), [f"indexer_recall_{lo}-{hi}k" if hi else f"indexer_recall_{lo}k+" for lo, hi in zip(units, units[1:])]


def local_indices(batch: int, seq_len: int, k: int, doc_start=None):
  """int32 [B, T, k]: query t's last k keys t, t-1, ..., t-k+1 (-1 before the row's or, with
  packed documents, the document's start): dsa.selector = "local", the baseline the indexer must beat."""
  keys = jnp.arange(seq_len)[:, None] - jnp.arange(k)[None, :]                     # [T, k]
  first = 0 if doc_start is None else doc_start[:, :, None]
  keys = jnp.broadcast_to(keys, (batch, seq_len, k))
  return jnp.where(keys >= first, keys, -1).astype(jnp.int32)


class DSAAttention(MLAAttention):
  """attention.kind = "dsa": MLA's parameters plus an `indexer` subtree (none with dsa.selector local)."""
  DIAGNOSTICS = ("indexer_recall",)      # sown only when "diagnostics" is mutable (and indexer_recall_*)

  def setup(self):
    super().setup()
    if self.config.dsa.selector == "indexer":
      self.indexer = LightningIndexer(self.config)

  def __call__(self, x_BTE, positions_BT, segment_ids_BT=None):
    """Packed documents (segment_ids): the indexer's scores, its top-k and the warm-up's loss and
    recall see only the query's own document (doc_start), so the sparse attention does too; the
    dense warm-up masks by segment; padding (segment 0) gets zeros."""
    c, kernel_args = self.config.dsa, self.kernel_args
    doc_start = None if segment_ids_BT is None else packing.doc_starts(segment_ids_BT)
    p = self.project(x_BTE, positions_BT)
    q_mqa, kv = self.mqa_inputs(p)
    if c.selector == "local":      # the baseline: the last index_topk keys, no indexer
      indices = local_indices(x_BTE.shape[0], x_BTE.shape[1], c.index_topk, doc_start)
      out = dsa_kernels.sparse_attention(q_mqa, kv, indices, v_dim=self.config.mla.kv_lora_rank, scale=self.scale,
                                         **kernel_args)
      out = self.o(self.mqa_output(out))
      return out if segment_ids_BT is None else jnp.where((segment_ids_BT > 0)[..., None], out, 0).astype(out.dtype)
    q_idx, k_idx, w_idx = self.indexer(x_BTE, p.c_q, positions_BT)
    topk = lambda: dsa_kernels.indexer_topk(q_idx, k_idx, w_idx, topk=c.index_topk, doc_start=doc_start,
                                            **kernel_args)
    with_loss = not self.is_initializing()
    if c.stage == "dense_warmup":
      indices, out = None, self.mha(p, segment_ids_BT)
      if with_loss:
        loss = dsa_kernels.indexer_loss(q_mqa, kv, q_idx, k_idx, w_idx, scale=self.scale, doc_start=doc_start,
                                        **kernel_args)
    else:
      indices = topk()
      v_dim = self.config.mla.kv_lora_rank
      if with_loss:   # one attention forward for both (on Pallas the teacher is the kernels')
        out, loss = dsa_kernels.sparse_attention_and_indexer_loss(q_mqa, kv, q_idx, k_idx, w_idx, indices, v_dim=v_dim,
                                                                  scale=self.scale, **kernel_args)
      else:
        out = dsa_kernels.sparse_attention(q_mqa, kv, indices, v_dim=v_dim, scale=self.scale, **kernel_args)
      out = self.mqa_output(out)
    if with_loss:
      self.sow("aux_loss", "indexer_loss", c.indexer_loss_coef * loss)
      self.sow("metrics", "indexer_loss", loss)
      if self.is_mutable_collection("diagnostics"):
        edges, names = recall_buckets(x_BTE.shape[1], c.index_topk)
        recall, _, hits, relevant = dsa_kernels.indexer_recall(
            q_mqa, kv, topk() if indices is None else indices, topk=c.index_topk, scale=self.scale,
            options=kernel_args["options"], doc_start=doc_start, distance_edges=edges)
        self.sow("diagnostics", "indexer_recall", recall)
        for i, name in enumerate(names):     # counts: their ratio over all layers is the recall (steps.py)
          self.sow("diagnostics", f"{name}_hits", hits[i].astype(jnp.float32))
          self.sow("diagnostics", f"{name}_keys", relevant[i].astype(jnp.float32))
    out = self.o(out)
    return out if segment_ids_BT is None else jnp.where((segment_ids_BT > 0)[..., None], out, 0).astype(out.dtype)

  @staticmethod
  def flops_per_token(config) -> float:
    """Forward FLOPs per token: MLA's projections, the indexer (projections, and scores over
    every past key), the attention (dense MHA form in warm-up, MQA form over k rows when
    sparse, with the W_uk / W_uv absorptions) and the indexer loss over its support."""
    m, a, c = config.model, config.mla, config.dsa
    t, h, r, rope = config.seq_len, m.n_heads, a.kv_lora_rank, a.qk_rope_dim
    hi, di = c.index_heads, c.index_head_dim
    all_keys = (t + 1) / 2
    local = c.selector == "local"
    indexer = 0 if local else 2 * (a.q_lora_rank * hi * di + m.d_model * (di + hi)) + 2 * hi * di * all_keys
    absorb_q = 2 * h * a.qk_nope_dim * r                       # W_uk into the queries
    if c.stage == "dense_warmup":
      support = all_keys
      attention = MLAAttention.flops_per_token(config)
    else:
      support = min(c.index_topk, all_keys)
      kv_up = 2 * r * h * (a.qk_nope_dim + a.v_head_dim)          # MHA form only
      absorb_out = 2 * h * r * a.v_head_dim                        # W_uv after attention
      attention = (MLAAttention.projection_flops(config) - kv_up + absorb_out
                   + 2 * h * (2 * r + rope) * support)
    loss = 0 if local else 2 * h * (r + rope) * support + 2 * hi * di * support
    return indexer + absorb_q + attention + loss
