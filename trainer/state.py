"""The train state: what it holds, its sharded initialisation, and restore-or-init at start-up."""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from configs import hf as hf_config
from hf import weights as hf_weights
from model import convert
from parallel.rules import logical_to_sharding, use_mesh
from trainer.checkpoint import Checkpointer, load_params


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: optimizer steps done
  params: Any              # float32 pytree, logical axes -> mesh via parallel.rules
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
  with use_mesh(mesh):
    boxed = jax.eval_shape(_init_fn(config, model, tx), key)
  shardings = logical_to_sharding(nn.get_partition_spec(boxed), mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  return abstract, shardings


def init_state(config, model, tx, mesh, shardings) -> TrainState:
  init = _init_fn(config, model, tx)
  with use_mesh(mesh):
    return jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=shardings)(jax.random.key(config.seed))


def restore_or_init(config, program, mesh, ckpt: Checkpointer, data_iter):
  """(state, start_step, notes): the newest readable checkpoint of this run (data_iter restored
  with it), else a fresh state, with init_from's parameters when set (start_step 0); notes say
  which parameters init_from did not have and how they start (one line each)."""
  state, start_step = ckpt.restore_latest(program.abstract_state, data_iter)
  if state is not None:
    return state, start_step, []
  state = init_state(config, program.model, program.tx, mesh, program.shardings)
  if not config.init_from:
    return state, 0, []
  abstract = program.abstract_state.params
  if hf_dir := hf_config.init_dir(config.init_from):
    params, fresh = hf_weights.read_params(hf_dir, config, abstract, alias=convert.alias)
  else:
    params, _, fresh = load_params(config.init_from, abstract, alias=convert.alias)
  params = jax.tree.map(lambda new, old: old if new is None else new, params, state.params,
                        is_leaf=lambda x: x is None)
  params, notes = convert.start_nsa_from_dense(params, fresh, config)
  started = {note.split(":")[0] for note in notes}
  notes += [f"{name}: fresh initialisation (not in {config.init_from})" for name in fresh if name not in started]
  return state.replace(params=params), 0, notes
