"""Compile the real train step ahead of time for a TPU slice, on any host with libtpu (no TPU needed).

  python scripts/aot_compile.py --config configs/1b.py --topology v5p-64 [--num-slices S] \
      [--seq-lens 8192,32768] [--noscale-layers] [--config.FIELD=VALUE ...]

--topology: an accelerator type as gcloud names it, v4-N or v5p-N (N TensorCores, 2 per chip),
v5litepod-N, v5e-N or v6e-N (N chips), or a raw topology such as v5p:2x4x4 or v5e:2x2.
--num-slices S: S such slices over DCN; the mesh's data axis spans them (mesh.data defaults to S).

It builds what train.py builds (trainer.steps.build on a mesh of the slice's devices, with
kernels.pallas_mode=compiled: attention.impl=auto takes the Pallas kernels as on a TPU and Mosaic
compiles them for the chip), lowers train_step for the global batch and compiles it; no data is
read. Per sequence length it prints HBM per chip (compiled.memory_analysis) against the chip's
capacity, FLOPs per step and a roofline bound on the step time with the MFU it allows. XLA's cost
analysis counts a while loop's body once, so for scanned layers it also compiles the model with 2
unrolled layers to scale its FLOPs and bytes to all layers (--noscale-layers skips that: faster).
The last line says whether it fits; exit status 0: fits, 1: does not fit, 2: bad arguments.
"""
import math
import os
import re
import sys
import time

from absl import flags
from ml_collections import config_flags

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # nothing to share: no TPU is attached

from configs import ConfigError, parse_flags  # noqa: E402
from parallel.mesh import make_mesh  # noqa: E402
from perf.chips import ALLOWED, Accelerator, parse_accelerator  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/1b.py")
_TOPOLOGY = flags.DEFINE_string("topology", None, "accelerator type (v5p-64, v6e-64, ...) or topology (v5p:2x4x4)")
_NUM_SLICES = flags.DEFINE_integer("num-slices", 1, "slices connected over DCN")
_SEQ_LENS = flags.DEFINE_list("seq-lens", [], "sequence lengths to compile (default: the config's seq_len)")
_SCALE = flags.DEFINE_boolean("scale-layers", True, "compile 2 unrolled layers to count XLA's cost per layer")

GIB = 2 ** 30


def topology_devices(acc: Accelerator, num_slices: int):
  """TPU devices of `num_slices` such slices (a device per chip; slice_index tells the slice)."""
  from jax.experimental import topologies
  return topologies.get_topology_desc(
      platform="tpu", topology_name=acc.topology, num_slices=num_slices,
      chips_per_host_bounds=(min(2, acc.dims[0]), min(2, acc.dims[1]), 1),
      chip_config_name="megacore" if acc.facts.cores == 2 else "default").devices


def lower(config, mesh):
  """(the Program train.py runs, its train_step lowered for the global batch, argument bytes per chip)."""
  import jax

  from trainer import steps
  program = steps.build(config, mesh)
  args = (program.abstract_state, steps.abstract_batch(config, mesh))
  arg_bytes = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(args))
  return program, program.train_step.lower(*args), arg_bytes


def needed_gib(error: str, arg_bytes: int) -> float:
  """HBM per chip the compiler asked for, from its out-of-memory message (nan if not found)."""
  units = {"K": 2 ** -20, "M": 2 ** -10, "G": 1, "T": 2 ** 10}
  if m := re.search(r"Used ([\d.]+)([KMGT]) of [\d.]+[KMGT] hbm", error):
    return float(m[1]) * units[m[2]]
  if m := re.search(r"temporaries \(([\d.]+)([KMGT])\)", error):
    return float(m[1]) * units[m[2]] + arg_bytes / GIB
  return math.nan


