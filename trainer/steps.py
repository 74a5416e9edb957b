"""The jitted train, eval and diagnostics steps of a config on a mesh (the Program train.py runs)."""
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from evaluation import retrieval
from model import transformer
from model.attention import ATTENTION_KINDS
from parallel import context
from parallel.mesh import batch_sharding, replicated
from parallel.rules import use_mesh
from trainer import divergence, optim
from trainer.state import TrainState, state_shardings


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


def batch_loss(model, params, batch, collections=()):
  """(objective, metrics): next-token cross-entropy ("loss") plus every term the layers sowed into
  "aux_loss"; metrics also hold the layers' "metrics" and any other `collections` asked for."""
  batch = context.batch_to_layout(batch)
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

  step = jax.jit(train_step, in_shardings=(shardings, batch_sharding(mesh)),
                 out_shardings=(shardings, replicated(mesh)), donate_argnums=0)
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
  retrieval_step: Callable | None     # (params, batch) -> (hits, counts) per distance bucket (eval.retrieval)


def build(config, mesh) -> Program:
  model = transformer.build(config)
  tx, schedule = optim.make_optimizer(config), optim.learning_rate(config)
  abstract_state, shardings = state_shardings(config, model, tx, mesh)
  train_step = make_train_step(model, tx, schedule, mesh, shardings,
                               trainable=optim.trainable(config, abstract_state.params))
  return Program(model, tx, abstract_state, shardings, train_step, make_eval_step(model, mesh, shardings),
                 make_diagnostics_step(model, mesh, shardings),
                 make_retrieval_step(model, mesh, shardings) if config.eval.retrieval else None)


def abstract_batch(config, mesh) -> dict:
  """The global batch train_step takes, as sharded ShapeDtypeStructs (pack mode adds segment ids,
  positions and weights)."""
  shape, batch = (config.batch_size, config.seq_len), batch_sharding(mesh)
  spec = lambda dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch)
  fields = {"inputs": spec(jnp.int32), "targets": spec(jnp.int32)}
  if config.data.packing == "pack":
    fields.update(segment_ids=spec(jnp.int32), positions=spec(jnp.int32), weights=spec(jnp.float32))
  return fields


def make_retrieval_step(model, mesh, shardings):
  """jit(params, batch) -> (hits, counts) of the synthetic targets per distance bucket
  (evaluation/retrieval.py eval_edges), reduced over the global batch."""
  edges = retrieval.eval_edges(model.config)

  def retrieval_step(params, batch):
    batch = context.batch_to_layout(batch)
    logits = model.apply({"params": params}, batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
    correct = jnp.argmax(logits, axis=-1) == batch["targets"]
    return retrieval.bucket_counts(correct, batch["distance"], batch["weights"], edges)

  step = jax.jit(retrieval_step, in_shardings=(shardings.params, batch_sharding(mesh)),
                 out_shardings=replicated(mesh))
  return _OnMesh(step, mesh)


def make_diagnostics_step(model, mesh, shardings):
  """jit(params, batch) -> the layers' "diagnostics" (e.g. DSA's indexer recall), averaged over
  layers; None when the attention kind computes none."""
  config = model.config
  if not getattr(ATTENTION_KINDS[config.attention.kind], "DIAGNOSTICS", ()) or (
      config.attention.kind == "dsa" and config.dsa.selector == "local"):      # no indexer to measure
    return None

  names = ATTENTION_KINDS[config.attention.kind].DIAGNOSTICS

  def diagnostics_step(params, batch):
    _, metrics = batch_loss(model, params, batch, collections=("diagnostics",))
    return {k: v for k, v in metrics.items() if k.startswith(names)}

  step = _OnMesh(jax.jit(diagnostics_step, in_shardings=(shardings.params, batch_sharding(mesh)),
                         out_shardings=replicated(mesh)), mesh)

  def ratios(params, batch) -> dict:
    """X_hits / X_keys (layer means of counts) -> X: a recall pooled over layers; buckets with no
    keys are left out."""
    metrics = jax.device_get(step(params, batch))
    out = {k: v for k, v in metrics.items() if not k.endswith(("_hits", "_keys"))}
    for key in (k[:-len("_hits")] for k in metrics if k.endswith("_hits")):
      if metrics[f"{key}_keys"] > 0:
        out[key] = float(metrics[f"{key}_hits"] / metrics[f"{key}_keys"])
    return out
  return ratios


def make_eval_step(model, mesh, shardings):
  def eval_step(params, batch):
    return batch_loss(model, params, batch)[1]["loss"]

  step = jax.jit(eval_step, in_shardings=(shardings.params, batch_sharding(mesh)),
                 out_shardings=replicated(mesh))
  return _OnMesh(step, mesh)


class _OnMesh:
  """A jitted step that traces, runs and lowers under its mesh and the logical-axis rules
  (parallel.rules.use_mesh): the model's sharding constraints read the rules, the Pallas kernels run per device
  over it (parallel/placement.py), and scripts/aot_compile.py lowers the very same step."""

  def __init__(self, jitted, mesh):
    self.jitted, self.mesh = jitted, mesh

  def __call__(self, *args):
    with use_mesh(self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    with use_mesh(self.mesh):
      return self.jitted.lower(*args)

