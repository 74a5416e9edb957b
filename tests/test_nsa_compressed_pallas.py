"""NSA's compressed-branch Pallas kernels (kernels/nsa/compressed_pallas.py: attention forward and
backward, block scores) against the XLA reference on CPU: fp32 in TPU interpret mode, bf16 in
Pallas's plain interpreter (tests/nsa_cases.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
  (out, lse), (ref, ref_lse) = attend("pallas")(q, kc, vc), attend("xla")(q, kc, vc)
  assert out.dtype == dtype and lse.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=1e-5, rtol=1e-5)   # -inf == -inf
  assert np.isneginf(np.asarray(lse[:, :l - 1])).all() and not np.asarray(out[:, :l - 1]).any()
  cot = jax.random.normal(jax.random.key(1), out.shape)
  def loss(f):
    def value(q, kc, vc):
      o, s = f(q, kc, vc)
      return jnp.sum(o.astype(jnp.float32) * cot) + 0.3 * jnp.sum(jnp.where(jnp.isinf(s), 0.0, s))
    return value
  got = jax.grad(loss(attend("pallas")), argnums=(0, 1, 2))(q, kc, vc)
  assert_grads_close(got, jax.grad(loss(attend("xla")), argnums=(0, 1, 2))(q, kc, vc), tol)
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
  (out, lse), (ref, ref_lse) = attend("pallas")(q, kc, vc), attend("xla")(q, kc, vc)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=1e-5, rtol=1e-5)
  plain = nsa.compressed_attention(q, kc, vc, block_len=l, stride=d, impl="xla")[0]
  assert not np.allclose(np.asarray(ref[0, 130:], np.float32), np.asarray(plain[0, 130:], np.float32), atol=1e-2)
  cot = jax.random.normal(jax.random.key(1), out.shape)
  loss = lambda f: lambda *a: jnp.sum(f(*a)[0].astype(jnp.float32) * cot)
  assert_grads_close(jax.grad(loss(attend("pallas")), argnums=(0, 1, 2))(q, kc, vc),
                      jax.grad(loss(attend("xla")), argnums=(0, 1, 2))(q, kc, vc), tol)
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


@pytest.mark.parametrize("t,hq,hkv,dk,l,d,lp,blocks_per_tile,start", [
    (512, 8, 2, 64, 32, 16, 64, 2, 256),      # 4 score tiles, a chunk at 256
    (256, 16, 1, 192, 32, 16, 32, 128, 0),    # G=16, one tile, l' = l
    (256, 1, 1, 128, 64, 16, 64, 1, 128),     # G=1, halo of 3 tokens, one block per tile
])
def test_block_scores_match_xla(t, hq, hkv, dk, l, d, lp, blocks_per_tile, start):
  q, kc, _ = compressed_inputs(1, t, hq, hkv, dk, 1, l, d, jnp.float32, seed=t)
  _, lse = nsa.compressed_attention(q, kc, kc, block_len=l, stride=d, impl="xla")
  nb = t // lp
  got = compressed_pallas.block_scores(q[:, start:], lse[:, start:], kc, start, block_len=l, stride=d,
                                           slc_block=lp, num_blocks=nb,
                                           options=KernelOptions(score_blocks=blocks_per_tile))
  p, _ = nsa_reference.compressed_probs(q[:, start:], start, kc, block_len=l, stride=d, scale=dk ** -0.5)
  ref = nsa_reference.block_scores(p.sum(axis=3), nb, block_len=l, stride=d, slc_block=lp)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_select_blocks_pallas_picks_the_xla_blocks(dtype):
  """Several select chunks (the last one padded), lse computed inside or passed in."""
  q, kc, _ = compressed_inputs(2, 384, 8, 2, 64, 1, 32, 16, dtype, seed=5)
  kw = dict(block_len=32, stride=16, slc_block=32, num_selected=5)
  ref = nsa.select_blocks(q, kc, impl="xla", **kw)
  np.testing.assert_array_equal(np.asarray(nsa.select_blocks(q, kc, impl="pallas", **kw)), np.asarray(ref))
  _, lse = nsa.compressed_attention(q, kc, kc, block_len=32, stride=16, impl="pallas")
  got = nsa.select_blocks(q, kc, lse=lse, impl="pallas", options=KernelOptions(select_chunk=256), **kw)
  # bf16: scores of near-equal blocks may round apart differently from XLA's; a few swaps allowed.
  assert (np.asarray(got) == np.asarray(ref)).mean() >= (1.0 if dtype == jnp.float32 else 0.98)


def test_compressed_shape_errors_say_what_is_needed():
  q, kc, vc = compressed_inputs(1, 100, 16, 1, 32, 32, 32, 16, jnp.float32)
  with pytest.raises(kernels.Unsupported, match="seq_len=100: must be a multiple of 8"):
    nsa.compressed_attention(q, kc, vc, block_len=32, stride=16, impl="pallas")


