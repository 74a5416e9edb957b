"""The NSA attention layer (docs/design.md §4): compressed, selected and sliding-window branches, gated.

RoPE: queries are rotated at their positions. The compression MLPs read *un-rotated* keys (so a
block's summary does not depend on where the block sits), and each compressed key k_cmp[i] is
then rotated at position i*d + l - 1, the last token it covers. Selected and window branches use
keys rotated at their own positions. Values are never rotated.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

import configs
from kernels import nsa as nsa_kernels
from kernels import options_from_config
from model import packing
from model.layers import Projection, Rope, apply_rope, head_rms_norm, param_with_axes
from parallel import context

BRANCHES = ("cmp", "slc", "win")


def branches_of(nsa_config) -> tuple[str, ...]:
  """nsa.branches "cmp+slc+win" (any non-empty subset, '+'-joined) -> the branches in BRANCHES order."""
  chosen = set(nsa_config.branches.split("+"))
  return tuple(b for b in BRANCHES if b in chosen)


def logit(p: float) -> float:
  """The gate bias that makes sigmoid give p."""
  return float(np.log(p) - np.log1p(-p))


def _beyond_window(block_indices, slc_block: int, window: int):
  """The share of the selected blocks (free slots -1 left out) that lie wholly outside the query's
  sliding window: what the selection adds beyond the window branch."""
  t = jnp.arange(block_indices.shape[1])[None, :, None, None]
  valid = block_indices >= 0
  beyond = valid & ((block_indices + 1) * slc_block - 1 < t - window + 1)
  return beyond.sum() / jnp.maximum(valid.sum(), 1)


class Compress(nn.Module):
  """phi(x[i*d : i*d + l] + pe): an MLP from l * D to D per compressed token, shared by heads.

  Under context parallelism x is in the load-balanced layout (parallel/placement.py): the windows
  read their tokens where the layout put them, and the compressed tokens are split over the
  context axis (`act_cmp`), so each device runs the MLP on its share only and the attention
  kernels gather the small [C, H, D] result."""
  block_len: int
  stride: int
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BTHD):
    b, t, h, dim = x_BTHD.shape
    c = nsa_kernels.num_compressed(t, self.block_len, self.stride)
    shards = context.context_size()
    padded = -(-c // shards) * shards           # whole shares per device (extra windows are dropped)
    pe = param_with_axes(self, "pos_emb", nn.initializers.normal(0.02), (self.block_len, dim),
                         ("cmp_block", "head_dim"), self.param_dtype)
    windows = np.minimum(np.arange(padded)[:, None] * self.stride + np.arange(self.block_len), t - 1)   # [C, l]
    windows = context.layout_index(windows, t, shards)
    # Every device reads the whole sequence (one all-gather over context), each gathers only its
    # share of the windows.
    x_BTHD = nn.with_logical_constraint(x_BTHD, ("act_batch", None, "act_kv_heads", None))
    blocks = jnp.take(x_BTHD, windows, axis=1) + pe[:, None, :].astype(x_BTHD.dtype)  # [B,C,l,H,D]
    blocks = nn.with_logical_constraint(blocks.transpose(0, 1, 3, 2, 4),              # [B,C,H,l,D]
                                        ("act_batch", "act_cmp", "act_kv_heads", None, None))
    hidden = Projection((dim,), ("cmp_block", "head_dim", "cmp_hidden"), self.dtype, self.param_dtype,
                        in_axes=2, name="fc1")(blocks)
    out = Projection((dim,), ("cmp_hidden", "head_dim"), self.dtype, self.param_dtype, name="fc2")(
        nn.silu(hidden))                                                              # [B,C,H,D]
    return out[:, :c]


class NSAAttention(nn.Module):
  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x_BTE, positions_BT, segment_ids_BT=None):
    """Packed documents (segment_ids): every document gets what it would get alone in its own
    row. The layer runs on the row re-laid so that each document starts on a selection-block
    boundary (model/packing.py), each query limited to its own document (doc_start); padding
    (segment 0) gets zeros."""
    m, c = self.config.model, self.config.nsa
    doc_start, layout = None, None
    if segment_ids_BT is not None:
      layout = packing.AlignedRows.build(segment_ids_BT, block=c.slc_block,
                                         max_docs=configs.max_docs_per_row(self.config))
      x_BTE, positions_BT, doc_start = layout.scatter(x_BTE), layout.scatter(positions_BT), layout.doc_start
    dtype, param_dtype = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
    kernel_args = dict(impl=self.config.attention.impl, options=options_from_config(self.config))
    proj = lambda name, shape, axes, **kw: Projection(shape, axes, dtype, param_dtype, name=name, **kw)
    rope = lambda x, pos: apply_rope(x, pos, Rope.from_config(m))
    head_norm = lambda name, x: head_rms_norm(m, name)(x) if m.qk_norm else x

    q = head_norm("q_norm", proj("q", (m.n_heads, m.head_dim), ("embed", "heads", "head_dim"),
                                 use_bias=m.qkv_bias)(x_BTE))
    q = rope(q, positions_BT)
    q = nn.with_logical_constraint(q, ("act_batch", "act_seq", "act_heads", None))

    def keys_values(branch):
      suffix = f"_{branch}" if c.separate_kv else ""
      shape, axes = (m.n_kv_heads, m.head_dim), ("embed", "kv_heads", "head_dim")
      local = lambda x: nn.with_logical_constraint(x, ("act_batch", "act_seq", "act_kv_heads", None))
      k = head_norm("k_norm" + suffix, proj("k" + suffix, shape, axes, use_bias=m.qkv_bias)(x_BTE))
      return local(k), local(proj("v" + suffix, shape, axes, use_bias=m.qkv_bias)(x_BTE))

    branches = branches_of(c)
    compressing = "cmp" in branches or "slc" in branches    # the selection ranks blocks by compressed scores
    needed = [b for b in BRANCHES if b in branches or (b == "cmp" and compressing)]
    kv = {branch: keys_values(branch) for branch in (needed if c.separate_kv else ("all",))}
    outputs = {}
    if compressing:
      k_raw, v_raw = kv.get("cmp", kv.get("all"))
      compress = lambda name: Compress(c.cmp_block, c.cmp_stride, dtype, param_dtype, name=name)
      k_cmp, v_cmp = compress("compress_k")(k_raw), compress("compress_v")(v_raw)
      # Rotated at the last token each covers: its index, or in a packed row the position given
      # for that token (restarting per document or not: RoPE sees only the query-key offset).
      last_token = jnp.arange(k_cmp.shape[1]) * c.cmp_stride + c.cmp_block - 1
      if doc_start is None:
        cmp_positions = jnp.broadcast_to(last_token, k_cmp.shape[:2])
      else:
        cmp_positions = jnp.take(positions_BT, last_token, axis=1)
      k_cmp = rope(k_cmp, cmp_positions)
    if doc_start is not None:
      kernel_args["doc_start"] = doc_start

    if "slc" in branches:
      # Pallas: one forward kernel for the compressed branch and the block scores (its probabilities);
      # XLA: compressed_attention, then select_blocks. Without the cmp branch its output is unused
      # (and the compression MLPs get no gradient: the selection alone does not train them).
      o_cmp, _, block_indices = nsa_kernels.compressed_attention_and_selection(
          q, k_cmp, v_cmp, block_len=c.cmp_block, stride=c.cmp_stride, slc_block=c.slc_block,
          num_selected=c.num_selected, num_initial=c.num_initial, num_local=c.num_local, **kernel_args)
      self.sow("metrics", "selected_beyond_window", _beyond_window(block_indices, c.slc_block, c.window))
    elif "cmp" in branches:
      o_cmp, _ = nsa_kernels.compressed_attention(q, k_cmp, v_cmp, block_len=c.cmp_block, stride=c.cmp_stride,
                                                  **kernel_args)
    if "cmp" in branches:
      outputs["cmp"] = o_cmp
    if "slc" in branches:
      k_slc, v_slc = kv.get("slc", kv.get("all"))
      k_slc = rope(k_slc, positions_BT)
      # What the selection saw, for studies of it (scripts/nsa_start_study.py); kept only when the
      # caller makes "intermediates" mutable.
      for name, value in (("selection_q", q), ("selection_k", k_slc), ("block_indices", block_indices)):
        self.sow("intermediates", name, value)
    if "slc" in branches and "win" in branches and not c.separate_kv:   # one K/V: gathered once under context parallelism
      outputs["slc"], outputs["win"] = nsa_kernels.selection_and_window(
          q, k_slc, v_slc, block_indices, slc_block=c.slc_block, window=c.window, **kernel_args)
    else:
      if "slc" in branches:
        outputs["slc"] = nsa_kernels.selection_attention(q, k_slc, v_slc, block_indices, slc_block=c.slc_block,
                                                         impl=kernel_args["impl"], options=kernel_args["options"])
      if "win" in branches:
        k_win, v_win = kv.get("win", kv.get("all"))
        outputs["win"] = nsa_kernels.window_attention(q, rope(k_win, positions_BT), v_win, window=c.window,
                                                      **kernel_args)

    # One gate per branch, starting near nsa.initial_gates (a converted dense model: model/convert.py
    # sets the bias to nsa.converted_gates instead).
    start = dict(zip(BRANCHES, c.initial_gates, strict=True))
    gate_bias = lambda key, shape, dtype: jnp.broadcast_to(
        jnp.asarray([logit(start[b]) for b in branches], dtype), shape)
    gates = jax.nn.sigmoid(proj("gate", (m.n_heads, len(branches)), ("embed", "heads", None), use_bias=True,
                                bias_init=gate_bias)(x_BTE).astype(jnp.float32))
    for i, branch in enumerate(branches):
      self.sow("metrics", f"gate_{branch}", gates[..., i].mean())
    out = sum(gates[..., i:i + 1] * outputs[b] for i, b in enumerate(branches)).astype(dtype)
    out = proj("o", (m.d_model,), ("heads", "head_dim", "embed"), in_axes=2)(out)
    if layout is None:
      return out
    return jnp.where((segment_ids_BT > 0)[..., None], layout.gather(out), 0).astype(dtype)

  @staticmethod
  def flops_per_token(config) -> float:
    """Forward FLOPs per token of the layer: projections, compression MLPs (run once per stride
    d, not per token; also without the cmp branch when the selection needs them) and the
    branches of nsa.branches over the keys each query sees on average (the compressed scores
    count once when only the selection uses them); packed documents: times T'/T of the aligned row."""
    m, c, t = config.model, config.nsa, config.seq_len
    hq, hkv, d = m.n_heads, m.n_kv_heads, m.head_dim
    branches = branches_of(c)
    compressing = "cmp" in branches or "slc" in branches
    kv_sets = (len(branches) + ("cmp" not in branches and compressing)) if c.separate_kv else 1
    projections = 2 * m.d_model * (hq * d * 2 + kv_sets * 2 * hkv * d + hq * len(branches))
    compression = 2 * 2 * hkv * (c.cmp_block * d * d + d * d) / c.cmp_stride if compressing else 0
    seen_cmp = max(0, (t - c.cmp_block) / c.cmp_stride + 1) / 2 if compressing else 0
    seen_slc = min(c.num_selected * c.slc_block, (t + 1) / 2) if "slc" in branches else 0
    seen_win = min(c.window, (t + 1) / 2) if "win" in branches else 0
    flops = projections + compression + 2 * 2 * hq * d * (seen_cmp + seen_slc + seen_win)
    if config.data.packing == "pack":    # the layer runs on the aligned row, T' for T tokens
      flops *= packing.aligned_length(t, c.slc_block, configs.max_docs_per_row(config)) / t
    return flops
