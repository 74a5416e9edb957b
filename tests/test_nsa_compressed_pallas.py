"""NSA's compressed-branch Pallas kernels (kernels/nsa/compressed_pallas.py: attention forward and
backward, block scores, the fused forward with block scores, kernels.nsa.compressed_attention_and_
selection) against the XLA reference on CPU: fp32 in TPU interpret mode, bf16 in Pallas's plain
interpreter (tests/nsa_cases.py). Sub-chunks are made small (SUB_KEYS) so that the small cases have
several. Also: their CostEstimates against a brute-force count, the grid steps at the paper's shape
(traced), and ahead-of-time compiles for v5e, v5p, v6e."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kernels
from kernels import KernelOptions, nsa
from kernels.nsa import compressed_pallas
from kernels.nsa import reference as nsa_reference
from model import packing
from tests.nsa_cases import assert_grads_close, compressed_inputs, options_for


@pytest.mark.parametrize("t,hq,hkv,dk,dv,l,d,key_tile,dtype,tol", [
    (256, 4, 2, 128, 128, 32, 16, 128, jnp.float32, 1e-5),   # G=2, one key tile
    (256, 16, 1, 192, 128, 32, 16, 8, jnp.float32, 1e-5),    # G=16, Dk=192, 2 key tiles: skips
    (128, 1, 1, 128, 128, 64, 32, 2, jnp.bfloat16, 3e-2),    # G=1, tiny key tiles
])
def test_compressed_attention_pallas_matches_xla(t, hq, hkv, dk, dv, l, d, key_tile, dtype, tol):
  """Outputs, lse and the gradients of q, k_cmp, v_cmp through both out and lse; the first
  l - 1 queries see nothing (0, lse -inf, zero gradient)."""
  options = options_for(dtype, key_tile=key_tile)
  q, kc, vc = compressed_inputs(2, t, hq, hkv, dk, dv, l, d, dtype, seed=t + key_tile)
  attend = lambda impl: lambda q, kc, vc: nsa.compressed_attention(q, kc, vc, block_len=l, stride=d, impl=impl,
                                                                   options=options)
  (out, lse), pallas_vjp = jax.vjp(attend("pallas"), q, kc, vc)     # one forward for values and gradients
  (ref, ref_lse), xla_vjp = jax.vjp(attend("xla"), q, kc, vc)
  assert out.dtype == dtype and lse.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=1e-5, rtol=1e-5)   # -inf == -inf
  assert np.isneginf(np.asarray(lse[:, :l - 1])).all() and not np.asarray(out[:, :l - 1]).any()
  # The gradient of sum(out * cot) + 0.3 * sum(lse where finite).
  cot = (jax.random.normal(jax.random.key(1), out.shape).astype(dtype), jnp.where(jnp.isinf(lse), 0.0, 0.3))
  got = pallas_vjp(cot)
  assert_grads_close(got, xla_vjp(cot), tol)
  assert not np.asarray(got[0][:, :l - 1]).any()


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_compressed_attention_and_block_scores_with_documents_match_xla(dtype, tol):
  """Packed documents on model/packing.py's aligned row (doc_start): compressed attention (out,
  lse, gradients) and the block scores and choices of select_blocks, Pallas against XLA."""
  t, hq, hkv, dk, dv, l, d, lp = 256, 8, 2, 64, 64, 32, 16, 64
  seg = jnp.asarray([[1] * 30 + [2] * 5 + [3] * 61 + [0] * 32, [1] * 1 + [2] * 95 + [3] * 32])   # T = 128
  doc_start = packing.AlignedRows.build(seg, block=lp, max_docs=2).doc_start      # T' = 256
  q, kc, vc = compressed_inputs(2, t, hq, hkv, dk, dv, l, d, dtype, seed=11)
  options = KernelOptions(pallas_mode="interpret")     # (the kernels' own tests run TPU interpret mode)
  attend = lambda impl: lambda q, kc, vc: nsa.compressed_attention(q, kc, vc, block_len=l, stride=d, impl=impl,
                                                                   options=options, doc_start=doc_start)
  (out, lse), pallas_vjp = jax.vjp(attend("pallas"), q, kc, vc)
  (ref, ref_lse), xla_vjp = jax.vjp(attend("xla"), q, kc, vc)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=1e-5, rtol=1e-5)
  plain = nsa.compressed_attention(q, kc, vc, block_len=l, stride=d, impl="xla")[0]
  assert not np.allclose(np.asarray(ref[0, 130:], np.float32), np.asarray(plain[0, 130:], np.float32), atol=1e-2)
  cot = (jax.random.normal(jax.random.key(1), out.shape).astype(dtype), jnp.zeros_like(lse))   # through out
  assert_grads_close(pallas_vjp(cot), xla_vjp(cot), tol)
  kw = dict(block_len=l, stride=d, slc_block=lp, num_selected=3, options=options, doc_start=doc_start)
  got, want = nsa.select_blocks(q, kc, impl="pallas", **kw), nsa.select_blocks(q, kc, impl="xla", **kw)
  assert (np.asarray(got) == np.asarray(want)).mean() >= (1.0 if dtype == jnp.float32 else 0.98)
  first_block = -(-np.asarray(doc_start) // lp)[..., None, None]
  assert ((np.asarray(want) == -1) | (np.asarray(want) >= first_block)).all()   # never before the document


def test_overlap_tiles_map_tokens_to_blocks():
  """l=32, d=16, l'=64, 2 blocks per tile: 8 tokens per key tile; token c covers [16c, 16c+32).
  Own tile: tokens 0-2 lie in block 0 (weights 2, 2, and 1+1 split with block 1 for token 3)."""
  own, prev = compressed_pallas.overlap_tiles(32, 16, 64, 2)
  np.testing.assert_array_equal(own, [[2, 0], [2, 0], [2, 0], [1, 1], [0, 2], [0, 2], [0, 2], [0, 1]])
  np.testing.assert_array_equal(prev[-1], [1, 0])            # the previous tile's last token spills
  assert not prev[:-1].any()
  np.testing.assert_array_equal(own.sum(0) + prev.sum(0), [8, 8])   # l'/d * l/d per block


@pytest.mark.parametrize("t,hq,hkv,dk,l,d,lp,blocks_per_tile,start,step_rows,sub", [
    (512, 8, 2, 64, 32, 16, 64, 2, 256, 256, 4),      # 4 score tiles, a chunk at 256, 4 grid steps, 2 sub-chunks
    (256, 16, 1, 192, 32, 16, 32, 128, 0, 4096, 128),  # G=16, one tile, l' = l, 2 sub-chunks
    (256, 1, 1, 128, 64, 16, 64, 1, 128, 4096, 2),     # G=1, 3 tokens spill (more than a sub-chunk), one block per tile
])
def test_block_scores_match_xla(t, hq, hkv, dk, l, d, lp, blocks_per_tile, start, step_rows, sub, monkeypatch):
  monkeypatch.setattr(compressed_pallas, "SUB_KEYS", sub)
  q, kc, _ = compressed_inputs(1, t, hq, hkv, dk, 1, l, d, jnp.float32, seed=t)
  _, lse = nsa.compressed_attention(q, kc, kc, block_len=l, stride=d, impl="xla")
  nb = t // lp
  got = compressed_pallas.block_scores(q[:, start:], lse[:, start:], kc, start, block_len=l, stride=d,
                                           slc_block=lp, num_blocks=nb,
                                           options=KernelOptions(score_blocks=blocks_per_tile, step_rows=step_rows))
  p, _ = nsa_reference.compressed_probs(q[:, start:], start, kc, block_len=l, stride=d, scale=dk ** -0.5)
  ref = nsa_reference.block_scores(p.sum(axis=3), nb, block_len=l, stride=d, slc_block=lp)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_select_blocks_pallas_picks_the_xla_blocks(dtype):
  """Several select chunks (the last one padded), lse computed inside (given: the fallback of
  test_compressed_attention_and_selection_picks_the_xla_blocks)."""
  q, kc, _ = compressed_inputs(2, 384, 8, 2, 64, 1, 32, 16, dtype, seed=5)
  kw = dict(block_len=32, stride=16, slc_block=32, num_selected=5)
  ref = nsa.select_blocks(q, kc, impl="xla", **kw)
  got = nsa.select_blocks(q, kc, impl="pallas", options=KernelOptions(select_chunk=256), **kw)
  # bf16: scores of near-equal blocks may round apart differently from XLA's; a few swaps allowed.
  assert (np.asarray(got) == np.asarray(ref)).mean() >= (1.0 if dtype == jnp.float32 else 0.98)


def test_compressed_shape_errors_say_what_is_needed():
  q, kc, vc = compressed_inputs(1, 100, 16, 1, 32, 32, 32, 16, jnp.float32)
  with pytest.raises(kernels.Unsupported, match="seq_len=100: must be a multiple of 8"):
    nsa.compressed_attention(q, kc, vc, block_len=32, stride=16, impl="pallas")




# ---- a query chunk of a longer sequence, several grid steps, key ranges ----

def _doc_start(t: int, starts) -> jax.Array:
  """int32 [1, t]: each position's document start, documents beginning at `starts` (multiples of l')."""
  starts = np.asarray(starts)
  return jnp.asarray(starts[np.searchsorted(starts, np.arange(t), side="right") - 1][None], jnp.int32)


@pytest.mark.parametrize("dtype,tol,docs", [(jnp.float32, 1e-5, False), (jnp.bfloat16, 3e-2, True)])
def test_compressed_attention_of_a_query_chunk_over_steps_and_key_ranges(dtype, tol, docs, monkeypatch):
  """Queries [256, 512) of a 512-token sequence against all its compressed keys (q_offset = 256, as
  context parallelism calls the kernel): 4 grid steps (step_rows=256), chunks of 8 keys, and the
  backward in 2 key ranges of 2 chunks (fp32 dq partials); bf16 with packed documents. Out, lse
  and the gradients through both against the reference at the same offset."""
  t, hq, hkv, dk, dv, l, d = 512, 8, 2, 64, 32, 32, 16
  monkeypatch.setattr(compressed_pallas, "DKV_RANGE_BYTES", 2 * 8 * (128 + 128) * 4)     # 2 chunks, lanes padded
  monkeypatch.setattr(compressed_pallas, "SUB_KEYS", 4)                                  # 2 sub-chunks per chunk
  options = options_for(dtype, key_tile=8, step_rows=256)
  q, kc, vc = compressed_inputs(1, t, hq, hkv, dk, dv, l, d, dtype, seed=7)
  q = q[:, t // 2:]
  doc = _doc_start(t, [0, 192, 320])[:, t // 2:] if docs else None
  g = compressed_pallas.attention_geometry(1, t // 2, hq, hkv, dk, dv, kc.shape[1], l, d, options=options)
  assert (g.num_steps, g.num_chunks, g.num_ranges) == (4, 4, 2)
  pallas = lambda q, kc, vc: compressed_pallas.compressed_attention(q, kc, vc, t // 2, l, d, options=options,
                                                                    doc_start=doc)
  xla = lambda q, kc, vc: nsa_reference.compressed(q, kc, vc, doc, q_offset=t // 2, block_len=l, stride=d,
                                                   scale=dk ** -0.5, options=options)
  (out, lse), pallas_vjp = jax.vjp(pallas, q, kc, vc)
  (ref, ref_lse), xla_vjp = jax.vjp(xla, q, kc, vc)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=1e-5, rtol=1e-5)
  cot = (jax.random.normal(jax.random.key(2), out.shape).astype(dtype), jnp.where(jnp.isinf(lse), 0.0, 0.3))
  assert_grads_close(pallas_vjp(cot), xla_vjp(cot), tol)


# ---- the fused forward: attention and block scores in one kernel ----

@pytest.mark.parametrize("dtype,tol,docs", [(jnp.float32, 1e-5, False), (jnp.bfloat16, 3e-2, True)])
def test_fused_forward_gives_the_attention_and_the_block_scores(dtype, tol, docs, monkeypatch):
  """compressed_attention_and_scores for queries [272, 528) of a 528-token sequence (q_offset traced,
  as context parallelism passes it): 2 chunks of 16 keys in sub-chunks of 8, 4 grid steps, each
  chunk's last token spilling into the next chunk's first block (for the last chunk, block 8, past
  the chunks' windows); bf16 with packed documents. Out, lse and their gradients (the scores have
  none) as the reference's, the scores as its block scores (fp32: within 1e-5 of the largest)."""
  t, hq, hkv, dk, dv, l, d, lp, start = 528, 16, 1, 64, 32, 32, 16, 64, 272
  monkeypatch.setattr(compressed_pallas, "SUB_KEYS", 8)
  options = options_for(dtype, key_tile=16, step_rows=1024)
  q, kc, vc = compressed_inputs(1, t, hq, hkv, dk, dv, l, d, dtype, seed=3)
  q, doc = q[:, start:], _doc_start(t, [0, 192, 320, 448])[:, start:] if docs else None
  nb = -(-t // lp)
  g = compressed_pallas.fused_geometry(1, t - start, hq, hkv, dk, dv, kc.shape[1], l, d, lp, nb, options=options)
  assert (g.num_steps, g.num_chunks, g.subs, g.blocks_per_chunk, g.score_windows) == (4, 2, 2, 4, 3)
  fused = jax.jit(lambda q, kc, vc, offset: compressed_pallas.compressed_attention_and_scores(
      q, kc, vc, offset, l, d, lp, nb, options=options, doc_start=doc))
  (out, lse, scores), fused_vjp = jax.vjp(lambda *a: fused(*a, jnp.int32(start)), q, kc, vc)
  (ref, ref_lse), xla_vjp = jax.vjp(lambda q, kc, vc: nsa_reference.compressed(
      q, kc, vc, doc, q_offset=start, block_len=l, stride=d, scale=dk ** -0.5, options=options), q, kc, vc)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=1e-5, rtol=1e-5)
  cot = (jax.random.normal(jax.random.key(2), out.shape).astype(dtype), jnp.where(jnp.isinf(lse), 0.0, 0.3))
  assert_grads_close(fused_vjp((*cot, jnp.ones_like(scores))), xla_vjp(cot), tol)      # the scores: no gradient
  p, _ = nsa_reference.compressed_probs(q, start, kc, doc, block_len=l, stride=d, scale=dk ** -0.5)
  want = np.asarray(nsa_reference.block_scores(p.sum(axis=3), nb, block_len=l, stride=d, slc_block=lp))
  got = np.asarray(scores).transpose(0, 2, 1, 3)
  assert want[..., 8].any()
  np.testing.assert_allclose(got / want.max(), want / want.max(), atol=tol)


