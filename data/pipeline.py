"""grain pipelines: documents -> global shuffle by seed -> one document stream per batch row ->
rows of seq_len + 1 tokens -> batches for the model.

Packing modes (`data.packing`):
  concat  documents joined (each ends with EOS) and cut into rows; attention runs across
          document boundaries, as in most pretraining. No padding.
  pack    whole documents first-fit packed into rows (grain's FirstFitPackIterDataset), with
          `segment_ids` and `positions` so attention and RoPE stay inside each document; a
          document longer than a row is split into row-sized pieces, never truncated.

Determinism (levanter's rule: what a global row holds depends only on the seed and the row's
index, never on the number of hosts): the document order depends only on `seed` (re-shuffled
every epoch). With B = batch_size, row r of every global batch comes from row stream r, which
reads documents r, r+B, r+2B, ... of that order and concatenates (or packs) them into rows on its
own. Host p of P builds only the streams of its rows, by default global rows [p*L, (p+1)*L) with
L = B/P (the rows jax.make_array_from_process_local_data takes from process p when devices are
ordered by process; `sharded_rows` gives them for any sharding). So hosts read disjoint documents
whose union is the dataset, and the global batches are the same for every P that divides B. A
host's streams share `data.num_threads` read threads (one row per task) and one prefetch thread of
`data.prefetch` batches. The iterator's state (each row stream's position) goes into every
checkpoint; restoring it yields exactly the batches an uninterrupted run would have read. A state
saved with another batch size resumes approximately: every row goes on after the furthest document
read.

Synthetic retrieval tasks (data/synthetic.py): when any source is synthetic, every document is a dict
of `tokens` and the per-token `scored` and `distance` (text documents: every token scored, distance
0), and these features travel with the tokens through joining, splitting and packing. The batches
then also hold `weights` (the targets' scored flags) and `distance` (the targets'). Without one,
documents, batches and iterator states are exactly those of plain token arrays.
"""
import copy
import logging
import sys
from concurrent import futures
from typing import Any

import grain
import numpy as np
from grain.experimental import FirstFitPackIterDataset, FlatMapTransform, ThreadPrefetchIterDataset

from configs import ConfigError, max_docs_per_row

FEATURES = ("scored", "distance")     # per-token features of synthetic documents (data/synthetic.py)


def with_features(sources) -> bool:
  """Whether documents carry `scored` and `distance`: when any source is synthetic, all do."""
  return any(source.synthetic for source, _ in sources)


def _text_document(to_tokens):
  """to_tokens -> a document whose every token is scored, with no distance (a text source mixed
  with synthetic ones)."""
  def to_document(record):
    tokens = to_tokens(record)
    return {"tokens": tokens, "scored": np.ones(len(tokens), np.uint8), "distance": np.zeros(len(tokens), np.int32)}
  return to_document


def documents(sources, split: str, seed: int, shuffle: bool = True) -> grain.MapDataset:
  """Infinite MapDataset of EOS-terminated token arrays (with synthetic sources: dicts of tokens
  and features), re-shuffled each epoch, mixed by weight."""
  parts, features = [], with_features(sources)
  for i, (source, _) in enumerate(sources):
    records = source.splits[split]
    if len(records) == 0:
      raise ConfigError("data.source", source.name, f"its {split} split is empty")
    ds = grain.MapDataset.source(records)
    if shuffle:
      ds = ds.shuffle(seed=seed + 1000 * i)
    to_document = _text_document(source.to_tokens) if features and not source.synthetic else source.to_tokens
    parts.append(ds.repeat(None).map(to_document))
  if len(parts) == 1:
    return parts[0]
  return grain.MapDataset.mix(parts, [w for _, w in sources])


