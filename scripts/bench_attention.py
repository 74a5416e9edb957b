"""One attention layer, forward + backward, for several sequence lengths: dense (GQA) vs NSA, and
dense MLA vs DSA (MLA + lightning indexer, sparse stage, indexer loss included).

  python scripts/bench_attention.py [--kinds dense nsa mla dsa] [--seq-lens 4096 8192 16384 32768] [--plot out.png] \
      [--packing concat pack] [--doc-len 2048]

MLA/DSA use DeepSeek-V3.2's attention dims scaled down 4x (q_lora 384, kv_lora 128, nope 32,
rope 16, v 32; indexer 16 heads x 32) with --heads heads and --topk keys per query.

  python scripts/bench_attention.py --impl pallas [--seq-lens 65536] [--heads 64 --kv-heads 4 --head-dim 192]

prints the traffic model of NSA's Pallas selection kernels (unless --kinds has dsa and not nsa): for a
random and a realistic (local, clustered) block selection with the paper's defaults, the K/V bytes
the forward moves HBM -> VMEM (from its index maps and prefetch lists) against the minimum (each
selected K/V block once per query tile) and what a one-query-at-a-time kernel reads, the MXU row
fill, and per kernel (forward, dq, dK/dV) all bytes in and out against the minimum. On a TPU it
first times the layers (--kinds) on the Pallas kernels, compiled for the chip, like the XLA table
below.

  python scripts/bench_attention.py --impl pallas --kinds dsa --seq-lens 32768 131072 \
      [--dsa-topk 2048 --dsa-heads 128 --dsa-samples 64] [--dsa-trained-run runs/dsa_sparse]

prints the traffic model of DSA's Pallas sparse-attention kernels (perf/dsa_traffic.py) at
DeepSeek-V3.2's absorbed shape (H=128 heads over 576-wide rows, value 512, bf16, top-2048): for a
random and a realistic (local window + persistent hot keys + noise) token selection, per kernel
(forward, dq, dkv) the bytes in and out against the minimum (forward, dq: each selected row once
per query; dkv: each operand once, the kv gradient written once), the MXU row fill, the FLOPs
executed against dense causal MLA (MHA form, qk 192 / v 128), the arithmetic intensity against
the ridge points of v5e, v5p and v6e (peak bf16 FLOP/s / HBM bandwidth) and the grid steps; then
how much the selections of g neighbouring queries overlap (the rows a g-query union tile would
gather relative to per-query gathers) and what such a tile would cost on v6e. Long sequences are
sampled: --dsa-samples runs of 16 consecutive queries spread over T, scaled to all of T.
--dsa-trained-run adds the selection of a trained model's indexer (every layer, on one
validation sequence of the embedded corpus, the model's seq_len and index_topk) with the same
V3.2 head shapes, next to a random selection of the same T and k.

  python scripts/bench_attention.py --sweep nsa.slc_block=32,64,128 --sweep nsa.num_selected=8,16,32 \
      --seq-lens 65536 [--heads 64 --kv-heads 4 --head-dim 192] [--plot out.png]
  python scripts/bench_attention.py --sweep dsa.index_topk=512,1024,2048 --seq-lens 32768

prints what each point of a grid costs, to pick block sizes (or top-k) before training: the
traffic model's bytes (forward + backward kernels) against the minimum, the MXU row fill, one
layer's compiled memory and FLOPs (--impl), and its time where a TPU is present; and plots each
against each swept field (--plot, default bench_nsa_sweep.png / bench_dsa_sweep.png). --no-compile:
the traffic model only (seconds; compiling a layer at 64k takes minutes on a CPU).

Per (kind, T): wall time (median of --repeats runs after a warm-up), compiled FLOPs
(`cost_analysis`) and memory (`memory_analysis`: arguments + outputs + temporaries). XLA counts a
while loop's body once, so FLOPs are read from the same layer compiled with one query chunk (the
same math; compiled only, never run; the window branch's chunk loop unrolled). A configuration
whose compiled memory exceeds --max-gb is compiled but not run. Prints a table; --plot draws time
and memory against T.
"""
import argparse
import os
import statistics
import time

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from flax import linen as nn  # noqa: E402

import configs  # noqa: E402
from configs import base  # noqa: E402
from model.attention import ATTENTION_KINDS  # noqa: E402
from sweeps import grid as sweep_grid  # noqa: E402


def layer_config(kind: str, seq_len: int, args, overrides=None) -> ml_collections.FrozenConfigDict:
  c = base.get_config()
  c.seq_len = seq_len
  c.attention.kind = kind
  c.attention.impl = args.impl
  c.model.update(n_heads=args.heads, n_kv_heads=args.kv_heads, head_dim=args.head_dim,
                 d_model=args.heads * args.head_dim, dtype=args.dtype)
  c.mla.update(q_lora_rank=384, kv_lora_rank=128, qk_nope_dim=32, qk_rope_dim=16, v_head_dim=32)
  c.dsa.update(stage="sparse", index_heads=16, index_head_dim=32, index_topk=args.topk)
  return ml_collections.FrozenConfigDict(sweep_grid.apply(c, overrides or {}))


