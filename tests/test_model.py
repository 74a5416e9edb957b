"""The dense model: attention against a naive loop, splash (Pallas, TPU interpret mode) against XLA,
RoPE, causality, and layer stacking options that must not change the numbers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import small_config
from kernels import dense
from model import transformer
from model.layers import Rope, apply_rope


def naive_causal_attention(q, k, v, scale):
  """One query at a time, one head at a time: the definition, in float64 numpy."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, hq, _ = q.shape
  group = hq // k.shape[2]
  out = np.zeros(q.shape[:3] + (v.shape[-1],))
  for bi in range(b):
    for h in range(hq):
      for ti in range(t):
        logits = scale * k[bi, :ti + 1, h // group] @ q[bi, ti, h]
        p = np.exp(logits - logits.max())
        out[bi, ti, h] = (p / p.sum()) @ v[bi, :ti + 1, h // group]
  return out


def _qkv(b, t, hq, hkv, d, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, t, hq, d)).astype(dtype),
          jax.random.normal(ks[1], (b, t, hkv, d)).astype(dtype),
          jax.random.normal(ks[2], (b, t, hkv, d)).astype(dtype))


@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (4, 1)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_dense_attention_matches_naive_loop(hq, hkv, dtype, tol):
  q, k, v = _qkv(2, 19, hq, hkv, 8, dtype)
  out = dense.attention(q, k, v, impl="xla")
  assert out.dtype == dtype
  np.testing.assert_allclose(np.asarray(out, np.float64), naive_causal_attention(q, k, v, 8 ** -0.5),
                             atol=tol, rtol=tol)


@pytest.mark.parametrize("t,hq,hkv", [(256, 4, 2), (384, 2, 2)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 5e-2)])
def test_splash_pallas_matches_xla_forward_and_gradients(t, hq, hkv, dtype, tol):
  q, k, v = _qkv(1, t, hq, hkv, 128, dtype, seed=t)
  loss = lambda impl: lambda q, k, v: jnp.sum(dense.attention(q, k, v, impl=impl).astype(jnp.float32) ** 2)
  out_x, out_p = dense.attention(q, k, v, impl="xla"), dense.attention(q, k, v, impl="pallas")
  np.testing.assert_allclose(np.asarray(out_p, np.float32), np.asarray(out_x, np.float32), atol=tol, rtol=tol)
  grads_x = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  grads_p = jax.grad(loss("pallas"), argnums=(0, 1, 2))(q, k, v)
  for gx, gp in zip(grads_x, grads_p):
    scale = float(jnp.abs(gx.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(gp, np.float32) / scale, np.asarray(gx, np.float32) / scale,
                               atol=tol * 2)


def test_rope_makes_scores_depend_on_relative_position_only():
  q, k, _ = _qkv(1, 1, 1, 1, 16, jnp.float32)
  def score(tq, tk):
    rq = apply_rope(q, jnp.array([[tq]]), Rope(10_000.0))
    rk = apply_rope(k, jnp.array([[tk]]), Rope(10_000.0))
    return float(jnp.sum(rq * rk))
  assert score(5, 2) == pytest.approx(score(105, 102), rel=1e-4)
  assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)


def _init(config, tokens):
  model = transformer.build(config)
  return model, nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens))["params"]


def test_model_is_causal():
  config = small_config()
  tokens = jax.random.randint(jax.random.key(1), (2, config.seq_len), 0, 4096)
  model, params = _init(config, tokens)
  apply = jax.jit(model.apply)
  logits = apply({"params": params}, tokens)
  assert logits.shape == (2, config.seq_len, 4096) and logits.dtype == jnp.float32
  changed = apply({"params": params}, tokens.at[:, 70].set(7))
  np.testing.assert_array_equal(logits[:, :70], changed[:, :70])
  assert not np.allclose(logits[:, 70:], changed[:, 70:])


def test_remat_and_unrolled_layers_give_the_same_loss_and_gradients():
  tokens = jax.random.randint(jax.random.key(1), (2, 128), 0, 4096)
  def loss_and_grads(**overrides):
    model, params = _init(small_config(**overrides), tokens)
    f = lambda p: jnp.mean(model.apply({"params": p}, tokens)[..., 0])
    return params, jax.jit(jax.value_and_grad(f))(params)
  _, (loss, grads) = loss_and_grads()
  _, (loss_remat, grads_remat) = loss_and_grads(**{"model.remat": "full"})
  np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_remat, grads)
  unrolled_params, (loss_unrolled, _) = loss_and_grads(**{"model.scan_layers": False})
  assert "layer_0" in unrolled_params and "layers" not in unrolled_params
  assert np.isfinite(loss_unrolled)


def test_model_with_pallas_attention_matches_xla():
  config = small_config(**{"model.head_dim": 128, "model.dtype": "float32"})
  tokens = jax.random.randint(jax.random.key(1), (1, 128), 0, 4096)
  model, params = _init(config, tokens)
  pallas_model = transformer.build(small_config(**{"model.head_dim": 128, "model.dtype": "float32",
                                                   "attention.impl": "pallas"}))
  np.testing.assert_allclose(pallas_model.apply({"params": params}, tokens),
                             model.apply({"params": params}, tokens), atol=2e-4, rtol=2e-4)


