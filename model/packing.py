"""Packed documents in the sparse layers: where each query's document starts, and the block-aligned
row NSA runs on.

A packed row holds whole documents one after another (segment ids > 0, one per document, positions
restarting at 0) and padding (segment 0). Every document must get exactly what it would get alone
in its own row, so each query's keys, compressed tokens and blocks must come from its own
document: the kernels take `doc_start` [B, T] (kernels/nsa/, kernels/dsa/), the row index of
the query's document's first token (a padding token's is its own index: it sees only itself, and
the layers zero its output).

NSA's blocks are the hard part: compressed tokens start every d tokens and selection blocks every
l' tokens *from the document's start*, while the tiled kernels use blocks of the row. So the NSA
layer re-lays each row (`AlignedRows`): every run of equal segment ids moves to the next multiple
of l' in a row of T' = T + max_docs * (l' - 1) tokens (rounded up to whole 128-token tiles), the
layer runs there with doc_start, and the outputs are gathered back. l' is a multiple of d, so the
document's compressed tokens and blocks are the row's. The cost: T'/T more work for every
projection and branch, and two gathers of [B, T, D]. max_docs is static (shapes are), and the data
pipeline packs at most that many documents per row (`data.max_docs_per_row`); tokens of a row
with more documents than that do not fit and come back as NaN, loudly.
"""
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

TILE = 128     # the kernels' query tiles: T' is a whole number of them


def run_starts(segment_ids_BT):
  """int32 [B, T]: the index of the first token of each token's run of equal segment ids."""
  t = jnp.arange(segment_ids_BT.shape[1], dtype=jnp.int32)
  boundary = jnp.concatenate([jnp.ones_like(segment_ids_BT[:, :1], bool),
                              segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
  return jax.lax.cummax(jnp.where(boundary, t, 0), axis=1)


def doc_starts(segment_ids_BT):
  """int32 [B, T]: where each token's document starts; padding (segment 0): the token itself."""
  t = jnp.arange(segment_ids_BT.shape[1], dtype=jnp.int32)
  return jnp.where(segment_ids_BT > 0, run_starts(segment_ids_BT), t)


def aligned_length(seq_len: int, block: int, max_docs: int) -> int:
  """T' of AlignedRows: room for max_docs documents each moved up to the next block boundary."""
  return -(-(seq_len + max_docs * (block - 1)) // math.lcm(block, TILE)) * math.lcm(block, TILE)


class AlignedRows(NamedTuple):
  """A row layout in which every run of equal segment ids starts on a multiple of `block`."""
  dest: jax.Array          # int32 [B, T]: where token t sits in the aligned row
  doc_start: jax.Array     # int32 [B, T']: doc_starts in the aligned row (inserted slots: padding)
  length: int              # T'

  @classmethod
  def build(cls, segment_ids_BT, *, block: int, max_docs: int) -> "AlignedRows":
    b, t = segment_ids_BT.shape
    length = aligned_length(t, block, max_docs)
    idx = jnp.arange(t, dtype=jnp.int32)
    start = run_starts(segment_ids_BT)
    # At a run's first token, the run before it is padded up to whole blocks.
    previous = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), start[:, :-1]], axis=1)
    gap = jnp.where((start == idx) & (idx > 0), (previous - idx) % block, 0)
    dest = idx + jnp.cumsum(gap, axis=1, dtype=jnp.int32)
    own_start = jnp.where(segment_ids_BT > 0, dest - (idx - start), dest)
    doc_start = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    doc_start = jax.vmap(lambda d, i, v: d.at[i].set(v, mode="drop"))(doc_start, dest, own_start)
    return cls(dest, doc_start, length)

  def scatter(self, x_BT):
    """x [B, T, ...] -> [B, T', ...] in the aligned row (zeros in the inserted slots)."""
    out = jnp.zeros((x_BT.shape[0], self.length, *x_BT.shape[2:]), x_BT.dtype)
    return jax.vmap(lambda o, i, v: o.at[i].set(v, mode="drop"))(out, self.dest, x_BT)

  def gather(self, y_BT):
    """y [B, T', ...] -> [B, T, ...]: each token's value back from its aligned slot (NaN for a
    token that did not fit: more documents in the row than max_docs)."""
    fill = jnp.nan if jnp.issubdtype(y_BT.dtype, jnp.floating) else 0
    return jax.vmap(lambda y, i: jnp.take(y, i, axis=0, mode="fill", fill_value=fill))(y_BT, self.dest)
