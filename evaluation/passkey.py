"""Passkey retrieval: can a model fetch a key planted at some depth of a long filler text?

The harness takes a `logits_fn(tokens int32 [B, T]) -> logits [B, T, V]`: the model's
(`functools.partial(jit_apply(model, mesh), params)`), or in tests a rigged retriever or a guesser,
so the scoring is checked without training anything. Every number is deterministic: each trial
draws its key and filler from its own seed (seed, length, depth index, trial).

train.py runs a small passkey eval at its eval steps with `eval.passkey` (`passkey_probe`). Every
host of a multi-host run computes the same prompts and answers: the tokens enter the jitted model
as one global array and the answers come back to every host.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from evaluation.by_position import bucket_edges
from parallel import context
from parallel.mesh import batch_sharding
from parallel.rules import use_mesh

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
KEY_DIGITS = 5
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER_TOKENS = KEY_DIGITS + 1   # " 12345": at worst a space and one token per digit
MIN_PASSKEY_LENGTH = 64          # room for the needle, the question and the answer


def jit_apply(model, mesh):
  """jit(params, tokens [B, T]) -> logits [B, T, V] on `mesh` (B divisible by the batch axes).
  Under context parallelism the rows go through the train step's load-balanced layout
  (parallel.context.batch_to_layout) and the logits come back in natural order. `tokens` may be a numpy array
  that every host holds alike."""
  def logits(params, tokens):
    batch = context.batch_to_layout({"inputs": tokens})
    out = model.apply({"params": params}, batch["inputs"], batch.get("positions"))
    return context.from_layout(out, 1, context.context_size())
  fn = jax.jit(logits, in_shardings=(None, batch_sharding(mesh)))
  def apply(params, tokens):
    if jax.process_count() > 1 and isinstance(tokens, np.ndarray):   # jit takes no host-local numpy here
      tokens = jax.make_array_from_callback(tokens.shape, batch_sharding(mesh), lambda i: tokens[i])
    with use_mesh(mesh):
      return fn(params, tokens)
  return apply


@dataclasses.dataclass(frozen=True)
class Prompt:
  tokens: np.ndarray   # int32 [length - ANSWER_TOKENS]: filler with the needle at `depth`, then QUESTION
  key: str
  needle_at: int       # index of the needle's first token


def prompt_parts(tokenizer, key: str) -> tuple[np.ndarray, np.ndarray]:
  """(needle, question) token ids; each text is encoded on its own, so it tokenizes the same
  wherever it lands in the filler."""
  needle, question = tokenizer.encode([NEEDLE.format(key=key), QUESTION], num_threads=1, special_tokens=False)
  return needle, question


def make_prompt(tokenizer, filler: np.ndarray, length: int, depth: float, seed) -> Prompt:
  """A prompt that, with ANSWER_TOKENS generated, is exactly `length` tokens: filler read from a
  random offset of `filler` (cyclically), the needle with a random 5-digit key at `depth` of it
  (0: first, 1: right before the question), then the question."""
  rng = np.random.default_rng(seed)
  key = str(rng.integers(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS))
  needle, question = prompt_parts(tokenizer, key)
  n = length - ANSWER_TOKENS - len(needle) - len(question)
  if n < 0:
    raise ValueError(f"passkey length {length} is too short: the needle, question and answer take "
                     f"{length - n} tokens")
  text = np.take(filler, rng.integers(len(filler)) + np.arange(n), mode="wrap")
  at = int(round(depth * n))
  tokens = np.concatenate([text[:at], needle, text[at:], question]).astype(np.int32)
  return Prompt(tokens, key, at)


_argmax_at = jax.jit(lambda logits, pos: jnp.argmax(
    jnp.take_along_axis(logits, pos[:, None, None], axis=1)[:, 0], axis=-1))


def _to_host(x) -> np.ndarray:
  """x as numpy on this host, gathered from the others when they hold parts of it."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def greedy_decode(logits_fn, prompts: list[np.ndarray], length: int, num_tokens: int, batch_size: int) -> np.ndarray:
  """int32 [len(prompts), num_tokens]: greedy continuations. Each row is right-padded to `length`
  (a causal model never sees the padding) and the whole prefix is re-run per token: no KV cache,
  one shape per length, so a jitted logits_fn compiles once. A short last chunk repeats row 0."""
  out = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    rows = chunk + [chunk[0]] * (batch_size - len(chunk))
    if max(map(len, rows)) + num_tokens > length:
      raise ValueError(f"a prompt of {max(map(len, rows))} tokens + {num_tokens} does not fit {length}")
    tokens = np.zeros((batch_size, length), np.int32)
    for i, p in enumerate(rows):
      tokens[i, :len(p)] = p
    last = np.array([len(p) - 1 for p in rows], np.int32)
    generated = np.zeros((batch_size, num_tokens), np.int32)
    for j in range(num_tokens):
      generated[:, j] = _to_host(_argmax_at(logits_fn(tokens), last + j))
      tokens[np.arange(batch_size), last + j + 1] = generated[:, j]   # inside: len(p) + num_tokens <= length
    out.append(generated[:len(chunk)])
  return np.concatenate(out)


