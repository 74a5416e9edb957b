"""Check a config once at start-up; a bad value stops the run with one line that names the field,
the value and what is allowed (train.py turns ConfigError into exit code 2, no traceback)."""
import dataclasses
import math
import os
import uuid

import jax.numpy as jnp
from etils import epath

import kernels
from configs import ConfigError, hf
from data import sources
from evaluation import passkey
from kernels import IMPLS, PALLAS_MODES, dense, options_from_config, resolve_impl
from kernels import dsa as dsa_kernels
from kernels import nsa as nsa_kernels
from model.attention import ATTENTION_KINDS
from model.layers import ROPE_SCALINGS
from model.transformer import REMAT_POLICIES
from parallel.mesh import MESH_AXES, mesh_shape
from parallel.rules import SHARDED_DIMS


def _get(config, field: str):
  node = config
  for part in field.split("."):
    node = node[part]
  return node


def _positive(config, *fields):
  for f in fields:
    v = _get(config, f)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
      raise ConfigError(f, v, "must be a positive number")


def _choice(config, field, allowed):
  v = _get(config, field)
  if v not in allowed:
    raise ConfigError(field, v, f"allowed values are {', '.join(map(str, allowed))}")


def _dtype(config, field, allowed=("float32", "bfloat16", "float16")):
  _choice(config, field, allowed)
  return jnp.dtype(_get(config, field))


