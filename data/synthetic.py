"""Synthetic long-range retrieval tasks: documents whose scored tokens can only be predicted by
looking a known distance back, to show whether (sparse) attention retrieves.

  synthetic:mqar     multi-query associative recall (Zoology): num_pairs key-value pairs open the
                     document, then filler holding num_queries queries, each a key again followed by
                     its value, at least min_distance tokens after that key
  synthetic:passkey  a needle (a marker token and passkey_digits digits) hidden in filler at
                     passkey_depth, and at the end the marker again followed by the same digits

A document is exactly seq_len + 1 tokens, with no EOS (with concat packing a row is one document)
and two per-token features besides `tokens`:
  scored    1 where the token is a scored target: a query's value, a final passkey digit
  distance  for scored tokens, the tokens back to the evidence (the same value in its pair, the
            same digit in the needle); for MQAR also the query's key position minus its key's; else 0

Token ids (V = model.vocab_size): keys [V - key_vocab - value_vocab, V - value_vocab), values
[V - value_vocab, V); the passkey marker is the first key id and its digits the first 10 value ids.
Random filler is uniform over [FILLER_LOW, V - key_vocab - value_vocab): never a key or a value,
and never one of the tokenizer's special ids (the embedded tokenizer's pad, unk, BOS, EOS are 0-3).
Text filler (data.synthetic.filler = a source) is that source's documents joined, from a random
one at a random offset, with any reserved id in it redrawn as random filler.

Record i of a split comes from its own generator, seeded by (seed, split, task, i): any row is made
alone, in any order, on any host, which is all the pipeline's determinism rules need.
"""
import dataclasses
import operator
from collections.abc import Callable, Sequence

import numpy as np

from configs import ConfigError

PREFIX = "synthetic:"
TASKS = ("mqar", "passkey")
SPECS = tuple(PREFIX + t for t in TASKS)
RANDOM = "random"                       # data.synthetic.filler: random ids
FILLER_LOW = 4                          # random filler ids start here (above pad, unk, BOS, EOS)
PASSKEY_BASE = 10                       # passkey digits: the first 10 value ids
SPLIT_IDS = {"train": 0, "validation": 1}
SPLIT_ROWS = {"train": 10**7, "validation": 10**4}

Filler = Callable[[np.random.Generator, int], np.ndarray]     # (rng, n) -> n int32 filler tokens


@dataclasses.dataclass(frozen=True)
class Task:
  """One task's shape, from the config (data.synthetic, seq_len, model.vocab_size)."""
  name: str
  length: int               # tokens per document: seq_len + 1
  vocab_size: int
  num_pairs: int
  num_queries: int
  key_vocab: int
  value_vocab: int
  min_distance: int
  passkey_digits: int
  passkey_depth: float      # -1: uniform per document

  @property
  def key_low(self) -> int:
    return self.vocab_size - self.key_vocab - self.value_vocab

  @property
  def value_low(self) -> int:
    return self.vocab_size - self.value_vocab

  @property
  def query_start(self) -> int:
    """MQAR: the first position a query's key may take. Every key is min_distance back from there
    (the last pair's key too), so any query may ask any key."""
    return max(2 * self.num_pairs, 2 * self.num_pairs - 2 + self.min_distance)

  @property
  def passkey_filler(self) -> int:
    """Passkey: filler tokens per document (the needle and the final question take the rest)."""
    return self.length - 2 * (1 + self.passkey_digits)

  def needle_at(self, depth: float) -> int:
    """Passkey: the needle's marker position for a depth in [0, 1] (0: first token, 1: after all filler)."""
    return int(depth * self.passkey_filler + 0.5)