def compile_step(config, batch: int, packed: bool = False):
  """jit(grad of the layer) lowered and compiled for [batch, T, d_model] bf16 input (and packed
  documents: [batch, T] segment ids)."""
  layer = ATTENTION_KINDS[config.attention.kind](config)
  x = jax.ShapeDtypeStruct((batch, config.seq_len, config.model.d_model), jnp.dtype(config.model.dtype))
  pos = jax.ShapeDtypeStruct((batch, config.seq_len), jnp.int32)
  seg = pos if packed else None
  params = jax.eval_shape(lambda: nn.unbox(layer.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype),
                                                       jnp.zeros(pos.shape, pos.dtype))))

  def loss(params, x, pos, seg):   # + the layer's auxiliary losses (DSA's indexer loss), as in training
    y, aux = layer.apply(params, x, pos, seg, mutable=["aux_loss"])
    return jnp.sum(y.astype(jnp.float32) ** 2) + sum(jnp.sum(a) for a in jax.tree.leaves(aux))
  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  return step, step.lower(params, x, pos, seg).compile(), (params, x, pos, seg)


def packed_documents(seq_len: int, batch: int, mean_len: int, max_docs: int | None, seed: int = 0):
  """(segment ids, positions) int32 [batch, T]: documents of exponentially distributed lengths
  (mean mean_len, deterministic) packed end to end, at most max_docs per row (the last one takes
  the rest of the row)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  seg, pos = np.zeros((batch, seq_len), np.int32), np.zeros((batch, seq_len), np.int32)
  for r in range(batch):
    start, doc = 0, 1
    while start < seq_len:
      n = seq_len - start if doc == max_docs else max(1, int(rng.exponential(mean_len)))
      n = min(n, seq_len - start)
      seg[r, start:start + n], pos[r, start:start + n] = doc, np.arange(n)
      start, doc = start + n, doc + 1
  return seg, pos


def measure(kind, seq_len, args, overrides=None, run=True, packing="concat"):
  """Compiled FLOPs and memory of one layer's fwd+bwd, and its time (unless `run` is False or it
  does not fit --max-gb); packing "pack": on packed documents (--doc-len)."""
  config = layer_config(kind, seq_len, args, overrides)
  packed = packing == "pack"
  # XLA counts a loop body once: for FLOPs, compile (never run) with one query chunk where the
  # chunk size does not change the math, and the window's chunk loop unrolled.
  whole = ml_collections.ConfigDict(config)
  whole.kernels.update(query_chunk=1 << 30, dsa_query_chunk=1 << 30, unroll_chunks=True)
  flops = compile_step(ml_collections.FrozenConfigDict(whole), args.batch, packed)[1].cost_analysis().get(
      "flops", float("nan"))
  step, compiled, shapes = compile_step(config, args.batch, packed)
  mem = compiled.memory_analysis()
  gb = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes) / 2**30
  row = {"kind": kind, "T": seq_len, "packing": packing, "gflops": flops / 1e9, "mem_gb": gb, "ms": float("nan")}
  if run and gb <= args.max_gb:
    params, x = (jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype) * 0.02, a) for a in shapes[:2])
    pos, seg = jnp.broadcast_to(jnp.arange(seq_len), shapes[2].shape), None
    if packed:
      seg, pos = packed_documents(seq_len, args.batch, args.doc_len, configs.max_docs_per_row(config))
    jax.block_until_ready(compiled(params, x, pos, seg))
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      jax.block_until_ready(compiled(params, x, pos, seg))
      times.append(time.perf_counter() - start)
    row["ms"] = 1e3 * statistics.median(times)
  return row


def traffic(args):
  if "nsa" in args.kinds or "dsa" not in args.kinds:
    nsa_time_table(args)
  if "dsa" in args.kinds:
    dsa_time_table(args)
    dsa_traffic_tables(args)


CHIP_NAMES = ("v5e", "v5p", "v6e")


def nsa_shape(args, config=None):
  from perf import nsa_time
  c = config.nsa if config is not None else None
  layer = {} if c is None else dict(block_len=c.cmp_block, stride=c.cmp_stride, slc_block=c.slc_block,
                                    num_selected=c.num_selected, window=c.window)
  return nsa_time.Shape(hq=args.heads, hkv=args.kv_heads, dk=args.head_dim, dv=args.v_dim or args.head_dim, **layer)


def nsa_model(seq_len, shape, selection_kind):
  """The time model's rows for one layer (fwd + bwd) and its dense twin, per kernel and in total. Each
  chip runs the kernels as configured for it: score matmuls of its MXU width (kernels.matmul_keys)."""
  from kernels import KernelOptions
  from perf import nsa_time, time_model
  from perf.chips import CHIPS
  idx = nsa_time.synthetic_selection(seq_len, shape.hkv, realistic=selection_kind == "realistic",
                                     block=shape.slc_block, n=shape.num_selected)
  by_mxu = {mxu: nsa_time.layer_costs(seq_len, idx, shape, KernelOptions(pallas_mode="compiled", matmul_keys=mxu))
            for mxu in sorted({CHIPS[c].mxu for c in CHIP_NAMES})}
  minimum = nsa_time.minimum(seq_len, idx, shape)
  dense, dense_min = nsa_time.dense_costs(seq_len, shape), nsa_time.dense_minimum(seq_len, shape)
  costs = by_mxu[min(by_mxu)]
  out = {"kernels": costs, "layer": sum(costs[1:], costs[0])._replace(name="NSA layer"), "minimum": minimum,
         "dense": sum(dense[1:], dense[0]), "dense_minimum": dense_min, "chips": {}}
  for chip in CHIP_NAMES:
    facts, own = CHIPS[chip], by_mxu[CHIPS[chip].mxu]
    total = lambda cs, **kw: 1e3 * sum(time_model.terms(c, facts, **kw).total for c in cs)
    out["chips"][chip] = {
        "kernel_ms": [1e3 * time_model.terms(c, facts).total for c in own], "ms": total(own),
        "roofline_ms": 1e3 * time_model.roofline(minimum.flops, minimum.bytes, facts),
        "steps_3x_ms": total(own, step_factor=3), "dmas_3x_ms": total(own, dma_factor=3), "dense_ms": total(dense),
        "dense_roofline_ms": 1e3 * time_model.roofline(dense_min.flops, dense_min.bytes, facts)}
  return out


def nsa_time_table(args):
  """--impl pallas, nsa: the time model (perf/time_model.py, perf/nsa_time.py) per kernel and chip."""
  shape = nsa_shape(args)
  on_tpu = jax.default_backend() == "tpu"
  print(f"NSA layer fwd+bwd on the time model (estimates, not measurements; constants in perf/chips.py): "
        f"B=1 HQ={shape.hq} HKV={shape.hkv} Dk={shape.dk} Dv={shape.dv} bf16, l={shape.block_len} d={shape.stride} "
        f"l'={shape.slc_block} n={shape.num_selected} w={shape.window}")
  print("  time >= max(FLOPs/peak, bytes/bandwidth) + steps x step cost + DMAs x issue cost (per chip; megacore "
        "halves the last two on v5p); each chip's score matmuls are its MXU's width (v6e: 256 keys; the columns "
        "before the times are v5e's and v5p's 128)")
  g = lambda x: f"{x / 1e9:.2f}"
  for seq_len in args.seq_lens:
    for selection in ("random", "realistic"):
      m = nsa_model(seq_len, shape, selection)
      print(f"\nT={seq_len}, {selection} selection")
      print(f"{'kernel (128-key matmuls)':<26} {'steps':>8} {'DMAs':>9} {'GB':>8} {'GFLOP':>9} "
            + " ".join(f"{c + ' ms':>9}" for c in CHIP_NAMES))
      for i, c in enumerate(m["kernels"]):
        print(f"{c.name:<26} {c.steps:>8} {c.dmas:>9} {g(c.bytes):>8} {c.flops / 1e9:9.0f} "
              + " ".join(f"{m['chips'][chip]['kernel_ms'][i]:9.2f}" for chip in CHIP_NAMES))
      lay, mn, dn, dmin = m["layer"], m["minimum"], m["dense"], m["dense_minimum"]
      per_chip = lambda value, fmt=".2f": " ".join(f"{value(m['chips'][chip]):9{fmt}}" for chip in CHIP_NAMES)
      cost = lambda c: f"{c.steps:>8} {c.dmas:>9} {g(c.bytes):>8} {c.flops / 1e9:9.0f}"
      blank = f"{'':>8} {'':>9} {'':>8} {'':>9}"
      rows = [("NSA layer", cost(lay), per_chip(lambda c: c["ms"])),
              ("  honest minimum", f"{'':>8} {'':>9} {g(mn.bytes):>8} {mn.flops / 1e9:9.0f}",
               per_chip(lambda c: c["roofline_ms"])),
              ("  x minimum / x roofline", f"{'':>8} {'':>9} {lay.bytes / mn.bytes:8.2f} {lay.flops / mn.flops:9.2f}",
               per_chip(lambda c: c["ms"] / c["roofline_ms"])),
              ("  step cost 3x", blank, per_chip(lambda c: c["steps_3x_ms"])),
              ("  DMA issue cost 3x", blank, per_chip(lambda c: c["dmas_3x_ms"])),
              ("dense (splash), causal", cost(dn), per_chip(lambda c: c["dense_ms"])),
              ("  dense roofline", f"{'':>8} {'':>9} {g(dmin.bytes):>8} {dmin.flops / 1e9:9.0f}",
               per_chip(lambda c: c["dense_roofline_ms"])),
              ("  NSA / dense time", blank, per_chip(lambda c: c["ms"] / c["dense_ms"], ".3f"))]
      for label, columns, times in rows:
        print(f"{label:<26} {columns} {times}")
      if on_tpu and selection == "random":      # the model's layer on random inputs: a random-like selection
        from perf import nsa_time
        print(f"{'  measured on ' + jax.devices()[0].device_kind:<56} {nsa_time.measure_ms(seq_len, shape):9.2f} ms "
              "(the same layer, compiled and run: set perf/chips.py's step and DMA costs until the model agrees)")


DSA_DK, DSA_DV = 576, 512        # DeepSeek-V3.2: kv_lora_rank 512 + qk_rope_dim 64; value 512


def trained_selection(run_dir: str):
  """(indices [n_layers, T, k] int32, seq_len, index_topk): every layer's top-k on one validation
  sequence of the embedded corpus, from the indexer of the run's newest checkpoint (xla top-k)."""
  import operator

  import numpy as np
  import orbax.checkpoint as ocp

  from configs.base import EMBEDDED_TOKENIZER
  from data import corpus
  from data.tokenizer import Tokenizer
  from kernels import dsa as dsa_kernels
  from model import transformer
  from model.dsa import LightningIndexer
  from parallel.mesh import make_mesh
  from trainer import checkpoint, steps
  directory = checkpoint.checkpoint_dir(run_dir)
  with ocp.CheckpointManager(directory, item_handlers={"config": ocp.JsonCheckpointHandler()}) as manager:
    step = manager.latest_step()
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  config = ml_collections.ConfigDict(saved)
  if config.attention.kind != "dsa":
    raise SystemExit(f"--dsa-trained-run {run_dir}: attention.kind is {config.attention.kind}, not dsa")
  mesh = make_mesh(config.mesh, jax.devices()[:1])
  abstract = steps.build(config, mesh).abstract_state.params
  params, step, _ = checkpoint.load_params(run_dir, abstract)
  # One layer per module (no scan), so that the indexers' outputs can be captured.
  n_layers = config.model.n_layers
  if config.model.scan_layers:
    layers = params.pop("layers")
    params.update({f"layer_{i}": jax.tree.map(operator.itemgetter(i), layers) for i in range(n_layers)})
  config.model.scan_layers = False
  config.model.remat = "none"
  config.attention.impl = "xla"
  tokenizer = Tokenizer(config.data.tokenizer or EMBEDDED_TOKENIZER)
  docs = [text for _, text in corpus.embedded_documents("validation")]
  ids = np.concatenate([np.append(x, tokenizer.eos_id) for x in tokenizer.encode(docs)])
  longest = max(tokenizer.encode(docs), key=len)       # one long document when there is one
  tokens = (longest if len(longest) >= config.seq_len else ids)[:config.seq_len][None]
  model = transformer.build(config)
  _, state = model.apply({"params": params}, jnp.asarray(tokens), mutable=["intermediates", "aux_loss", "metrics"],
                         capture_intermediates=lambda m, name: isinstance(m, LightningIndexer) and name == "__call__")
  out = []
  for i in range(n_layers):
    (q_idx, k_idx, w_idx), = state["intermediates"][f"layer_{i}"]["attn"]["indexer"]["__call__"]
    out.append(dsa_kernels.indexer_topk(q_idx, k_idx, w_idx, topk=config.dsa.index_topk, impl="xla")[0])
  print(f"trained selection: {run_dir} step {step}, {n_layers} layers, T={config.seq_len}, "
        f"k={config.dsa.index_topk}, one validation sequence of the embedded corpus (the layers are the "
        "batch rows below: bytes and FLOPs summed over them)")
  return np.asarray(jnp.stack(out)), config.seq_len, config.dsa.index_topk


