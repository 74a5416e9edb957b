"""Pallas kernels run per device: the one place that puts them inside `jax.shard_map`.

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
"""
import jax
from flax import linen as nn
from jax.sharding import PartitionSpec as P

# Logical axes of the kernels' arguments ([batch, seq, heads, dim] layout, DESIGN.md §3).
Q = ("act_batch", "act_seq", "act_heads", None)          # q, out [B, T, HQ, D]
KV = ("act_batch", "act_seq", "act_kv_heads", None)      # k, v, block indices [B, T, HKV, *]
MQA = ("act_batch", "act_seq", None, None)               # the one K/V head of MQA [B, T, 1, D]
CMP = ("act_batch", None, "act_kv_heads", None)          # k_cmp, v_cmp [B, C, HKV, D]
STATS = ("act_batch", "act_seq", "act_heads")            # lse [B, T, HQ]
ROWS = ("act_batch", "act_seq")                          # segment ids [B, T]


def _mesh_axes(name, rules):
  """Mesh axes of one logical axis name under `rules` (a tuple, maybe empty)."""
  for logical, mesh_axes in rules:
    if logical == name:
      if mesh_axes is None:
        return ()
      return tuple(mesh_axes) if isinstance(mesh_axes, (tuple, list)) else (mesh_axes,)
  return ()


def _specs(mesh, rules, args, in_axes):
  """{logical name: mesh axes} usable for these arguments: a mesh axis that does not divide every
  dimension it would split is dropped from all of them."""
  usable = {}
  blocked = set()
  for x, axes in zip(args, in_axes):
    for dim, name in zip(x.shape, axes or ()):
      if name is None:
        continue
      mesh_axes = tuple(a for a in _mesh_axes(name, rules) if a in mesh.shape and a not in mesh.manual_axes)
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
  return P(*[(by_name.get(n) or None) if n is not None else None for n in axes])


def per_device(fn, in_axes, out_axes):
  """fn(*args) run per device under the current mesh: args[i] has logical axes in_axes[i] (None:
  replicated, e.g. a static table), the outputs out_axes (one axis tuple, or a list of them for
  several outputs). Without a mesh of more than one device, or already inside a shard_map, fn runs as is."""

  def wrapped(*args):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or set(mesh.manual_axes) == set(mesh.axis_names):
      return fn(*args)
    by_name = _specs(mesh, nn.get_logical_axis_rules(), args, in_axes)
    in_specs = tuple(_to_spec(axes, by_name) for axes in in_axes)
    out_specs = (_to_spec(out_axes, by_name) if _is_axes(out_axes) else
                 tuple(_to_spec(axes, by_name) for axes in out_axes))
    # check_vma=False: Pallas calls carry no varying-manual-axes annotations.
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)
  return wrapped