class ConcatSplitIterDataset(grain.IterDataset):
  """Concatenates token arrays (or dicts of per-token features) and cuts rows of exactly `length`
  tokens (no padding).

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
    self._doc, self._offset = _EMPTY, 0
    self._doc_state = parent.get_state()        # parent state just before self._doc was read

  def __next__(self):
    pieces, needed = [], self._length
    while needed:
      if self._offset == len(self._doc["tokens"]):
        self._doc_state = self._parent.get_state()
        self._doc, self._offset = _as_dict(next(self._parent)), 0
      take = min(needed, len(self._doc["tokens"]) - self._offset)
      pieces.append({k: v[self._offset:self._offset + take] for k, v in self._doc.items()})
      self._offset += take
      needed -= take
    return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[-1]}

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._doc_state, "offset": self._offset, "doc_len": len(self._doc["tokens"])}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._doc_state = state["parent"]
    self._doc = _as_dict(next(self._parent)) if state["doc_len"] else _EMPTY
    self._offset = state["offset"]


_EMPTY = {"tokens": np.zeros(0, np.int32)}


def _as_dict(document) -> dict:
  """A document as {feature: per-token array}: a token array is {"tokens": it}."""
  return document if isinstance(document, dict) else {"tokens": document}


class _SplitLong(FlatMapTransform):
  """A document longer than a row becomes row-sized pieces (pack mode never truncates)."""

  def __init__(self, length: int):
    self.length = length

  def flat_map(self, document):
    document = _as_dict(document)
    return [{k: v[i:i + self.length] for k, v in document.items()} for i in range(0, len(document["tokens"]), self.length)]


def _model_inputs(batch: dict) -> dict:
  """Rows of seq_len + 1 tokens -> next-token inputs/targets (+ segment masks in pack mode, + the
  targets' weights and distances with synthetic sources)."""
  tokens = batch["tokens"]
  out = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  if "tokens_segment_ids" in batch:
    seg = batch["tokens_segment_ids"]
    out["segment_ids"] = seg[:, :-1]
    out["positions"] = batch["tokens_positions"][:, :-1]
    # A target counts when it continues the same document; padding (segment 0) never counts.
    out["weights"] = ((seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)).astype(np.float32)
  if "scored" in batch:
    # A scored target counts only when its evidence is in the row, and in pack mode in its own
    # document: distance < its position there (concat rows cut a task's document anywhere).
    distance = batch["distance"][:, 1:]
    positions = batch.get("tokens_positions", np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape))[:, 1:]
    scored = batch["scored"][:, 1:].astype(np.float32) * (distance < positions)
    out["weights"] = out["weights"] * scored if "weights" in out else scored
    out["distance"] = distance
  return out


def _row_stream(docs: grain.MapDataset, config, features: bool = False) -> grain.IterDataset:
  """One row stream: its documents, read in the calling thread, joined or packed into rows
  (`features`: with their per-token scored and distance)."""
  it = docs.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  row = config.seq_len + 1
  if config.data.packing == "concat":
    return ConcatSplitIterDataset(it, row)
  it = grain.experimental.FlatMapIterDataset(it, _SplitLong(row))
  # NSA runs packed rows re-laid with room for at most this many documents (model/packing.py).
  length_struct = dict.fromkeys(("tokens", *FEATURES) if features else ("tokens",), row)
  return FirstFitPackIterDataset(it, length_struct=length_struct, num_packing_bins=config.data.pack_bins,
                                 max_sequences_per_bin=max_docs_per_row(config),
                                 seed=config.seed, shuffle_bins=True)


class RowBatchIterDataset(grain.IterDataset):
  """Batches whose i-th row is the next row of stream i (streams built for global rows `rows`).

  grain's InterleaveIterDataset would give every stream its own prefetch thread (256 threads for
  256 rows per host); here all streams share `num_threads` threads, one row per task, so reads
  are parallel across rows and bounded. The state is every stream's state, so a restored iterator
  continues each row exactly where it was.
  """

  def __init__(self, streams: list[grain.IterDataset], rows: list[int], batch_size: int, num_threads: int):
    super().__init__(list(streams))
    self.rows, self.batch_size, self.num_threads = list(rows), batch_size, num_threads

  def __iter__(self):
    return _RowBatchIterator([s.__iter__() for s in self._parents], self.rows, self.batch_size,
                             self.num_threads)


