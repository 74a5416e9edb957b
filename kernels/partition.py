"""Kernels run per device: the one place that puts attention inside `jax.shard_map`, and the
load-balanced sequence layout of context parallelism.

XLA cannot partition a Mosaic kernel ("Mosaic kernels cannot be automatically partitioned"), so
every Pallas call the model makes goes through `per_device`. It reads the mesh the caller set
(`jax.set_mesh`, as the trainer's steps do) and the logical-axis rules in force
(`nn.logical_axis_rules`, trainer/sharding.py's table), and maps each argument's logical axes
(`act_batch`, `act_heads`, ...) to mesh axes exactly as the model's own activation constraints
do: the batch splits over the batch axes and heads over `tensor`, so the kernel reads the blocks
each device already holds (no all-gather of activations) and its outputs stay where they are.

A mesh axis splits only when every dimension it would split divides by its size; otherwise it
is left out for this call (the kernel then runs on the whole of that dimension on every device:
correct, only redundant). That keeps whole GQA groups together (HQ and HKV split alike) and lets
model.init trace a one-row batch. trainer/validate.py refuses, at start-up, training layouts that
would fall back this way.

Context parallelism (`act_seq` mapped to the `context` mesh axis, cp devices). The sequence is
stored in a load-balanced layout (`to_layout`): T splits into 2*cp chunks of c = T/(2cp) and
device i holds chunks i and 2cp-1-i, so every device has the same causal attention work (the
last device would otherwise do ~2x the average). Attention then runs per device for the XLA
references too: each device keeps its own queries (`act_seq` dims) and sees every key-side
array (`KEYS` dims) whole, in natural order. The shard_map's input specs ask XLA for the
all-gather over `context`; the transpose of that (the gradients of the gathered keys) is the
reduce-scatter of the per-device contributions. The kernel function runs once per local chunk
with `q_offset`, the global position of the chunk's first query: causality, compressed
visibility, forced blocks, the window and top-k all use global positions.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import PartitionSpec as P

SEQ = "act_seq"
KEYS = "act_keys"     # a key-side sequence dim: every device sees all T positions, natural order

# Logical axes of the kernels' arguments ([batch, seq, heads, dim] layout, DESIGN.md §3).
Q = ("act_batch", SEQ, "act_heads", None)                # q, out [B, T, HQ, D]
KV = ("act_batch", KEYS, "act_kv_heads", None)           # k, v [B, T, HKV, D]
SELECTED = ("act_batch", SEQ, "act_kv_heads", None)      # NSA block indices [B, T, HKV, n]
MQA = ("act_batch", KEYS, None, None)                    # the one K/V head of MQA [B, T, 1, D]
CMP = ("act_batch", None, "act_kv_heads", None)          # k_cmp, v_cmp [B, C, HKV, D]
STATS = ("act_batch", SEQ, "act_heads")                  # lse [B, T, HQ]
ROWS = ("act_batch", SEQ)                                # query segment ids, per-query values [B, T]
KEY_ROWS = ("act_batch", KEYS)                           # key segment ids [B, T]
QUERY_ROWS = ("act_batch", SEQ, None)                    # DSA weights, indices [B, T, *]
QUERY_HEADS = ("act_batch", SEQ, None, None)             # DSA indexer queries [B, T, H_I, D_I]
KEY_ROW = ("act_batch", KEYS, None)                      # DSA k_idx, kv [B, T, D]


def _mesh_axes(name, rules):
  """Mesh axes of one logical axis name under `rules` (a tuple, maybe empty)."""
  for logical, mesh_axes in rules:
    if logical == name:
      if mesh_axes is None:
        return ()
      return tuple(mesh_axes) if isinstance(mesh_axes, (tuple, list)) else (mesh_axes,)
  return ()


def _auto_axes(mesh, name, rules):
  return tuple(a for a in _mesh_axes(name, rules) if a in mesh.shape and a not in mesh.manual_axes)


def context_axes() -> tuple:
  """The mesh axes the sequence is split over (the `context` axis) under the current mesh and
  rules, or () when it is not split (no mesh, size 1, or inside a shard_map already)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  axes = _auto_axes(mesh, SEQ, nn.get_logical_axis_rules())
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


# ---- per-device execution ----

def with_doc_start(args, axes, doc_start):
  """per_device arguments and their axes, plus packed documents' doc_start [B, T] int32 (one
  value per query: ROWS) when it is given."""
  if doc_start is None:
    return args, axes
  return (*args, doc_start.astype(jnp.int32)), (*axes, ROWS)


def _specs(mesh, rules, args, in_axes):
  """{logical name: mesh axes} usable for these arguments: a mesh axis that does not divide every
  dimension it would split is dropped from all of them."""
  usable = {}
  blocked = set()
  for x, axes in zip(args, in_axes):
    for dim, name in zip(x.shape, axes or ()):
      if name is None or name == KEYS:
        continue
      mesh_axes = _auto_axes(mesh, name, rules)
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
  return tuple(a for a in _mesh_axes(name, nn.get_logical_axis_rules()) if a in mesh.shape and mesh.shape[a] > 1)


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
