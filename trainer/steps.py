"""Train state, its sharded initialisation, and the jitted train / eval steps."""
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from kernels import partition
from model import transformer
from model.attention import ATTENTION_KINDS
from trainer import divergence, optim, sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: optimizer steps done
  params: Any              # float32 pytree, logical axes -> mesh via sharding.LOGICAL_AXIS_RULES
  opt_state: Any
  rng: jax.Array           # uint32 raw key data, carried for stochastic layers and saved with the rest
  skips: jax.Array         # int32 scalar: non-finite steps in a row, skipped (trainer/divergence.py)


def _init_fn(config, model, tx):
  def init(rng):
    param_rng, state_rng = jax.random.split(rng)
    tokens = jnp.zeros((1, config.seq_len), jnp.int32)
    params = model.init(param_rng, tokens)["params"]          # boxed with logical axis names
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=_unbox_masked(tx.init(params)),
                      rng=jax.random.key_data(state_rng), skips=jnp.zeros((), jnp.int32))
  return init


def _unbox_masked(opt_state):
  """optax.masked keeps no state for a frozen parameter (a leafless MaskedNode); take it out of
  its logical-axes box so it gets no sharding either."""
  return jax.tree.map(lambda x: x.value if isinstance(getattr(x, "value", None), optax.MaskedNode) else x, opt_state,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def state_shardings(config, model, tx, mesh):
  """(abstract unboxed TrainState with shardings attached, the matching NamedSharding pytree)."""
  # Traced under the mesh as init_state and the steps are: the attention takes the same per-device
  # path (under context parallelism, the kernels of a sequence chunk, not of the whole sequence).
  key = jax.random.key(0)      # made outside: the mesh may be an ahead-of-time topology's
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    boxed = jax.eval_shape(_init_fn(config, model, tx), key)
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


def _by_name(collection) -> dict:
  """{leaf name: mean over layers} of a sown collection ({} when nothing was sown)."""
  values = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(collection)[0]:
    name = next(p.key for p in reversed(path) if isinstance(p, jax.tree_util.DictKey))
    values.setdefault(name, []).append(jnp.ravel(leaf))
  return {name: jnp.concatenate(v).mean() for name, v in values.items()}


def to_layout(batch: dict) -> dict:
  """Under context parallelism, the batch's [B, T] fields in the load-balanced sequence layout
  (kernels/partition.py: device i holds chunks i and 2cp-1-i), positions made explicit. Every
  field moves alike, so each token keeps its target, weight, position and segment, and the mean
  loss is the same (summed in another order)."""
  shards = partition.context_size()
  if shards == 1:
    return batch
  batch = dict(batch)
  if batch.get("positions") is None:
    batch["positions"] = jnp.broadcast_to(jnp.arange(batch["inputs"].shape[1], dtype=jnp.int32),
                                          batch["inputs"].shape)
  return {name: partition.to_layout(x, 1, shards) for name, x in batch.items()}


def batch_loss(model, params, batch, collections=()):
  """(objective, metrics): next-token cross-entropy ("loss") plus every term the layers sowed into
  "aux_loss"; metrics also hold the layers' "metrics" and any other `collections` asked for."""
  batch = to_layout(batch)
  logits, sown = model.apply({"params": params}, batch["inputs"], batch.get("positions"),
                             batch.get("segment_ids"), mutable=["aux_loss", "metrics", *collections])
  loss = cross_entropy(logits, batch["targets"], batch.get("weights"))
  aux = sum((jnp.sum(x) for x in jax.tree.leaves(sown.get("aux_loss", {}))), jnp.float32(0))
  metrics = {"loss": loss}
  for name in ("metrics", *collections):
    metrics.update(_by_name(sown.get(name, {})))
  return loss + aux, metrics


def make_train_step(model, tx, schedule, mesh, shardings, trainable=None):
  """jit(state, batch) -> (state, metrics); the old state's buffers are donated. `trainable`
  (a params-shaped pytree of bools) limits grad_norm to the parameters the optimizer updates.
  A step with a non-finite loss or grad_norm, or an update that would make a parameter
  non-finite, keeps the parameters and optimizer state as they were (trainer/divergence.py):
  metrics["skipped_steps"] is 1 and state.skips counts such steps in a row."""

  def train_step(state: TrainState, batch):
    with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
      grads, metrics = jax.grad(batch_loss, argnums=1, has_aux=True)(model, state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    counted = grads if trainable is None else jax.tree.map(lambda g, t: g if t else None, grads, trainable)
    grad_norm = optax.tree.norm(counted)
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & divergence.all_finite(params)
    metrics.update(grad_norm=grad_norm, lr=schedule(state.step), skipped_steps=(~ok).astype(jnp.int32))
    return state.replace(step=state.step + 1, params=divergence.keep_if(ok, params, state.params),
                         opt_state=divergence.keep_if(ok, opt_state, state.opt_state),
                         skips=jnp.where(ok, 0, state.skips + 1)), metrics

  step = jax.jit(train_step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  return _OnMesh(step, mesh)


class Program(NamedTuple):
  """Everything train.py runs for a config on a mesh; scripts/aot_compile.py lowers the same."""
  model: Any
  tx: optax.GradientTransformation
  abstract_state: TrainState       # shapes, dtypes and shardings, nothing allocated
  shardings: TrainState            # NamedSharding per leaf
  train_step: Callable             # (state, batch) -> (state, metrics)
  eval_step: Callable              # (params, batch) -> loss
  diagnostics_step: Callable | None   # (params, batch) -> costly metrics (DSA's recall), or None


def build(config, mesh) -> Program:
  model = transformer.build(config)
  tx, schedule = optim.make_optimizer(config), optim.learning_rate(config)
  abstract_state, shardings = state_shardings(config, model, tx, mesh)
  train_step = make_train_step(model, tx, schedule, mesh, shardings,
                               trainable=optim.trainable(config, abstract_state.params))
  return Program(model, tx, abstract_state, shardings, train_step, make_eval_step(model, mesh, shardings),
                 make_diagnostics_step(model, mesh, shardings))


def abstract_batch(config, mesh) -> dict:
  """The global batch train_step takes, as sharded ShapeDtypeStructs (pack mode adds segment ids,
  positions and weights)."""
  shape, batch = (config.batch_size, config.seq_len), sharding.batch_sharding(mesh)
  spec = lambda dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch)
  fields = {"inputs": spec(jnp.int32), "targets": spec(jnp.int32)}
  if config.data.packing == "pack":
    fields.update(segment_ids=spec(jnp.int32), positions=spec(jnp.int32), weights=spec(jnp.float32))
  return fields


def make_diagnostics_step(model, mesh, shardings):
  """jit(params, batch) -> the layers' "diagnostics" (e.g. DSA's indexer recall), averaged over
  layers; None when the attention kind computes none."""
  if not getattr(ATTENTION_KINDS[model.config.attention.kind], "DIAGNOSTICS", ()):
    return None

  def diagnostics_step(params, batch):
    with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
      _, metrics = batch_loss(model, params, batch, collections=("diagnostics",))
    return {k: v for k, v in metrics.items() if k in ATTENTION_KINDS[model.config.attention.kind].DIAGNOSTICS}

  step = jax.jit(diagnostics_step, in_shardings=(shardings.params, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))
  return _OnMesh(step, mesh)


def make_eval_step(model, mesh, shardings):
  def eval_step(params, batch):
    with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
      return batch_loss(model, params, batch)[1]["loss"]

  step = jax.jit(eval_step, in_shardings=(shardings.params, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))
  return _OnMesh(step, mesh)


class _OnMesh:
  """A jitted step that runs and lowers under its mesh: the Pallas kernels inside run per device
  over it (kernels/partition.py), and scripts/aot_compile.py lowers the very same step."""

  def __init__(self, jitted, mesh):
    self.jitted, self.mesh = jitted, mesh

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args)

