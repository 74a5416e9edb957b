"""Dense -> NSA: the starting values of the parameters NSA adds to a dense model (docs/continue.md).

A dense checkpoint (Hugging Face or ours) gives NSA its q/k/v/o, norms and MLPs; `alias` makes
the separate K/V of `nsa.separate_kv` start as copies of the dense k/v. What NSA adds starts so
that the layer begins close to the dense one and every branch still gets gradients:
- compression MLPs as mean pooling: position embedding 0, fc1 = (c / l) I on each of the l
  tokens, fc2 = (2 / c) I, so phi(block) = (2 / c) silu(c mean) = mean + c mean^2 / 2 + ... ~ mean
  (c = COMPRESS_GAIN keeps the silu nearly linear without tiny weights);
- gates constant at nsa.converted_gates (cmp, slc, win): a zero gate kernel and the bias at their
  logits. The default leans on the sliding window, which is exact dense attention for the first
  `window` tokens.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np

from model import nsa

COMPRESS_GAIN = 0.1
_SEPARATE = re.compile(r"^(k|v|k_norm)_(cmp|slc|win)$")


def alias(names: tuple[str, ...]) -> tuple[str, ...]:
  """The dense parameter an NSA parameter starts from (k_cmp -> k, k_norm_win -> k_norm, ...)."""
  return tuple(_SEPARATE.sub(r"\1", n) for n in names)


def _start_value(name: str, shape, config):
  """The value of one new NSA parameter, or None when this module does not set it."""
  c = config.nsa
  if name.endswith("pos_emb"):
    return np.zeros(shape, np.float32)
  if re.search(r"compress_[kv]/fc1/kernel$", name):       # [..., l, D, D]
    return np.broadcast_to(np.eye(shape[-1], dtype=np.float32) * COMPRESS_GAIN / c.cmp_block, shape)
  if re.search(r"compress_[kv]/fc2/kernel$", name):       # [..., D, D]
    return np.broadcast_to(np.eye(shape[-1], dtype=np.float32) * 2 / COMPRESS_GAIN, shape)
  if name.endswith("gate/kernel"):
    return np.zeros(shape, np.float32)
  if name.endswith("gate/bias"):                          # [..., H, branches]
    gates = dict(zip(nsa.BRANCHES, c.converted_gates, strict=True))
    return np.broadcast_to(np.array([nsa.logit(gates[b]) for b in nsa.branches_of(c)], np.float32), shape)
  return None


def start_nsa_from_dense(params, fresh: list[str], config):
  """(params, notes): NSA's fresh parameters (their '/'-joined names in `fresh`) set to their
  dense-start values, on the sharding each already has; notes say what was set how, one line each.
  A no-op unless attention.kind is nsa (and from an NSA checkpoint nothing is fresh)."""
  if config.attention.kind != "nsa":
    return params, []
  notes, fresh_set = [], set(fresh)

  def start(path, leaf):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if name not in fresh_set:
      return leaf
    value = _start_value(name, leaf.shape, config)
    if value is None:
      return leaf
    notes.append(f"{name}: {_describe(name, config)}")
    return jax.device_put(jnp.asarray(value, leaf.dtype), leaf.sharding)

  return jax.tree_util.tree_map_with_path(start, params), notes


def _describe(name: str, config) -> str:
  if name.endswith("pos_emb"):
    return "zeros"
  if name.endswith("fc1/kernel"):
    return f"identity x {COMPRESS_GAIN}/{config.nsa.cmp_block} per token (mean pooling)"
  if name.endswith("fc2/kernel"):
    return f"identity x {2 / COMPRESS_GAIN:g} (undoes silu's slope 1/2 at 0)"
  if name.endswith("gate/kernel"):
    return "zeros (gates start constant)"
  return f"gates (cmp, slc, win) = {tuple(config.nsa.converted_gates)}"
