"""The grain pipeline: packing modes, determinism, host-count independent batches, resumable state,
mixtures."""
import json

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


def _global_batches(config, src, hosts, steps, states=None):
  """`steps` global batches assembled from `hosts` simulated hosts (local rows in process order, as
  train.py's make_array_from_process_local_data places them), and each host's state after them."""
  its = [pipeline.train_iterator(config, src, p, hosts) for p in range(hosts)]
  for it, state in zip(its, states or [None] * hosts):
    if state is not None:
      it.set_state(state)
  local = [[next(it) for _ in range(steps)] for it in its]
  batches = [{k: np.concatenate([local[p][s][k] for p in range(hosts)]) for k in local[0][s]}
             for s in range(steps)]
  states = [json.loads(json.dumps(it.get_state())) for it in its]     # as the checkpoint stores it
  for it in its:
    it.close()
  return batches, states


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


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
  it = pipeline.train_iterator(config, src)
  batches = [next(it) for _ in range(3)]
  for r in range(2):                                         # row r: documents r, r+2, r+4... joined
    stream = np.concatenate([order[i] for i in range(r, 40, 2)])[:24].reshape(3, 8)
    np.testing.assert_array_equal([b["inputs"][r] for b in batches], stream[:, :-1])
    np.testing.assert_array_equal([b["targets"][r] for b in batches], stream[:, 1:])


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


def test_pack_mode_holds_at_most_max_docs_per_row():
  """NSA's aligned row has room for data.max_docs_per_row documents: the packer never puts more
  in a row (here 2 of the many short documents that would otherwise share a 32-token row)."""
  lengths = [3, 4, 2, 5, 3, 6, 2, 4] * 4
  counts = {}
  for limit in (0, 2):
    config = small_config(batch_size=2, seq_len=32, **{"data.packing": "pack", "data.max_docs_per_row": limit})
    it = pipeline.train_iterator(config, [(ListSource(lengths), 1.0)])
    segments = np.concatenate([next(it)["segment_ids"] for _ in range(4)])
    counts[limit] = max(len(set(row[row > 0].tolist())) for row in segments)
  assert counts[2] == 2 < counts[0]


