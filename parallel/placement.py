"""Kernels run per device: the one place that puts attention inside `jax.shard_map`.

XLA cannot partition a Mosaic kernel ("Mosaic kernels cannot be automatically partitioned"), so
every Pallas call the model makes goes through `per_device`. It reads the mesh and the
logical-axis rules in force (parallel.rules.use_mesh) and maps each argument's logical axes
(`act_batch`, `act_heads`, ...) to mesh axes exactly as the model's own activation constraints
do: the batch splits over the batch axes and heads over `tensor`, so the kernel reads the blocks
each device already holds (no all-gather of activations) and its outputs stay where they are.

A mesh axis splits only when every dimension it would split divides by its size; otherwise it
is left out for this call (the kernel then runs on the whole of that dimension on every device:
correct, only redundant). That keeps whole GQA groups together (HQ and HKV split alike) and lets
model.init trace a one-row batch. trainer/validate.py refuses, at start-up, training layouts that
would fall back this way.

Under context parallelism (parallel/context.py) attention runs per device for the XLA references
too: each device keeps its own queries (`act_seq` dims) and sees every key-side array (`KEYS`
dims) whole, in natural order. The shard_map's input specs ask XLA for the all-gather over
`context`; the transpose of that (the gradients of the gathered keys) is the reduce-scatter of
the per-device contributions. The kernel function runs once per local chunk with `q_offset`, the
global position of the chunk's first query: causality, compressed visibility, forced blocks, the
window and top-k all use global positions.
"""
import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from parallel.context import SEQ, context_axes, from_layout
from parallel.rules import auto_axes, mesh_axes_of

KEYS = "act_keys"     # a key-side sequence dim: every device sees all T positions, natural order

# Logical axes of the kernels' arguments ([batch, seq, heads, head_dim] layout, docs/design.md §3).
Q = ("act_batch", SEQ, "act_heads", None)                # q, out [B, T, HQ, D]
KV = ("act_batch", KEYS, "act_kv_heads", None)           # k, v [B, T, HKV, D]
SELECTED = ("act_batch", SEQ, "act_kv_heads", None)      # NSA block indices [B, T, HKV, n]
MQA = ("act_batch", KEYS, None, None)                    # the one K/V head of MQA [B, T, 1, D]
CMP = ("act_batch", None, "act_kv_heads", None)          # k_cmp, v_cmp [B, C, HKV, D]
STATS = ("act_batch", SEQ, "act_heads")                  # lse [B, T, HQ]
PER_QUERY = ("act_batch", SEQ)                           # query segment ids, per-query values [B, T]
PER_KEY = ("act_batch", KEYS)                            # key segment ids [B, T]
QUERY_ROWS = ("act_batch", SEQ, None)                    # DSA weights, indices [B, T, *]
QUERY_HEADS = ("act_batch", SEQ, None, None)             # DSA indexer queries [B, T, H_I, D_I]
KEY_ROW = ("act_batch", KEYS, None)                      # DSA k_idx, kv [B, T, D]


def with_doc_start(args, axes, doc_start):
  """per_device arguments and their axes, plus packed documents' doc_start [B, T] int32 (one
  value per query: PER_QUERY) when it is given."""
  if doc_start is None:
    return args, axes
  return (*args, doc_start.astype(jnp.int32)), (*axes, PER_QUERY)


def _specs(mesh, rules, args, in_axes):
  """{logical name: mesh axes} usable for these arguments: a mesh axis that does not divide every
  dimension it would split is dropped from all of them."""
  usable = {}
  blocked = set()
  for x, axes in zip(args, in_axes):
    for dim, name in zip(x.shape, axes or ()):
      if name is None or name == KEYS:
        continue
      mesh_axes = auto_axes(mesh, name, rules)
      usable[name] = mesh_axes
      size = 1
      for a in mesh_axes:
        size *= mesh.shape[a]
        if dim % size:
          blocked.add(a)
  return {name: tuple(a for a in axes if a not in blocked) for name, axes in usable.items()}


def _is_axes(x) -> bool:
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def _to_spec(axes, by_name):
  if axes is None:
    return P()
  return P(*[(by_name.get(n) or None) if n not in (None, KEYS) else None for n in axes])