def task(config, spec: str, field: str = "data.source") -> Task:
  """The task `spec` names ('synthetic:mqar'), checked against the config: a ConfigError names the
  first field that cannot work (`field` for an unknown task name)."""
  name = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
  if name not in TASKS:
    raise ConfigError(field, spec, f"unknown synthetic task; allowed: {', '.join(SPECS)}")
  s = config.data.synthetic
  for f in ("num_pairs", "num_queries", "key_vocab", "value_vocab", "passkey_digits"):
    if not _is_int(s[f]) or s[f] < 1:
      raise ConfigError(f"data.synthetic.{f}", s[f], "must be an integer >= 1")
  if not _is_int(s.min_distance) or s.min_distance < 0:
    raise ConfigError("data.synthetic.min_distance", s.min_distance, "must be an integer >= 0")
  if not (s.passkey_depth == -1 or 0 <= s.passkey_depth <= 1):
    raise ConfigError("data.synthetic.passkey_depth", s.passkey_depth, "must be in [0, 1], or -1 (uniform per row)")
  if not isinstance(s.filler, str) or not s.filler or s.filler.startswith(PREFIX):
    raise ConfigError("data.synthetic.filler", s.filler, f"must be '{RANDOM}' or a text source (embedded, DIR, tfds:NAME)")
  t = Task(name, config.seq_len + 1, config.model.vocab_size, s.num_pairs, s.num_queries, s.key_vocab,
           s.value_vocab, s.min_distance, s.passkey_digits, float(s.passkey_depth))
  if t.key_low <= FILLER_LOW:
    raise ConfigError("model.vocab_size", t.vocab_size, f"must be above {FILLER_LOW} + data.synthetic.key_vocab + "
                      f"value_vocab = {FILLER_LOW + t.key_vocab + t.value_vocab} (room for filler ids)")
  rows = f"seq_len + 1 = {t.length} tokens"
  if name == "mqar":
    if t.num_pairs > t.key_vocab:
      raise ConfigError("data.synthetic.num_pairs", t.num_pairs, f"must be <= data.synthetic.key_vocab={t.key_vocab} "
                        "(the keys of a row are distinct)")
    if t.num_queries > t.num_pairs:
      raise ConfigError("data.synthetic.num_queries", t.num_queries,
                        f"must be <= data.synthetic.num_pairs={t.num_pairs} (each query asks another key)")
    if 2 * (t.num_pairs + t.num_queries) > t.length:
      raise ConfigError("data.synthetic.num_pairs", t.num_pairs, f"2 x (num_pairs + num_queries={t.num_queries}) "
                        f"tokens must fit in {rows}")
    if t.query_start + 2 * t.num_queries > t.length:
      raise ConfigError("data.synthetic.min_distance", t.min_distance,
                        f"queries at least min_distance after every key need 2 x num_pairs={t.num_pairs} - 2 + "
                        f"min_distance + 2 x num_queries={t.num_queries} = {t.query_start + 2 * t.num_queries} "
                        f"tokens, more than {rows}")
  else:
    if t.value_vocab < PASSKEY_BASE:
      raise ConfigError("data.synthetic.value_vocab", t.value_vocab, f"must be >= {PASSKEY_BASE} for synthetic:passkey "
                        "(its digits are the first 10 value ids)")
    if t.passkey_filler < 0:
      raise ConfigError("data.synthetic.passkey_digits", t.passkey_digits,
                        f"the needle and the question, 2 x (1 + passkey_digits) tokens, must fit in {rows}")
  return t


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def random_filler(t: Task) -> Filler:
  return lambda rng, n: rng.integers(FILLER_LOW, t.key_low, n, dtype=np.int32)


