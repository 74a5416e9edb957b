"""MLA and DSA layers, the indexer's gradient isolation, the warm-up optimizer, and the two-stage
recipe end to end (dense MLA -> indexer warm-up -> sparse) through train.py."""
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from flax.traverse_util import flatten_dict

from configs import dsa_tiny, dsa_v32
from conftest import read_metrics, run_train, small_config
from model import transformer
from model.attention import ATTENTION_KINDS
from parallel.mesh import make_mesh
from trainer import checkpoint, optim, steps, validate
from trainer.state import init_state, state_shardings

DSA_SMALL = {"attention.kind": "dsa", "mla.q_lora_rank": 32, "mla.kv_lora_rank": 16, "mla.qk_nope_dim": 8,
             "mla.qk_rope_dim": 8, "mla.v_head_dim": 8, "dsa.index_heads": 2, "dsa.index_head_dim": 16,
             "dsa.index_topk": 16}


def _layer(kind, t=48, **overrides):
  config = small_config(**{**DSA_SMALL, "attention.kind": kind, "seq_len": t, "model.dtype": "float32",
                           **overrides})
  config = ml_collections.FrozenConfigDict(config)
  x = jax.random.normal(jax.random.key(0), (2, t, config.model.d_model))
  pos = jnp.broadcast_to(jnp.arange(t), (2, t))
  layer = ATTENTION_KINDS[kind](config)
  return layer, nn.unbox(layer.init(jax.random.key(1), x, pos)), x, pos


def test_mla_mha_and_absorbed_mqa_forms_agree():
  layer, params, x, pos = _layer("mla")
  mha = layer.apply(params, x, pos, form="mha")
  mqa = layer.apply(params, x, pos, form="mqa")
  assert float(jnp.abs(mha).max()) > 0.1
  np.testing.assert_allclose(np.asarray(mqa), np.asarray(mha), atol=2e-5, rtol=2e-5)


def test_dsa_with_every_key_selected_is_dense_mla():
  """index_topk >= T: the sparse stage attends to every past key, i.e. dense MLA."""
  t = 40
  dsa_layer, params, x, pos = _layer("dsa", t=t, **{"dsa.index_topk": t})
  mla_layer = ATTENTION_KINDS["mla"](dsa_layer.config)
  mla_params = {"params": {k: v for k, v in params["params"].items() if k != "indexer"}}
  np.testing.assert_allclose(np.asarray(dsa_layer.apply(params, x, pos, mutable=["aux_loss", "metrics"])[0]),
                             np.asarray(mla_layer.apply(mla_params, x, pos)), atol=2e-5, rtol=2e-5)
  # With fewer keys it is not (the selection matters).
  few = ATTENTION_KINDS["dsa"](ml_collections.FrozenConfigDict(small_config(
      **{**DSA_SMALL, "seq_len": t, "model.dtype": "float32", "dsa.index_topk": 4})))
  assert not np.allclose(few.apply(params, x, pos, mutable=["aux_loss", "metrics"])[0],
                         mla_layer.apply(mla_params, x, pos), atol=1e-3)


def test_local_selector_is_sliding_window_mla():
  """dsa.selector=local: no indexer; each query attends to its last index_topk keys, i.e. MLA
  with a sliding window of that many keys (here checked against MLA's dense form masked so)."""
  t, k = 40, 6
  layer, params, x, pos = _layer("dsa", t=t, **{"dsa.index_topk": k, "dsa.selector": "local"})
  assert "indexer" not in params["params"]
  out, sown = layer.apply(params, x, pos, mutable=["aux_loss", "metrics"])
  assert not sown.get("aux_loss")
  # Row by row: query t sees keys (t-k, t]; MLA on the slice x[t-k+1 : t+1] ends at that query,
  # with positions kept, so its last output is the local selector's.
  mla_layer = ATTENTION_KINDS["mla"](layer.config)
  for q in (0, 3, 17, t - 1):
    lo = max(0, q - k + 1)
    window = mla_layer.apply(params, x[:, lo:q + 1], pos[:, lo:q + 1])
    np.testing.assert_allclose(np.asarray(out[:, q]), np.asarray(window[:, -1]), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("stage", ["dense_warmup", "sparse"])
def test_dsa_layer_on_pallas_matches_xla(stage):
  """The whole layer, impl=pallas (Pallas's interpreter) against impl=xla, fp32: its output, the
  indexer loss it sows and the gradients of every parameter (through output and loss)."""
  t = 128 if stage == "dense_warmup" else 40          # dense Pallas attention: whole 128-row tiles
  layers = {impl: _layer("dsa", t=t, **{"dsa.stage": stage, "dsa.index_topk": 8, "attention.impl": impl,
                                          "kernels.pallas_mode": "interpret"}) for impl in ("pallas", "xla")}
  _, params, x, pos = layers["xla"]
  cot = jax.random.normal(jax.random.key(2), x.shape)

  def objective(layer):
    def f(p):
      out, sown = layer.apply(p, x, pos, mutable=["aux_loss", "metrics"])
      loss = sown["metrics"]["indexer_loss"][0]
      return jnp.sum(out * cot) + 10.0 * sown["aux_loss"]["indexer_loss"][0], (out, loss)
    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)
  (_, (out, loss)), grads = objective(layers["pallas"][0])
  (_, (out_want, loss_want)), grads_want = objective(layers["xla"][0])
  np.testing.assert_allclose(out, out_want, atol=3e-5, rtol=3e-5)
  np.testing.assert_allclose(loss, loss_want, rtol=1e-5)
  assert float(loss_want) > 0.01
  grads, grads_want = flatten_dict(grads, sep="/"), flatten_dict(grads_want, sep="/")
  assert any("indexer" in path for path in grads)
  for path, g in grads.items():
    scale = float(jnp.abs(grads_want[path]).max()) or 1.0
    np.testing.assert_allclose(g / scale, grads_want[path] / scale, atol=1e-4, err_msg=path)