def validate(config, num_devices: int | None = None, num_slices: int = 1) -> None:
  """Raises ConfigError on the first bad value. `num_devices` (over `num_slices` slices) enables
  the mesh checks."""
  _positive(config, "steps", "batch_size", "seq_len", "log_every", "checkpoint_every",
            "keep_checkpoints", "eval_batches")
  _require(
      ("profile.start_step", config.profile.start_step, config.profile.start_step >= 0,
       "must be >= 0 (0: no profile)"),
      ("profile.num_steps", config.profile.num_steps, config.profile.num_steps >= 1, "must be >= 1"),
  )
  if config.eval_every < 0:
    raise ConfigError("eval_every", config.eval_every, "must be >= 0 (0 disables evaluation)")
  _validate_passkey(config)

  if hf_dir := hf.init_dir(config.init_from):
    hf.read(hf_dir)       # a directory with a readable config.json (resolve() read it already)
    if config.attention.kind not in ("dense", "nsa"):
      raise ConfigError("attention.kind", config.attention.kind,
                        "must be dense or nsa to start from a Hugging Face model (init_from=hf:DIR)")
  m = config.model
  _positive(config, "model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads",
            "model.n_kv_heads", "model.head_dim", "model.mlp_dim", "model.rope_theta", "model.norm_eps")
  if m.n_heads % m.n_kv_heads:
    raise ConfigError("model.n_heads", m.n_heads,
                      f"must be a multiple of model.n_kv_heads={m.n_kv_heads} (GQA groups)")
  if m.head_dim % 2:
    raise ConfigError("model.head_dim", m.head_dim, "must be even (RoPE rotates pairs)")
  _dtype(config, "model.dtype")
  _dtype(config, "model.param_dtype", ("float32", "bfloat16"))
  _choice(config, "model.remat", ("none", *REMAT_POLICIES))
  _choice(config, "model.rope_scaling.type", ROPE_SCALINGS)
  if m.rope_scaling.type != "none":
    _positive(config, "model.rope_scaling.factor", "model.rope_scaling.original_max_len")
    if m.rope_scaling.type == "llama3" and not 0 < m.rope_scaling.low_freq_factor < m.rope_scaling.high_freq_factor:
      raise ConfigError("model.rope_scaling.low_freq_factor", m.rope_scaling.low_freq_factor,
                        f"must be > 0 and < model.rope_scaling.high_freq_factor={m.rope_scaling.high_freq_factor}")
  if m.tied_unembed_scale < 0:
    raise ConfigError("model.tied_unembed_scale", m.tied_unembed_scale, "must be >= 0 (0: d_model ** -0.5)")
  for field in ("qkv_bias", "qk_norm"):
    if m[field] and config.attention.kind not in ("dense", "nsa"):
      raise ConfigError(f"model.{field}", True, f"is for attention.kind dense or nsa, not {config.attention.kind!r}")

  _choice(config, "attention.kind", tuple(ATTENTION_KINDS))
  _choice(config, "attention.impl", IMPLS)
  _choice(config, "kernels.pallas_mode", PALLAS_MODES)
  _choice(config, "kernels.dsa_dkv", kernels.DSA_DKV)
  _choice(config, "kernels.dsa_tile_rows", (128, 256))
  _choice(config, "kernels.dsa_gather", kernels.DSA_GATHERS)
  _choice(config, "kernels.dsa_indexer_dtype", kernels.DSA_INDEXER_DTYPES)
  _positive(config, *(f"kernels.{f.name}" for f in dataclasses.fields(kernels.KernelOptions)
                       if f.type is int and f.name != "matmul_keys"))
  _require(("kernels.matmul_keys", config.kernels.matmul_keys,
            _is_int(config.kernels.matmul_keys) and config.kernels.matmul_keys >= 0,
            "must be 0 (the MXU's width) or a positive number of keys"),
           ("kernels.step_rows", config.kernels.step_rows, config.kernels.step_rows % 128 == 0,
            "must be a multiple of 128 (whole 128-row tiles)"))
  _require(("kernels.topk_recall", config.kernels.topk_recall, 0 < config.kernels.topk_recall <= 1,
            "must be in (0, 1] (1: DSA's exact top-k)"))
  pallas = resolve_impl(config.attention.impl, options_from_config(config)) == "pallas"
  if pallas:
    _kernel_shapes(config)

  if config.attention.kind == "nsa":
    _validate_nsa(config)
  if config.attention.kind in ("mla", "dsa"):
    _validate_mla(config)
  if config.attention.kind == "dsa":
    _validate_dsa(config)

  o = config.optimizer
  _positive(config, "optimizer.lr")
  _require(
      ("optimizer.warmup_steps", o.warmup_steps, 0 <= o.warmup_steps <= config.steps,
       f"must be between 0 and steps={config.steps}"),
      ("optimizer.min_lr_ratio", o.min_lr_ratio, 0 <= o.min_lr_ratio <= 1, "must be in [0, 1]"),
      ("optimizer.b1", o.b1, 0 <= o.b1 < 1, "must be in [0, 1)"),
      ("optimizer.b2", o.b2, 0 <= o.b2 < 1, "must be in [0, 1)"),
      ("optimizer.weight_decay", o.weight_decay, o.weight_decay >= 0, "must be >= 0"),
      ("optimizer.grad_clip", o.grad_clip, o.grad_clip >= 0, "must be >= 0 (0 disables clipping)"),
      ("optimizer.max_skipped_steps", o.max_skipped_steps, _is_int(o.max_skipped_steps) and o.max_skipped_steps >= 1,
       "must be an integer >= 1 (non-finite steps in a row, each skipped, before the run stops)"),
  )

  sources.synthetic_tasks(config)                  # synthetic:TASK names, data.synthetic's fields, its filler
  for spec, _ in sources.source_specs(config):     # also checks data.mixture's syntax
    if not sources.exists(spec):
      raise ConfigError(sources.source_field(config), spec, "must be 'embedded', 'tfds:NAME', 'synthetic:TASK' "
                        "or a directory written by scripts/prepare_data.py")
  _choice(config, "data.packing", ("concat", "pack"))
  _positive(config, "data.num_threads", "data.prefetch", "data.pack_bins")
  if not isinstance(config.data.max_docs_per_row, int) or config.data.max_docs_per_row < 0:
    raise ConfigError("data.max_docs_per_row", config.data.max_docs_per_row,
                      "must be an integer >= 1, or 0 (auto: a limit for NSA only)")
  _choice(config, "wandb.mode", ("offline", "online", "disabled"))
  if config.init_from and not hf.init_dir(config.init_from) and not epath.Path(config.init_from).is_dir():
    raise ConfigError("init_from", config.init_from,
                      "must be a checkpoint directory, a run's workdir or hf:DIR (a Hugging Face model)")

  if num_devices is not None:
    _validate_mesh(config, num_devices, num_slices)


def _require(*rules) -> None:
  """rules: (field, value, ok, allowed); the first one not ok raises its ConfigError."""
  for field, value, ok, allowed in rules:
    if not ok:
      raise ConfigError(field, value, allowed)


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _validate_passkey(config) -> None:
  _require(
      ("eval.passkey", config.eval.passkey, isinstance(config.eval.passkey, bool), "must be True or False"),
      ("eval.passkey_trials", config.eval.passkey_trials,
       _is_int(config.eval.passkey_trials) and config.eval.passkey_trials >= 1,
       "must be an integer >= 1 (keys per depth x length)"),
  )
  if config.eval.retrieval:
    _require(
        ("eval.retrieval", True, config.eval_every > 0, "runs at eval steps: needs eval_every > 0"),
        ("eval.retrieval", True, bool(sources.synthetic_tasks(config)),
         "needs a synthetic task among the data (data.source or data.mixture synthetic:mqar / synthetic:passkey)"),
        ("eval.retrieval_window", config.eval.retrieval_window,
         _is_int(config.eval.retrieval_window) and config.eval.retrieval_window >= 0,
         "must be an integer >= 0 (0: nsa.window, or dsa.index_topk for DSA)"),
    )
  if config.eval.passkey:
    _require(
        ("eval.passkey", True, config.eval_every > 0, "runs at eval steps: needs eval_every > 0"),
        ("eval.passkey", True, bool(config.data.tokenizer), "needs data.tokenizer (the prompts are text)"),
        ("seq_len", config.seq_len, config.seq_len >= passkey.MIN_PASSKEY_LENGTH,
         f"must be >= {passkey.MIN_PASSKEY_LENGTH} with eval.passkey (room for the needle, question and answer)"),
    )


