"""The device mesh and the one table that maps logical axis names to mesh axes.

Model code names logical axes only; this file alone knows the mesh. Axes:
  data   - pure data parallelism (replicated parameters; across slices/DCN on pods)
  fsdp   - data parallelism with parameters and optimizer state sharded (ZeRO-3)
  context - context parallelism: one sequence split over devices (load-balanced layout and
           per-device attention: kernels/partition.py)
  tensor - tensor parallelism over heads / MLP hidden / vocab (Megatron-style)
"""
import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context", "tensor")

LOGICAL_AXIS_RULES = (
    # parameters
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("cmp_block", None),        # NSA compression MLP input positions / hidden units
    ("cmp_hidden", None),
    ("q_lora", None),           # MLA low-rank query / key-value latents
    ("kv_lora", None),
    ("index_heads", None),      # DSA lightning indexer (small: replicated)
    ("index_head_dim", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_seq", "context"),
    ("act_cmp", "context"),      # NSA's compressed tokens, computed where they are (model/nsa.py)
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

# Which config field must divide by which mesh axis, for the parameters/batches sharded over it.
SHARDED_DIMS = {
    "fsdp": ("model.d_model",),
    "tensor": ("model.n_heads", "model.n_kv_heads", "model.mlp_dim", "model.vocab_size"),
}


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """Axis sizes with the (at most one) -1 filled from the devices left over."""
  sizes = {a: int(mesh_config.get(a, 1)) for a in MESH_AXES}   # a config without an axis: 1
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  for a, s in sizes.items():
    if s == -1:
      sizes[a] = num_devices // known if known and num_devices % known == 0 else -1
  return sizes


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(mesh_config, len(devices))
  shape, types = tuple(sizes[a] for a in MESH_AXES), (AxisType.Auto,) * len(MESH_AXES)
  # Auto axes: XLA's partitioner propagates shardings from the constraints the model states.
  try:
    return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=types)
  except NotImplementedError:   # e.g. fsdp 8 x context 8 on a 4x4x4 torus: an axis spans part of a physical one
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=types)


def logical_to_sharding(logical_specs, mesh: Mesh):
  """A pytree of logical PartitionSpecs -> the same pytree of NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_AXIS_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches are [batch, seq]: batch split over every data-parallel axis."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