def xla_cost(config, mesh, compiled, scale: bool):
  """XLA's (FLOPs, bytes accessed) per chip per step, and how they were counted."""
  cost = compiled.cost_analysis()
  flops, nbytes = cost["flops"], cost["bytes accessed"]
  m = config.model
  if not (m.scan_layers and m.n_layers > 1):
    return flops, nbytes, "all layers"
  if not scale:
    return flops, nbytes, "1 layer body"
  # count = outside + body: 2 unrolled layers give outside + 2 x body, hence the body's cost.
  two = config.copy_and_resolve_references()
  two.model.update(scan_layers=False, n_layers=2)
  print("  compiling 2 unrolled layers to count XLA's cost per layer ...", flush=True)
  start = time.time()
  try:
    cost2 = lower(two, mesh)[1].compile().cost_analysis()
  except Exception as e:   # noqa: BLE001 (e.g. out of memory): keep the one-body count
    print(f"  (not counted per layer: {str(e).splitlines()[0][:200]})")
    return flops, nbytes, "1 layer body"
  print(f"  compiled in {time.time() - start:.0f} s", flush=True)
  flops += (m.n_layers - 1) * (cost2["flops"] - flops)
  nbytes += (m.n_layers - 1) * (cost2["bytes accessed"] - nbytes)
  return flops, nbytes, f"scaled to {m.n_layers} layers"


def context_gathers(hlo: str, seq_sizes: set, widths: set, shards: int) -> tuple[float, float, list]:
  """(forward, backward) bytes one chip receives per layer from the all-gathers over the sequence
  inside the scanned layer's body (context parallelism: the gathered keys), from the compiled HLO,
  and the gathered shapes: each all-gather of a key-side tensor (last dimension in `widths`) whose
  gathered dimension is a sequence (a sequence size, or `shards` x the next dimension's
  T/shards), (shards-1)/shards of its output. (The widths keep out parameters' fsdp gathers
  whose dimension happens to equal a sequence size.)"""
  sizes = {"bf16": 2, "f32": 4, "s32": 4, "f16": 2, "u32": 4, "s8": 1, "pred": 1}
  forward = backward = 0.0
  shapes = []
  for line in hlo.splitlines():
    if " all-gather(" not in line or "/layers/" not in line:
      continue
    shape, dims = re.search(r"= (\w+)\[([\d,]*)\]", line), re.search(r"dimensions=\{(\d+)\}", line)
    if not (shape and dims and shape[1] in sizes):
      continue
    dims_list, g = [int(d) for d in shape[2].split(",") if d], int(dims[1])
    split = dims_list[g] == shards and g + 1 < len(dims_list) and shards * dims_list[g + 1] in seq_sizes
    if (dims_list[g] not in seq_sizes and not split) or dims_list[-1] not in widths:
      continue
    received = math.prod(dims_list) * sizes[shape[1]] * (shards - 1) / shards
    shapes.append(f"{shape[1]}[{shape[2]}]")
    if "transpose(" in line:
      backward += received
    else:
      forward += received
  return forward, backward, shapes