def passkey_lengths(config, num_devices: int, num_slices: int = 1) -> list[int]:
  """eval.passkey's prompt lengths: passkey.default_lengths (256, 1k, 4k, ... up to seq_len)
  that this config also accepts as its seq_len (Pallas tiles, NSA blocks, context-parallel
  chunks, the passkey minimum); seq_len itself always is one."""
  lengths = []
  for n in passkey.default_lengths(config.seq_len):
    shorter = config.copy_and_resolve_references()
    shorter.seq_len = n
    try:
      validate(shorter, num_devices, num_slices)
    except ConfigError:
      continue
    lengths.append(n)
  return lengths


def _validate_nsa(config) -> None:
  c = config.nsa
  _positive(config, "nsa.cmp_block", "nsa.cmp_stride", "nsa.slc_block", "nsa.num_selected",
            "nsa.window")
  _require(
      ("nsa.num_initial", c.num_initial, c.num_initial >= 0, "must be >= 0"),
      ("nsa.num_local", c.num_local, c.num_local >= 0, "must be >= 0"),
      ("nsa.cmp_block", c.cmp_block, c.cmp_block % c.cmp_stride == 0,
       f"must be a multiple of nsa.cmp_stride={c.cmp_stride} (d | l)"),
      ("nsa.slc_block", c.slc_block, c.slc_block % c.cmp_stride == 0,
       f"must be a multiple of nsa.cmp_stride={c.cmp_stride} (d | l')"),
      ("nsa.cmp_block", c.cmp_block, c.cmp_block <= c.slc_block,
       f"must be <= nsa.slc_block={c.slc_block} (l <= l')"),
      ("nsa.num_selected", c.num_selected, c.num_selected >= c.num_initial + c.num_local,
       f"must be >= nsa.num_initial + nsa.num_local = {c.num_initial + c.num_local} (forced blocks count)"),
      ("seq_len", config.seq_len, config.seq_len >= c.cmp_block,
       f"must be >= nsa.cmp_block={c.cmp_block}, or the compressed branch sees nothing"),
      ("nsa.branches", c.branches, isinstance(c.branches, str) and bool(c.branches)
       and set(c.branches.split("+")) <= {"cmp", "slc", "win"} and len(c.branches.split("+")) == len(set(c.branches.split("+"))),
       "must be a non-empty '+'-joined subset of cmp, slc, win (e.g. cmp+slc+win, win)"),
      ("nsa.initial_gates", c.initial_gates,
       len(c.initial_gates) == 3 and all(0 < g < 1 for g in c.initial_gates),
       "must be three values in (0, 1): the (cmp, slc, win) gates a model trained from scratch starts near"),
      ("nsa.converted_gates", c.converted_gates,
       len(c.converted_gates) == 3 and all(0 < g < 1 for g in c.converted_gates),
       "must be three values in (0, 1): the (cmp, slc, win) gates a dense model's conversion starts at"),
  )


# The kernels' own argument names (kernels.Unsupported.dim) -> the config fields behind them.
_KERNEL_DIMS = {"seq_len": "seq_len", "n_heads": "model.n_heads"}


def _kernel_shapes(config, context: int = 1) -> None:
  """The Pallas kernels' shape rules, from kernels/ (their check_supported), for this config: on
  each device's query chunks of seq_len / (2 x context) under context parallelism."""
  m, kind = config.model, config.attention.kind
  seq_len = config.seq_len if context == 1 else config.seq_len // (2 * context)
  try:
    if kind in ("dense", "mla") or (kind == "dsa" and config.dsa.stage == "dense_warmup"):
      dense.check_supported(seq_len=seq_len)
    elif kind == "dsa":
      dsa_kernels.check_supported(n_heads=m.n_heads)
    elif kind == "nsa":
      nsa_kernels.check_supported(seq_len=seq_len, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
                                  slc_block=config.nsa.slc_block)
  except kernels.Unsupported as e:
    if context > 1 and e.dim == "seq_len":
      raise ConfigError("mesh.context", context, f"the query chunks seq_len / (2 x mesh.context) = {seq_len}: "
                        f"{e.allowed} ({kind} attention on Pallas kernels)") from None
    raise ConfigError(_KERNEL_DIMS[e.dim], e.value, f"{e.allowed} ({kind} attention on Pallas kernels)") from None


