"""The one table that maps logical axis names to mesh axes, and the context that puts it in force.

Model code names logical axes only (`embed`, `heads`, `act_batch`, ...); this table alone knows
the mesh axes (parallel/mesh.py). `use_mesh` sets the mesh and the rules together, so the
model's sharding constraints and the kernels' per-device placement (parallel/placement.py)
always read the same table.
"""
import contextlib

import jax
from flax import linen as nn
from jax.sharding import Mesh

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


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
  """The mesh and the logical-axis rules together: what every traced step runs under."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    yield


def logical_to_sharding(logical_specs, mesh: Mesh):
  """A pytree of logical PartitionSpecs -> the same pytree of NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_AXIS_RULES)


def mesh_axes_of(name: str, rules=LOGICAL_AXIS_RULES) -> tuple:
  """Mesh axes of one logical axis name under `rules` (a tuple, maybe empty)."""
  for logical, mesh_axes in rules:
    if logical == name:
      if mesh_axes is None:
        return ()
      return tuple(mesh_axes) if isinstance(mesh_axes, (tuple, list)) else (mesh_axes,)
  return ()


def auto_axes(mesh, name: str, rules) -> tuple:
  """The mesh axes `name` splits over that this mesh has and that are not manual already."""
  return tuple(a for a in mesh_axes_of(name, rules) if a in mesh.shape and a not in mesh.manual_axes)