def dsa_cases(args):
  """(name, T, k, indices [layers or 1, n, k], positions): random and clustered selections per
  --seq-lens (sampled queries), and a trained run's with a random twin (--dsa-trained-run)."""
  import numpy as np

  from perf import dsa_traffic as dt
  cases = []
  for seq_len in args.seq_lens:
    positions = dt.sample_positions(seq_len, args.dsa_samples)
    for realistic in (False, True):
      cases.append(("clustered" if realistic else "random", seq_len, args.dsa_topk,
                    dt.synthetic_selection(seq_len, args.dsa_topk, positions, realistic=realistic), positions))
  if args.dsa_trained_run:
    idx, seq_len, k = trained_selection(args.dsa_trained_run)
    positions = np.arange(seq_len)
    cases.append(("trained", seq_len, k, idx, positions))
    cases.append(("random", seq_len, k, dt.synthetic_selection(seq_len, k, positions, realistic=False), positions))
  return cases


def dsa_model(seq_len, k, indices, positions, heads):
  """The time model's rows for one DSA layer (fwd + bwd) per gather path: TensorCore DMAs (every
  chip; v5e's only path) and SparseCores (v5p, v6e: kernels.dsa_gather=auto); a selection of
  several layers (a trained run) is averaged over them. Per chip, its auto path in total."""
  from perf import dsa_time, time_model
  from perf.chips import CHIPS
  shape = dsa_time.Shape(heads=heads, topk=k)

  def costs(chip):
    per_layer = [dsa_time.layer_costs(seq_len, layer[None], positions, shape, chip=chip) for layer in indices]
    mean = lambda i, field: sum(getattr(layer[i], field) for layer in per_layer) / len(per_layer)
    return [c._replace(bytes=mean(i, "bytes"), dmas=round(mean(i, "dmas")),
                       **({"flops": mean(i, "flops")} if hasattr(c, "flops") else {}))
            for i, c in enumerate(per_layer[0])]
  paths = {"tensorcore": costs(None), "sparsecore": costs("v5p")}     # v6e traces the same SparseCore path
  minimum = dsa_time.minimum(seq_len, indices[:1], positions, shape)
  out = {"paths": paths, "minimum": minimum, "chips": {}}
  for chip in CHIP_NAMES:
    facts = CHIPS[chip]
    own = paths["sparsecore" if facts.sparse_cores else "tensorcore"]
    total = lambda cs, **kw: 1e3 * sum(time_model.terms(c, facts, **kw).total for c in cs)
    usable = {path: cs for path, cs in paths.items() if path == "tensorcore" or facts.sparse_cores}
    out["chips"][chip] = {
        "path": "sparsecore" if facts.sparse_cores else "tensorcore",
        "ms": {path: total(cs) for path, cs in usable.items()},
        "kernel_ms": {path: [1e3 * time_model.terms(c, facts).total for c in cs] for path, cs in usable.items()},
        "auto_ms": total(own), "roofline_ms": 1e3 * time_model.roofline(minimum.flops, minimum.bytes, facts),
        "steps_ms": 1e3 * sum(time_model.terms(c, facts).steps for c in own),
        "steps_3x_ms": total(own, step_factor=3), "dmas_3x_ms": total(own, dma_factor=3)}
  return out


