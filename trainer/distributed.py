"""Multi-host start-up: every process joins one JAX cluster before anything touches devices.

On a Cloud TPU slice (queued resources or GKE) the hosts are found by jax itself: the same command
runs on every worker and `jax.distributed.initialize()` reads the slice's metadata. Elsewhere the
cluster is named on the command line (--coordinator_address, --num_processes, --process_id); on
CPU that selects gloo collectives, so N processes on one machine are N hosts (docs/design.md §8).
"""
import jax

from configs import ConfigError


def on_cloud_tpu() -> bool:
  """A Cloud TPU VM of a queued resource or a GKE TPU node pool (jax's own detection)."""
  from jax._src.clusters import cloud_tpu_cluster  # no public API names these checks
  return cloud_tpu_cluster.GceTpuCluster.is_env_present() or cloud_tpu_cluster.GkeTpuCluster.is_env_present()


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
  given = [coordinator_address is not None, num_processes is not None, process_id is not None]
  if any(given) and not all(given):
    missing = [f for f, g in zip(("--coordinator_address", "--num_processes", "--process_id"), given) if not g]
    raise ConfigError(missing[0], None, "--coordinator_address, --num_processes and --process_id go together")
  if all(given):
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError("--process_id", process_id, f"must be in [0, --num_processes={num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")    # CPU devices' collectives only
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
  elif on_cloud_tpu():
    jax.distributed.initialize()     # one process (single-host slice) is fine too

