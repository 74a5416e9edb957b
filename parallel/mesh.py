"""The device mesh: one builder for train.py and the ahead-of-time compiles, multislice included.

Axes:
  data    - pure data parallelism (replicated parameters); the only axis that spans slices (DCN)
  fsdp    - data parallelism with parameters and optimizer state sharded (ZeRO-3)
  context - context parallelism: one sequence split over devices (parallel/context.py)
  tensor  - tensor parallelism over heads / MLP hidden / vocab (Megatron-style)

The number of slices is read from the devices themselves (`device.slice_index`: a Cloud TPU
multislice job, or an AOT topology with num_slices > 1), so whoever builds the mesh from the same
devices gets the same mesh. Over S slices, `data` is S (across slices, DCN) x data per slice and
fsdp, context and tensor stay inside a slice (ICI): only the gradient all-reduce crosses DCN.
"""
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context", "tensor")
_AUTO = (AxisType.Auto,) * len(MESH_AXES)   # XLA propagates shardings from the model's constraints


def num_slices(devices) -> int:
  """Slices the devices span (1 for devices without a slice_index: CPU, GPU, one TPU slice)."""
  return len({getattr(d, "slice_index", 0) or 0 for d in devices})


def mesh_shape(mesh_config, num_devices: int, slices: int = 1) -> dict[str, int]:
  """Axis sizes with the (at most one) -1 filled from the devices left over; over several slices
  an unset data axis (1) becomes the number of slices."""
  sizes = {a: int(mesh_config.get(a, 1)) for a in MESH_AXES}   # a config without an axis: 1
  if slices > 1 and sizes["data"] == 1:
    sizes["data"] = slices
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  for a, s in sizes.items():
    if s == -1:
      sizes[a] = num_devices // known if known and num_devices % known == 0 else -1
  return sizes


def make_mesh(mesh_config, devices=None) -> Mesh:
  """The training mesh over `devices` (default: all): within a slice by the physical topology,
  across slices a hybrid mesh whose data axis spans them."""
  devices = jax.devices() if devices is None else list(devices)
  slices = num_slices(devices)
  sizes = mesh_shape(mesh_config, len(devices), slices)
  shape = tuple(sizes[a] for a in MESH_AXES)
  if slices > 1:
    if sizes["data"] % slices:
      raise ValueError(f"mesh.data={sizes['data']}: must be a multiple of the {slices} slices")
    per_slice = (sizes["data"] // slices, *shape[1:])
    grid = mesh_utils.create_hybrid_device_mesh(per_slice, (slices, 1, 1, 1), devices)
    return Mesh(grid, MESH_AXES, axis_types=_AUTO)
  try:
    return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=_AUTO)
  except NotImplementedError:   # e.g. fsdp 8 x context 8 on a 4x4x4 torus: an axis spans part of a physical one
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=_AUTO)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches are [batch, seq]: batch split over every data-parallel axis."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
