"""Train state, its sharded initialisation, and the jitted train / eval steps."""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from trainer import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: optimizer steps done
  params: Any              # float32 pytree, logical axes -> mesh via sharding.LOGICAL_AXIS_RULES
  opt_state: Any
  rng: jax.Array           # uint32 raw key data, carried for stochastic layers and saved with the rest


def _init_fn(config, model, tx):
  def init(rng):
    param_rng, state_rng = jax.random.split(rng)
    tokens = jnp.zeros((1, config.seq_len), jnp.int32)
    params = model.init(param_rng, tokens)["params"]          # boxed with logical axis names
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(state_rng))
  return init


def state_shardings(config, model, tx, mesh):
  """(abstract unboxed TrainState with shardings attached, the matching NamedSharding pytree)."""
  boxed = jax.eval_shape(_init_fn(config, model, tx), jax.random.key(0))
  shardings = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  return abstract, shardings


def init_state(config, model, tx, mesh, shardings) -> TrainState:
  init = _init_fn(config, model, tx)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    return jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=shardings)(jax.random.key(config.seed))


def cross_entropy(logits_BTV, targets_BT, weights_BT=None):
  """Mean next-token cross-entropy in float32 (over the targets with weight 1, if weights given)."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)
  if weights_BT is None:
    return losses.mean()
  return (losses * weights_BT).sum() / jnp.maximum(weights_BT.sum(), 1.0)


def batch_loss(model, params, batch):
  logits = model.apply({"params": params}, batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
  return cross_entropy(logits, batch["targets"], batch.get("weights"))


def make_train_step(model, tx, schedule, mesh, shardings):
  """jit(state, batch) -> (state, metrics); the old state's buffers are donated."""

  def train_step(state: TrainState, batch):
    with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
      loss, grads = jax.value_and_grad(batch_loss, argnums=1)(model, state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  step = jax.jit(train_step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  return _with_mesh(step, mesh)


def make_eval_step(model, mesh, shardings):
  def eval_step(params, batch):
    with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
      return batch_loss(model, params, batch)

  step = jax.jit(eval_step, in_shardings=(shardings.params, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))
  return _with_mesh(step, mesh)


def _with_mesh(fn, mesh):
  def wrapped(*args):
    with jax.set_mesh(mesh):
      return fn(*args)
  return wrapped