@pytest.mark.parametrize("stage", ["dense_warmup", "sparse"])
def test_lm_loss_never_reaches_the_indexer_and_the_indexer_loss_only_reaches_it(stage):
  config = small_config(**DSA_SMALL, **{"dsa.stage": stage})
  model = transformer.build(config)
  tokens = jax.random.randint(jax.random.key(1), (2, config.seq_len), 0, 4096)
  params = nn.unbox(model.init(jax.random.key(0), tokens))["params"]
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1)}

  def lm_only(p):
    return steps.cross_entropy(model.apply({"params": p}, tokens, mutable=["aux_loss", "metrics"])[0],
                               batch["targets"])

  def indexer_only(p):
    total, metrics = steps.batch_loss(model, p, batch)
    return total - metrics["loss"]
  is_indexer = lambda path: "indexer" in path
  for loss, reaches_indexer in ((lm_only, False), (indexer_only, True)):
    grads = flatten_dict(jax.jit(jax.grad(loss))(params), sep="/")
    for path, g in grads.items():
      nonzero = bool(jnp.any(g != 0))
      if is_indexer(path) != reaches_indexer:
        assert not nonzero, f"{loss.__name__} reaches {path}"
      elif path.endswith("kernel"):
        assert nonzero, f"{loss.__name__} does not reach {path}"


def test_warmup_step_changes_only_the_indexer():
  config = small_config(**DSA_SMALL, **{"dsa.stage": "dense_warmup"})
  model, tx = transformer.build(config), optim.make_optimizer(config)
  mesh = make_mesh(config.mesh)
  _, shardings = state_shardings(config, model, tx, mesh)
  state = init_state(config, model, tx, mesh, shardings)
  before = flatten_dict(jax.device_get(state.params), sep="/")
  train_step = steps.make_train_step(model, tx, optim.learning_rate(config), mesh, shardings,
                                     trainable=optim.trainable(config, state.params))
  tokens = jax.random.randint(jax.random.key(1), (config.batch_size, config.seq_len), 0, 4096)
  for _ in range(2):   # the first step's learning rate is 0 (warm-up from 0)
    state, metrics = train_step(state, {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1)})
  after = flatten_dict(jax.device_get(state.params), sep="/")
  assert {"loss", "indexer_loss", "grad_norm"} <= set(metrics)
  for path in before:
    if "indexer" in path:
      assert not np.array_equal(before[path], after[path]), path
    else:
      np.testing.assert_array_equal(before[path], after[path], err_msg=path)


def test_v32_config_has_deepseek_v32_attention_shapes():
  for stage in ("dense_warmup", "sparse"):
    config = dsa_v32.get_config(stage)
    validate.validate(config, num_devices=128)
    assert config.dsa.stage == stage
  config = ml_collections.FrozenConfigDict(config)
  t = 4096  # shapes of one layer's parameters do not depend on T
  x = jax.ShapeDtypeStruct((1, t, config.model.d_model), jnp.bfloat16)
  pos = jax.ShapeDtypeStruct((1, t), jnp.int32)
  params = jax.eval_shape(lambda: nn.unbox(ATTENTION_KINDS["dsa"](config).init(
      jax.random.key(0), jnp.zeros(x.shape, x.dtype), jnp.zeros(pos.shape, pos.dtype))))["params"]
  shapes = {k: v.shape for k, v in flatten_dict(params, sep="/").items()}
  assert shapes["q_down/kernel"] == (7168, 1536)
  assert shapes["q_up/kernel"] == (1536, 128, 192)
  assert shapes["kv_down/kernel"] == (7168, 512 + 64)
  assert shapes["k_up"] == (512, 128, 128) and shapes["v_up"] == (512, 128, 128)
  assert shapes["indexer/q/kernel"] == (1536, 64, 128)
  assert shapes["indexer/k/kernel"] == (7168, 128) and shapes["indexer/weights/kernel"] == (7168, 64)
  assert config.dsa.index_topk == 2048


def _params(workdir, config):
  abstract = state_shardings(config, transformer.build(config), optim.make_optimizer(config),
                                   make_mesh(config.mesh))[0].params
  params, _, fresh = checkpoint.load_params(str(workdir), abstract)
  return flatten_dict(jax.device_get(params), sep="/"), fresh


