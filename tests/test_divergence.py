"""The divergence guard (trainer/divergence.py): a non-finite step changes nothing and is counted,
too many in a row stop the run with exit code 3, no checkpoint holds a non-finite parameter, and
the re-run resumes from the last good one."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn

from conftest import read_metrics, run_train, small_config
from parallel.mesh import make_mesh
from trainer import checkpoint, divergence, optim, steps
from trainer.state import init_state, state_shardings


class _Toy(nn.Module):
  """A model with the transformer's call signature that compiles in a blink; its middle layer is
  named like DSA's indexer, which DSA's warm-up trains alone (optim.trainable)."""
  vocab: int

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None):
    x = nn.Embed(self.vocab, 8, name="embed")(tokens)
    return nn.Dense(self.vocab, name="out")(x + nn.Dense(8, name="indexer")(x))


def _toy_program(**overrides):
  """(config, abstract state, shardings, train_step, fresh state): steps.build's parts on _Toy."""
  config = small_config(**{"model.vocab_size": 64, "seq_len": 8, "batch_size": 2, **overrides})
  model, tx, mesh = _Toy(config.model.vocab_size), optim.make_optimizer(config), make_mesh(config.mesh)
  abstract, shardings = state_shardings(config, model, tx, mesh)
  train_step = steps.make_train_step(model, tx, optim.learning_rate(config), mesh, shardings,
                                     trainable=optim.trainable(config, abstract.params))
  return config, abstract, shardings, train_step, init_state(config, model, tx, mesh, shardings)


def _batch(config, weight):
  tokens = jax.random.randint(jax.random.key(1), (config.batch_size, config.seq_len), 0, config.model.vocab_size)
  return {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1),
          "weights": jnp.full(tokens.shape, weight, jnp.float32)}


def _bytes(tree) -> list[bytes]:
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("overrides", [{}, {"attention.kind": "dsa", "dsa.stage": "dense_warmup"}],
                         ids=["adamw", "dsa-warmup-masked-optimizer"])
def test_non_finite_step_changes_nothing_and_is_counted(overrides):
  """The real train step and optimizer (DSA's warm-up: optax.multi_transform, frozen parameters
  with no state) on a toy model: a NaN loss and gradient leave parameters and optimizer state
  bitwise as they were, count 1 skipped step, and the next finite step resets the count."""
  config, _, _, train_step, state = _toy_program(**overrides)
  state, _ = train_step(state, _batch(config, 1.0))        # the optimizer's moments are not zero now
  before = jax.device_get(state)
  state, metrics = train_step(state, _batch(config, np.nan))
  after = jax.device_get(state)
  assert not np.isfinite(metrics["loss"]) and not np.isfinite(metrics["grad_norm"])
  assert _bytes((after.params, after.opt_state)) == _bytes((before.params, before.opt_state))
  assert (int(after.step), int(after.skips), int(metrics["skipped_steps"])) == (2, 1, 1)
  state, metrics = train_step(state, _batch(config, 1.0))
  assert (int(state.skips), int(metrics["skipped_steps"])) == (0, 0)
  assert _bytes(state.params) != _bytes(before.params)


def test_checkpoint_refuses_non_finite_parameters_and_restores_one_without_skips(tmp_path):
  """A state with a NaN parameter is not saved; a checkpoint made before TrainState.skips (its
  state saved without the field) restores, with skips 0."""
  config, abstract, shardings, _, state = _toy_program(checkpoint_every=1)
  ckpt = checkpoint.Checkpointer(tmp_path, config)
  poisoned = state.replace(params=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), state.params))
  assert divergence.params_finite(state.params) and not divergence.params_finite(poisoned.params)
  assert ckpt.save(1, poisoned, data_iter=None) is False and ckpt.latest_step() is None
  old = {k: v for k, v in vars(state).items() if k != "skips"}
  ckpt.manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(old)))
  ckpt.wait()
  target, added = ckpt._state_target(3, abstract)
  restored = ckpt.manager.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
  restored = abstract.replace(**restored, **added)
  assert int(restored.skips) == 0 and restored.skips.sharding == shardings.skips
  assert _bytes(restored) == _bytes(state)
  ckpt.close()


@pytest.mark.slow
def test_diverging_run_stops_with_exit_3_and_a_sane_lr_resumes_it_with_passkey_evals(tmp_path):
  """lr=1e6 without clipping: step 2's update (lr 5e5) leaves finite parameters whose gradients
  are NaN from step 3 on (measured). With max_skipped_steps=2 the run stops after step 4 with one
  line; every checkpoint written is finite; those of step 2's parameters (2, 3) are set aside, and
  the same command with a sane lr resumes from step 1 and finishes. The resumed run also has
  eval.passkey on (one train.py run less for the suite): passkey_acc in [0, 1] at its eval steps."""
  diverging = {"steps": 6, "checkpoint_every": 1, "optimizer.lr": 1e6, "optimizer.grad_clip": 0,
               "optimizer.max_skipped_steps": 2}
  result = run_train(tmp_path, diverging)
  assert result.returncode == divergence.EXIT_CODE, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.startswith("diverged")]
  assert lines == ["diverged at step 4: 2 steps in a row (optimizer.max_skipped_steps=2) had a non-finite loss, "
                   "gradient norm or update and were skipped; last finite loss 8.318 (step 4). Lower optimizer.lr "
                   "(now 1e+06) or set optimizer.grad_clip (now 0: off), then re-run the command: it resumes from "
                   "step 1 (the checkpoints of the skipped steps' parameters, step 2, 3, are in "
                   "checkpoints_diverged/)"], result.stderr
  metrics = read_metrics(tmp_path)
  assert [metrics[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
  assert os.listdir(tmp_path / "checkpoints") == ["1"]
  aside = sorted(tmp_path.glob("checkpoints_diverged/*"))
  assert [p.name.split("-")[0] for p in aside] == ["2", "3"]
  for directory in (tmp_path / "checkpoints" / "1", *aside):
    with ocp.StandardCheckpointer() as reader:
      params = reader.restore(directory / "state")["params"]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params)), directory

  resumed = run_train(tmp_path, {**diverging, "optimizer.lr": 1e-3, "eval_every": 3, "eval_batches": 1,
                                 "eval.passkey": True, "eval.passkey_trials": 1})
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed from step 1" in resumed.stderr
  metrics = read_metrics(tmp_path)
  assert sorted(metrics) == list(range(1, 7))
  assert all(metrics[s]["skipped_steps"] == 0 and np.isfinite(metrics[s]["loss"]) for s in range(2, 7))
  assert [s for s in sorted(metrics) if "passkey_acc" in metrics[s]] == [3, 6]
  assert all(0.0 <= metrics[s]["passkey_acc"] <= 1.0 and np.isfinite(metrics[s]["eval_loss"]) for s in (3, 6))
