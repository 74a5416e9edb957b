"""DSA's top-k: exact (lax.top_k) against the approximate top-k of `kernels.topk_recall`
(kernels/chunking.top_k, the partial reduction behind lax.approx_max_k), per recall target:
the bins it keeps and their expected recall, the time of one chunk of queries on this machine's backend, and the recall
measured against the exact top-k on two kinds of scores:
  random    i.i.d. normal scores (the recall formula's assumption);
  indexer   lightning-indexer scores sum_j w_j relu(q_j . k_s) of random q, k, w with a local bias
            (recent keys score higher), so the best keys cluster, as a trained indexer's do.

Then the Pallas indexer (kernels/dsa/indexer_pallas.py): its grid steps, MXU FLOPs and HBM bytes at
each T (traced, nothing run), and the recall of its int8 QK against its bf16 QK on random inputs
(--int8-seq-len keys, TPU interpret mode off a TPU: keep it small).

  python scripts/bench_topk.py [--seq-lens 32768 131072] [--topk 2048] [--recalls 1 0.99 0.95 0.9]
"""
import argparse
import time

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels import KernelOptions, chunking  # noqa: E402
from kernels.dsa import indexer_pallas  # noqa: E402
from perf.time_model import pallas_calls  # noqa: E402


def scores(kind: str, queries: int, seq_len: int, seed: int = 0):
  """[queries, T] float32: the last `queries` positions' scores against every key (all visible)."""
  key = jax.random.key(seed)
  if kind == "random":
    return jax.random.normal(key, (queries, seq_len))
  kq, kk, kw = jax.random.split(key, 3)
  heads, dim = 16, 32
  q = jax.random.normal(kq, (queries, heads, dim))
  k = jax.random.normal(kk, (seq_len, dim))
  w = jax.random.uniform(kw, (queries, heads))
  s = jnp.einsum("qhs,qh->qs", jax.nn.relu(jnp.einsum("qhd,sd->qhs", q, k)), w) / dim ** 0.5
  return s + 2.0 * jnp.exp(-(seq_len - 1 - jnp.arange(seq_len)) / 512.0)[None, :]


def timed(fn, x, repeats: int) -> float:
  jax.block_until_ready(fn(x))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(x))
    times.append(time.perf_counter() - start)
  return 1e3 * min(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 131072])
  parser.add_argument("--topk", type=int, default=2048)
  parser.add_argument("--recalls", type=float, nargs="+", default=[1.0, 0.99, 0.95, 0.9, 0.8])
  parser.add_argument("--queries", type=int, default=64, help="queries per timed chunk")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--int8-seq-len", type=int, default=1024, help="keys of the int8 recall check (0: skip)")
  args = parser.parse_args()
  k = args.topk
  print(f"top-{k} of [{args.queries}, T] float32 scores on {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}), best of {args.repeats}")
  print(f"{'T':>7} {'recall target':>13} {'sorted N':>9} {'expected':>9} {'ms':>8} {'speed-up':>8} "
        f"{'recall random':>13} {'recall indexer':>14}")
  for seq_len in args.seq_lens:
    data = {kind: scores(kind, args.queries, seq_len) for kind in ("random", "indexer")}
    exact = {kind: np.asarray(jax.lax.top_k(x, k)[1]) for kind, x in data.items()}
    base_ms = None
    for recall in args.recalls:
      fn = jax.jit(lambda x, r=recall: chunking.top_k(x, k, r))
      ms = timed(fn, data["random"], args.repeats)
      base_ms = base_ms or ms
      measured = {}
      for kind, x in data.items():
        got = np.asarray(fn(x)[1])
        measured[kind] = np.mean([np.intersect1d(a, b).size / k for a, b in zip(got, exact[kind])])
      bins = seq_len if recall >= 1 else chunking.approx_bins(seq_len, k, recall)
      print(f"{seq_len:>7} {recall:>13.2f} {bins:>9} {chunking.expected_recall(seq_len, bins, k):>9.4f} {ms:8.1f} "
            f"{base_ms / ms:7.2f}x {measured['random']:>13.4f} {measured['indexer']:>14.4f}", flush=True)
  pallas_indexer(args.seq_lens, k)
  if args.int8_seq_len:
    print(f"int8 QK recall against bf16 QK (T={args.int8_seq_len}, H_I=64, d_I=128, k={min(k, args.int8_seq_len // 4)}, "
          f"queries past k): {int8_recall(args.int8_seq_len, min(k, args.int8_seq_len // 4)):.4f}")


def pallas_indexer(seq_lens, k: int, heads: int = 64, dim: int = 128):
  """The Pallas indexer's pallas_calls at each T (B=1, bf16): steps, FLOPs, bytes, candidates."""
  print(f"Pallas indexer (H_I={heads}, d_I={dim}, k={k}): traced")
  print(f"{'T':>7} {'steps':>7} {'TFLOP':>8} {'GB':>7} {'levels':>6} {'candidates':>10}")
  for t in seq_lens:
    args = [jax.ShapeDtypeStruct((1, t, heads, dim), jnp.bfloat16), jax.ShapeDtypeStruct((1, t, dim), jnp.bfloat16),
            jax.ShapeDtypeStruct((1, t, heads), jnp.float32)]
    calls = pallas_calls(lambda q, kk, w: indexer_pallas.indexer_topk(q, kk, w, 0, topk=k), *args)
    g = indexer_pallas.geometry(args[0], args[1], k, KernelOptions())
    print(f"{t:>7} {sum(c.steps for c in calls):>7} {sum(c.flops * c.repeats for c in calls) / 1e12:8.1f} "
          f"{sum(c.bytes * c.repeats for c in calls) / 1e9:7.1f} {g.levels:>6} {g.width:>10}")


def int8_recall(seq_len: int, k: int, heads: int = 64, dim: int = 128) -> float:
  """Mean over queries t >= k of |int8 top-k ∩ bf16 top-k| / k, random normal q, k and |w|."""
  kq, kk, kw = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (1, seq_len, heads, dim)).astype(jnp.bfloat16)
  keys = jax.random.normal(kk, (1, seq_len, dim)).astype(jnp.bfloat16)
  w = jnp.abs(jax.random.normal(kw, (1, seq_len, heads))) * (heads * dim) ** -0.5
  run = lambda dtype: np.asarray(indexer_pallas.indexer_topk(q, keys, w, 0, topk=k,
                                                             options=KernelOptions(dsa_indexer_dtype=dtype)))[0, k:]
  bf16, int8 = run("bfloat16"), run("int8")
  return float(np.mean([np.intersect1d(a, b).size / k for a, b in zip(int8, bf16)]))


if __name__ == "__main__":
  main()