@pytest.mark.parametrize("fused,dtype,tol", [(True, jnp.float32, 1e-5), (False, jnp.float32, 1e-5),
                                             (True, jnp.bfloat16, 3e-2)])
def test_compressed_attention_and_selection_picks_the_xla_blocks(fused, dtype, tol, monkeypatch):
  """kernels.nsa.compressed_attention_and_selection on Pallas (the fused forward, or where it does
  not fit its VMEM the separate score kernel) against compressed_attention + select_blocks on XLA:
  the same out and lse, the same blocks (3 select chunks of 128 queries). bf16: p enters the block
  scores in bf16, as it enters p V; a few near-ties may swap."""
  if not fused:
    monkeypatch.setattr(compressed_pallas, "FUSED_VMEM_LIMIT", 0)
  q, kc, vc = compressed_inputs(2, 384, 8, 2, 64, 32, 32, 16, dtype, seed=5)
  kw = dict(block_len=32, stride=16, slc_block=32, num_selected=5,
            options=KernelOptions(pallas_mode="interpret", select_chunk=128))          # the glue: the quicker interpreter
  got = nsa.compressed_attention_and_selection(q, kc, vc, impl="pallas", **kw)
  want = nsa.compressed_attention_and_selection(q, kc, vc, impl="xla", **kw)
  for x, y in zip(got[:2], want[:2]):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=tol, rtol=tol)
  assert (np.asarray(got[2]) == np.asarray(want[2])).mean() >= (1.0 if dtype == jnp.float32 else 0.99)
  if fused and dtype == jnp.float32:        # one device's queries [128, 384) at a traced offset (context parallelism)
    local = jax.jit(lambda q, offset: nsa.compressed_selection_local(
        q, kc, vc, q_offset=offset, num_blocks=12, block_len=32, stride=16, slc_block=32, num_selected=5, num_initial=1,
        num_local=2, scale=64 ** -0.5, options=kw["options"]))
    np.testing.assert_array_equal(np.asarray(local(q[:, 128:], jnp.int32(128))[2]), np.asarray(want[2][:, 128:]))
  traced = jax.make_jaxpr(lambda *a: nsa.compressed_attention_and_selection(*a, impl="pallas", **kw))(q, kc, vc)
  names = {eqn.params["name"] for eqn, _ in _pallas_calls(traced.jaxpr)}
  assert names == ({"nsa_compressed_fwd_scores"} if fused else {"nsa_compressed_fwd", "nsa_compressed_scores"})