def score(text: str, key: str) -> tuple[bool, int]:
  """(exact, digits right): the first KEY_DIGITS characters of the answer, leading space dropped."""
  answer = text.lstrip()[:KEY_DIGITS]
  return answer == key, sum(a == b for a, b in zip(answer, key))


def default_lengths(seq_len: int) -> list[int]:
  """The bucket edges up to seq_len: 256, 1k, 4k, 16k, ..., seq_len."""
  return bucket_edges(seq_len)[1:]


def passkey_eval(logits_fn, tokenizer, filler: np.ndarray, lengths, *, trials: int = 10, seed: int = 0,
                 depths=DEPTHS, batch_size: int = 8) -> dict:
  """{"cells": [{length, depth, accuracy, digit_accuracy, trials}], "accuracy", "digit_accuracy"}:
  exact-match accuracy per depth x length over `trials` keys, trial t of cell (length, depth i)
  drawn from seed (seed, length, i, t)."""
  cells, exact_all, digits_all = [], [], []
  for length in lengths:
    prompts = [make_prompt(tokenizer, filler, length, depth, (seed, length, i, t))
               for i, depth in enumerate(depths) for t in range(trials)]
    generated = greedy_decode(logits_fn, [p.tokens for p in prompts], length, ANSWER_TOKENS, batch_size)
    scores = [score(tokenizer.decode(g), p.key) for g, p in zip(generated, prompts)]
    for i, depth in enumerate(depths):
      exact, digits = zip(*scores[i * trials:(i + 1) * trials])
      cells.append({"length": int(length), "depth": float(depth), "trials": trials,
                    "accuracy": float(np.mean(exact)), "digit_accuracy": float(np.sum(digits) / (KEY_DIGITS * trials))})
      exact_all += exact
      digits_all += digits
  return {"cells": cells, "accuracy": float(np.mean(exact_all)),
          "digit_accuracy": float(np.sum(digits_all) / (KEY_DIGITS * len(digits_all)))}


def passkey_accuracy(logits_fn, tokenizer, filler: np.ndarray, lengths, seed: int = 0, **kwargs) -> float:
  """The overall exact-match accuracy: one number for a training run's metrics."""
  return passkey_eval(logits_fn, tokenizer, filler, lengths, seed=seed, **kwargs)["accuracy"]


def passkey_probe(config, model, mesh, sources, lengths):
  """params -> passkey accuracy, for train.py's eval steps: `config.eval.passkey_trials` keys per
  depth x length of `lengths`, drawn from config.seed (the same prompts at every eval), decoded
  in batches no larger than the prompts need (a multiple of the mesh's batch shards)."""
  from data.tokenizer import Tokenizer
  tokenizer, trials = Tokenizer(config.data.tokenizer), config.eval.passkey_trials
  filler = filler_tokens(sources, 4 * max(lengths))
  apply = jit_apply(model, mesh)
  shards = config.batch_size // batch_sharding(mesh).shard_shape((config.batch_size, config.seq_len))[0]
  batch_size = min(config.batch_size, -(-len(DEPTHS) * trials // shards) * shards)
  return lambda params: passkey_accuracy(functools.partial(apply, params), tokenizer, filler, lengths,
                                         seed=config.seed, trials=trials, batch_size=batch_size)


def filler_tokens(sources, num_tokens: int) -> np.ndarray:
  """At least `num_tokens` tokens of the validation split, its documents in order (EOS-separated,
  as in training; cycled if the split is smaller)."""
  from data import pipeline
  docs = pipeline.documents(sources, "validation", seed=0, shuffle=False)
  parts, total = [], 0
  while total < num_tokens:
    doc = docs[len(parts)]
    parts.append(np.asarray(doc["tokens"] if isinstance(doc, dict) else doc, np.int32))   # dict: synthetic features
    total += len(parts[-1])
  return np.concatenate(parts)