def _dims(axes, name):
  return [d for d, n in enumerate(axes or ()) if n == name]


def _split_queries(fn, in_axes, out_axes, shards: int, axes: tuple):
  """The per-device body under context parallelism: key-side arrays back to natural order, then
  fn once per local chunk (chunks i and 2cp-1-i of device i) with its global q_offset."""
  outs_axes = [out_axes] if _is_axes(out_axes) else list(out_axes)

  def body(*args):
    args = list(args)
    for i, axes_i in enumerate(in_axes):
      for d in _dims(axes_i, KEYS):
        args[i] = from_layout(args[i], d, shards)
    device = jax.lax.axis_index(axes)
    halves = []
    for h in range(2):
      part = []
      for x, axes_i in zip(args, in_axes):
        for d in _dims(axes_i, SEQ):
          n = x.shape[d] // 2
          x = jax.lax.slice_in_dim(x, h * n, (h + 1) * n, axis=d)
        part.append(x)
      halves.append(part)
    chunk = next(x.shape[d] for x, a in zip(halves[0], in_axes) for d in _dims(a, SEQ))
    offsets = (device * chunk, (2 * shards - 1 - device) * chunk)
    results = [fn(*halves[h], q_offset=offsets[h]) for h in range(2)]
    flat = [r if isinstance(r, (tuple, list)) else (r,) for r in results]
    joined = []
    for o, axes_o in enumerate(outs_axes):
      d = _dims(axes_o, SEQ)[0]
      joined.append(jnp.concatenate([flat[0][o], flat[1][o]], axis=d))
    return joined[0] if _is_axes(out_axes) else tuple(joined)
  return body


def split_axes(name: str) -> tuple:
  """The mesh axes (size > 1) that logical axis `name` may be split over: inside a per_device
  body, a partial result over that axis (a sum over local heads) is combined with a collective
  over them (on an axis the call left whole, the collective sees equal copies)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  return tuple(a for a in mesh_axes_of(name, nn.get_logical_axis_rules()) if a in mesh.shape and mesh.shape[a] > 1)


def per_device(fn, in_axes, out_axes, *, pallas: bool = True):
  """fn(*args, q_offset) run per device under the current mesh: args[i] has logical axes
  in_axes[i] (None: replicated, e.g. a static table), the outputs out_axes (one axis tuple, or a
  list of them for several outputs).

  Without context parallelism: fn(*args, q_offset=0), inside a shard_map for Pallas kernels
  (`pallas`), called as is for XLA (XLA partitions it itself) or without a mesh of more than one
  device or inside a shard_map already. With it (see the module doc), always per device, once per
  local chunk."""

  def wrapped(*args):
    mesh = jax.sharding.get_abstract_mesh()
    axes = context_axes()
    shards = math.prod(mesh.shape[a] for a in axes) if axes else 1
    if shards == 1 and (not pallas or mesh.empty or mesh.size == 1
                        or set(mesh.manual_axes) == set(mesh.axis_names)):
      return fn(*args, q_offset=0)
    rules = nn.get_logical_axis_rules()
    by_name = _specs(mesh, rules, args, in_axes)
    if shards > 1:
      for x, axes_i in zip(args, in_axes):
        for d in _dims(axes_i, SEQ):
          if x.shape[d] % (2 * shards):
            raise ValueError(f"sequence length {x.shape[d]} must be a multiple of 2 x context = {2 * shards}")
      by_name[SEQ] = axes
      body = _split_queries(fn, in_axes, out_axes, shards, axes)
    else:
      body = functools.partial(fn, q_offset=0)
    in_specs = tuple(_to_spec(a, by_name) for a in in_axes)
    out_specs = (_to_spec(out_axes, by_name) if _is_axes(out_axes) else
                 tuple(_to_spec(a, by_name) for a in out_axes))
    # check_vma=False: Pallas calls carry no varying-manual-axes annotations. The cotangent of an
    # input replicated over an axis (gathered keys) is then summed over that axis, as it must be.
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)
  return wrapped