# ---- what the kernels cost: CostEstimates against a brute-force count, grid steps at the paper's shape ----

def _pallas_calls(jaxpr, times=1):
  """(pallas_call equation, how often it runs: the lengths of the scans around it) in a jaxpr."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      yield eqn, times
      continue
    assert eqn.primitive.name != "while", "a loop of unknown length around kernels"
    inner = times * eqn.params["length"] if eqn.primitive.name == "scan" else times
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _pallas_calls(sub.jaxpr, inner)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _pallas_calls(sub, inner)


def _estimates(fn, *args) -> dict:
  """{kernel name: CostEstimate} of the pallas_calls fn traces (one each)."""
  calls = [eqn for eqn, _ in _pallas_calls(jax.make_jaxpr(fn)(*args).jaxpr)]
  assert len({e.params["name"] for e in calls}) == len(calls)
  return {e.params["name"]: e.params["cost_estimate"] for e in calls}


def _brute_force(kernel: str, g, q_offset: int, docs: bool) -> tuple:
  """(flops, transcendentals, bytes) of one call, counted from the visibility rule alone: a (tile,
  sub-chunk) pair is computed iff a row of the tile sees a token of the sub-chunk (a tile sees a
  prefix of the tokens); a step (per key range in the backward) walks the chunks its tiles need,
  the first from the block the pipeline keeps per head (and range), the others copied from HBM."""
  pos = q_offset + np.arange(g.t)
  token = np.arange(g.num_chunks * g.chunk)
  seen = (token[None] * g.stride + g.block_len - 1 <= pos[:, None]) & (token[None] < g.c)
  need_sub = seen.reshape(g.num_tiles, g.bq, g.num_chunks, g.chunk // g.sub, g.sub).any(axis=(1, 4))
  need = need_sub.any(-1)                                                               # [tiles, chunks]
  backward, scores = kernel == compressed_pallas.BACKWARD, kernel == compressed_pallas.SCORES
  ranges, per_range = (g.num_ranges, g.chunks_per_range) if backward else (1, g.num_chunks)
  pairs = subs = spill_pairs = copied = 0
  for step in range(g.num_steps):
    for r in range(ranges):
      tiles, chunks = slice(step * g.tiles_per_step, (step + 1) * g.tiles_per_step), slice(r * per_range, (r + 1) * per_range)
      walked = need[tiles, chunks]
      pairs += walked.sum()
      subs += need_sub[tiles, chunks].sum()
      copied += max(walked.any(0).sum() - 1, 0)
      spill_pairs += need_sub[tiles, :g.block_tiles - 1, -1].sum() if scores else 0     # whole chunks spill
  mm = lambda *shapes: sum(2 * m * k * n for m, k, n in shapes)        # [m, k] x [k, n] products
  kc, sub, rows, bq, isz, tps = g.chunk, g.sub, 128, g.bq, g.itemsize, g.tiles_per_step
  q_rows, stats = tps * rows * g.dk * isz, tps * rows * 4
  fused, nbc = kernel == compressed_pallas.FUSED, g.blocks_per_chunk
  if kernel == compressed_pallas.FORWARD or fused:
    flops = subs * mm((rows, g.dk, sub), (rows, sub, g.dv))
    exps = subs * rows * sub + pairs * rows + g.num_tiles * rows
    per_step, per_range_bytes, chunk = q_rows + tps * rows * g.dv * isz + stats, 0, kc * (g.dk + g.dv) * isz
    if fused:     # p x overlap [sub, NBC] per (tile, sub-chunk), the head sum per (tile, chunk), exp(m - lse)
      flops += subs * mm((rows, sub, nbc)) + pairs * mm((bq, rows, nbc)) * (1 if g.dtype == np.float32 else 3)
      exps += g.num_tiles * rows * g.chunk_lanes
      per_step += tps * bq * g.score_lanes * 4
  elif backward:
    flops = subs * mm((rows, g.dk, sub), (rows, g.dv, sub), (rows, sub, g.dk), (sub, rows, g.dv), (sub, rows, g.dk))
    exps, chunk = subs * rows * sub, kc * (g.dk + g.dv) * isz
    per_step = 2 * q_rows // g.dk * g.dk + tps * rows * g.dv * isz + 2 * stats
    per_step += tps * rows * g.dk * (isz if ranges == 1 else 4) - q_rows           # dq: q's dtype, or fp32 partials
    per_range_bytes = per_range * kc * (g.dk + g.dv) * 4             # fp32 dK, dV
  else:
    nbt = g.blocks_per_chunk
    per_sub = mm((rows, g.dk, sub), (bq, sub, nbt)) + (mm((bq, rows, sub)) if g.group > 1 else 0)
    reach = -(-(g.block_len - g.stride) // g.stride)          # tokens reaching into the next chunk's blocks
    flops = subs * per_sub + (spill_pairs * mm((bq, sub if reach <= sub else kc, nbt)) if reach > 0 else 0)
    exps, chunk, per_range_bytes = subs * rows * sub, kc * g.dk * isz, 0
    per_step = q_rows + stats + tps * bq * g.block_tiles * nbt * 4
  per_step += stats if docs else 0
  heads = g.b * g.hkv
  total = heads * (ranges * g.num_steps * per_step + ranges * (chunk + per_range_bytes) + copied * chunk) + 4
  total += kc * g.blocks_per_chunk * 4 * (1 + (g.block_len > g.stride and g.block_tiles > 1)) if scores else 0
  total += kc * nbc * isz + (sub * 4 if g.block_len > g.stride else 0) if fused else 0     # overlap, spill weights
  return heads * flops, heads * exps, total


def _assert_estimate(estimate, expected):
  assert (estimate.flops, estimate.transcendentals, estimate.bytes_accessed) == tuple(int(x) for x in expected)


@pytest.mark.parametrize("docs,traced", [(False, False), (True, False), (False, True)])
def test_attention_cost_estimates_count_what_the_kernels_do(docs, traced, monkeypatch):
  """Forward, fused forward and backward CostEstimates equal a brute-force count: 256 queries at 256
  of a 768-token sequence (47 compressed keys in chunks of 16, sub-chunks of 4; fused: 12 blocks
  of l' = 64, 4 per chunk), 4 steps, 2 backward key ranges; traced q_offset: counted as if the
  queries were the sequence's last 256."""
  t, hq, hkv, dk, dv, l, d, lp, t_seq = 256, 8, 2, 64, 32, 32, 16, 64, 768
  monkeypatch.setattr(compressed_pallas, "DKV_RANGE_BYTES", 2 * 16 * (128 + 128) * 4)
  monkeypatch.setattr(compressed_pallas, "SUB_KEYS", 4)
  options = KernelOptions(pallas_mode="compiled", key_tile=16, step_rows=256)
  q, kc, vc = compressed_inputs(1, t_seq, hq, hkv, dk, dv, l, d, jnp.bfloat16)
  q, doc = q[:, 256:512], _doc_start(t_seq, [0, 320])[:, 256:512] if docs else None
  fused_options = dataclasses.replace(options, pallas_mode="interpret")   # traced only: 4 blocks per chunk, not 128
  got = {}
  for fused in (False, True):
    def loss(q, kc, vc, offset):
      if fused:
        return compressed_pallas.compressed_attention_and_scores(q, kc, vc, offset, l, d, lp, t_seq // lp,
                                                                 options=fused_options, doc_start=doc)[0].sum()
      return compressed_pallas.compressed_attention(q, kc, vc, offset, l, d, options=options, doc_start=doc)[0].sum()
    grad = jax.grad(loss, argnums=(0, 1, 2))
    got |= _estimates(grad, q, kc, vc, jnp.int32(256)) if traced else _estimates(lambda *a: grad(*a, 256), q, kc, vc)
  g = compressed_pallas.attention_geometry(1, t, hq, hkv, dk, dv, kc.shape[1], l, d, options=options)
  fg = compressed_pallas.fused_geometry(1, t, hq, hkv, dk, dv, kc.shape[1], l, d, lp, t_seq // lp,
                                        options=fused_options)
  assert (g.num_steps, g.num_chunks, g.num_ranges, g.subs) == (4, 3, 2, 4)
  assert fg.tiles_per_step == g.tiles_per_step and (fg.blocks_per_chunk, fg.score_lanes) == (4, 12)
  offset = t_seq - t if traced else 256                 # (C - 1) * d + l = 768: the last 256 queries
  for kernel, geometry in ((compressed_pallas.FORWARD, g), (compressed_pallas.BACKWARD, g), (compressed_pallas.FUSED, fg)):
    _assert_estimate(got[compressed_pallas.NAMES[kernel]], _brute_force(kernel, geometry, offset, docs))


@pytest.mark.parametrize("hq,l,d,docs,traced", [
    (16, 32, 16, False, False),    # G=16, tokens spill into the next tile of blocks
    (16, 32, 16, True, False),     # packed documents
    (16, 32, 16, False, True),     # traced chunk start: counted as the sequence's last chunk
    (1, 16, 16, False, False),     # G=1 (no head sum), l = d (no spill)
])
def test_block_scores_cost_estimate_counts_what_the_kernel_does(hq, l, d, docs, traced, monkeypatch):
  monkeypatch.setattr(compressed_pallas, "SUB_KEYS", 4)                    # 4 sub-chunks per chunk of 16 tokens
  t, qc, start, lp = 768, 256, 256, 64
  # Traced only; interpret mode keeps 4 blocks per chunk (a TPU rounds score_blocks up to 128 lanes).
  options = KernelOptions(pallas_mode="interpret", score_blocks=4, step_rows=1024 if hq > 1 else 128)
  q, kc, _ = compressed_inputs(1, t, hq, 1, 64, 1, l, d, jnp.bfloat16)
  lse = jnp.zeros((1, qc, hq), jnp.float32)
  doc = _doc_start(t, [0, 320])[:, start:start + qc] if docs else None
  scores = lambda q, lse, kc, s: compressed_pallas.block_scores(q, lse, kc, s, block_len=l, stride=d, slc_block=lp,
                                                                num_blocks=t // lp, options=options, doc_start=doc)
  args = (q[:, start:start + qc], lse, kc)
  got = _estimates(scores, *args, jnp.int32(start)) if traced else _estimates(lambda *a: scores(*a, start), *args)
  g = compressed_pallas.scores_geometry(1, qc, hq, 1, 64, kc.shape[1], l, d, lp, t // lp, options=options)
  assert g.num_steps > 1 and g.num_chunks > 2 and g.block_tiles == 3 and g.subs == 4
  covered = (kc.shape[1] - 1) * d + l
  offset = -(-covered // g.bq) * g.bq - qc if traced else start
  _assert_estimate(got[compressed_pallas.NAMES[compressed_pallas.SCORES]],
                   _brute_force(compressed_pallas.SCORES, g, offset, docs))


@pytest.mark.parametrize("t", [65536, 131072])
def test_paper_shape_grid_steps(t):
  """The paper's shape (B=1, HQ=64, HKV=4, Dk=192, Dv=128, l=32, d=16, l'=64, bf16), traced for TPU:
  a layer's compressed branch, fused (compressed_attention_and_selection: forward with block scores,
  backward) or not (compressed_attention and select_blocks' block scores, lse given), runs
  B * HKV * T * G / 4096 grid steps per kernel (scans counted), 1024 at 64k: a step is 256 queries
  x 16 heads. The steps grow linearly in T; walks() gives each kernel's steps and flops."""
  b, hq, hkv, dk, dv, l, d, lp = 1, 64, 4, 192, 128, 32, 16, 64
  c = nsa.num_compressed(t, l, d)
  options = KernelOptions(pallas_mode="compiled")
  kw = dict(block_len=l, stride=d, impl="pallas", options=options)

  def layer(fused):
    def loss(q, kc, vc):
      if fused:
        out, lse, chosen = nsa.compressed_attention_and_selection(q, kc, vc, slc_block=lp, num_selected=16, **kw)
      else:
        out, lse = nsa.compressed_attention(q, kc, vc, **kw)
        chosen = nsa.select_blocks(q, kc, slc_block=lp, num_selected=16, lse=lse, **kw)
      return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isinf(lse), 0.0, lse)), chosen
    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
  shapes = [((b, t, hq, dk), jnp.bfloat16), ((b, c, hkv, dk), jnp.bfloat16), ((b, c, hkv, dv), jnp.bfloat16)]
  walks = compressed_pallas.walks(b, t, hq, hkv, dk, dv, l, d, lp, options=options)    # what perf/ reports
  per_kernel = b * hkv * t * (hq // hkv) // 4096
  for fused, names in ((True, ("fwd_scores", "bwd")), (False, ("fwd", "bwd", "scores"))):
    jaxpr = jax.make_jaxpr(layer(fused))(*[jax.ShapeDtypeStruct(s, dt) for s, dt in shapes])
    steps, flops = {}, {}
    for eqn, times in _pallas_calls(jaxpr.jaxpr):
      name = eqn.params["name"]
      steps[name] = steps.get(name, 0) + times * int(np.prod(eqn.params["grid_mapping"].grid))
      flops[name] = flops.get(name, 0) + times * eqn.params["cost_estimate"].flops
    assert steps == {f"nsa_compressed_{n}": per_kernel for n in names}
    for name in steps:
      assert walks[name]["steps"] == steps[name]
      if name != "nsa_compressed_scores":    # traced chunk starts: each call is estimated as the last chunk
        assert walks[name]["flops"] == flops[name]


@pytest.mark.parametrize("chip", ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"])
def test_compressed_kernels_compile_for_tpu(chip):
  """Mosaic compiles the compressed-branch kernels for the chip, ahead of time (libtpu, no TPU): the
  paper's heads at T=8192, one sequence per chip inside shard_map: the fused forward (attention and
  block scores) with the backward; and for the last 1024 queries against the keys of a 16384-token
  sequence (as under context parallelism: two chunks, two windows of 128 blocks, the spill between
  them) the fused forward and the separate block scores. (The plain forward: test_nsa_pallas.py's
  layer compile.)"""
  topo = topologies.get_topology_desc(platform="tpu", topology_name=chip, chip_config_name="default",
                                      chips_per_host_bounds=(2, 2, 1), num_slices=1)
  mesh = jax.make_mesh((len(topo.devices),), ("data",), devices=topo.devices)
  t, l, d, lp = 8192, 32, 16, 64
  options = KernelOptions(pallas_mode="compiled")

  def step(q, kc, vc, kc_long, vc_long):
    def loss(q, kc, vc):
      out, lse, scores = compressed_pallas.compressed_attention_and_scores(q, kc, vc, 0, l, d, lp, t // lp,
                                                                           options=options)
      return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isinf(lse), 0.0, lse)), (lse, scores)
    (_, (lse, scores)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, kc, vc)
    tail = q[:, -1024:]
    long = compressed_pallas.compressed_attention_and_scores(tail, kc_long, vc_long, 2 * t - 1024, l, d, lp, 2 * t // lp,
                                                             options=options)
    separate = compressed_pallas.block_scores(tail, long[1], kc_long, 2 * t - 1024, block_len=l, stride=d, slc_block=lp,
                                              num_blocks=2 * t // lp, options=options)
    return grads, scores, long, separate
  fn = jax.shard_map(step, mesh=mesh, in_specs=(P("data"),) * 5, out_specs=P("data"), check_vma=False)
  b, sharded = len(topo.devices), NamedSharding(mesh, P("data"))
  c, c_long = nsa.num_compressed(t, l, d), nsa.num_compressed(2 * t, l, d)
  shapes = [(b, t, 64, 192), (b, c, 4, 192), (b, c, 4, 128), (b, c_long, 4, 192), (b, c_long, 4, 128)]
  lowered = jax.jit(fn).lower(*[jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=sharded) for s in shapes])
  assert lowered.as_text().count("tpu_custom_call") == 4
  assert lowered.compile().memory_analysis().temp_size_in_bytes < 2 * 2**30
