"""grain pipelines: documents -> one token stream (EOS after each document) -> windows of
seq_len + 1 tokens -> global shuffle by seed -> this host's share -> batches {inputs, targets}.

Determinism: window w of the stream is the same on every machine; the shuffled order depends only
on `seed`; epoch e re-shuffles with a seed derived from it. Host p of P takes every P-th window of
the shuffled order, so the hosts' rows of one global batch are disjoint and together exactly the
batch a single host would read. The iterator state (one integer) goes into every checkpoint.
"""
import dataclasses

import grain
import numpy as np

from configs import ConfigError
from data import corpus
from data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Windows:
  """Random access to non-overlapping windows of `length` tokens of a 1-D token stream."""
  tokens: np.ndarray
  length: int

  def __len__(self) -> int:
    return len(self.tokens) // self.length

  def __getitem__(self, i: int) -> np.ndarray:
    return self.tokens[i * self.length:(i + 1) * self.length]


def token_stream(texts: list[str], tokenizer: Tokenizer) -> np.ndarray:
  ids = tokenizer.encode(texts)
  eos = np.array([tokenizer.eos_id], np.int32)
  return np.concatenate([part for doc in ids for part in (doc, eos)])


def load_tokens(config, split: str) -> np.ndarray:
  """The split's token stream, with the tokenizer checked against the model's vocab."""
  tokenizer = Tokenizer(config.data.tokenizer)
  if tokenizer.vocab_size != config.model.vocab_size:
    raise ConfigError("model.vocab_size", config.model.vocab_size,
                         f"must equal the vocab size {tokenizer.vocab_size} of data.tokenizer={tokenizer.path}")
  if config.data.source != corpus.EMBEDDED:
    raise ConfigError("data.source", config.data.source, "only 'embedded' is supported")
  return token_stream([text for _, text in corpus.embedded_documents(split)], tokenizer)


def _to_example(rows: np.ndarray) -> dict[str, np.ndarray]:
  return {"inputs": rows[:, :-1], "targets": rows[:, 1:]}


def train_iterator(config, tokens: np.ndarray, process_index: int = 0, process_count: int = 1):
  """Infinite iterator of this host's batches; `get_state`/`set_state` for checkpoints."""
  if config.batch_size % process_count:
    raise ConfigError("batch_size", config.batch_size,
                         f"must be divisible by the number of hosts ({process_count})")
  windows = Windows(tokens, config.seq_len + 1)
  if len(windows) < config.batch_size:
    raise ConfigError("seq_len", config.seq_len,
                         f"the corpus has {len(tokens)} tokens, fewer than one batch of windows")
  ds = grain.MapDataset.source(windows).shuffle(seed=config.seed).repeat(None)
  ds = ds[process_index::process_count].batch(config.batch_size // process_count, drop_remainder=True)
  ds = ds.map(_to_example)
  read = grain.ReadOptions(num_threads=config.data.num_threads, prefetch_buffer_size=config.data.prefetch)
  return iter(ds.to_iter_dataset(read))


def eval_batches(config, tokens: np.ndarray, process_index: int = 0, process_count: int = 1):
  """The first `eval_batches` batches of the validation windows, in order (a fixed eval set)."""
  windows = Windows(tokens, config.seq_len + 1)
  local = config.batch_size // process_count
  needed = config.eval_batches * config.batch_size
  if len(windows) == 0:
    raise ConfigError("seq_len", config.seq_len, "is longer than the whole validation split")
  rows = np.stack([windows[i % len(windows)] for i in range(needed)])
  rows = rows.reshape(config.eval_batches, process_count, local, -1)[:, process_index]
  return [_to_example(r) for r in rows]
