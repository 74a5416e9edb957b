"""Context parallelism: the load-balanced layout, each kernel on a query chunk at its global
offset against all keys, config rules, and training split over a context axis (8 CPU devices)
exactly as without it."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_model import NSA_SMALL

from configs import ConfigError
from conftest import read_metrics, run_train, small_config
from kernels import KernelOptions, dense, dsa, nsa
from kernels.dsa import indexer_pallas
from kernels.dsa import pallas as dsa_pallas
from kernels.dsa import reference as dsa_reference
from parallel import context
from trainer import steps, validate


def test_layout_puts_chunks_i_and_mirror_on_device_i():
  """T=16 over cp=2: four chunks of 4; device 0 holds chunks 0 and 3, device 1 chunks 1 and 2."""
  np.testing.assert_array_equal(context.layout_positions(16, 2),
                                [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11])
  x = jax.random.normal(jax.random.key(0), (3, 48, 5))
  for cp in (1, 2, 3, 4):
    y = context.to_layout(x, 1, cp)
    np.testing.assert_array_equal(y, x[:, context.layout_positions(48, cp)])
    np.testing.assert_array_equal(context.from_layout(y, 1, cp), x)
  # causal work per device (sum of visible keys over its queries) is balanced exactly
  pos = context.layout_positions(64, 4).reshape(4, -1)
  assert len(set((pos + 1).sum(1))) == 1


def test_reordered_batch_gives_the_same_loss():
  """Inputs, targets and weights moved to the layout, and the outputs restored, give the loss of
  the natural order; positions travel with the tokens."""
  ks = jax.random.split(jax.random.key(1), 3)
  logits = jax.random.normal(ks[0], (2, 32, 11))
  targets = jax.random.randint(ks[1], (2, 32), 0, 11)
  weights = (jax.random.uniform(ks[2], (2, 32)) > 0.3).astype(jnp.float32)
  moved = [context.to_layout(x, 1, 4) for x in (logits, targets, weights)]
  assert steps.cross_entropy(*moved) == pytest.approx(float(steps.cross_entropy(logits, targets, weights)), rel=1e-6)
  np.testing.assert_array_equal(context.from_layout(moved[0], 1, 4), logits)
  batch = {"inputs": targets, "targets": targets}
  with jax.set_mesh(jax.make_mesh((1,), ("context",))):
    assert context.batch_to_layout(batch) is batch       # one device: nothing moves


# ---- each kernel: a chunk at its global offset equals those rows of the full call ----

T, CHUNK = 512, 128          # the chunk: splash's 128-row tiles, NSA's 64-position row tiles (G=2)
OFFSETS = (0, 384)           # the first chunk and the last


def _compare_chunk(full, local, args, key_args, offset, *, rtol, grads=True):
  """local(chunked query-side args..., all key-side args..., q_offset) == full(...)[:, chunk]:
  outputs, and the gradients of every float input under a cotangent on the chunk's rows."""
  rows = slice(offset, offset + CHUNK)
  chunked = [a[:, rows] for a in args]
  out_full = full(*args, *key_args)
  out_local = jax.jit(lambda *a: local(*a[:-1], q_offset=a[-1]))(*chunked, *key_args, jnp.int32(offset))
  leaves_full, leaves_local = jax.tree.leaves(out_full), jax.tree.leaves(out_local)
  for f, l in zip(leaves_full, leaves_local):
    np.testing.assert_allclose(np.asarray(l, np.float32), np.asarray(f[:, rows], np.float32), rtol=rtol, atol=rtol)
  if not grads:
    return
  cots = [jax.random.normal(jax.random.key(7 + i), x.shape) for i, x in enumerate(leaves_local)]
  def value(outs, chunk_rows):
    total = 0.0
    for o, c in zip(jax.tree.leaves(outs), cots):
      o = o[:, rows] if chunk_rows else o
      total += jnp.sum(jnp.where(jnp.isinf(o), 0.0, o.astype(jnp.float32)) * c)
    return total
  floats = tuple(i for i, x in enumerate([*args, *key_args]) if jnp.issubdtype(x.dtype, jnp.floating))
  g_full = jax.grad(lambda *a: value(full(*a), True), argnums=floats)(*args, *key_args)
  g_local = jax.grad(lambda *a: value(local(*a, q_offset=jnp.int32(offset)), False),
                     argnums=floats)(*chunked, *key_args)
  for i, gf, gl in zip(floats, g_full, g_local):
    gf = gf[:, rows] if i < len(args) else gf
    np.testing.assert_allclose(np.asarray(gl, np.float32), np.asarray(gf, np.float32), rtol=rtol, atol=rtol)