def test_same_seed_same_batches_other_seed_other_batches(embedded):
  a = _take(pipeline.train_iterator(small_config(), embedded), 3)
  b = _take(pipeline.train_iterator(small_config(), embedded), 3)
  c = _take(pipeline.train_iterator(small_config(seed=1), embedded), 3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("packing", ["concat", "pack"])
def test_global_batches_do_not_depend_on_the_number_of_hosts_or_threads(embedded, packing):
  one, _ = _global_batches(small_config(**{"data.packing": packing, "data.num_threads": 4}), embedded, 1, 4)
  assert one[0]["inputs"].shape == (8, 128) and len({b["inputs"].tobytes() for b in one}) == 4
  for hosts, threads in ((2, 1), (4, 2), (8, 3)):
    config = small_config(**{"data.packing": packing, "data.num_threads": threads})
    _assert_same(_global_batches(config, embedded, hosts, 4)[0], one)


def test_pack_mode_is_host_count_independent_with_mixtures_and_long_documents():
  config = small_config(batch_size=4, seq_len=15, **{"data.packing": "pack", "data.pack_bins": 3})
  rng = np.random.default_rng(0)
  src = [(ListSource(rng.integers(1, 50, 30).tolist(), "a"), 2.0), (ListSource([7, 33, 2, 16] * 3, "b"), 1.0)]
  one, _ = _global_batches(config, src, 1, 12)
  for hosts in (2, 4):
    _assert_same(_global_batches(config, src, hosts, 12)[0], one)


def test_hosts_read_disjoint_documents_whose_union_is_the_dataset():
  config = small_config(batch_size=8)
  src = [(ListSource(range(1, 22)), 1.0)]                    # 21 documents, 8 rows
  seen = []
  for p in range(2):
    streams = pipeline.host_documents(config, src, p, 2)     # stream r: documents r, r+8, r+16...
    rows = range(4 * p, 4 * p + 4)
    first_epoch = [docs[k] for r, docs in zip(rows, streams) for k in range(len(range(r, 21, 8)))]
    seen.append([int(doc[0]) // 1000 for doc in first_epoch])
  order = pipeline.documents(src, "train", config.seed)
  assert seen[0] == [int(order[i][0]) // 1000 for r in range(4) for i in range(r, 21, 8)]
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(21))


def test_a_host_builds_the_rows_it_is_given():
  config, src = small_config(), [(ListSource(range(5, 40)), 1.0)]
  one, _ = _global_batches(config, src, 1, 2)
  some = pipeline.train_iterator(config, src, 1, 2, rows=[7, 1, 3, 5])
  replica = pipeline.train_iterator(config, src, 1, 2, rows=range(8))      # devices replicating rows
  for b in one:
    np.testing.assert_array_equal(next(some)["inputs"], b["inputs"][[7, 1, 3, 5]])
    np.testing.assert_array_equal(next(replica)["inputs"], b["inputs"])
  for bad in ([], [0, 1, 2, 2], [0, 1, 2, 8]):
    with pytest.raises(ConfigError, match="batch_size=8: a host's rows"):
      pipeline.train_iterator(config, src, 0, 2, rows=bad)


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


@pytest.mark.parametrize("packing", ["concat", "pack"])
def test_every_host_resumes_exactly_on_the_global_batches(embedded, packing):
  config = small_config(**{"data.packing": packing})
  straight, _ = _global_batches(config, embedded, 1, 6)
  first, states = _global_batches(config, embedded, 2, 3)
  resumed, _ = _global_batches(config, embedded, 2, 3, states)
  _assert_same(first + resumed, straight)


@pytest.mark.parametrize("packing", ["concat", "pack"])
def test_a_state_of_another_batch_size_goes_on_after_the_documents_read(packing):
  src = [(ListSource([10] * 40), 1.0)]                       # one row per document
  config = lambda batch: small_config(batch_size=batch, seq_len=9,
                                      **{"data.packing": packing, "data.pack_bins": 1})
  order = pipeline.documents(src, "train", config(4).seed)
  doc_at = lambda positions: [int(order[i][0]) // 1000 for i in positions]
  it = pipeline.train_iterator(config(4), src)
  _take(it, 3)                                               # stream r read positions r, r+4, r+8
  state = json.loads(json.dumps(it.get_state()))
  bigger = pipeline.train_iterator(config(8), src, 0, 2)
  bigger.set_state(state)                                    # row r: the first r + 8k >= 3 + 12
  assert (_take(bigger, 2)[:, :, 0] // 1000).tolist() == [doc_at((16, 17, 18, 19)), doc_at((24, 25, 26, 27))]
  legacy = pipeline.train_iterator(config(8), src, 0, 2)     # a state of the one-stream pipeline
  reader = {"next_index": 7}
  legacy.set_state({"parent": reader, "offset": 0, "doc_len": 0} if packing == "concat" else
                   {"parent": {"parent": reader, "next_index_in_buffer": 0}, "next_row": 0, "counter": 0})
  assert (next(legacy)["inputs"][:, 0] // 1000).tolist() == doc_at((8, 9, 10, 11))


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
  assert pipeline.epoch(it, src) == pytest.approx(6 / 4)
  assert pipeline.epoch(pipeline.train_iterator(config, src), src) == 0


def test_epoch_counter_counts_every_row_stream_on_every_host():
  config = small_config(batch_size=4, seq_len=9)
  src = [(ListSource([10, 20, 5, 15, 30, 10, 8, 12, 3, 25]), 1.0)]
  order = pipeline.documents(src, "train", config.seed)
  # 4 steps = 40 tokens per row stream; stream r reads documents r, r+4, ... until it has 40
  read = [np.searchsorted(np.cumsum([len(order[i]) for i in range(r, 80, 4)]), 40) + 1 for r in range(4)]
  its = [pipeline.train_iterator(config, src, p, n) for p, n in ((0, 2), (1, 2), (0, 1))]
  for it in its:
    _take(it, 4)
  *hosts, one = [pipeline.epoch(it, src, n) for it, n in zip(its, (2, 2, 1))]
  assert one == pytest.approx(sum(read) / 10) and (hosts[0] + hosts[1]) / 2 == pytest.approx(one)
  assert [pipeline.documents_read(it) for it in its] == [read[0] + read[1], read[2] + read[3], sum(read)]


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


def test_eval_batches_are_fixed_and_the_same_global_rows_on_any_hosts(embedded):
  config = small_config(eval_batches=2)
  first = pipeline.eval_batches(config, embedded)
  again = pipeline.eval_batches(config, embedded)
  assert len(first) == 2
  _assert_same(first, again)
  for hosts in (2, 4):
    parts = [pipeline.eval_batches(config, embedded, p, hosts) for p in range(hosts)]
    assert parts[0][0]["inputs"].shape == (config.batch_size // hosts, config.seq_len)
    _assert_same([{k: np.concatenate([part[s][k] for part in parts]) for k in first[s]} for s in range(2)],
                 first)
  assert not np.array_equal(first[0]["inputs"][0], first[0]["inputs"][1])


def test_tokenizer_that_does_not_fit_the_model_is_rejected():
  with pytest.raises(ConfigError, match="model.vocab_size=1000: must be at least the vocab size 4096"):
    sources.open_sources(small_config(**{"model.vocab_size": 1000}))
