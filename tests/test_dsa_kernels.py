"""kernels.dsa (impl="xla") against oracles written here, one query position at a time.

The oracles never gather: each query builds its own mask over all T keys from its index list (a
different formulation from the chunked gathers under test), vmapped over t so the differentiable
ones give reference gradients. The top-k oracle is a float64 numpy loop.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import KernelOptions, dsa

SCALE = 0.3


def _rand(key, shape, dtype):
  return jax.random.normal(key, shape).astype(dtype)


def _indexer_inputs(b, t, hi, di, seed=0, integer=False, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 3)
  if integer:   # small integers: every score is exact in any dtype, so ties are real ties
    draw = lambda k, shape, lo, hi_: jax.random.randint(k, shape, lo, hi_).astype(dtype)
    return draw(ks[0], (b, t, hi, di), -2, 3), draw(ks[1], (b, t, di), -2, 3), draw(ks[2], (b, t, hi), -1, 3)
  return _rand(ks[0], (b, t, hi, di), dtype), _rand(ks[1], (b, t, di), dtype), _rand(ks[2], (b, t, hi), dtype)


def oracle_topk(q_idx, k_idx, w, topk):
  q_idx, k_idx, w = (np.asarray(x, np.float64) for x in (q_idx, k_idx, w))
  b, t = q_idx.shape[:2]
  out = np.full((b, t, topk), -1, np.int64)
  for bi in range(b):
    for ti in range(t):
      scores = [float(np.sum(w[bi, ti] * np.maximum(q_idx[bi, ti] @ k_idx[bi, s], 0))) for s in range(ti + 1)]
      order = sorted(range(ti + 1), key=lambda s: (-scores[s], s))[:topk]     # ties: the lower s
      out[bi, ti, :len(order)] = order
  return out


@pytest.mark.parametrize("integer", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("t,topk,chunk", [(24, 8, 128), (29, 5, 8), (6, 16, 4)])
def test_indexer_topk_matches_loop(integer, dtype, t, topk, chunk):
  options = KernelOptions(dsa_query_chunk=chunk)
  q_idx, k_idx, w = _indexer_inputs(2, t, 3, 8, seed=t, integer=integer, dtype=dtype)
  got = dsa.indexer_topk(q_idx, k_idx, w, topk=topk, impl="xla", options=options)
  assert got.dtype == jnp.int32 and got.shape == (2, t, topk)
  np.testing.assert_array_equal(np.asarray(got), oracle_topk(q_idx, k_idx, w, topk))
  # Rows with fewer than topk visible keys hold all of them, then -1.
  for ti in range(min(t, topk)):
    assert sorted(np.asarray(got[0, ti, :ti + 1]).tolist()) == list(range(ti + 1))
    assert (np.asarray(got[:, ti, ti + 1:]) == -1).all()


def _indices(b, t, k, seed):
  """Random index lists with every awkward entry: -1, repeats, future and out-of-range keys."""
  rng = np.random.default_rng(seed)
  idx = rng.integers(-1, t + 3, size=(b, t, k))
  idx[:, :, 1] = idx[:, :, 0]                      # a repeat in every row
  idx[:, 0, :] = -1                                # a row that sees nothing
  idx[:, 1, :] = [1] + [t + 1] * (k - 1)           # itself, then out of range
  return jnp.asarray(idx, jnp.int32)


def _support(indices_t, t_pos, t):
  """[T] bool: the set of keys query t_pos may attend to, from its index list."""
  s = jnp.arange(t)
  return jnp.any(indices_t[:, None] == s[None, :], axis=0) & (s <= t_pos)


def oracle_sparse_attention(q, kv, indices, v_dim, scale):
  """Per query: softmax over its support of all T keys (float32), value = kv[:, :v_dim]."""
  t = q.shape[1]

  def one(q_t, idx_t, t_pos, kv_b):                  # q_t [H, D]
    mask = _support(idx_t, t_pos, t)
    logits = jnp.where(mask, (kv_b.astype(jnp.float32) @ q_t.astype(jnp.float32).T).T * scale, -jnp.inf)
    p = jnp.where(mask, jnp.exp(logits - jnp.max(jnp.where(mask, logits, -1e30), -1, keepdims=True)), 0.0)
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    return p @ kv_b[:, :v_dim].astype(jnp.float32)
  per_batch = jax.vmap(one, in_axes=(0, 0, 0, None))
  return jax.vmap(per_batch, in_axes=(0, 0, None, 0))(q, indices, jnp.arange(t), kv)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("t,k,chunk", [(19, 6, 128), (37, 9, 8)])
def test_sparse_attention_matches_oracle_forward_and_gradients(dtype, tol, t, k, chunk):
  options = KernelOptions(dsa_query_chunk=chunk)
  b, h, dk, v_dim = 2, 4, 24, 16
  ks = jax.random.split(jax.random.key(t), 3)
  q, kv = _rand(ks[0], (b, t, h, dk), dtype), _rand(ks[1], (b, t, dk), dtype)
  indices = _indices(b, t, k, seed=t)
  cot = _rand(ks[2], (b, t, h, v_dim), jnp.float32)
  run = lambda q, kv: dsa.sparse_attention(q, kv, indices, v_dim=v_dim, scale=SCALE, impl="xla", options=options)
  ref = lambda q, kv: oracle_sparse_attention(q, kv, indices, v_dim, SCALE)
  out = run(q, kv)
  assert out.dtype == dtype and out.shape == (b, t, h, v_dim)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref(q, kv)), atol=tol, rtol=tol)
  assert not np.asarray(out[:, 0]).any()            # nothing visible: exactly 0
  grads = jax.grad(lambda q, kv: jnp.sum(run(q, kv).astype(jnp.float32) * cot), argnums=(0, 1))(q, kv)
  grads_ref = jax.grad(lambda q, kv: jnp.sum(ref(q, kv) * cot), argnums=(0, 1))(q, kv)
  for g, g_ref in zip(grads, grads_ref):
    assert np.isfinite(np.asarray(g, np.float32)).all()
    scale = float(jnp.abs(g_ref).max())
    np.testing.assert_allclose(np.asarray(g, np.float32) / scale, np.asarray(g_ref, np.float32) / scale,
                               atol=2 * tol)
  assert not np.asarray(grads[0][:, 0]).any()        # and zero gradient for that query


def oracle_indexer_loss(q, kv, q_idx, k_idx, w, indices, scale):
  """mean_t KL(teacher_t || softmax(I[t, support_t])) with per-query masks over all T keys."""
  t = q.shape[1]

  def one(q_t, qi_t, w_t, idx_t, t_pos, kv_b, ki_b):
    s = jnp.arange(t)
    mask = (s <= t_pos) if idx_t is None else _support(idx_t, t_pos, t)
    logits = jnp.where(mask, (kv_b.astype(jnp.float32) @ q_t.astype(jnp.float32).T).T * scale, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1)                              # [H, T], each head over the support
    teacher = p.sum(0) / p.sum()
    dots = jax.nn.relu(ki_b.astype(jnp.float32) @ qi_t.astype(jnp.float32).T)   # [T, HI]
    student = jax.nn.log_softmax(jnp.where(mask, dots @ w_t.astype(jnp.float32), -jnp.inf))
    return jnp.sum(jnp.where(teacher > 0, teacher * (jnp.log(jnp.where(teacher > 0, teacher, 1.0))
                                                      - jnp.where(mask, student, 0.0)), 0.0))
  idx_axis = None if indices is None else 0
  per_batch = jax.vmap(one, in_axes=(0, 0, 0, idx_axis, 0, None, None))
  kl = jax.vmap(per_batch, in_axes=(0, 0, 0, idx_axis, None, 0, 0))(
      q, q_idx, w, indices, jnp.arange(t), kv, k_idx)
  return kl.mean()


@pytest.mark.parametrize("stage", ["dense_warmup", "sparse"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_indexer_loss_matches_oracle_and_trains_only_the_indexer(stage, dtype, tol):
  options = KernelOptions(dsa_query_chunk=8)
  b, t, h, dk, hi, di = 2, 21, 3, 16, 2, 8
  ks = jax.random.split(jax.random.key(1), 2)
  q, kv = _rand(ks[0], (b, t, h, dk), dtype), _rand(ks[1], (b, t, dk), dtype)
  q_idx, k_idx, w = _indexer_inputs(b, t, hi, di, seed=2, dtype=dtype)
  if stage == "sparse":   # every row keeps itself (as top-k does); the rest random, with repeats
    indices = _indices(b, t, 6, seed=3).at[:, :, 0].set(jnp.arange(t, dtype=jnp.int32))
  else:
    indices = None
  run = lambda *a: dsa.indexer_loss(*a, indices, scale=SCALE, impl="xla", options=options)
  ref = lambda *a: oracle_indexer_loss(*a, indices, SCALE)
  args = (q, kv, q_idx, k_idx, w)
  loss = run(*args)
  np.testing.assert_allclose(float(loss), float(ref(*args)), rtol=tol, atol=tol)
  assert float(loss) > 0.01
  grads = jax.grad(run, argnums=(0, 1, 2, 3, 4))(*args)
  grads_ref = jax.grad(ref, argnums=(2, 3, 4))(*args)
  assert not np.asarray(grads[0]).any() and not np.asarray(grads[1]).any()   # teacher: stop-gradient
  for g, g_ref in zip(grads[2:], grads_ref):
    scale = float(jnp.abs(g_ref).max())
    assert scale > 0
    np.testing.assert_allclose(np.asarray(g, np.float32) / scale, np.asarray(g_ref, np.float32) / scale,
                               atol=5 * tol)


def test_indexer_recall_counts_true_top_k():
  options = KernelOptions(dsa_query_chunk=8)
  b, t, h, dk, k = 1, 30, 2, 8, 4
  ks = jax.random.split(jax.random.key(5), 2)
  q, kv = _rand(ks[0], (b, t, h, dk), jnp.float32), _rand(ks[1], (b, t, dk), jnp.float32)
  # The true top-k of the head-summed attention, by brute force per row.
  probs = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((t, t), bool)),
                                   jnp.einsum("bthd,bsd->bhts", q, kv) * SCALE, -jnp.inf), -1).sum(1)
  truth = jax.lax.top_k(probs, k)[1].astype(jnp.int32)                    # [B, T, k]
  recall, rows = dsa.indexer_recall(q, kv, truth, topk=k, scale=SCALE, options=options)
  assert int(rows) == t - k and float(recall) == pytest.approx(1.0)
  # Replace the best key of every row with its worst visible one: recall (k-1)/k.
  worst = jnp.argmin(jnp.where(jnp.tril(jnp.ones((t, t), bool)), probs, jnp.inf), -1).astype(jnp.int32)
  half = truth.at[:, :, 0].set(worst)
  recall, _ = dsa.indexer_recall(q, kv, half, topk=k, scale=SCALE, options=options)
  assert float(recall) == pytest.approx((k - 1) / k)
  # By distance: every true top-k key of the counted rows is counted in its bucket t - s, and the
  # replaced best keys are the misses there.
  edges = (0, 4, 16)
  _, _, hits, relevant = dsa.indexer_recall(q, kv, half, topk=k, scale=SCALE, options=options, distance_edges=edges)
  t_q = jnp.arange(t)[None, :, None]
  counted = (jnp.arange(t) >= k)[None, :, None]
  bucket = lambda d: jnp.searchsorted(jnp.array(edges), d, side="right") - 1
  for i in range(len(edges)):
    want_relevant = int(((bucket(t_q - truth) == i) & counted).sum())
    want_misses = int(((bucket(t_q - truth[:, :, :1]) == i) & counted).sum())
    assert (int(relevant[i]), int(relevant[i] - hits[i])) == (want_relevant, want_misses), i
  assert int(relevant.sum()) == (t - k) * k


def test_sparse_path_memory_is_not_quadratic():
  """fwd+bwd of top-k, sparse attention and the indexer loss at T=8192, k=64: compiled memory
  stays far below one [T, T] float32 tensor (256 MiB)."""
  b, t, h, dk, hi, di, k = 1, 8192, 4, 80, 2, 32, 64
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)

  def loss(q, kv, q_idx, k_idx, w):
    idx = dsa.indexer_topk(q_idx, k_idx, w, topk=k, impl="xla")
    out = dsa.sparse_attention(q, kv, idx, v_dim=64, scale=SCALE, impl="xla")
    return jnp.sum(out.astype(jnp.float32)) + dsa.indexer_loss(q, kv, q_idx, k_idx, w, idx, scale=SCALE)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(
      spec(b, t, h, dk), spec(b, t, dk), spec(b, t, hi, di), spec(b, t, di), spec(b, t, hi)).compile()
  mem = compiled.memory_analysis()
  total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
  assert total < t * t * 4 / 4, f"{total / 2**20:.0f} MiB"
