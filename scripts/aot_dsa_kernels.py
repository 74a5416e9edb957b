"""Compile DSA's Pallas kernels ahead of time for a TPU chip (no TPU needed, libtpu) at
DeepSeek-V3.2's shape and print what XLA's cost and memory analyses say, forward + backward, for
three programs, one sequence per chip inside shard_map:

  attention  top-k + sparse attention
  teacher    + the indexer loss with the teacher from the attention kernels
             (kernels.dsa.sparse_attention_and_indexer_loss, the sparse stage as training runs it)
  xla_loss   + the indexer loss on the XLA reference (attention recomputed in XLA)

  python scripts/aot_dsa_kernels.py [--chip v5p:2x2x1] [--seq-len 8192] [--topk 2048] [--unroll]

--unroll unrolls the query-chunk loops so the cost analysis counts every chunk (XLA counts a
loop body once); the Pallas calls count their CostEstimate. Memory is per chip.
"""
import argparse
import os
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # nothing to share: no TPU is attached

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

from kernels import KernelOptions, dsa  # noqa: E402

HEADS, DK, DV, INDEX_HEADS, INDEX_DIM = 128, 576, 512, 64, 128
PROGRAMS = ("attention", "teacher", "xla_loss")


def program(name: str, topk: int, options: KernelOptions):
  """The gradient of a loss of every input, as `name` builds it."""
  scale = DK ** -0.5

  def loss(q, kv, q_idx, k_idx, w):
    idx = dsa.indexer_topk(q_idx, k_idx, w, topk=topk, impl="pallas", options=options)
    if name == "teacher":
      out, indexer_loss = dsa.sparse_attention_and_indexer_loss(q, kv, q_idx, k_idx, w, idx, v_dim=DV, scale=scale,
                                                                impl="pallas", options=options)
    else:
      out = dsa.sparse_attention(q, kv, idx, v_dim=DV, scale=scale, impl="pallas", options=options)
      indexer_loss = 0.0 if name == "attention" else dsa.indexer_loss(q, kv, q_idx, k_idx, w, idx, scale=scale,
                                                                      impl="xla", options=options)
    return jnp.sum(out.astype(jnp.float32) ** 2) + indexer_loss
  return jax.grad(loss, argnums=range(5))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--chip", default="v5p:2x2x1", help="a 4-chip topology: v5e:2x2, v5p:2x2x1, v6e:2x2")
  parser.add_argument("--seq-len", type=int, default=8192)
  parser.add_argument("--topk", type=int, default=2048)
  parser.add_argument("--unroll", action="store_true", help="unroll the query-chunk loops (full cost analysis)")
  parser.add_argument("--programs", nargs="+", default=list(PROGRAMS), choices=PROGRAMS)
  args = parser.parse_args()
  topo = topologies.get_topology_desc(platform="tpu", topology_name=args.chip, chip_config_name="default",
                                      chips_per_host_bounds=(2, 2, 1), num_slices=1)
  mesh = jax.make_mesh((len(topo.devices),), ("data",), devices=topo.devices)
  options = KernelOptions(pallas_mode="compiled", unroll_chunks=args.unroll)
  b, t, sharded = len(topo.devices), args.seq_len, NamedSharding(mesh, P("data"))
  spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sharded)
  inputs = (spec(b, t, HEADS, DK), spec(b, t, DK), spec(b, t, INDEX_HEADS, INDEX_DIM), spec(b, t, INDEX_DIM),
            spec(b, t, INDEX_HEADS, dtype=jnp.float32))
  print(f"DSA kernels, forward + backward, {args.chip}, H={HEADS} Dk={DK} v_dim={DV} H_I={INDEX_HEADS} "
        f"d_I={INDEX_DIM} k={args.topk} T={t} bf16, one sequence per chip{', chunks unrolled' if args.unroll else ''}")
  print(f"{'program':>10} {'TFLOP':>8} {'GB accessed':>11} {'temp MiB':>9} {'compile s':>9}")
  for name in args.programs:
    start = time.time()
    grads = jax.shard_map(program(name, args.topk, options), mesh=mesh, in_specs=(P("data"),) * 5,
                          out_specs=(P("data"),) * 5, check_vma=False)
    compiled = jax.jit(grads).lower(*inputs).compile()
    costs = compiled.cost_analysis()
    costs = costs[0] if isinstance(costs, list) else costs
    memory = compiled.memory_analysis()
    print(f"{name:>10} {costs.get('flops', 0) / 1e12:8.2f} {costs.get('bytes accessed', 0) / 1e9:11.1f} "
          f"{memory.temp_size_in_bytes / 2**20:9.0f} {time.time() - start:9.0f}", flush=True)


if __name__ == "__main__":
  main()