def compile_row(config, mesh, acc: Accelerator, scale: bool) -> dict:
  from model import transformer
  m, chips, tokens = config.model, mesh.size, config.batch_size * config.seq_len
  start = time.time()
  program, lowered, arg_bytes = lower(config, mesh)
  kernels = lowered.as_text().count("tpu_custom_call")
  print(f"  lowered in {time.time() - start:.0f} s ({kernels} Pallas kernel calls); compiling ...", flush=True)
  passes = 4 if m.remat == "full" else 3    # forward + backward (2 forwards' worth); remat=full: + forward
  model = transformer.flops_per_token(config, program.abstract_state.params) * tokens
  r = dict(seq_len=config.seq_len, model=model, executed=model * passes / 3, xla=math.nan, xla_bytes=math.nan,
           how="", splash=0.0)
  if config.attention.kind == "dense" and kernels:
    # jax's splash kernels carry no cost estimate: XLA counts none of their QK^T and PV FLOPs
    # (2 matmuls x 2 x HQ x D x (T+1)/2 keys per query, per pass).
    r["splash"] = passes * m.n_layers * 2 * 2 * m.n_heads * m.head_dim * (config.seq_len + 1) / 2 * tokens
  start = time.time()
  try:
    compiled = lowered.compile()
  except Exception as e:   # noqa: BLE001
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    print(f"  does not fit: {str(e).splitlines()[0][:300]}")
    r["total"] = needed_gib(str(e), arg_bytes)
  else:
    mem = compiled.memory_analysis()
    parts = dict(arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
                 aliased=-mem.alias_size_in_bytes, temporaries=mem.temp_size_in_bytes,
                 code=mem.generated_code_size_in_bytes)
    r["total"] = sum(parts.values()) / GIB
    print(f"  compiled in {time.time() - start:.0f} s; HBM per chip {r['total']:.2f} GiB = "
          + " + ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items()).replace("+ aliased -", "- aliased "),
          flush=True)
    shards = mesh.shape["context"]
    if shards > 1:
      from kernels import nsa
      seq_sizes, widths = {config.seq_len}, {m.head_dim}
      if config.attention.kind == "nsa":            # the compressed K/V, split over context
        seq_sizes.add(-(-nsa.num_compressed(config.seq_len, config.nsa.cmp_block, config.nsa.cmp_stride) // shards)
                      * shards)
      if config.attention.kind in ("mla", "dsa"):    # indexer keys, latent rows; MHA-form heads
        a = config.mla
        widths = {config.dsa.index_head_dim, a.kv_lora_rank + a.qk_rope_dim, a.qk_nope_dim + a.qk_rope_dim,
                  a.v_head_dim}
      fwd, bwd, shapes = context_gathers(compiled.as_text(), seq_sizes, widths, shards)
      print(f"  gathered over context per layer: {', '.join(shapes) or 'none found'}")
      from model.attention import ATTENTION_KINDS
      attention = ATTENTION_KINDS[config.attention.kind].flops_per_token(config) * tokens / chips
      r.update(gather_mb=fwd / 1e6, gather_bwd_mb=bwd / 1e6, gather_ms=fwd / (acc.facts.ici_gbs * 1e9) * 1e3,
               attention_ms=attention / (acc.facts.peak_tflops * 1e12) * 1e3)
      print(f"  context={shards}: per layer and chip the forward all-gathers bring {r['gather_mb']:.1f} MB "
            f"({r['gather_ms']:.2f} ms at {acc.facts.ici_gbs} GB/s ICI), the backward's {r['gather_bwd_mb']:.1f} MB; "
            f"the layer's attention forward is {attention:.3g} FLOPs ({r['attention_ms']:.2f} ms at peak): "
            f"{'compute-bound (the gather can hide under it)' if r['gather_ms'] < r['attention_ms'] else 'communication-bound'}",
            flush=True)
    flops, nbytes, r["how"] = xla_cost(config, mesh, compiled, scale)
    r["xla"], r["xla_bytes"] = flops * chips + r["splash"], nbytes * chips
  peak, bandwidth = chips * acc.facts.peak_tflops * 1e12, chips * acc.facts.hbm_tbs * 1e12
  r["compute_s"], r["memory_s"] = r["executed"] / peak, r["xla_bytes"] / bandwidth
  r["step_s"] = r["compute_s"] if math.isnan(r["memory_s"]) else max(r["compute_s"], r["memory_s"])
  r["mfu"] = r["model"] / (r["step_s"] * peak)
  return r


def main(config, topology: str, num_slices: int, seq_lens, scale: bool) -> int:
  from trainer import validate
  acc = parse_accelerator(topology)
  if acc is None:
    print(f"error: --topology={topology}: allowed are {ALLOWED}", file=sys.stderr)
    return 2
  if num_slices < 1:
    print(f"error: --num-slices={num_slices}: must be >= 1", file=sys.stderr)
    return 2
  if not all(s.isdigit() for s in seq_lens):
    print(f"error: --seq-lens={','.join(seq_lens)}: must be integers, e.g. 8192,32768", file=sys.stderr)
    return 2
  config.kernels.pallas_mode = "compiled"     # Mosaic compiles the kernels for the chip
  # validate() checks that the data exists; the compile reads none: a gs:// or remote data.source
  # passes as the embedded corpus would (packing, which shapes the batch, is kept).
  config.data.update(source="embedded", mixture="")
  devices = topology_devices(acc, num_slices)
  configs = []
  for seq_len in [int(s) for s in seq_lens] or [config.seq_len]:
    configs.append(c := config.copy_and_resolve_references())
    c.seq_len = seq_len
    validate.validate(c, num_devices=len(devices), num_slices=num_slices)
  mesh = make_mesh(config.mesh, devices)   # what train.py builds from these devices
  print(f"{topology}: {acc.topology} x {num_slices} slice(s) = {len(devices)} chips ({devices[0].device_kind}: "
        f"{acc.facts.hbm_gib} GiB HBM, {acc.facts.peak_tflops} TFLOP/s bf16, {acc.facts.hbm_tbs} TB/s each)")
  print(f"mesh: {', '.join(f'{a}={s}' for a, s in mesh.shape.items())}; {config.attention.kind} attention "
        f"(impl {config.attention.impl}), batch {config.batch_size}, remat {config.model.remat}")
  m = config.model
  print(f"model: d_model {m.d_model}, {m.n_layers} layers, {m.n_heads}/{m.n_kv_heads} heads of {m.head_dim}, "
        f"mlp {m.mlp_dim}, vocab {m.vocab_size}" + (f" (config.json of {config.init_from}; no weights read)"
                                                    if config.init_from.startswith("hf:") else ""))
  rows = []
  for c in configs:
    print(f"seq_len {c.seq_len}: lowering train_step (compiling takes minutes for big configs) ...", flush=True)
    rows.append(compile_row(c, mesh, acc, scale))

  print("\nFLOPs per step: model = analytical (model.transformer.flops_per_token x tokens, 3 x forward): "
        "what MFU counts;\n  executed = model + the forward that remat=full recomputes (x4/3): the roofline's "
        "compute time;\n  XLA = compiled.cost_analysis() x chips (Pallas kernels by their cost estimates; * = "
        "+ the splash kernels' attention\n  FLOPs, analytical: they carry no estimate), how = which layers it "
        "counts (a while loop's body counts once;\n  chunk loops inside a layer still count once).\n"
        "roofline: step >= max(executed FLOPs / (chips x peak), XLA bytes / (chips x HBM bandwidth)); "
        "MFU <= model FLOPs / (step x chips x peak)\n"
        "context all-gather: what one chip receives per layer in the forward (keys gathered over mesh.context, "
        "from the compiled HLO)\n  and its time at the chip's ICI bandwidth, against the layer's attention "
        "forward FLOPs per chip at peak")
  print(f"{'seq_len':>8} {'GiB/chip':>9} {'fits':>4} {'model':>9} {'executed':>9} {'XLA':>10} {'XLA bytes':>9} "
        f"{'how':>21} {'compute s':>9} {'memory s':>9} {'step >= s':>9} {'MFU <=':>6}")
  g = lambda x: "-" if math.isnan(x) else f"{x:.3g}"
  for r in rows:
    xla = g(r["xla"]) + ("*" if r["splash"] and not math.isnan(r["xla"]) else "")
    print(f"{r['seq_len']:>8} {r['total']:>9.2f} {'yes' if r['total'] <= acc.facts.hbm_gib else 'no':>4} "
          f"{g(r['model']):>9} {g(r['executed']):>9} {xla:>10} {g(r['xla_bytes']):>9} {r['how']:>21} "
          f"{g(r['compute_s']):>9} {g(r['memory_s']):>9} {g(r['step_s']):>9} {r['mfu']:>6.1%}"
          + (f"  context all-gather/layer {r['gather_mb']:.1f} MB = {r['gather_ms']:.2f} ms vs attention "
             f"{r['attention_ms']:.2f} ms" if "gather_mb" in r else ""))
  worst = max((r["total"] for r in rows), key=lambda gib: math.inf if math.isnan(gib) else gib)
  fits = all(r["total"] <= acc.facts.hbm_gib for r in rows)   # nan (an out-of-memory message not understood): no
  name = config_flags.get_config_filename(flags.FLAGS["config"])
  print(f"{topology} {name}: {'fits' if fits else 'does not fit'} ({worst:.1f} of {acc.facts.hbm_gib} GiB HBM per chip)")
  return 0 if fits else 1


def run(argv) -> int:
  if error := parse_flags(argv, _CONFIG):
    print(error, file=sys.stderr)
    return 2
  if _CONFIG.value is None or not _TOPOLOGY.value:
    print("error: --config and --topology are required, e.g. "
          "python scripts/aot_compile.py --config configs/1b.py --topology v5p-64", file=sys.stderr)
    return 2
  try:
    return main(_CONFIG.value, _TOPOLOGY.value, _NUM_SLICES.value, _SEQ_LENS.value, _SCALE.value)
  except ConfigError as e:
    print(str(e), file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(run(sys.argv))