class TextFiller:
  """Filler cut from a text source's split: its documents joined (each ends with its EOS), from a
  random document at a random offset. Reserved ids in the text are redrawn as random filler, so a
  key, value or marker appears only where the task puts it."""

  def __init__(self, records: Sequence, to_tokens: Callable, t: Task):
    self.records, self.to_tokens, self.key_low = records, to_tokens, t.key_low

  def __call__(self, rng: np.random.Generator, n: int) -> np.ndarray:
    pieces, got, j = [np.zeros(0, np.int32)], 0, int(rng.integers(len(self.records)))
    while got < n:
      tokens = np.asarray(self.to_tokens(self.records[j % len(self.records)]), np.int32)
      if len(pieces) == 1:
        tokens = tokens[rng.integers(len(tokens)):]
      pieces.append(tokens)
      got, j = got + len(tokens), j + 1
    tokens = np.concatenate(pieces)[:n]
    reserved = tokens >= self.key_low
    tokens[reserved] = rng.integers(FILLER_LOW, self.key_low, int(reserved.sum()), dtype=np.int32)
    return tokens


def mqar(t: Task, rng: np.random.Generator, filler: Filler) -> dict:
  """[k0 v0 k1 v1 ... filler ... k v ... k v ...]: queries are non-overlapping (key, value) slots drawn
  uniformly in [query_start, length), each asking a different pair in random order."""
  n, pairs, queries = t.length, t.num_pairs, t.num_queries
  keys = t.key_low + rng.choice(t.key_vocab, pairs, replace=False).astype(np.int32)
  values = t.value_low + rng.integers(t.value_vocab, size=pairs, dtype=np.int32)
  # `queries` 2-token slots in `room` tokens: distinct sorted draws in room - queries, spread by rank.
  room = n - t.query_start
  at = t.query_start + np.sort(rng.choice(room - queries, queries, replace=False)) + np.arange(queries)
  asked = rng.choice(pairs, queries, replace=False)
  is_task = np.zeros(n, bool)
  is_task[:2 * pairs] = is_task[at] = is_task[at + 1] = True
  tokens = np.empty(n, np.int32)
  tokens[~is_task] = filler(rng, n - 2 * (pairs + queries))
  tokens[0:2 * pairs:2], tokens[1:2 * pairs:2] = keys, values
  tokens[at], tokens[at + 1] = keys[asked], values[asked]
  scored, distance = np.zeros(n, np.uint8), np.zeros(n, np.int32)
  scored[at + 1] = 1
  distance[at + 1] = at - 2 * asked
  return {"tokens": tokens, "scored": scored, "distance": distance}


def passkey(t: Task, rng: np.random.Generator, filler: Filler) -> dict:
  """[filler, marker d1..dD at needle_at(depth), filler, marker d1..dD]: the final digits are scored."""
  n, digits = t.length, t.passkey_digits
  needle = np.concatenate([[t.key_low], t.value_low + rng.integers(PASSKEY_BASE, size=digits)]).astype(np.int32)
  at = t.needle_at(rng.random() if t.passkey_depth < 0 else t.passkey_depth)
  text = filler(rng, t.passkey_filler)
  tokens = np.concatenate([text[:at], needle, text[at:], needle])
  scored, distance = np.zeros(n, np.uint8), np.zeros(n, np.int32)
  scored[n - digits:] = 1
  distance[n - digits:] = n - digits - 1 - at
  return {"tokens": tokens, "scored": scored, "distance": distance}


GENERATORS = {"mqar": mqar, "passkey": passkey}


class Records(Sequence):
  """A split of a task: SPLIT_ROWS[split] documents, made on demand; item i from its own seed."""

  def __init__(self, t: Task, seed: int, split: str, filler: Filler):
    self.task, self.split, self.filler = t, split, filler
    self._entropy = [int(seed) % 2**63, SPLIT_IDS[split], TASKS.index(t.name)]
    self._generate = GENERATORS[t.name]

  def __len__(self) -> int:
    return SPLIT_ROWS[self.split]

  def __getitem__(self, i) -> dict:
    i = operator.index(i)
    if not -len(self) <= i < len(self):
      raise IndexError(i)
    rng = np.random.default_rng(np.random.SeedSequence([*self._entropy, i % len(self)]))
    return self._generate(self.task, rng, self.filler)
