"""kernels.nsa at impl="xla" against naive per-query loops written here (tiny sizes): outputs and
gradients, fp32 and bf16, GQA groups 1/2/4/16, Dk != Dv, T not a multiple of any block."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import KernelOptions, nsa
from kernels.nsa import reference as nsa_reference

CHUNKED = KernelOptions(query_chunk=16, window_chunk=16)   # several chunks, the last one partial

# ---- oracles: one query position at a time, straight from docs/design.md §4 ----


def naive_attend(q_t, keys, values, visible, scale):
  """One query position: q_t [B,HQ,Dk]; keys [B,S,HKV,Dk]; visible bool [S] or [B,HKV,S].
  -> (out [B,HQ,Dv], lse [B,HQ]); nothing visible -> (0, -inf)."""
  b, hq, _ = q_t.shape
  hkv = keys.shape[2]
  if keys.shape[1] == 0:
    return jnp.zeros((b, hq, values.shape[-1])), jnp.full((b, hq), -jnp.inf)
  qg = q_t.reshape(b, hkv, hq // hkv, -1).astype(jnp.float32)          # head h -> KV head h // G
  logits = jnp.einsum("bhgd,bshd->bhgs", qg, keys.astype(jnp.float32)) * scale
  vis = visible[None, None, None, :] if visible.ndim == 1 else visible[:, :, None, :]
  logits = jnp.where(vis, logits, -1e30)
  p = jnp.exp(logits - logits.max(-1, keepdims=True)) * vis
  denom = p.sum(-1)
  safe = jnp.where(denom > 0, denom, 1)
  out = jnp.einsum("bhgs,bshd->bhgd", p / safe[..., None], values.astype(jnp.float32))
  lse = jnp.where(denom > 0, logits.max(-1) + jnp.log(safe), -jnp.inf)
  return out.reshape(b, hq, -1), lse.reshape(b, hq)


def per_query(fn):
  """Runs fn(t, q[:, t], ...) for every query position t (vmapped: one query at a time)."""
  def run(q, *args):
    return jax.vmap(lambda t, q_t: fn(t, q_t, *args), in_axes=(0, 1), out_axes=1)(jnp.arange(q.shape[1]), q)
  return run


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def naive_compressed(q, k_cmp, v_cmp, l, d, scale):
  return per_query(lambda t, q_t, kc, vc: naive_attend(
      q_t, kc, vc, jnp.arange(kc.shape[1]) * d + l - 1 <= t, scale))(q, k_cmp, v_cmp)


@functools.partial(jax.jit, static_argnums=(4, 5))
def naive_selection(q, k, v, idx, block, scale):
  s = jnp.arange(k.shape[1])
  def one(t, q_t, k, v, idx):
    idx_t = jnp.take(idx, t, axis=1)                                     # [B, HKV, n]
    chosen = jnp.any((s[None, None, :, None] // block == idx_t[:, :, None, :]) & (idx_t[:, :, None, :] >= 0), -1)
    return naive_attend(q_t, k, v, chosen & (s <= t), scale)[0]
  return per_query(one)(q, k, v, idx)


@functools.partial(jax.jit, static_argnums=(3, 4))
def naive_window(q, k, v, w, scale):
  s = jnp.arange(k.shape[1])
  return per_query(lambda t, q_t, k, v: naive_attend(q_t, k, v, (s <= t) & (s > t - w), scale)[0])(q, k, v)


def naive_select(q, k_cmp, l, d, lp, n, n_init, n_local, scale):
  """Block choice per (batch, t, KV head) in float64 numpy: forced blocks, then the best scores
  (ties: the lower block), -1 for free slots."""
  b, t_len, hq, _ = q.shape
  hkv = k_cmp.shape[2]
  g = hq // hkv
  result = np.full((b, t_len, hkv, n), -1)
  for t in range(t_len):
    visible = np.arange(k_cmp.shape[1]) * d + l - 1 <= t
    logits = np.einsum("bhd,bchd->bhc", np.asarray(q[:, t], np.float64),
                       np.repeat(np.asarray(k_cmp, np.float64), g, axis=2)) * scale
    p = np.zeros_like(logits)
    if visible.any():
      e = np.exp(np.where(visible, logits, -np.inf) - logits[..., visible].max(-1, keepdims=True))
      p = e / e.sum(-1, keepdims=True)
    for bi in range(b):
      for h in range(hkv):
        group_p = p[bi, h * g:(h + 1) * g].sum(0)
        cur = t // lp
        scores = {}
        for j in range(cur + 1):
          scores[j] = sum(group_p[i] * len(set(range(i * d, i * d + l)) & set(range(j * lp, (j + 1) * lp))) / d
                          for i in range(len(group_p)))
        forced = {j for j in range(min(n_init, cur + 1))} | {cur - x for x in range(n_local) if cur - x >= 0}
        rest = sorted((j for j in scores if j not in forced), key=lambda j: (-scores[j], j))
        chosen = sorted(forced) + rest[:n - len(forced)]
        result[bi, t, h, :len(chosen)] = chosen
  return result


def _inputs(seed, b, t, hq, hkv, dk, dv, c, dtype):
  ks = jax.random.split(jax.random.key(seed), 6)
  n = lambda k, s: jax.random.normal(k, s).astype(dtype)
  return (n(ks[0], (b, t, hq, dk)), n(ks[1], (b, t, hkv, dk)), n(ks[2], (b, t, hkv, dv)),
          n(ks[3], (b, c, hkv, dk)), n(ks[4], (b, c, hkv, dv)))


TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}
SHAPES = [  # (T, HQ, HKV, Dk, Dv)
    (37, 2, 2, 16, 8),     # G = 1, Dk != Dv
    (45, 4, 2, 8, 8),      # G = 2
    (29, 4, 1, 8, 16),     # G = 4
    (19, 16, 1, 8, 8),     # G = 16
]


def _close(a, b, tol):
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=tol)


def _grads_close(f_test, f_ref, args, tol):
  """Gradients of sum(out * r) for a fixed random r, relative to the reference's largest entry."""
  out = f_ref(*args)
  r = jax.random.normal(jax.random.key(9), out.shape)
  loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) * r)
  g_test = jax.jit(jax.grad(loss(f_test), argnums=tuple(range(len(args)))))(*args)
  g_ref = jax.jit(jax.grad(loss(f_ref), argnums=tuple(range(len(args)))))(*args)
  for gt, gr in zip(g_test, g_ref):
    assert np.all(np.isfinite(np.asarray(gt, np.float32)))
    scale = max(float(jnp.max(jnp.abs(gr.astype(jnp.float32)))), 1e-6)
    _close(gt.astype(jnp.float32) / scale, gr.astype(jnp.float32) / scale, tol * 3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_compressed_attention(shape, dtype):
  t, hq, hkv, dk, dv = shape
  l, d = 8, 4
  c = nsa.num_compressed(t, l, d)
  q, _, _, kc, vc = _inputs(t, 2, t, hq, hkv, dk, dv, c, dtype)
  scale = dk ** -0.5
  out, lse = nsa.compressed_attention(q, kc, vc, block_len=l, stride=d, impl="xla", options=CHUNKED)
  ref_out, ref_lse = naive_compressed(q, kc, vc, l, d, scale)
  assert out.dtype == dtype and lse.dtype == jnp.float32
  _close(out, ref_out, TOL[dtype])
  assert np.all(np.isneginf(lse[:, :l - 1])) and np.all(out[:, :l - 1] == 0)   # nothing visible yet
  _close(lse[:, l - 1:], ref_lse[:, l - 1:], TOL[dtype])
  _grads_close(lambda q, kc, vc: nsa.compressed_attention(q, kc, vc, block_len=l, stride=d, impl="xla", options=CHUNKED)[0],
               lambda q, kc, vc: naive_compressed(q, kc, vc, l, d, scale)[0], (q, kc, vc), TOL[dtype])


def test_compressed_attention_with_no_compressed_tokens():
  q, _, _, kc, vc = _inputs(0, 1, 5, 2, 1, 8, 8, 0, jnp.float32)
  out, lse = nsa.compressed_attention(q, kc, vc, block_len=8, stride=4, impl="xla", options=CHUNKED)
  assert out.shape == (1, 5, 2, 8) and np.all(out == 0) and np.all(np.isneginf(lse))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_selection_attention(shape, dtype):
  t, hq, hkv, dk, dv = shape
  block, n = 8, 3
  q, k, v, _, _ = _inputs(t + 1, 2, t, hq, hkv, dk, dv, 0, dtype)
  num_blocks = -(-t // block)
  # random choices including -1, repeats, future blocks and out-of-range indices (all ignored)
  idx = jax.random.randint(jax.random.key(t), (2, t, hkv, n), -1, num_blocks + 2).astype(jnp.int32)
  idx = idx.at[:, :, :, 0].set((jnp.arange(t) // block)[None, :, None])      # own block: never empty
  idx = idx.at[:, 5, 0, 1].set(idx[:, 5, 0, 0])                               # a repeat
  scale = dk ** -0.5
  clean = jnp.where((idx <= (jnp.arange(t) // block)[None, :, None, None]) & (idx < num_blocks), idx, -1)
  out = nsa.selection_attention(q, k, v, idx, slc_block=block, impl="xla", options=CHUNKED)
  _close(out, naive_selection(q, k, v, clean, block, scale), TOL[dtype])
  _grads_close(lambda q, k, v: nsa.selection_attention(q, k, v, idx, slc_block=block, impl="xla", options=CHUNKED),
               lambda q, k, v: naive_selection(q, k, v, clean, block, scale), (q, k, v), TOL[dtype])


def test_selection_attention_with_nothing_selected_is_zero_with_zero_gradients():
  q, k, v, _, _ = _inputs(3, 1, 12, 2, 1, 8, 8, 0, jnp.float32)
  idx = jnp.full((1, 12, 1, 2), -1, jnp.int32).at[:, 6:, :, 0].set(5)       # -1, then future only
  f = lambda q, k, v: nsa.selection_attention(q, k, v, idx, slc_block=4, impl="xla", options=CHUNKED)
  assert np.all(f(q, k, v) == 0)
  grads = jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2))(q, k, v)
  assert all(np.all(g == 0) for g in grads)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("window", [1, 7, 100])
def test_window_attention(shape, dtype, window):
  t, hq, hkv, dk, dv = shape
  q, k, v, _, _ = _inputs(t + 2, 2, t, hq, hkv, dk, dv, 0, dtype)
  scale = dk ** -0.5
  out = nsa.window_attention(q, k, v, window=window, impl="xla", options=CHUNKED)
  _close(out, naive_window(q, k, v, window, scale), TOL[dtype])
  if window == 7:
    _grads_close(lambda q, k, v: nsa.window_attention(q, k, v, window=window, impl="xla", options=CHUNKED),
                 lambda q, k, v: naive_window(q, k, v, window, scale), (q, k, v), TOL[dtype])


def test_overlap_weights_by_hand():
  np.testing.assert_array_equal(nsa_reference.overlap_weights(32, 16, 64), [1, 2, 2, 2, 1])    # paper defaults
  np.testing.assert_array_equal(nsa_reference.overlap_weights(16, 16, 64), [1, 1, 1, 1])       # l = d
  np.testing.assert_array_equal(nsa_reference.overlap_weights(64, 16, 64), [1, 2, 3, 4, 3, 2, 1])
  np.testing.assert_array_equal(nsa_reference.overlap_weights(32, 8, 32), [1, 2, 3, 4, 3, 2, 1])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("l,d,lp,n", [(8, 4, 8, 3), (8, 4, 16, 3), (4, 4, 8, 4)])
def test_select_blocks_matches_the_definition(shape, l, d, lp, n):
  t, hq, hkv, dk, _ = shape
  c = nsa.num_compressed(t, l, d)
  q, _, _, kc, _ = _inputs(t + 3, 2, t, hq, hkv, dk, dk, c, jnp.float32)
  got = np.asarray(nsa.select_blocks(q, kc, block_len=l, stride=d, slc_block=lp, num_selected=n,
                                     num_initial=1, num_local=2, impl="xla", options=CHUNKED))
  want = naive_select(q, kc, l, d, lp, n, 1, 2, dk ** -0.5)
  assert got.dtype == np.int32 and got.shape == (2, t, hkv, n)
  np.testing.assert_array_equal(np.sort(got, -1), np.sort(want, -1))


def test_select_blocks_ties_take_the_lower_block_and_forced_blocks_count():
  # All keys identical: every visible compressed token gets the same probability, so interior
  # blocks tie; the choice must be deterministic (lowest index first).
  t, l, d, lp = 64, 8, 4, 8
  q = jnp.ones((1, t, 2, 8))
  kc = jnp.ones((1, nsa.num_compressed(t, l, d), 1, 8))
  got = np.asarray(nsa.select_blocks(q, kc, block_len=l, stride=d, slc_block=lp, num_selected=4,
                                     num_initial=1, num_local=2, impl="xla", options=CHUNKED))
  assert sorted(got[0, 63, 0]) == [0, 1, 6, 7]      # forced 0, 7, 6; then the lowest tied block
  assert sorted(got[0, 3, 0]) == [-1, -1, -1, 0]    # only block 0 exists yet
  assert sorted(got[0, 12, 0]) == [-1, -1, 0, 1]    # 2 eligible blocks, both forced


def test_select_blocks_sends_no_gradient():
  q, _, _, kc, _ = _inputs(5, 1, 32, 2, 1, 8, 8, 7, jnp.float32)
  f = lambda q, kc: nsa.select_blocks(q, kc, block_len=8, stride=4, slc_block=8, num_selected=2,
                                      impl="xla", options=CHUNKED).astype(jnp.float32).sum()
  assert all(np.all(g == 0) for g in jax.grad(f, argnums=(0, 1))(q, kc))


def test_the_briefs_keyword_names_for_slc_block_still_work():
  """`select_block=` / `block_size=` (the brief's first contract) mean slc_block; two different values are refused."""
  q, k, v = (jax.random.normal(jax.random.key(i), (1, 64, 4, 8)) for i in range(3))
  kc = jax.random.normal(jax.random.key(3), (1, 7, 2, 8))
  kw = dict(block_len=16, stride=8, num_selected=3, impl="xla")
  idx = nsa.select_blocks(q, kc, slc_block=16, **kw)
  np.testing.assert_array_equal(nsa.select_blocks(q, kc, select_block=16, **kw), idx)
  k2, v2 = k[:, :, :2], v[:, :, :2]
  np.testing.assert_array_equal(nsa.selection_attention(q, k2, v2, idx, block_size=16, impl="xla"),
                                nsa.selection_attention(q, k2, v2, idx, slc_block=16, impl="xla"))
  with pytest.raises(ValueError, match="slc_block=16 and block_size=32"):
    nsa.selection_attention(q, k2, v2, idx, slc_block=16, block_size=32, impl="xla")
