"""One NSA layer, forward + backward, on the time model (perf/time_model.py), with dense attention
on the same model beside it.

Per kernel: grid steps from the traced layer (`jax.make_jaxpr` of value_and_grad over the four
kernel-contract functions, impl="pallas" compiled for TPU: nothing runs); FLOPs and bytes from the
kernels' CostEstimates, except where they depend on the selection (the selection walk), which
kernels/nsa/selection_pallas.walk counts from the lists the kernel would read for this selection;
DMA descriptors from the kernels' walks. The honest minimum beside them:
  FLOPs  3 x the forward's useful FLOPs: every query against the compressed tokens it sees, the
         keys of its selected blocks it sees, and its window (the roofline's numerator);
  bytes  q, k, v, k_cmp, v_cmp read once per pass (forward and backward), each branch's out
         written once and its dO read once, dq, dk, dv, dk_cmp, dv_cmp written once.
Dense: splash attention (kernels/dense.py) as traced, causal; its FLOPs are the blocks on and below
the diagonal (Dv padded to Dk as kernels/dense.py does), its bytes each executed block pair's K/V
once per query head (splash's head axis is outside its query-block axis).
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kernels import KernelOptions, dense, nsa
from kernels.nsa import compressed_pallas, selection_pallas
from perf import time_model
from perf.time_model import Cost, pallas_calls


class Shape(NamedTuple):
  """One NSA layer's attention shape; the paper's by default (NSA, arXiv 2502.11089, §4)."""
  hq: int = 64
  hkv: int = 4
  dk: int = 192
  dv: int = 128
  block_len: int = 32       # l
  stride: int = 16          # d
  slc_block: int = 64       # l'
  num_selected: int = 16    # n
  window: int = 512         # w
  itemsize: int = 2         # bf16


PAPER = Shape()


def synthetic_selection(seq_len: int, kv_heads: int, *, realistic: bool, block: int = 64, n: int = 16, seed: int = 0,
                        chunk: int = 4096) -> np.ndarray:
  """int32 [1, T, HKV, n] block indices as NSA's select_blocks makes them: block 0 and the two
  local blocks forced, the other n - 3 the best-scoring eligible blocks. Random: uniform scores.
  Realistic: each block has a persistent relevance (log-normal: a few hot blocks), decaying with
  distance from the query, plus per-query noise; neighbouring queries then agree on most blocks,
  as the NSA paper observes."""
  rng = np.random.default_rng(seed)
  nb = seq_len // block
  out = np.empty((seq_len, kv_heads, n), np.int32)
  for h in range(kv_heads):
    relevance = rng.lognormal(0.0, 1.0, nb)
    for t0 in range(0, seq_len, chunk):
      current = (np.arange(t0, min(t0 + chunk, seq_len)) // block)[:, None]
      j = np.arange(nb)[None, :]
      if realistic:
        scores = np.log(relevance)[None, :] - (current - j) / 64.0 + rng.normal(0, 0.3, (current.size, nb))
      else:
        scores = rng.random((current.size, nb))
      scores = np.where((j == 0) | ((current - j >= 0) & (current - j < 2)), np.inf, scores)
      scores = np.where(j <= current, scores, -np.inf)
      top = np.argsort(-scores, axis=1, kind="stable")[:, :n]
      top = np.where(np.take_along_axis(scores, top, 1) == -np.inf, -1, top)
      out[t0:t0 + current.size, h] = np.pad(top, ((0, 0), (0, n - top.shape[1])), constant_values=-1)  # n > blocks
  return out[None]


def _struct(shape, dtype=jnp.bfloat16):
  return jax.ShapeDtypeStruct(shape, dtype)


def layer_step(seq_len: int, s: Shape = PAPER, options: KernelOptions | None = None):
  """(value_and_grad of one NSA layer's attention, its argument shapes): the kernel-contract
  functions on Pallas as model/nsa.py composes them (block scores fused into the compressed
  forward; selection and window on shared K/V), summed, B = 1."""
  options = options or KernelOptions(pallas_mode="compiled")
  c = nsa.num_compressed(seq_len, s.block_len, s.stride)
  kw = dict(impl="pallas", options=options)

  def loss(q, k, v, k_cmp, v_cmp):
    o_cmp, _, idx = nsa.compressed_attention_and_selection(q, k_cmp, v_cmp, block_len=s.block_len, stride=s.stride,
                                                           slc_block=s.slc_block, num_selected=s.num_selected, **kw)
    o_slc, o_win = nsa.selection_and_window(q, k, v, idx, slc_block=s.slc_block, window=s.window, **kw)
    return sum(jnp.sum(o.astype(jnp.float32)) for o in (o_cmp, o_slc, o_win))
  args = [_struct((1, seq_len, s.hq, s.dk)), _struct((1, seq_len, s.hkv, s.dk)), _struct((1, seq_len, s.hkv, s.dv)),
          _struct((1, c, s.hkv, s.dk)), _struct((1, c, s.hkv, s.dv))]
  return jax.value_and_grad(loss, argnums=range(5)), args


def layer_calls(seq_len: int, s: Shape = PAPER, options: KernelOptions | None = None):
  """The traced pallas_calls of one NSA layer's attention, forward and backward (B = 1)."""
  step, args = layer_step(seq_len, s, options)
  return pallas_calls(step, *args)


def measure_ms(seq_len: int, s: Shape = PAPER, repeats: int = 5) -> float:
  """On a TPU: the median wall time of layer_step, compiled, on random inputs (milliseconds)."""
  return time_model.measure_ms(*layer_step(seq_len, s, KernelOptions()), repeats)


def selection_walk(seq_len: int, selection: np.ndarray, s: Shape = PAPER, options: KernelOptions | None = None):
  """The selection kernels' geometry and lists for this selection [1, T, HKV, n]."""
  options = options or KernelOptions(pallas_mode="compiled")
  w = selection_pallas.Walk("selection", 1, seq_len, seq_len, s.hkv, s.hq // s.hkv, s.dk, s.dv, s.slc_block,
                            selection.shape[-1], 0, 1.0, options, s.itemsize)
  union, count = selection_pallas.tile_unions(jnp.asarray(selection), slc_block=s.slc_block, seq_len=seq_len,
                                              queries_per_tile=w.bq)
  return w, np.asarray(selection_pallas.step_lists(w, union, count))


def window_walk(seq_len: int, s: Shape = PAPER, options: KernelOptions | None = None):
  options = options or KernelOptions(pallas_mode="compiled")
  w = selection_pallas.Walk("window", 1, seq_len, seq_len, s.hkv, s.hq // s.hkv, s.dk, s.dv,
                            selection_pallas.window_block(seq_len), 1, s.window, 1.0, options, s.itemsize)
  return w, np.asarray(selection_pallas.step_lists(w, *selection_pallas.window_unions(w, 0)))


def _walk_cost(name, w, lists, backward, steps):
  c = selection_pallas.walk(w, lists, backward)
  return Cost(name, steps, c["flops"], c["bytes"], c["dmas"])


def layer_costs(seq_len: int, selection: np.ndarray, s: Shape = PAPER, options: KernelOptions | None = None):
  """[Cost] per kernel of one layer, forward + backward, for this selection."""
  options = options or KernelOptions(pallas_mode="compiled")
  walks = {"selection": selection_walk(seq_len, selection, s, options), "window": window_walk(seq_len, s, options)}
  compressed = compressed_pallas.walks(1, seq_len, s.hq, s.hkv, s.dk, s.dv, s.block_len, s.stride, s.slc_block,
                                       options=options)
  costs = []
  for call in layer_calls(seq_len, s, options):
    kind, _, direction = call.name.removeprefix("nsa_").rpartition("_")
    if kind in walks:
      costs.append(_walk_cost(call.name, *walks[kind], direction == "bwd", call.steps))
    else:              # the compressed branch: its walk at the queries' real offsets (chunks of select_blocks)
      w = compressed[call.name]
      costs.append(Cost(call.name, call.steps, w["flops"], w["bytes"], w["dmas"]))   # looked up by name
  return costs


def minimum(seq_len: int, selection: np.ndarray, s: Shape = PAPER) -> Cost:
  """The honest minimum (module docstring) for this selection."""
  t = np.arange(seq_len)
  c = nsa.num_compressed(seq_len, s.block_len, s.stride)
  cmp_keys = np.clip((t - s.block_len + 1) // s.stride + 1, 0, c).sum()
  win_keys = np.minimum(s.window, t + 1).sum()
  idx = selection[0]                                                             # [T, HKV, n]
  valid = (idx >= 0) & (idx <= (t // s.slc_block)[:, None, None])
  distinct = np.sort(np.where(valid, idx, -1), -1)
  first = np.concatenate([np.ones_like(distinct[..., :1], bool), distinct[..., 1:] != distinct[..., :-1]], -1)
  first &= distinct >= 0
  own = (distinct == (t // s.slc_block)[:, None, None]) & first                    # the block holding t: partial
  keys = first.sum(-1) * s.slc_block - own.sum(-1) * (s.slc_block - 1 - t % s.slc_block)[:, None]
  fwd = 2 * (s.dk + s.dv) * (s.hq * (cmp_keys + win_keys) + s.hq // s.hkv * keys.sum())   # keys: [T, HKV]
  q, k, v = seq_len * s.hq * s.dk, seq_len * s.hkv * s.dk, seq_len * s.hkv * s.dv
  inputs = q + k + v + c * s.hkv * (s.dk + s.dv)
  out = seq_len * s.hq * s.dv
  # forward: inputs read, 3 outs written; backward: inputs, 3 dO and 3 outs read, gradients written.
  read_write = s.itemsize * (3 * inputs + 9 * out)
  return Cost("minimum", 0, 3 * fwd, read_write, 0)


def dense_costs(seq_len: int, s: Shape = PAPER, options: KernelOptions | None = None):
  """[Cost] per splash kernel of dense causal GQA attention at the same shape, forward + backward."""
  options = options or KernelOptions(pallas_mode="compiled")

  def loss(q, k, v):
    return jnp.sum(dense.attention(q, k, v, impl="pallas", options=options).astype(jnp.float32))
  calls = pallas_calls(jax.value_and_grad(loss, argnums=range(3)), _struct((1, seq_len, s.hq, s.dk)),
                       _struct((1, seq_len, s.hkv, s.dk)), _struct((1, seq_len, s.hkv, s.dv)))
  d = max(s.dk, s.dv)
  matmuls = {"fwd": 2, "dq": 3, "dkv": 4}
  costs = []
  for call in calls:
    kind = next(k for k in matmuls if f"_{k}" in call.name)
    q_blocks = call.grid[2] if kind != "dkv" else call.grid[1]
    block = seq_len // q_blocks
    pairs = q_blocks * (q_blocks + 1) // 2
    flops = matmuls[kind] * 2 * s.hq * pairs * block * block * d
    kv_bytes = s.hq * pairs * block * 2 * d * s.itemsize
    costs.append(Cost(call.name, call.steps, flops, kv_bytes + 2 * seq_len * s.hq * d * s.itemsize))
  return costs


@functools.cache
def dense_minimum(seq_len: int, s: Shape = PAPER) -> Cost:
  fwd = 2 * s.hq * (s.dk + s.dv) * seq_len * (seq_len + 1) / 2
  q, k, v, out = seq_len * s.hq * s.dk, seq_len * s.hkv * s.dk, seq_len * s.hkv * s.dv, seq_len * s.hq * s.dv
  return Cost("minimum", 0, 3 * fwd, s.itemsize * (3 * (q + k + v) + 3 * out), 0)
