"""How should NSA's new parameters start when a dense model becomes NSA? Eval loss at step 0.

  python scripts/nsa_start_study.py --workdir runs/dense [--seq-len 1024] [--eval-batches 4] \
      [--config.nsa.window=256 ...]

Reads a dense run's newest checkpoint, makes it NSA (the --config.nsa.* fields apply) and prints a
markdown table of the validation loss before any training step, for:
- dense: the dense model itself at this length (the target);
- NSA: compression MLPs random (their ordinary initialisation) or mean pooling, times gates
  random (the ordinary initialisation: 0.5 + a random function of x) or constant at
  (cmp, slc, win), model/convert.py's start.
The default nsa.converted_gates is the choice this table supports (docs/continue.md).
"""
import sys

from absl import flags
from ml_collections import config_flags

from configs import ConfigError, parse_flags

_OVERRIDES = config_flags.DEFINE_config_dict("config", __import__("configs.base", fromlist=["x"]).get_config(),
                                             "NSA fields to apply (--config.nsa.window=256, ...)")
_WORKDIR = flags.DEFINE_string("workdir", None, "the dense run")
_SEQ_LEN = flags.DEFINE_integer("seq-len", None, "evaluated length (default: the run's seq_len)")
_EVAL_BATCHES = flags.DEFINE_integer("eval-batches", 4, "validation batches")
GATES = ((0.5, 0.5, 0.5), (0.1, 0.1, 0.9), (0.02, 0.02, 0.98), (0.1, 0.5, 0.5), (0.1, 0.9, 0.1))


def main(workdir: str) -> int:
  import jax
  import numpy as np
  from flax import linen as nn

  from data import pipeline, sources
  from model import convert, transformer
  from trainer import checkpoint, steps

  directory = checkpoint.checkpoint_dir(workdir)
  dense_config, _ = checkpoint.saved_config(directory)
  if dense_config.attention.kind != "dense":
    raise ConfigError("workdir", workdir, "must be a dense run")
  dense_config.update(seq_len=_SEQ_LEN.value or dense_config.seq_len, eval_batches=_EVAL_BATCHES.value)
  nsa_config = dense_config.copy_and_resolve_references()
  nsa_config.attention.kind = "nsa"
  nsa_config.nsa.update(_OVERRIDES.value.nsa.to_dict())
  batches = pipeline.eval_batches(dense_config, sources.open_sources(dense_config))

  def eval_loss(config, params) -> float:
    model = transformer.build(config)
    loss = jax.jit(lambda p, b: steps.batch_loss(model, p, b)[1]["loss"])
    return float(np.mean([loss(params, b) for b in batches]))

  def load(config):
    model = transformer.build(config)
    tokens = np.zeros((1, config.seq_len), np.int32)
    fresh_params = nn.unbox(model.init(jax.random.key(config.seed), tokens))["params"]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), fresh_params)
    params, _, fresh = checkpoint.load_params(str(directory), abstract, alias=convert.alias)
    return jax.tree.map(lambda new, old: old if new is None else new, params, fresh_params,
                        is_leaf=lambda x: x is None), fresh

  rows = [("dense", "", eval_loss(dense_config, load(dense_config)[0]))]
  params, fresh = load(nsa_config)
  new_compression = [n for n in fresh if "compress_" in n]
  new_gates = [n for n in fresh if "/gate/" in n]
  for compression in ("random", "mean-pool"):
    for gates in ("random", *GATES):
      names = (new_compression if compression == "mean-pool" else []) + (new_gates if gates != "random" else [])
      if gates != "random":
        nsa_config.nsa.converted_gates = gates
      started, _ = convert.start_nsa_from_dense(params, names, nsa_config)
      rows.append((compression, "random (0.5 +- x W)" if gates == "random" else str(gates), eval_loss(nsa_config, started)))
      print(f"  {rows[-1]}", file=sys.stderr, flush=True)
  recalls = []
  nsa_config.nsa.converted_gates = (0.1, 0.1, 0.9)
  for compression in ("random", "mean-pool"):
    names = (new_compression if compression == "mean-pool" else []) + new_gates
    started, _ = convert.start_nsa_from_dense(params, names, nsa_config)
    recalls.append((compression, far_recall(nsa_config, started, batches[0]["inputs"][:2])))
  n = nsa_config.nsa
  print(f"eval loss before training at seq_len {dense_config.seq_len} ({dense_config.eval_batches} x "
        f"{dense_config.batch_size} validation rows), NSA window {n.window}, {n.num_selected} x {n.slc_block} "
        f"selected, cmp {n.cmp_block}/{n.cmp_stride}; from {workdir}\n")
  print("| compression | gates (cmp, slc, win) | eval loss | vs dense |\n|---|---|---:|---:|")
  for compression, gates, loss in rows:
    print(f"| {compression} | {gates} | {loss:.4f} | {loss - rows[0][2]:+.4f} |")
  print(f"\nThe selection at the start: the share of the dense model's attention to keys beyond the window "
        f"(t - s >= {n.window}) that falls in the {n.num_selected} selected blocks, per layer (2 rows, every "
        f"head; gates {nsa_config.nsa.converted_gates})\n")
  print("| compression | " + " | ".join(f"layer {i}" for i in range(len(recalls[0][1]))) + " |\n|---|"
        + "---:|" * len(recalls[0][1]))
  for compression, per_layer in recalls:
    print(f"| {compression} | " + " | ".join(f"{r:.3f}" for r in per_layer) + " |")
  return 0


