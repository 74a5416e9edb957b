"""Eval loss by position: how well a model predicts token t+1 at each depth of a long context.

Positions fall in buckets [0, 256), [256, 1k), [1k, 4k), ... each 4x the last, up to seq_len. The
loss reads the validation rows in their fixed order, so the numbers are deterministic.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from parallel.mesh import batch_sharding
from parallel.rules import use_mesh

FIRST_EDGE = 256            # buckets [0, 256), [256, 1k), [1k, 4k), [4k, 16k), ... each 4x the last


def bucket_edges(seq_len: int) -> list[int]:
  """[0, 256, 1024, 4096, ..., seq_len]: bucket i holds positions [edges[i], edges[i+1])."""
  edges, edge = [0], FIRST_EDGE
  while edge < seq_len:
    edges.append(edge)
    edge *= 4
  return edges + [seq_len]


def short(n: int) -> str:
  """1024 -> '1k', 1536 -> '1536' (table labels)."""
  return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def token_losses(logits_BTV, targets_BT):
  """Per-token next-token cross-entropy in float32 [B, T] (the train step's loss before its mean)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)


def loss_by_position(losses_BT, positions_BT, weights_BT, edges) -> list[dict]:
  """[{lo, hi, loss, tokens}] per bucket: the weighted mean loss of the predictions made at
  positions [lo, hi) (the input's position: a prediction there saw position + 1 tokens of its
  document or row). Targets of weight 0 (padding, cross-document in pack mode) do not count."""
  losses, positions, weights = (np.asarray(x, np.float64).ravel() for x in (losses_BT, positions_BT, weights_BT))
  bucket = np.searchsorted(edges, positions, side="right") - 1
  keep = (weights > 0) & (bucket >= 0) & (bucket < len(edges) - 1)
  n = len(edges) - 1
  sums = np.bincount(bucket[keep], weights=(losses * weights)[keep], minlength=n)
  counts = np.bincount(bucket[keep], weights=weights[keep], minlength=n)
  return [{"lo": int(edges[i]), "hi": int(edges[i + 1]), "tokens": int(counts[i]),
           "loss": float(sums[i] / counts[i]) if counts[i] else float("nan")} for i in range(n)]


def batch_token_losses(batch: dict, losses_fn) -> tuple:
  """(losses, positions, weights) [B, T] of one eval batch, positions and weights filled in for
  concat rows (position = index in the row, every target counts)."""
  inputs = np.asarray(batch["inputs"])
  positions = batch.get("positions")
  if positions is None:
    positions = np.broadcast_to(np.arange(inputs.shape[1]), inputs.shape)
  weights = batch.get("weights")
  if weights is None:
    weights = np.ones(inputs.shape, np.float32)
  return np.asarray(losses_fn(batch)), np.asarray(positions), np.asarray(weights)


def jit_token_losses(model, mesh):
  """jit(params, batch) -> per-token losses [B, T] (positions and segments as the batch says)."""
  def losses(params, batch):
    logits = model.apply({"params": params}, batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
    return token_losses(logits, batch["targets"])
  fn = jax.jit(losses, in_shardings=(None, batch_sharding(mesh)))
  def apply(params, batch):
    with use_mesh(mesh):
      return fn(params, batch)
  return apply
