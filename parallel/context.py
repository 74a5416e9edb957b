"""Context parallelism: one sequence split over the `context` mesh axis, in a load-balanced layout.

T splits into 2*cp chunks of c = T/(2cp) and device i holds chunks i and 2cp-1-i, so every device
has the same causal attention work (the last device would otherwise do ~2x the average). The
batch is put in this layout once per step (`batch_to_layout`); attention then runs per device
(parallel/placement.py) on its own queries at their global positions against all keys.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from parallel.rules import auto_axes

SEQ = "act_seq"


def context_axes() -> tuple:
  """The mesh axes the sequence is split over (the `context` axis) under the current mesh and
  rules, or () when it is not split (no mesh, size 1, or inside a shard_map already)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  axes = auto_axes(mesh, SEQ, nn.get_logical_axis_rules())
  return axes if math.prod(mesh.shape[a] for a in axes) > 1 else ()


def context_size() -> int:
  """cp: how many devices one sequence is split over (1: no context parallelism)."""
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[a] for a in context_axes())


# ---- the load-balanced layout: device i holds chunks i and 2cp-1-i of 2cp ----

def _xp(x):
  return np if isinstance(x, np.ndarray) else jnp     # numpy for static index tables


def to_layout(x, axis: int, shards: int):
  """Natural order -> load-balanced layout along `axis` (length divisible by 2 * shards): slices
  and a reversal, no gather."""
  if shards == 1:
    return x
  xp = _xp(x)
  x = xp.moveaxis(x, axis, 0)
  chunks = x.reshape(2, shards, -1, *x.shape[1:])               # [2, cp, c, ...]: chunk j = [j//cp, j%cp]
  pairs = xp.stack([chunks[0], xp.flip(chunks[1], 0)], 1)        # [cp, 2, c, ...]: chunks i, 2cp-1-i
  return xp.moveaxis(pairs.reshape(x.shape), 0, axis)


def from_layout(x, axis: int, shards: int):
  """Load-balanced layout -> natural order along `axis`: the inverse of to_layout."""
  if shards == 1:
    return x
  xp = _xp(x)
  x = xp.moveaxis(x, axis, 0)
  pairs = x.reshape(shards, 2, -1, *x.shape[1:])
  natural = xp.concatenate([pairs[:, 0], xp.flip(pairs[:, 1], 0)], 0)
  return xp.moveaxis(natural.reshape(x.shape), 0, axis)


def layout_positions(seq_len: int, shards: int) -> np.ndarray:
  """int32 [T]: the natural position stored at each index of the layout."""
  return to_layout(np.arange(seq_len, dtype=np.int32), 0, shards)


def layout_index(natural_positions, seq_len: int, shards: int) -> np.ndarray:
  """Where natural positions (any int array) sit in the layout (static numpy)."""
  where = np.argsort(layout_positions(seq_len, shards)).astype(np.int32)
  return where[np.asarray(natural_positions)]


def batch_to_layout(batch: dict) -> dict:
  """Under context parallelism, the batch's [B, T] fields in the load-balanced layout, positions
  made explicit. Every field moves alike, so each token keeps its target, weight, position and
  segment, and the mean loss is the same (summed in another order)."""
  shards = context_size()
  if shards == 1:
    return batch
  batch = dict(batch)
  if batch.get("positions") is None:
    batch["positions"] = jnp.broadcast_to(jnp.arange(batch["inputs"].shape[1], dtype=jnp.int32),
                                          batch["inputs"].shape)
  return {name: to_layout(x, 1, shards) for name, x in batch.items()}