def dsa_time_table(args):
  """--impl pallas, dsa: the time model (perf/time_model.py, perf/dsa_time.py) per kernel, gather
  path and chip."""
  from perf import dsa_time
  on_tpu = jax.default_backend() == "tpu"
  print(f"DSA layer fwd+bwd (top-k, sparse attention, teacher, loss) on the time model (estimates, not measurements; "
        f"constants in perf/chips.py): B=1 H={args.dsa_heads} Dk={DSA_DK} dv={DSA_DV} H_I=64 d_I=128 bf16")
  print("  time >= max(FLOPs/peak, bytes/bandwidth) + steps x step cost + DMAs x issue cost (megacore halves the "
        "last two on v5p; SparseCore descriptors are shared by all their subcores); rows add up (no overlap)")
  g = lambda x: f"{x / 1e9:.1f}"
  for name, seq_len, k, idx, positions in dsa_cases(args):
    m = dsa_model(seq_len, k, idx, positions, args.dsa_heads)
    sample = f"{len(positions) / seq_len:.1%} of queries sampled" if len(positions) < seq_len else "every query"
    print(f"\nT={seq_len} k={k}, {name} selection ({sample})")
    for path, costs in m["paths"].items():
      chips = [c for c in CHIP_NAMES if path == "tensorcore" or m["chips"][c]["path"] == path]
      print(f"{'kernel, ' + path + ' gathers':<32} {'steps':>8} {'DMAs':>12} {'B/DMA':>7} {'GB':>8} {'TFLOP':>7} "
            + " ".join(f"{c + ' ms':>9}" for c in chips))
      for i, c in enumerate(costs):
        per_dma = f"{c.bytes / c.dmas:7.0f}" if c.dmas else f"{'':>7}"
        steps, flops = getattr(c, "steps", 0), getattr(c, "flops", 0.0)
        print(f"{c.name:<32} {steps:>8} {c.dmas:>12} {per_dma} {g(c.bytes):>8} {flops / 1e12:7.2f} "
              + " ".join(f"{m['chips'][chip]['kernel_ms'][path][i]:9.1f}" for chip in chips))
      dmas, nbytes = sum(c.dmas for c in costs), sum(c.bytes for c in costs)
      print(f"{'DSA layer':<32} {sum(getattr(c, 'steps', 0) for c in costs):>8} {dmas:>12} "
            f"{nbytes / max(dmas, 1):7.0f} {g(nbytes):>8} {sum(getattr(c, 'flops', 0.0) for c in costs) / 1e12:7.2f} "
            + " ".join(f"{m['chips'][chip]['ms'][path]:9.1f}" for chip in chips))
    mn = m["minimum"]
    per_chip = lambda value, fmt=".1f": " ".join(f"{value(m['chips'][chip]):9{fmt}}" for chip in CHIP_NAMES)
    print(f"{'each chip, its auto path':<32} " + " ".join(f"{c + ' ' + m['chips'][c]['path'][:6]:>16}"
                                                         for c in CHIP_NAMES))
    rows = [("DSA layer ms", per_chip(lambda c: c["auto_ms"])),
            (f"honest minimum ({g(mn.bytes)} GB, {mn.flops / 1e12:.1f} TF)", per_chip(lambda c: c["roofline_ms"])),
            ("x roofline", per_chip(lambda c: c["auto_ms"] / c["roofline_ms"], ".2f")),
            ("grid steps / roofline", per_chip(lambda c: c["steps_ms"] / c["roofline_ms"], ".3f")),
            ("step cost 3x, ms", per_chip(lambda c: c["steps_3x_ms"])),
            ("DMA issue cost 3x, ms", per_chip(lambda c: c["dmas_3x_ms"]))]
    for label, times in rows:
      print(f"{label:<32} " + " ".join(f"{x:>16}" for x in times.split()))
    if on_tpu and name == "random" and len(positions) < seq_len:    # random inputs: a random-like selection
      print(f"{'measured on ' + jax.devices()[0].device_kind:<32} "
            f"{dsa_time.measure_ms(seq_len, dsa_time.Shape(heads=args.dsa_heads, topk=k)):9.1f} ms")