class _RowBatchIterator(grain.DatasetIterator):
  def __init__(self, streams, rows: list[int], batch_size: int, num_threads: int):
    super().__init__(streams)
    self._rows, self._batch_size = rows, batch_size
    self._start_states = [copy.deepcopy(s.get_state()) for s in streams]
    threads = min(num_threads, len(streams))
    self._pool = futures.ThreadPoolExecutor(threads, "grain-rows") if threads > 1 else None

  def _each(self, fn, *args) -> list:
    """fn(stream, *args) for every stream, in parallel; each stream is used by one task at a time."""
    return list((self._pool.map if self._pool else map)(fn, self._parents, *args))

  def __next__(self):
    self._assert_not_closed()
    rows = self._each(next)
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def get_state(self) -> dict[str, Any]:
    return {"batch_size": self._batch_size, "rows": list(self._rows),
            "row_states": [s.get_state() for s in self._parents]}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("batch_size") == self._batch_size and state.get("rows") == self._rows:
      self._each(lambda stream, s: stream.set_state(s), state["row_states"])
      return
    # Saved with another batch size or rows (or by the old one-stream-per-host pipeline): no exact
    # continuation exists, so rather than start over, every stream goes on after the furthest
    # document read (a few documents are skipped; in pack mode up to a round of pack_bins rows
    # per stream may be read again, as the saved positions lag).
    if "row_states" in state:
      reached = max(r + _stream_documents_read(s) * state["batch_size"]
                    for r, s in zip(state["rows"], state["row_states"]))
    else:
      reached = _find(state, "next_index") or 0
    logging.warning("data state saved for %s rows of a batch of %s, restored to %d rows of %d: rows go on "
                    "from document %d of the order, not exactly where they were", len(state.get("rows", ())),
                    state.get("batch_size", "?"), len(self._rows), self._batch_size, reached)
    starts = [_replace(s, "next_index", -(-max(reached - r, 0) // self._batch_size))
              for r, s in zip(self._rows, self._start_states)]
    self._each(lambda stream, s: stream.set_state(s), starts)

  def close(self, _finalizing=sys.is_finalizing) -> None:     # bound early: grain closes in __del__
    if self._closed:
      return
    if self._pool is not None and not _finalizing():          # at exit the threads are stopped anyway
      self._pool.shutdown(wait=False, cancel_futures=True)
    self._pool = None
    super().close()


def _model_batches(docs: list[grain.MapDataset], config, rows: list[int], num_threads: int, features: bool = False):
  streams = [_row_stream(d, config, features) for d in docs]
  return RowBatchIterDataset(streams, rows, config.batch_size, num_threads).map(_model_inputs)


def _local_batch(config, process_count: int) -> int:
  if config.batch_size % process_count:
    raise ConfigError("batch_size", config.batch_size,
                      f"must be divisible by the number of hosts ({process_count})")
  return config.batch_size // process_count


def host_rows(config, process_index: int = 0, process_count: int = 1, rows=None) -> list[int]:
  """The global batch rows this host builds: `rows` when given (`sharded_rows`: any distinct rows;
  hosts whose devices replicate rows build the same ones), else the block [p*L, (p+1)*L): the rows
  make_array_from_process_local_data takes from process p when the batch axis runs over the
  devices in process order (as jax.make_mesh orders CPU devices; checked by
  tests/two_hosts_data.py). A mesh that interleaves hosts' devices needs `sharded_rows`."""
  if rows is None:
    local = _local_batch(config, process_count)
    return list(range(process_index * local, (process_index + 1) * local))
  rows = [int(r) for r in rows]
  if not rows or len(set(rows)) != len(rows) or not all(0 <= r < config.batch_size for r in rows):
    raise ConfigError("batch_size", config.batch_size,
                      f"a host's rows must be distinct rows of the global batch, got {rows}")
  return rows


def sharded_rows(sharding, batch_size: int) -> list[int]:
  """The global rows this process's devices hold under a batch `sharding` (a jax Sharding), in the
  order make_array_from_process_local_data reads them from the local batch: ascending."""
  held = set()
  for index in sharding.addressable_devices_indices_map((batch_size,)).values():
    held.update(range(batch_size)[index[0]])
  return sorted(held)


def host_documents(config, sources, process_index: int = 0, process_count: int = 1, rows=None,
                   split: str = "train") -> list[grain.MapDataset]:
  """The documents each of this host's row streams reads: stream r takes documents r, r+B, r+2B...
  of the (training: shuffled) order, so hosts read disjoint documents and together all of them."""
  return _row_documents(config, sources, split, host_rows(config, process_index, process_count, rows))


def _row_documents(config, sources, split: str, rows: list[int]) -> list[grain.MapDataset]:
  docs = documents(sources, split, config.seed, shuffle=split == "train")
  return [docs[r::config.batch_size] for r in rows]


def train_iterator(config, sources, process_index: int = 0, process_count: int = 1, rows=None):
  """Infinite iterator of this host's rows of every global batch; `get_state`/`set_state` for
  checkpoints."""
  rows = host_rows(config, process_index, process_count, rows)
  docs = _row_documents(config, sources, "train", rows)
  batches = _model_batches(docs, config, rows, config.data.num_threads, with_features(sources))
  return iter(ThreadPrefetchIterDataset(batches, prefetch_buffer_size=config.data.prefetch))


def eval_batches(config, sources, process_index: int = 0, process_count: int = 1, rows=None) -> list[dict]:
  """A fixed evaluation set: the first `eval_batches` batches of the validation documents in order,
  split into row streams like training (so the global eval batches do not depend on the hosts)."""
  rows = host_rows(config, process_index, process_count, rows)
  docs = _row_documents(config, sources, "validation", rows)
  it = iter(_model_batches(docs, config, rows, config.data.num_threads, with_features(sources)))
  try:
    return [next(it) for _ in range(config.eval_batches)]
  finally:
    it.close()


def documents_read(iterator) -> int | None:
  """Training documents this host's row streams have read (those in progress included). Summed
  over hosts that build disjoint rows, it is the global count: the same for any number of hosts."""
  state = _holder(iterator.get_state(), "row_states")
  return None if state is None else sum(map(_stream_documents_read, state["row_states"]))


def epoch(iterator, sources, process_count: int = 1) -> float | None:
  """Epochs of training documents consumed (single source only): this host's `documents_read`
  scaled by its share of the rows (1/P; the state says which, so `process_count` is not needed),
  over the dataset's documents. Exact on one host; on several an estimate of the global count
  (every host's rows read alike), as it needs no communication."""
  state = _holder(iterator.get_state(), "row_states") if len(sources) == 1 else None
  if state is None:
    return None
  read = sum(map(_stream_documents_read, state["row_states"]))
  return read * state["batch_size"] / len(state["rows"]) / len(sources[0][0].splits["train"])


def _stream_documents_read(row_state) -> int:
  """One row stream's documents read: its reader's position, saved before the document in
  progress, plus that document (concat: `doc_len` > 0; pack: pieces of it emitted). In pack mode
  the saved position lags by up to one round of `data.pack_bins` rows: grain's packer restores
  from there."""
  in_progress = _find(row_state, "doc_len") or _find(row_state, "next_index_in_buffer")
  return _find(row_state, "next_index") + bool(in_progress)


def _replace(state, key, value):
  """A copy of a nested state with its (first) `key` set to `value`."""
  state = copy.deepcopy(state)
  _holder(state, key)[key] = value
  return state


def _find(state, key):
  holder = _holder(state, key)
  return None if holder is None else holder[key]


def _holder(state, key):
  """The first dict (depth first) of a nested state that holds `key`."""
  if isinstance(state, dict):
    if key in state:
      return state
    for value in state.values():
      if (found := _holder(value, key)) is not None:
        return found
  return None