def far_recall(config, params, tokens) -> list[float]:
  """Per layer: of the attention mass softmax(q k / sqrt(D)) that queries give keys at least
  nsa.window back, the share inside the blocks NSA selected (q, keys and blocks as the layer
  sowed them)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from model import transformer
  _, sown = transformer.build(config).apply({"params": params}, tokens, mutable=["intermediates"])
  seen = sown["intermediates"]["layers"]["attn"]
  q, k, blocks = (np.asarray(seen[name][0], np.float32) if name != "block_indices" else np.asarray(seen[name][0])
                  for name in ("selection_q", "selection_k", "block_indices"))   # [L, B, T, H(KV), ...]
  c = config.nsa
  t = q.shape[2]
  group = q.shape[3] // k.shape[3]
  distance = np.arange(t)[:, None] - np.arange(t)[None, :]
  far = distance >= c.window
  out = []
  for layer in range(q.shape[0]):
    k_heads = np.repeat(k[layer], group, axis=2)                                   # [B, T, H, D]
    logits = jnp.einsum("bthd,bshd->bhts", q[layer], k_heads) / np.sqrt(q.shape[-1])
    p = np.asarray(jax.nn.softmax(jnp.where(distance >= 0, logits, -jnp.inf), axis=-1))   # [B, H, T, S]
    chosen = np.zeros((*blocks.shape[1:4], t // c.slc_block + 1), bool)             # [B, T, HKV, blocks]
    b, tt, hh, slot = np.nonzero(blocks[layer] >= 0)
    chosen[b, tt, hh, blocks[layer][b, tt, hh, slot]] = True
    in_block = np.repeat(chosen, group, axis=2)[..., np.arange(t) // c.slc_block]   # [B, T, H, S]
    in_block = in_block.transpose(0, 2, 1, 3)
    out.append(float((p * in_block * far).sum() / (p * far).sum()))
  return out


def run(argv) -> int:
  if error := parse_flags(argv):
    print(error, file=sys.stderr)
    return 2
  if not _WORKDIR.value:
    print("error: --workdir is required, e.g. python scripts/nsa_start_study.py --workdir runs/dense", file=sys.stderr)
    return 2
  try:
    return main(_WORKDIR.value)
  except ConfigError as e:
    print(str(e), file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(run(sys.argv))