def _nsa_inputs(hq=4, hkv=2, d=32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(ks[0], (1, T, hq, d))
  k = jax.random.normal(ks[1], (1, T, hkv, d))
  v = jax.random.normal(ks[2], (1, T, hkv, d))
  c = nsa.num_compressed(T, 32, 16)
  kc = jax.random.normal(ks[3], (1, c, hkv, d))
  vc = jax.random.normal(ks[4], (1, c, hkv, d))
  return q, k, v, kc, vc


@pytest.mark.parametrize("pallas,offset", [(False, o) for o in OFFSETS] + [(True, 384)],
                         ids=[f"xla-{o}" for o in OFFSETS] + ["pallas-384"])
def test_nsa_functions_on_a_chunk_at_its_offset(pallas, offset):
  """Compressed attention (out, lse), block selection (exact), selected-block and window attention
  (outputs and q/k/v gradients), the Pallas kernels in Pallas's interpreter (test_nsa_pallas.py
  runs each in TPU interpret mode)."""
  options = KernelOptions(pallas_mode="interpret")
  q, k, v, kc, vc = _nsa_inputs(seed=offset)
  impl = "pallas" if pallas else "xla"
  common = dict(scale=0.2, options=options)
  cmp = dict(block_len=32, stride=16, **common)
  _compare_chunk(lambda q, kc, vc: nsa.compressed_attention(q, kc, vc, impl=impl, **cmp),
                 functools.partial(nsa.compressed_local, pallas=pallas, **cmp), [q], [kc, vc], offset, rtol=1e-4)

  sel = dict(block_len=32, stride=16, slc_block=32, num_selected=4, num_initial=1, num_local=2, **common)
  _, lse = nsa.compressed_attention(q, kc, kc, block_len=32, stride=16, impl=impl, **common)
  idx = nsa.select_blocks(q, kc, lse=lse, impl=impl, **sel)
  _compare_chunk(lambda q, lse, kc: nsa.select_blocks(q, kc, lse=lse, impl=impl, **sel),
                 lambda q, lse, kc, q_offset: nsa.select_local(q, kc, lse, q_offset=q_offset, num_blocks=T // 32,
                                                               pallas=pallas, **sel),
                 [q, lse], [kc], offset, rtol=0, grads=False)

  _compare_chunk(lambda q, idx, k, v: nsa.selection_attention(q, k, v, idx, slc_block=32, impl=impl, **common),
                 lambda q, idx, k, v, q_offset: nsa.selection_local(q, k, v, idx, q_offset=q_offset, slc_block=32,
                                                                    pallas=pallas, **common),
                 [q, idx], [k, v], offset, rtol=1e-4)
  _compare_chunk(lambda q, k, v: nsa.window_attention(q, k, v, window=48, impl=impl, **common),
                 functools.partial(nsa.window_local, window=48, pallas=pallas, **common), [q], [k, v], offset,
                 rtol=1e-4)


@pytest.mark.parametrize("pallas", [False, True], ids=["xla", "splash"])
def test_dense_attention_on_a_chunk_at_its_offset(pallas):
  """Causal GQA attention with two packed documents: a chunk at 256 against all keys (splash:
  the padded key range of a traced offset) equals the full call's rows, outputs and gradients."""
  q, k, v, _, _ = _nsa_inputs(seed=3)
  segments = jnp.where(jnp.arange(T) < 300, 1, 2)[None]
  impl = "pallas" if pallas else "xla"
  _compare_chunk(lambda q, seg, k, v, kv_seg: dense.attention(q, k, v, segment_ids=seg, scale=0.2, impl=impl),
                 lambda q, seg, k, v, kv_seg, q_offset: dense.local_attention(
                     q, k, v, seg, kv_seg, q_offset=q_offset, scale=0.2, window=None, pallas=pallas,
                     options=KernelOptions()),
                 [q, segments], [k, v, segments], 256, rtol=1e-4)


@pytest.mark.parametrize("pallas,offset", [(False, o) for o in OFFSETS] + [(True, 384)],
                         ids=[f"xla-{o}" for o in OFFSETS] + ["pallas-384"])
def test_dsa_functions_on_a_chunk_at_its_offset(pallas, offset):
  """The indexer's top-k (exact) and the sparse MLA attention (outputs, q and kv gradients);
  Pallas: the kernels in Pallas's interpreter."""
  ks = jax.random.split(jax.random.key(offset), 6)
  options = KernelOptions(dsa_query_chunk=32, pallas_mode="interpret")
  impl = "pallas" if pallas else "xla"
  q_idx, k_idx = jax.random.normal(ks[0], (1, T, 2, 16)), jax.random.normal(ks[1], (1, T, 16))
  w = jax.random.normal(ks[2], (1, T, 2))
  _compare_chunk(lambda q_idx, w, k_idx: dsa.indexer_topk(q_idx, k_idx, w, topk=24, options=options),
                 lambda q_idx, w, k_idx, q_offset: _dsa_local(dsa_reference.indexer_topk, pallas)(
                     q_idx, k_idx, w, q_offset=q_offset, topk=24, options=options),
                 [q_idx, w], [k_idx], offset, rtol=0, grads=False)
  q, kv = jax.random.normal(ks[3], (1, T, 4, 48)), jax.random.normal(ks[4], (1, T, 48))
  idx = jnp.sort(dsa.indexer_topk(q_idx, k_idx, w, topk=24, options=options), axis=-1)
  _compare_chunk(lambda q, idx, kv: dsa.sparse_attention(q, kv, idx, v_dim=32, scale=0.2, impl=impl, options=options),
                 lambda q, idx, kv, q_offset: _dsa_local(dsa_reference.sparse_attention, pallas)(
                     q, kv, idx, q_offset=q_offset, v_dim=32, scale=0.2, options=options),
                 [q, idx], [kv], offset, rtol=1e-5)


def _dsa_local(xla_local, pallas):
  """A DSA function's per-device body: the XLA reference's, or the Pallas kernel's."""
  if not pallas:
    return xla_local
  kernel = {dsa_reference.indexer_topk: indexer_pallas.indexer_topk,
            dsa_reference.sparse_attention: dsa_pallas.sparse_attention}[xla_local]
  return lambda *args, q_offset, **kw: kernel(*args, q_offset, **kw)


# ---- config rules ----

def test_context_rules_name_the_field():
  def check(**overrides):
    config = small_config(**{"mesh.fsdp": 2, "mesh.context": 4, **overrides})
    with pytest.raises(ConfigError) as e:
      validate.validate(config, num_devices=8)
    return e.value
  assert check(**{"mesh.context": 3}).field == "mesh"                      # 2 x 3 != 8 devices
  assert check(seq_len=132).field == "seq_len"                             # not a multiple of 2 x 4
  e = check(seq_len=128, **NSA_SMALL)                                      # chunks of 16 < l'=32
  assert e.field == "mesh.context" and "nsa.slc_block=32" in str(e)
  e = check(seq_len=512, **{"attention.impl": "pallas"})                   # chunks of 64: splash needs 128
  assert e.field == "mesh.context" and "128" in str(e)
  validate.validate(small_config(**{"mesh.fsdp": 2, "mesh.context": 4, "seq_len": 256}, **NSA_SMALL), num_devices=8)


# ---- training: context x fsdp trains like fsdp alone ----

def _losses(workdir, steps_):
  metrics = read_metrics(workdir)
  return np.array([metrics[s]["loss"] for s in steps_])


CONTEXT_RUNS = {
    "dense": ({}, "configs/tiny.py", 4),
    "nsa": (NSA_SMALL, "configs/tiny.py", 4),
    "dsa": ({}, "configs/dsa_tiny.py", 4),
}


@pytest.mark.slow
@pytest.mark.parametrize("run", list(CONTEXT_RUNS))
def test_context_parallel_training_matches_fsdp(tmp_path, run):
  """train.py on 8 CPU devices: context=4 x fsdp=2 gives the losses of fsdp=8, fp32, relative
  1e-4 (NSA on the Pallas kernels with context: test_pod.py)."""
  overrides, config, context = CONTEXT_RUNS[run]
  overrides = {"steps": 3, "seq_len": 256, "model.dtype": "float32", "optimizer.warmup_steps": 1, **overrides}
  split = run_train(tmp_path / "split", {**overrides, "mesh.context": context}, devices=8, wait=False, config=config)
  plain = run_train(tmp_path / "plain", overrides, devices=8, wait=False, config=config)
  for proc in (split, plain):
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
  np.testing.assert_allclose(_losses(tmp_path / "split", [1, 2, 3]), _losses(tmp_path / "plain", [1, 2, 3]),
                             rtol=1e-4)