def test_two_stage_recipe_end_to_end(tmp_path):
  """dense MLA -> dense warm-up (indexer only; its loss falls) -> sparse (all train; LM loss
  falls), each stage taking the previous one's parameters with --config.init_from. The DSA
  stages read packed documents (data.packing=pack: the indexer, its loss and recall stay in each
  document), and the sparse stage, killed (kill -9) after step 20, resumes from its step-15
  checkpoint to the same losses, bitwise."""
  small = {**DSA_SMALL, "log_every": 5, "model.n_layers": 1}
  packed = {**small, "data.packing": "pack"}
  mla_dir, warm_dir, sparse_dir = tmp_path / "mla", tmp_path / "warmup", tmp_path / "sparse"
  result = run_train(mla_dir, {**small, "attention.kind": "mla", "steps": 3}, config="configs/dsa_tiny.py")
  assert result.returncode == 0, result.stderr
  result = run_train(warm_dir, {**packed, "steps": 30, "init_from": mla_dir},
                     config="configs/dsa_tiny.py:dense_warmup")
  assert result.returncode == 0, result.stderr
  assert re.search(r"new parameter layers/attn/indexer/\S+: fresh initialisation \(not in ", result.stderr)
  warm = read_metrics(warm_dir)
  assert warm[30]["indexer_loss"] < 0.7 * warm[5]["indexer_loss"], warm
  assert 0 <= warm[30]["indexer_recall"] <= 1
  # By distance, in index_topk lengths (0-1, 1-4, 4+): each a share.
  assert {"indexer_recall_0-1k", "indexer_recall_1-4k"} <= set(warm[30]), warm[30]
  assert all(0 <= warm[30][k] <= 1 for k in warm[30] if k.startswith("indexer_recall_"))
  # Warm-up kept every MLA parameter exactly as the dense run left it.
  base = small_config(dsa_tiny.get_config, **small)
  mla_params, _ = _params(mla_dir, small_config(dsa_tiny.get_config, **{**small, "attention.kind": "mla"}))
  warm_params, fresh = _params(warm_dir, base)
  assert not fresh
  for path, value in mla_params.items():
    np.testing.assert_array_equal(warm_params[path], value, err_msg=path)

  sparse_run = {**packed, "steps": 30, "init_from": warm_dir, "checkpoint_every": 15}
  result = run_train(sparse_dir, sparse_run, config="configs/dsa_tiny.py:sparse", kill_after_step=20)
  assert result.returncode == -9, result.stderr
  killed = read_metrics(sparse_dir)
  result = run_train(sparse_dir, sparse_run, config="configs/dsa_tiny.py:sparse")
  assert result.returncode == 0, result.stderr
  assert "resumed from step 15" in result.stderr and "packing pack" in result.stderr
  sparse = read_metrics(sparse_dir)
  assert sparse[20]["loss"] == killed[20]["loss"]
  assert (sparse[25]["loss"] + sparse[30]["loss"]) / 2 < sparse[5]["loss"] - 0.5, sparse
  assert abs(sparse[5]["indexer_loss"]) < 10 and np.isfinite(sparse[30]["indexer_loss"])


def test_sparse_stage_on_pallas_kernels_trains_like_xla(tmp_path):
  """dsa_tiny's sparse stage, 20 steps: the indexer's top-k, the sparse attention and the indexer
  loss's teacher on the Pallas kernels (Pallas's interpreter), sharded context 2 x tensor 2
  inside the trainer's shard_map (a device holds half the heads: the teacher is the
  mean over both halves), give one device's impl=xla losses (rtol 2e-3) and indexer losses."""
  overrides = {**DSA_SMALL, "steps": 20, "checkpoint_every": 20, "batch_size": 2, "model.n_layers": 1,
               "kernels.pallas_mode": "interpret"}
  sharded = {"mesh.context": 2, "mesh.tensor": 2}
  runs = {impl: run_train(tmp_path / impl, {**overrides, "attention.impl": impl, **(sharded if impl == "pallas" else {})},
                          wait=False, config="configs/dsa_tiny.py:sparse", devices=4 if impl == "pallas" else 1)
          for impl in ("pallas", "xla")}
  for impl, proc in runs.items():
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"attention dsa/{impl}" in stderr
    assert ("'context': 2, 'tensor': 2" in stderr) == (impl == "pallas")
  pallas, xla = (read_metrics(tmp_path / impl) for impl in ("pallas", "xla"))
  series = lambda run, field: np.array([run[s][field] for s in range(1, 21)])
  np.testing.assert_allclose(series(pallas, "loss"), series(xla, "loss"), rtol=2e-3)
  # The indexer loss (~0.14) is a small difference of two entropies: equal at the same weights
  # (step 1), then within 1% as the bf16 trajectories part.
  got, want = series(pallas, "indexer_loss"), series(xla, "indexer_loss")
  np.testing.assert_allclose(got[0], want[0], rtol=2e-5)
  np.testing.assert_allclose(got, want, rtol=1e-2)
  assert np.mean([xla[s]["loss"] for s in (18, 19, 20)]) < xla[1]["loss"] - 0.5      # it trains