def dsa_traffic_tables(args):
  from kernels.dsa.pallas import queries_per_tile
  from perf import dsa_traffic as dt
  from perf.chips import CHIPS
  chips = ("v5e", "v5p", "v6e")
  heads = args.dsa_heads
  ridges = ", ".join(f"{c} {CHIPS[c].ridge:.0f}" for c in chips)
  print(f"DSA sparse MLA kernels (Pallas), HBM<->VMEM traffic model: H={heads} Dk={DSA_DK} dv={DSA_DV} bf16, "
        f"{queries_per_tile(heads)} query x {heads} heads per tile; ridge FLOP/B: {ridges}")
  cases = dsa_cases(args)
  print(f"{'selection':>10} {'T':>7} {'k':>5} {'sample':>7} | {'kernel':>7} {'in GB':>9} {'min GB':>9} {'ratio':>6} "
        f"{'out GB':>8} {'min GB':>8} {'ratio':>6} {'MXU fill':>8} {'TFLOP':>9} {'dense':>9} {'ratio':>6} "
        f"{'FLOP/B':>6} {'v5e/v5p/v6e':>11} {'grid steps':>10} {'work':>9}")
  results = []
  for name, seq_len, k, idx, positions in cases:
    sampled = len(positions) < seq_len
    r = dt.sparse_traffic(idx, heads=heads, dk=DSA_DK, dv=DSA_DV, q_offset=positions,
                          seq_len=seq_len if sampled else None)
    results.append((name, seq_len, k, idx, positions, r))
    head = f"{name:>10} {seq_len:>7} {k:>5} {r['sampled_fraction']:7.1%}"
    for kernel in ("forward", "dq+dkv", "teacher", "dq", "dkv"):
      x = r[kernel]
      bound = "/".join("C" if x["intensity"] > CHIPS[c].ridge else "M" for c in chips)
      print(f"{head if kernel == 'forward' else '':<{len(head)}} | {kernel:>7} {x['in'] / 1e9:9.2f} "
            f"{x['min_in'] / 1e9:9.2f} {x['in'] / x['min_in']:6.2f} {x['out'] / 1e9:8.3f} {x['min_out'] / 1e9:8.3f} "
            f"{x['out'] / x['min_out']:6.2f} {x['row_fill']:8.1%} {x['flops'] / 1e12:9.2f} "
            f"{x['dense_mha_flops'] / 1e12:9.2f} {x['flops'] / x['dense_mha_flops']:6.3f} {x['intensity']:6.0f} "
            f"{bound:>11} {x['grid_steps']:10.3g} {x['work_steps']:9.3g}", flush=True)
    print(f"{'':<{len(head)}} | dkv: {r['pairs'] / r['queries']:.1f} (key tile, query) pairs per query, "
          f"{r['dkv']['pallas_calls']} pallas_calls of {r['dkv_window']} pairs; kv relayout "
          f"{r['kv_relayout_bytes'] / 1e9:.3f} GB per walk kernel (not above)")
  print("dq+dkv: the default backward (kernels.dsa_dkv=rows), one walk; teacher: the indexer loss's teacher "
        "(sparse stage; dense: half the forward); dq and dkv: kernels.dsa_dkv=tiles (dq's walk, then the "
        "KV-stationary dkv)")
  print("in/out: bytes per layer, batch 1; min: forward/dq each selected row once per query, dkv each operand once; "
        "dense: causal MLA in MHA form (qk 192, v 128), the same kernel's share; "
        "C/M: compute- or memory-bound at that FLOP/B; grid steps: B x steps run, work: chunks (forward, dq) "
        "or pairs (dkv) that compute")
  groups = (1, 2, 4, 8, 16)
  print(f"\nneighbouring queries' selections: a union tile of g consecutive queries (g x {heads} rows) "
        f"against per-query gathers; v6e model: max(FLOPs / (peak x min(1, rows / MXU)), bytes / HBM bandwidth) (perf.chips)")
  print(f"{'selection':>10} {'T':>7} {'k':>5} {'g':>3} {'union/sum':>9} {'FLOP/B':>7} {'exec FLOP/B':>11} "
        f"{'v6e':>8} {'us/query':>8} {'speedup':>7}")
  for name, seq_len, k, idx, positions, _ in results:
    o = dt.overlap(idx, groups, q_offset=positions, num_keys=seq_len, heads=heads, dk=DSA_DK, dv=DSA_DV)
    for g, x in o.items():
      print(f"{name if g == 1 else '':>10} {seq_len if g == 1 else '':>7} {k if g == 1 else '':>5} {g:>3} "
            f"{x['union_over_sum']:9.3f} {x['flop_per_byte']:7.0f} {x['executed_flop_per_byte']:11.0f} "
            f"{x['bound']:>8} {x['time_per_query'] * 1e6:8.3f} {x['speedup']:6.2f}x", flush=True)
    if name == "trained":
      per_layer = [dt.overlap(idx[i:i + 1], groups, q_offset=positions, num_keys=seq_len) for i in range(len(idx))]
      print(f"{'':>10} union/sum per layer: " + "; ".join(
          f"g={g} " + " ".join(f"{o[g]['union_over_sum']:.3f}" for o in per_layer) for g in (2, 4, 16)))