def _validate_mla(config) -> None:
  a = config.mla
  _positive(config, "mla.q_lora_rank", "mla.kv_lora_rank", "mla.qk_nope_dim", "mla.qk_rope_dim",
            "mla.v_head_dim")
  if a.qk_rope_dim % 2:
    raise ConfigError("mla.qk_rope_dim", a.qk_rope_dim, "must be even (RoPE rotates pairs)")


def _validate_dsa(config) -> None:
  c = config.dsa
  _choice(config, "dsa.stage", ("dense_warmup", "sparse"))
  _choice(config, "dsa.selector", ("indexer", "local"))
  if c.selector == "local" and c.stage != "sparse":
    raise ConfigError("dsa.selector", c.selector, "local has no indexer to warm up: use it with dsa.stage=sparse")
  _positive(config, "dsa.index_heads", "dsa.index_head_dim", "dsa.index_topk")
  _require(
      ("dsa.index_head_dim", c.index_head_dim, c.index_head_dim >= config.mla.qk_rope_dim,
       f"must be >= mla.qk_rope_dim={config.mla.qk_rope_dim} (RoPE on its first qk_rope_dim dims)"),
      ("dsa.indexer_loss_coef", c.indexer_loss_coef, c.indexer_loss_coef >= 0, "must be >= 0"),
  )


def _validate_mesh(config, num_devices: int, num_slices: int) -> None:
  raw = {a: config.mesh[a] for a in MESH_AXES}
  for a, s in raw.items():
    if not isinstance(s, int) or (s < 1 and s != -1):
      raise ConfigError(f"mesh.{a}", s, "must be a positive integer or -1 (fill with the devices left)")
  if sum(s == -1 for s in raw.values()) > 1:
    raise ConfigError("mesh", dict(raw), "at most one axis may be -1")
  sizes = mesh_shape(config.mesh, num_devices, num_slices)
  if sizes["data"] % num_slices:
    raise ConfigError("mesh.data", raw["data"], f"must be a multiple of the {num_slices} slices (the data axis spans "
                      "them over DCN; 1 means one replica per slice)")
  if any(s == -1 for s in sizes.values()) or math.prod(sizes.values()) != num_devices:
    raise ConfigError("mesh", dict(raw), f"the axis sizes must multiply to the {num_devices} devices")
  for axis, fields in SHARDED_DIMS.items():
    for f in fields:
      if _get(config, f) % sizes[axis]:
        raise ConfigError(f, _get(config, f), f"must be divisible by mesh.{axis}={sizes[axis]}")
  data_parallel = sizes["data"] * sizes["fsdp"]
  if config.batch_size % data_parallel:
    raise ConfigError("batch_size", config.batch_size,
                      f"must be divisible by mesh.data x mesh.fsdp = {data_parallel}")
  if sizes["context"] > 1:
    _validate_context(config, sizes["context"])


def _validate_context(config, context: int) -> None:
  """Context parallelism: the sequence splits into 2 x context chunks (the load-balanced layout),
  and each chunk must hold whole blocks of what the attention kind tiles."""
  if config.seq_len % (2 * context):
    raise ConfigError("seq_len", config.seq_len, f"must be divisible by 2 x mesh.context = {2 * context} "
                      "(context parallelism splits the sequence into 2 x context chunks)")
  chunk = config.seq_len // (2 * context)
  if config.attention.kind in ("nsa", "dsa") and config.data.packing == "pack":
    raise ConfigError("data.packing", "pack", f"{config.attention.kind} attention masks packed documents without "
                      "context parallelism only: use concat, or mesh.context=1")
  if config.attention.kind == "nsa" and chunk % config.nsa.slc_block:
    raise ConfigError("mesh.context", context, f"seq_len / (2 x mesh.context) = {chunk} must be a multiple of "
                      f"nsa.slc_block={config.nsa.slc_block} (each chunk holds whole selection blocks)")
  if resolve_impl(config.attention.impl, options_from_config(config)) == "pallas":
    _kernel_shapes(config, context)


def validate_workdir(workdir: str) -> None:
  """The workdir (local, or remote such as gs://bucket/run) exists or can be made, and takes files."""
  probe = epath.Path(workdir) / f".write_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
  try:
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise ConfigError("workdir", workdir, f"must be a writable directory ({e.strerror or e})") from None
