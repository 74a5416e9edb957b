"""grain pipelines: documents -> global shuffle by seed -> this host's documents -> pack into
rows of seq_len + 1 tokens -> batches for the model.

Packing modes (`data.packing`):
  concat  documents joined (each ends with EOS) and cut into rows; attention runs across
          document boundaries, as in most pretraining. No padding.
  pack    whole documents first-fit packed into rows (grain's FirstFitPackIterDataset), with
          `segment_ids` and `positions` so attention and RoPE stay inside each document; a
          document longer than a row is split into row-sized pieces, never truncated.

Determinism: the document order depends only on `seed` (re-shuffled every epoch); host p of P takes
every P-th document of that order, so hosts read disjoint documents whose union is the dataset. The
iterator's state (where each host is) goes into every checkpoint; restoring it yields exactly the
batches an uninterrupted run would have read.
"""
from typing import Any

import grain
import numpy as np
from grain.experimental import FirstFitPackIterDataset, FlatMapTransform, ThreadPrefetchIterDataset

from configs import ConfigError


def documents(sources, split: str, seed: int, shuffle: bool = True) -> grain.MapDataset:
  """Infinite MapDataset of EOS-terminated token arrays, re-shuffled each epoch, mixed by weight."""
  parts = []
  for i, (source, _) in enumerate(sources):
    records = source.splits[split]
    if len(records) == 0:
      raise ConfigError("data.source", source.name, f"its {split} split is empty")
    ds = grain.MapDataset.source(records)
    if shuffle:
      ds = ds.shuffle(seed=seed + 1000 * i)
    parts.append(ds.repeat(None).map(source.to_tokens))
  if len(parts) == 1:
    return parts[0]
  return grain.MapDataset.mix(parts, [w for _, w in sources])


class ConcatSplitIterDataset(grain.IterDataset):
  """Concatenates token arrays and cuts rows of exactly `length` tokens (no padding).

  grain's ConcatThenSplitIterDataset pads a row whenever a long document passes through, which
  wastes much of each batch at long context; this one never pads. Its state is the parent's state
  before the document in progress plus the offset into it, so restoring reads nothing twice.
  """

  def __init__(self, parent: grain.IterDataset, length: int):
    super().__init__(parent)
    self.length = length

  def __iter__(self):
    return _ConcatSplitIterator(self._parent.__iter__(), self.length)


class _ConcatSplitIterator(grain.DatasetIterator):
  def __init__(self, parent, length: int):
    super().__init__(parent)
    self._length = length
    self._doc, self._offset = np.zeros(0, np.int32), 0
    self._doc_state = parent.get_state()        # parent state just before self._doc was read

  def __next__(self):
    pieces, needed = [], self._length
    while needed:
      if self._offset == len(self._doc):
        self._doc_state = self._parent.get_state()
        self._doc, self._offset = next(self._parent), 0
      take = min(needed, len(self._doc) - self._offset)
      pieces.append(self._doc[self._offset:self._offset + take])
      self._offset += take
      needed -= take
    return {"tokens": np.concatenate(pieces)}

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._doc_state, "offset": self._offset, "doc_len": len(self._doc)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._doc_state = state["parent"]
    self._doc = next(self._parent) if state["doc_len"] else np.zeros(0, np.int32)
    self._offset = state["offset"]


class _SplitLong(FlatMapTransform):
  """A document longer than a row becomes row-sized pieces (pack mode never truncates)."""

  def __init__(self, length: int):
    self.length = length

  def flat_map(self, tokens):
    return [{"tokens": tokens[i:i + self.length]} for i in range(0, len(tokens), self.length)]


def _model_inputs(batch: dict) -> dict:
  """Rows of seq_len + 1 tokens -> next-token inputs/targets (+ segment masks in pack mode)."""
  tokens = batch["tokens"]
  out = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  if "tokens_segment_ids" in batch:
    seg = batch["tokens_segment_ids"]
    out["segment_ids"] = seg[:, :-1]
    out["positions"] = batch["tokens_positions"][:, :-1]
    # A target counts when it continues the same document; padding (segment 0) never counts.
    out["weights"] = ((seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)).astype(np.float32)
  return out


def _rows(docs: grain.MapDataset, config, local_batch: int, read_threads: int, prefetch: int):
  it = docs.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
  row = config.seq_len + 1
  if config.data.packing == "concat":
    it = ConcatSplitIterDataset(it, row)
  else:
    it = grain.experimental.FlatMapIterDataset(it, _SplitLong(row))
    it = FirstFitPackIterDataset(it, length_struct={"tokens": row}, num_packing_bins=config.data.pack_bins,
                                 seed=config.seed, shuffle_bins=True)
  return it.batch(local_batch, drop_remainder=True).map(_model_inputs)


def _local_batch(config, process_count: int) -> int:
  if config.batch_size % process_count:
    raise ConfigError("batch_size", config.batch_size,
                      f"must be divisible by the number of hosts ({process_count})")
  return config.batch_size // process_count


def host_documents(config, sources, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """This host's share of the shuffled training documents."""
  return documents(sources, "train", config.seed)[process_index::process_count]


def train_iterator(config, sources, process_index: int = 0, process_count: int = 1):
  """Infinite iterator of this host's batches; `get_state`/`set_state` for checkpoints."""
  docs = host_documents(config, sources, process_index, process_count)
  rows = _rows(docs, config, _local_batch(config, process_count), config.data.num_threads, config.data.prefetch)
  return iter(ThreadPrefetchIterDataset(rows, prefetch_buffer_size=config.data.prefetch))


def eval_batches(config, sources, process_index: int = 0, process_count: int = 1) -> list[dict]:
  """A fixed evaluation set: the first `eval_batches` batches of the validation documents, in order."""
  docs = documents(sources, "validation", config.seed, shuffle=False)[process_index::process_count]
  it = iter(_rows(docs, config, _local_batch(config, process_count), 1, 1))
  return [next(it) for _ in range(config.eval_batches)]


def epoch(iterator, sources, process_count: int = 1) -> float | None:
  """Epochs of training documents this host has consumed (single source only)."""
  if len(sources) != 1:
    return None
  consumed = _find(iterator.get_state(), "next_index")
  docs_per_host = len(sources[0][0].splits["train"]) / process_count
  return None if consumed is None else consumed / docs_per_host


def _find(state, key):
  if isinstance(state, dict):
    if key in state:
      return state[key]
    for value in state.values():
      found = _find(value, key)
      if found is not None:
        return found
  return None