def test_flops_per_token_counts_matmuls_and_attention():
  config = small_config()
  _, params = _init(config, jnp.zeros((1, 128), jnp.int32))
  m = config.model
  per_layer_attention = 2 * m.d_model * m.head_dim * 2 * (m.n_heads + m.n_kv_heads) \
      + 2 * 2 * m.n_heads * m.head_dim * (config.seq_len + 1) / 2
  mlp = 3 * m.d_model * m.mlp_dim
  unembed = m.d_model * m.vocab_size
  norms = (2 * m.n_layers + 1) * m.d_model
  expected = 3 * (2 * (m.n_layers * mlp + unembed + norms) + m.n_layers * per_layer_attention)
  assert transformer.flops_per_token(config, params) == pytest.approx(expected)


NSA_SMALL = {"attention.kind": "nsa", "nsa.cmp_block": 16, "nsa.cmp_stride": 8, "nsa.slc_block": 32,
             "nsa.num_selected": 3, "nsa.window": 32}


@pytest.mark.parametrize("separate_kv", [False, True])
def test_nsa_model_is_causal_and_differentiable(separate_kv):
  config = small_config(**NSA_SMALL, **{"nsa.separate_kv": separate_kv})
  tokens = jax.random.randint(jax.random.key(1), (2, config.seq_len), 0, 4096)
  model, params = _init(config, tokens)
  attn = params["layers"]["attn"]
  assert {"compress_k", "compress_v", "gate", "q", "o"} <= set(attn)
  assert ({"k_cmp", "k_slc", "k_win", "v_cmp"} <= set(attn)) == separate_kv
  assert attn["compress_k"]["pos_emb"].shape == (config.model.n_layers, 16, config.model.head_dim)
  apply = jax.jit(model.apply)
  logits = apply({"params": params}, tokens)
  changed = apply({"params": params}, tokens.at[:, 90].set(7))
  np.testing.assert_array_equal(logits[:, :90], changed[:, :90])
  assert not np.allclose(logits[:, 90:], changed[:, 90:])
  loss = lambda p: jnp.mean(model.apply({"params": p}, tokens)[..., 0] ** 2)
  grads = jax.jit(jax.grad(loss))(params)
  norms = jax.tree.map(lambda g: float(jnp.linalg.norm(g)), grads["layers"]["attn"])
  assert all(np.isfinite(n) and n > 0 for n in jax.tree.leaves(norms)), norms


@pytest.mark.parametrize("branches, params_expected", [
    ("win", {"q", "k", "v", "o", "gate"}),
    ("slc", {"q", "k", "v", "o", "gate", "compress_k", "compress_v"}),
    ("cmp+win", {"q", "k", "v", "o", "gate", "compress_k", "compress_v"}),
])
def test_nsa_branch_ablations_keep_only_their_branches(branches, params_expected):
  """nsa.branches: one gate per kept branch; without cmp and slc no compression at all. "win"
  alone is sliding-window attention: with a window covering the row and its gate at 1, the
  model is the dense one with the same q/k/v/o."""
  config = small_config(**NSA_SMALL, **{"nsa.branches": branches, "model.dtype": "float32"})
  tokens = jax.random.randint(jax.random.key(1), (2, config.seq_len), 0, 4096)
  model, params = _init(config, tokens)
  attn = params["layers"]["attn"]
  assert set(attn) == params_expected
  assert attn["gate"]["kernel"].shape[-1] == len(branches.split("+"))
  start = dict(zip(("cmp", "slc", "win"), config.nsa.initial_gates))          # (0.01, 0.5, 0.5)
  np.testing.assert_allclose(jax.nn.sigmoid(attn["gate"]["bias"][0, 0]), [start[b] for b in branches.split("+")],
                             rtol=1e-5)
  _, sown = model.apply({"params": params}, tokens, mutable=["metrics"])
  assert {k for k in sown["metrics"]["layers"]["attn"]} == (
      {f"gate_{b}" for b in branches.split("+")} | ({"selected_beyond_window"} if "slc" in branches else set()))
  if branches == "win":
    config.nsa.window = config.seq_len
    dense_config = small_config(**{"model.dtype": "float32"})
    attn["gate"]["kernel"] = jnp.zeros_like(attn["gate"]["kernel"])
    attn["gate"]["bias"] = jnp.full_like(attn["gate"]["bias"], 30.0)      # sigmoid = 1 in float32
    dense_params = {**params, "layers": {**params["layers"], "attn": {k: attn[k] for k in ("q", "k", "v", "o")}}}
    np.testing.assert_allclose(transformer.build(config).apply({"params": params}, tokens),
                               transformer.build(dense_config).apply({"params": dense_params}, tokens), atol=2e-5)


def test_selected_beyond_window_counts_blocks_wholly_outside_the_window():
  from model.nsa import _beyond_window
  # block 16 tokens, window 32; query t=63: blocks 0,1 (tokens <= 31 < 63-32+1=32) beyond, 2,3 not.
  indices = jnp.full((1, 64, 1, 5), -1).at[0, 63, 0, :4].set(jnp.arange(4))
  assert float(_beyond_window(indices, 16, 32)) == 0.5
  # query t=47 (window keys 16..47): block 0 beyond, block 1 and 2 not; with t=63's: 3 of 7.
  indices = indices.at[0, 47, 0, :3].set(jnp.arange(3))
  assert float(_beyond_window(indices, 16, 32)) == pytest.approx(3 / 7)