def sweep_bench(args, parser):
  """--sweep: what each point of a grid of NSA (or DSA) fields costs per T, before training with
  it: the Pallas kernels' HBM<->VMEM bytes (traffic model, forward + backward, against the
  minimum) and MXU row fill, one layer's compiled memory and FLOPs, and its time on a TPU."""
  from sweeps import report as sweep_report
  try:
    points = sweep_grid.product([sweep_grid.parse_axis(a) for a in args.sweep])
    fields = sweep_grid.fields_of(points)
    kind = "dsa" if any(f.startswith("dsa.") for f in fields) else "nsa"
    sweep_grid.check_fields(layer_config(kind, args.seq_lens[0], args), points, {})
  except sweep_grid.SweepError as e:
    parser.error(str(e))
  on_tpu = jax.default_backend() == "tpu"
  if kind == "nsa":
    shape = f"HQ={args.heads} HKV={args.kv_heads} Dk={args.head_dim} Dv={args.v_dim or args.head_dim}"
  else:
    shape = (f"traffic at V3.2's H={args.dsa_heads} Dk={DSA_DK} dv={DSA_DV} ({args.dsa_samples} x 16 queries "
             f"sampled per T); compiled: the MLA layer of --kinds mla/dsa (4x smaller dims)")
  print(f"{kind} sweep, one layer fwd+bwd, B={args.batch} {shape} {args.dtype}, realistic synthetic selection; "
        f"compiled on {jax.devices()[0].device_kind}" + ("" if on_tpu else " (time: TPU only)"))
  head = " ".join(f"{f.rsplit('.', 1)[-1]:>12}" for f in fields)
  print(f"{head} {'T':>7} {'traffic GB':>10} {'x min':>6} {'MXU fill':>8} {'memory GB':>9} {'GFLOP':>10} {'ms':>8}")
  show = lambda v, fmt, width: f"{v:{width}{fmt}}" if v is not None and v == v else f"{'-':>{width}}"
  rows = []
  for seq_len in args.seq_lens:
    for point in points:
      config = layer_config(kind, seq_len, args, point)
      r = {**point, "T": seq_len, **point_traffic(kind, config, seq_len, args), "mem_gb": None, "gflops": None,
           "ms": None}
      if not args.no_compile:
        cost = measure(kind, seq_len, args, point, run=on_tpu)
        r.update(mem_gb=cost["mem_gb"], gflops=cost["gflops"], ms=cost["ms"] if on_tpu else None)
      rows.append(r)
      print(" ".join(f"{point[f]!s:>12}" for f in fields) + f" {seq_len:>7} {r['traffic_gb']:10.3f} "
            f"{r['traffic_gb'] / r['min_gb']:6.2f} {r['mxu_fill']:8.1%} {show(r['mem_gb'], '.3f', 9)} "
            f"{show(r['gflops'], '.1f', 10)} {show(r['ms'], '.2f', 8)}", flush=True)
  print("traffic: bytes in + out of the attention kernels (NSA: selection forward, dq, dK/dV; DSA: forward, "
        "dq+dkv, indexer-loss teacher) per layer, batch 1; x min: against each selected block/row moved once")
  metrics = [("traffic_gb", "traffic GB"), ("mxu_fill", "MXU row fill")]
  metrics += [] if args.no_compile else [("mem_gb", "compiled memory GB"), ("gflops", "GFLOP")]
  metrics += [("ms", "time ms")] if on_tpu and not args.no_compile else []
  path = args.plot or f"bench_{kind}_sweep.png"
  plt = sweep_report._pyplot()
  fig, axes = plt.subplots(len(metrics), len(fields), figsize=(4.5 * len(fields) + 1, 3 * len(metrics)),
                           squeeze=False)
  for ax_row, (key, label) in zip(axes, metrics):
    sweep_report.against_fields(ax_row, rows, fields, key, label, extra=("T",))
  fig.suptitle(f"{kind}: cost per point (one layer, fwd+bwd)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f"wrote {path}")
  return rows


def point_traffic(kind, config, seq_len, args) -> dict:
  """Traffic model of a point's kernels: GB moved, the minimum GB, MXU row fill."""
  if kind == "nsa":
    m = nsa_model(seq_len, nsa_shape(args, config), "realistic")
    return {"traffic_gb": m["layer"].bytes / 1e9, "min_gb": m["minimum"].bytes / 1e9,
            "mxu_fill": m["minimum"].flops / m["layer"].flops, "model_ms": m["chips"]["v5p"]["ms"],
            "x_roofline": m["chips"]["v5p"]["ms"] / m["chips"]["v5p"]["roofline_ms"]}
  from perf import dsa_traffic as dt
  positions = dt.sample_positions(seq_len, args.dsa_samples)
  idx = dt.synthetic_selection(seq_len, config.dsa.index_topk, positions, realistic=True)
  r = dt.sparse_traffic(idx, heads=args.dsa_heads, dk=DSA_DK, dv=DSA_DV, q_offset=positions,
                        seq_len=seq_len if len(positions) < seq_len else None)
  kernels = [r[k] for k in ("forward", "dq+dkv", "teacher")]
  return {"traffic_gb": sum(k["in"] + k["out"] for k in kernels) / 1e9,
          "min_gb": sum(k["min_in"] + k["min_out"] for k in kernels) / 1e9, "mxu_fill": r["forward"]["row_fill"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
  parser.add_argument("--kinds", nargs="+", default=["dense", "nsa"], choices=sorted(ATTENTION_KINDS))
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--kv-heads", type=int, default=1)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--topk", type=int, default=512, help="DSA keys per query")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--packing", nargs="+", default=["concat"], choices=["concat", "pack"],
                      help="concat: one document per row; pack: packed documents (segment ids), --doc-len")
  parser.add_argument("--doc-len", type=int, default=2048, help="--packing pack: mean document length")
  parser.add_argument("--max-gb", type=float, default=16.0, help="run only configs compiled to fit this")
  parser.add_argument("--plot", default="", help="write a PNG of time and memory against T")
  parser.add_argument("--impl", default="xla", choices=["xla", "pallas"],
                      help="xla: time the layers; pallas: the Pallas kernels' traffic model")
  parser.add_argument("--v-dim", type=int, default=0, help="value head dim for --impl pallas (default: --head-dim)")
  parser.add_argument("--dsa-topk", type=int, default=2048, help="--impl pallas, dsa: keys per query")
  parser.add_argument("--dsa-heads", type=int, default=128, help="--impl pallas, dsa: absorbed heads")
  parser.add_argument("--dsa-samples", type=int, default=64,
                      help="--impl pallas, dsa: runs of 16 consecutive queries sampled per T")
  parser.add_argument("--dsa-trained-run", default="",
                      help="--impl pallas, dsa: also a trained DSA run's selection (its workdir)")
  parser.add_argument("--sweep", action="append", default=[], metavar="FIELD=V1,V2,...",
                      help="a grid of nsa.* (or dsa.*) fields (repeat: the product): a row per point and T")
  parser.add_argument("--no-compile", action="store_true",
                      help="--sweep: the traffic model only (no compiled memory, FLOPs or time; fast)")
  args = parser.parse_args()
  if args.sweep:
    return sweep_bench(args, parser)
  if args.impl == "pallas" and jax.default_backend() != "tpu":
    return traffic(args)     # off TPU the kernels would only be interpreted: their traffic model

  print(f"one layer fwd+bwd, B={args.batch} HQ={args.heads} HKV={args.kv_heads} D={args.head_dim} "
        f"{args.dtype}, NSA paper defaults, DSA top-{args.topk}; {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs")
  if "pack" in args.packing:
    print(f"pack: documents of exponentially distributed lengths, mean {args.doc_len} tokens (at most "
          f"data.max_docs_per_row per row); NSA runs on its block-aligned row (model/packing.py)")
  print(f"{'kind':>6} {'T':>7} {'packing':>8} {'time ms':>10} {'GFLOP':>10} {'memory GB':>10}")
  rows = []
  for seq_len in args.seq_lens:
    for kind in args.kinds:
      for packing in args.packing:
        r = measure(kind, seq_len, args, packing=packing)
        rows.append(r)
        ms = f"{r['ms']:10.0f}" if r["ms"] == r["ms"] else f"{'not run':>10}"
        print(f"{kind:>6} {seq_len:>7} {packing:>8} {ms} {r['gflops']:10.1f} {r['mem_gb']:10.2f}", flush=True)
  for kind in args.kinds:
    by_t = {r["T"]: r for r in rows if r["kind"] == kind and r["packing"] == args.packing[0]}
    if 8192 in by_t and 32768 in by_t:
      import math
      exponent = math.log(by_t[32768]["gflops"] / by_t[8192]["gflops"]) / math.log(4)
      print(f"{kind}: FLOPs grow as T^{exponent:.2f} between 8k and 32k")
  import resource
  print(f"peak resident memory of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")
  if args.plot:
    plot(rows, args.kinds, args.plot)
  if args.impl == "pallas":
    traffic(args)


def plot(rows, kinds, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
  for kind, packing in dict.fromkeys((r["kind"], r["packing"]) for r in rows if r["kind"] in kinds):
    rs = [r for r in rows if (r["kind"], r["packing"]) == (kind, packing)]
    label = kind if packing == "concat" else f"{kind} ({packing})"
    ax_t.plot([r["T"] for r in rs], [r["ms"] for r in rs], "o-", label=label)
    ax_m.plot([r["T"] for r in rs], [r["mem_gb"] for r in rs], "o-", label=label)
  for ax, label in ((ax_t, "fwd+bwd time (ms)"), (ax_m, "compiled memory (GB)")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel(label)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
