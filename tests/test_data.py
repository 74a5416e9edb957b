"""The embedded corpus and its grain pipeline: deterministic, host-sharded, resumable."""
import numpy as np
import pytest

from configs import ConfigError
from conftest import small_config
from data import corpus, pipeline
from data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokens():
  return pipeline.load_tokens(small_config(), "train")


def test_embedded_corpus_is_real_text_with_a_held_out_split():
  train = corpus.embedded_documents("train")
  validation = corpus.embedded_documents("validation")
  assert len(train) > 400 and len(validation) > 5
  assert not {p for p, _ in train} & {p for p, _ in validation}
  assert sum(len(t) for _, t in train) > 5_000_000           # several MB of source code


def test_token_stream_separates_documents_with_eos():
  tokenizer = Tokenizer(small_config().data.tokenizer)
  stream = pipeline.token_stream(["def f():\n    return 1\n", "x = 2\n"], tokenizer)
  eos = np.flatnonzero(stream == tokenizer.eos_id)
  assert len(eos) == 2 and eos[-1] == len(stream) - 1
  assert tokenizer.decode(stream[:eos[0]]) == "def f():\n    return 1\n"


def test_batches_are_next_token_windows(tokens):
  config = small_config()
  batch = next(pipeline.train_iterator(config, tokens))
  assert batch["inputs"].shape == batch["targets"].shape == (config.batch_size, config.seq_len)
  assert batch["inputs"].dtype == np.int32
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  for row in batch["inputs"]:   # each row is a window of the stream at a multiple of seq_len + 1
    starts = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(tokens, 8)[::config.seq_len + 1]
                                   == row[:8], axis=1))
    assert len(starts) >= 1


def _take(iterator, n):
  return [next(iterator)["inputs"] for _ in range(n)]


def test_same_seed_same_batches_other_seed_other_batches(tokens):
  a = _take(pipeline.train_iterator(small_config(), tokens), 3)
  b = _take(pipeline.train_iterator(small_config(), tokens), 3)
  c = _take(pipeline.train_iterator(small_config(seed=1), tokens), 3)
  np.testing.assert_array_equal(np.stack(a), np.stack(b))
  assert not np.array_equal(np.stack(a), np.stack(c))


def test_hosts_read_disjoint_rows_that_make_up_the_global_batch(tokens):
  config = small_config()
  single = _take(pipeline.train_iterator(config, tokens), 4)
  hosts = [_take(pipeline.train_iterator(config, tokens, p, 2), 4) for p in range(2)]
  for step in range(4):
    rows = lambda x: sorted(map(bytes, x))
    assert rows(np.concatenate([hosts[0][step], hosts[1][step]])) == rows(single[step])
    assert not set(map(bytes, hosts[0][step])) & set(map(bytes, hosts[1][step]))


def test_iterator_state_resumes_exactly(tokens):
  config = small_config()
  it = pipeline.train_iterator(config, tokens)
  _take(it, 5)
  state = it.get_state()
  expected = _take(it, 3)
  fresh = pipeline.train_iterator(config, tokens)
  fresh.set_state(state)
  np.testing.assert_array_equal(np.stack(_take(fresh, 3)), np.stack(expected))


def test_epochs_cover_every_window_once_and_reshuffle():
  config = small_config(batch_size=4, seq_len=8)
  stream = np.arange(10 * 9, dtype=np.int32)                 # exactly 10 windows of 9 tokens
  it = pipeline.train_iterator(config, stream)
  firsts = [b["inputs"][:, 0] // 9 for b in (next(it) for _ in range(5))]   # 20 windows: 2 epochs
  order = np.concatenate(firsts)
  assert sorted(order[:10]) == list(range(10)) and sorted(order[10:]) == list(range(10))
  assert not np.array_equal(order[:10], order[10:])


def test_eval_batches_are_fixed_and_split_across_hosts():
  config = small_config(eval_batches=2)
  val = pipeline.load_tokens(config, "validation")
  full = pipeline.eval_batches(config, val)
  halves = [pipeline.eval_batches(config, val, p, 2) for p in range(2)]
  assert len(full) == 2
  np.testing.assert_array_equal(np.concatenate([halves[0][1]["inputs"], halves[1][1]["inputs"]]),
                                full[1]["inputs"])


def test_tokenizer_that_does_not_fit_the_model_is_rejected():
  with pytest.raises(ConfigError, match="model.vocab_size=1000: must equal the vocab size 4096"):
    pipeline.load_tokens(small_config(**{"model.vocab_size": 1000}), "train")
