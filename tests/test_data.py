"""The grain pipeline: packing modes, determinism, host sharding, resumable state, mixtures."""
import numpy as np
import pytest

from configs import ConfigError
from conftest import small_config
from data import corpus, pipeline, sources
from data.tokenizer import Tokenizer


class ListSource(sources.Source):
  """Documents given as arrays; document d holds the tokens d*1000 + 0..n-1 so rows tell their origin."""

  def __init__(self, lengths, name="list"):
    docs = [np.arange(n, dtype=np.int32) + 1000 * d for d, n in enumerate(lengths)]
    super().__init__(name, {"train": docs, "validation": docs[:3]}, lambda r: r)


def _take(iterator, n, key="inputs"):
  return np.stack([next(iterator)[key] for _ in range(n)])


@pytest.fixture(scope="module")
def embedded():
  return sources.open_sources(small_config())


def test_embedded_corpus_is_real_text_with_a_held_out_split():
  train = corpus.embedded_documents("train")
  validation = corpus.embedded_documents("validation")
  assert len(train) > 400 and len(validation) > 5
  assert not {p for p, _ in train} & {p for p, _ in validation}
  assert sum(len(t) for _, t in train) > 5_000_000           # several MB of source code


def test_embedded_documents_end_with_eos(embedded):
  tokenizer = Tokenizer(small_config().data.tokenizer)
  (source, _), = embedded
  doc = source.splits["train"][0]
  assert doc[-1] == tokenizer.eos_id and tokenizer.eos_id not in doc[:-1]
  assert tokenizer.decode(doc[:-1]) == corpus.embedded_documents("train")[0][1]


def test_concat_rows_are_the_document_stream_cut_without_padding():
  config = small_config(batch_size=2, seq_len=7)
  src = [(ListSource([5, 12, 3, 9, 20]), 1.0)]
  order = pipeline.documents(src, "train", config.seed)
  stream = np.concatenate([order[i] for i in range(5)])      # first epoch, in shuffled order
  rows = _take(pipeline.train_iterator(config, src), 3, "inputs")
  targets = _take(pipeline.train_iterator(config, src), 3, "targets")
  np.testing.assert_array_equal(rows.reshape(-1, 7), stream[:48].reshape(6, 8)[:, :-1])
  np.testing.assert_array_equal(targets.reshape(-1, 7), stream[:48].reshape(6, 8)[:, 1:])


def test_pack_mode_keeps_documents_whole_and_marks_them():
  config = small_config(batch_size=4, seq_len=15, **{"data.packing": "pack"})
  lengths = [5, 40, 3, 9, 16, 2, 7]
  src = [(ListSource(lengths), 1.0)]
  it = pipeline.train_iterator(config, src)
  batches = [next(it) for _ in range(6)]
  seen = {}
  for b in batches:
    for row in range(4):
      inputs, seg, pos, w = (b[k][row] for k in ("inputs", "segment_ids", "positions", "weights"))
      for s in set(seg[seg > 0].tolist()):
        piece = inputs[seg == s]
        np.testing.assert_array_equal(pos[seg == s], np.arange(len(piece)))   # positions restart
        doc = int(piece[0]) // 1000
        seen.setdefault(doc, []).append(piece)
      assert np.all(w[seg == 0] == 0)                                         # padding never counts
      last_of_segment = np.append(seg[1:] != seg[:-1], True)
      assert np.all(w[last_of_segment & (seg > 0)] <= 1)
  long_doc = np.sort(np.concatenate(seen[1]))        # 40 tokens > 16-token rows: split, not cut
  assert set(np.arange(1000, 1040)) - set(long_doc.tolist()) <= set(range(1000 + 15, 1040, 16))


def test_same_seed_same_batches_other_seed_other_batches(embedded):
  a = _take(pipeline.train_iterator(small_config(), embedded), 3)
  b = _take(pipeline.train_iterator(small_config(), embedded), 3)
  c = _take(pipeline.train_iterator(small_config(seed=1), embedded), 3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_hosts_read_disjoint_documents_whose_union_is_the_dataset():
  config = small_config()
  src = [(ListSource(range(1, 22)), 1.0)]                    # 21 documents, 2 hosts
  hosts = [pipeline.host_documents(config, src, p, 2) for p in range(2)]
  firsts = [{int(hosts[p][i][0]) // 1000 for i in range(len_)} for p, len_ in ((0, 11), (1, 10))]
  assert not firsts[0] & firsts[1]
  assert firsts[0] | firsts[1] == set(range(21))


@pytest.mark.parametrize("packing", ["concat", "pack"])
def test_iterator_state_resumes_exactly(embedded, packing):
  config = small_config(**{"data.packing": packing})
  it = pipeline.train_iterator(config, embedded)
  _take(it, 5)
  state = it.get_state()
  expected = _take(it, 4)
  fresh = pipeline.train_iterator(config, embedded)
  fresh.set_state(state)
  np.testing.assert_array_equal(_take(fresh, 4), expected)


def test_epochs_cover_every_document_once_and_reshuffle():
  config = small_config()
  src = [(ListSource([1] * 10), 1.0)]
  docs = pipeline.documents(src, "train", config.seed)
  order = [int(docs[i][0]) // 1000 for i in range(20)]
  assert sorted(order[:10]) == list(range(10)) and sorted(order[10:]) == list(range(10))
  assert order[:10] != order[10:]


def test_epoch_counter_counts_documents_consumed():
  config = small_config(batch_size=1, seq_len=9)
  src = [(ListSource([10] * 4), 1.0)]                        # one row per document
  it = pipeline.train_iterator(config, src)
  _take(it, 6)
  assert pipeline.epoch(it, src) == pytest.approx(5 / 4)     # the 6th document is in progress


def test_mixture_draws_by_weight():
  config = small_config()
  src = [(ListSource([3] * 10, "a"), 3.0), (ListSource([3] * 10, "b"), 1.0)]
  src[1][0].splits["train"] = [d + 100_000 for d in src[1][0].splits["train"]]
  docs = pipeline.documents(src, "train", config.seed)
  from_b = np.mean([docs[i][0] >= 100_000 for i in range(400)])
  assert from_b == pytest.approx(0.25, abs=0.02)


def test_mixture_spec_is_validated():
  assert sources.parse_mixture("a=0.7, tfds:x=0.3") == [("a", 0.7), ("tfds:x", 0.3)]
  for bad in ("a", "a=-1", "=2", "a=b"):
    with pytest.raises(ConfigError, match="data.mixture"):
      sources.parse_mixture(bad)


def test_eval_batches_are_fixed_and_split_across_hosts(embedded):
  config = small_config(eval_batches=2)
  first = pipeline.eval_batches(config, embedded)
  again = pipeline.eval_batches(config, embedded)
  assert len(first) == 2
  np.testing.assert_array_equal(first[1]["inputs"], again[1]["inputs"])
  halves = [pipeline.eval_batches(config, embedded, p, 2) for p in range(2)]
  assert halves[0][0]["inputs"].shape == (config.batch_size // 2, config.seq_len)
  assert not np.array_equal(halves[0][0]["inputs"], halves[1][0]["inputs"])


def test_tokenizer_that_does_not_fit_the_model_is_rejected():
  with pytest.raises(ConfigError, match="model.vocab_size=1000: must equal the vocab size 4096"):
    sources.open_sources(small_config(**{"model.vocab_size": 1000}))
