"""Synthetic retrieval tasks (data/synthetic.py): the documents' layout and features, determinism per
(seed, split, row), the features through both packing modes, mixtures, hosts and resume, config
errors, and the accuracy-by-distance functions (evaluation/retrieval.py)."""
import json

import numpy as np
import pytest

from configs import ConfigError
from conftest import small_config
from data import pipeline, sources, synthetic
from evaluation import retrieval

V = 4096                                   # small_config's model.vocab_size
# Rows of 129 tokens: MQAR queries start at 2 x 8 - 2 + 48 = 62, so 33 two-token slots for 6 queries.
SYN = {"data.synthetic.num_pairs": 8, "data.synthetic.num_queries": 6, "data.synthetic.min_distance": 48,
       "data.synthetic.key_vocab": 16, "data.synthetic.value_vocab": 32}
KEYS, VALUES = range(V - 48, V - 32), range(V - 32, V)
FILLER = range(synthetic.FILLER_LOW, V - 48)
MIXTURE = "synthetic:mqar=1,synthetic:passkey=1,embedded=1"


def syn_config(source="synthetic:mqar", **overrides):
  field = "data.mixture" if "=" in source else "data.source"
  return small_config(**{field: source, **SYN, **overrides})


def records(config, split="train"):
  (source, _), = sources.open_sources(config)
  return source.splits[split]


@pytest.fixture(scope="module")
def embedded():
  (source, _), = sources.open_sources(small_config())
  return source


def open_with(config, embedded):
  """sources.open_sources(config), with the module's embedded corpus instead of tokenizing it again."""
  def open_spec(spec):
    return embedded if spec == "embedded" else sources.open_source(spec, config, None, open_spec)
  return [(open_spec(spec), weight) for spec, weight in sources.source_specs(config)]


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _global_batches(config, src, hosts, steps, states=None):
  """`steps` global batches from `hosts` simulated hosts (local rows in process order), and their states."""
  its = [pipeline.train_iterator(config, src, p, hosts) for p in range(hosts)]
  for it, state in zip(its, states or [None] * hosts):
    if state is not None:
      it.set_state(state)
  local = [_take(it, steps) for it in its]
  batches = [{k: np.concatenate([local[p][s][k] for p in range(hosts)]) for k in local[0][s]} for s in range(steps)]
  states = [json.loads(json.dumps(it.get_state())) for it in its]     # as the checkpoint stores it
  for it in its:
    it.close()
  return batches, states


def _in(tokens, ids: range):
  return np.all((tokens >= ids.start) & (tokens < ids.stop))


# ---- documents ----

@pytest.mark.parametrize("task", synthetic.TASKS)
def test_a_row_depends_only_on_seed_split_and_index(task):
  train = records(syn_config(f"synthetic:{task}"))
  assert (len(train), len(records(syn_config(f"synthetic:{task}"), "validation"))) == (10**7, 10**4)
  first = train[123]
  _ = train[999], train[5]                                   # any order of access
  _assert_same([records(syn_config(f"synthetic:{task}"))[123]], [first])
  np.testing.assert_array_equal(train[-1]["tokens"], train[10**7 - 1]["tokens"])
  with pytest.raises(IndexError):
    train[10**7]
  others = [train[124], records(syn_config(f"synthetic:{task}", seed=1))[123],
            records(syn_config(f"synthetic:{task}"), "validation")[123]]
  assert all(not np.array_equal(o["tokens"], first["tokens"]) for o in others)


def test_mqar_layout_pairs_queries_and_distances():
  """Every row: 8 pairs of distinct keys and values from their ranges, then filler (never a key or
  a value) holding 6 queries asking 6 different pairs. A scored token is a query's value at t: the
  token before it is the key, which with its value stands exactly distance[t] tokens earlier, in the
  pairs, with distance >= min_distance; nothing else is scored and every other distance is 0."""
  rows = records(syn_config())
  query_at, distances = [], []
  for i in range(300):
    doc = rows[i]
    tokens, scored, distance = doc["tokens"], doc["scored"], doc["distance"]
    assert len(tokens) == len(scored) == len(distance) == 129 and tokens.dtype == np.int32
    keys, values = tokens[0:16:2], tokens[1:16:2]
    assert _in(keys, KEYS) and _in(values, VALUES) and len(set(keys.tolist())) == 8
    t = np.flatnonzero(scored)
    assert len(t) == 6 and set(scored.tolist()) == {0, 1}
    d = distance[t]
    assert np.all(d >= 48) and np.all(distance[scored == 0] == 0)
    evidence = t - 1 - d                                     # where the asked key stands in the pairs
    assert np.all(evidence % 2 == 0) and np.all(evidence >= 0) and np.all(evidence < 16)
    np.testing.assert_array_equal(tokens[evidence], tokens[t - 1])
    np.testing.assert_array_equal(tokens[evidence + 1], tokens[t])
    assert len(set(evidence.tolist())) == 6                  # different pairs
    rest = np.ones(129, bool)
    rest[:16] = rest[t] = rest[t - 1] = False
    assert _in(tokens[rest], FILLER)
    query_at += (t - 1).tolist()
    distances += d.tolist()
  # Query slots are uniform over [62, 129): the first and last slot are taken, the mean is the middle.
  assert min(query_at) == 62 and max(query_at) == 127
  assert np.mean(query_at) == pytest.approx((62 + 127) / 2, abs=2)
  assert min(distances) < 48 + 8 and max(distances) > 120


@pytest.mark.parametrize("depth", [0.0, 0.25, 1.0])
def test_passkey_needle_sits_at_its_depth_and_the_final_digits_are_scored(depth):
  """117 filler tokens (129 - 2 x (1 + 5)): the needle's marker stands at round(depth x 117); the
  row ends with the marker and the same 5 digits, which alone are scored, at distance 123 - needle."""
  rows = records(syn_config("synthetic:passkey", **{"data.synthetic.passkey_depth": depth}))
  marker, digits = KEYS.start, range(V - 32, V - 22)       # the first key id; the first 10 value ids
  at = {0.0: 0, 0.25: 29, 1.0: 117}[depth]
  seen = set()
  for i in range(50):
    doc = rows[i]
    tokens = doc["tokens"]
    assert np.flatnonzero(tokens == marker).tolist() == [at, 123]
    assert _in(tokens[at + 1:at + 6], digits)
    np.testing.assert_array_equal(tokens[124:], tokens[at + 1:at + 6])
    assert np.flatnonzero(doc["scored"]).tolist() == list(range(124, 129))
    assert doc["distance"][124:].tolist() == [123 - at] * 5 and not doc["distance"][:124].any()
    filler = np.concatenate([tokens[:at], tokens[at + 6:123]])
    assert len(filler) == 117 and _in(filler, FILLER)
    seen.add(tokens[at + 1:at + 6].tobytes())
  assert len(seen) == 50                                   # the keys differ


def test_passkey_random_depth_is_uniform():
  rows = records(syn_config("synthetic:passkey"))          # passkey_depth -1
  at = np.array([np.flatnonzero(rows[i]["tokens"] == KEYS.start)[0] for i in range(400)])
  assert at.min() >= 0 and at.max() <= 117
  np.testing.assert_allclose(np.quantile(at, [0.25, 0.5, 0.75]), [29.25, 58.5, 87.75], atol=8)


def test_text_filler_is_the_corpus_cut_to_length():
  """filler=embedded: a passkey row's filler (the row less its needle and question) is a run of the
  embedded split's documents joined, where every reserved id of the text is redrawn as filler.
  The mixture's embedded part and the filler are the same opened source."""
  config = syn_config("synthetic:passkey=1,embedded=1", **{"data.synthetic.filler": "embedded",
                                                           "data.synthetic.passkey_depth": 0.5})
  (passkey, _), (text, _) = sources.open_sources(config)
  for split, n in (("train", 12), ("validation", 4)):
    assert passkey.splits[split].filler.records is text.splits[split]
    docs = text.splits[split]
    stream = np.concatenate([docs[i] for i in range(len(docs))] + [docs[i] for i in range(3)])
    reserved = stream >= KEYS.start
    assert reserved.any()                                  # the test sees a redraw
    for i in range(n):
      tokens = passkey.splits[split][i]["tokens"]
      filler = np.concatenate([tokens[:59], tokens[65:123]])
      assert _in(filler, range(0, KEYS.start))
      starts = np.arange(len(stream) - len(filler))
      for j in range(len(filler)):                         # where the stream matches the filler so far
        starts = starts[(stream[starts + j] == filler[j]) | reserved[starts + j]]
      assert len(starts) >= 1, (split, i)


# ---- the pipeline ----

def test_concat_rows_are_whole_task_documents_with_their_features():
  """One MQAR document is one row: row r of step s is document r + s B of the order, weights are its
  scored flags and distance its distances, both of the targets (tokens 1..128)."""
  config = syn_config()
  src = sources.open_sources(config)
  order = pipeline.documents(src, "train", config.seed)
  it = pipeline.train_iterator(config, src)
  for s, batch in enumerate(_take(it, 3)):
    assert sorted(batch) == ["distance", "inputs", "targets", "weights"]
    for r in range(8):
      doc = order[r + 8 * s]
      np.testing.assert_array_equal(batch["inputs"][r], doc["tokens"][:-1])
      np.testing.assert_array_equal(batch["targets"][r], doc["tokens"][1:])
      np.testing.assert_array_equal(batch["weights"][r], doc["scored"][1:])
      np.testing.assert_array_equal(batch["distance"][r], doc["distance"][1:])
    assert batch["weights"].sum() == 8 * 6 and batch["weights"].dtype == np.float32
  it.close()
  evals = pipeline.eval_batches(syn_config(eval_batches=2), src)
  validation = src[0][0].splits["validation"]
  for s, batch in enumerate(evals):                        # validation rows in their order
    np.testing.assert_array_equal(batch["inputs"], [validation[r + 8 * s]["tokens"][:-1] for r in range(8)])


def test_pack_rows_are_whole_task_documents_with_their_features():
  config = syn_config(**{"data.packing": "pack", "data.pack_bins": 4})
  src = sources.open_sources(config)
  order = pipeline.documents(src, "train", config.seed)
  it = pipeline.train_iterator(config, src)
  batches = _take(it, 4)
  it.close()
  for r in range(8):                                       # one round of 4 bins: documents r, r+8, r+16, r+24
    expected = {order[r + 8 * k]["tokens"].tobytes(): order[r + 8 * k] for k in range(4)}
    for b in batches:
      doc = expected.pop(np.append(b["inputs"][r], b["targets"][r, -1]).tobytes())
      assert np.all(b["segment_ids"][r] == 1)
      np.testing.assert_array_equal(b["positions"][r], np.arange(128))
      np.testing.assert_array_equal(b["weights"][r], doc["scored"][1:])
      np.testing.assert_array_equal(b["distance"][r], doc["distance"][1:])
    assert not expected


def test_concat_mixture_rows_are_the_document_stream_with_features(embedded):
  """Mixed with text, concat rows cut task documents anywhere: the rows are the joined stream of
  documents r, r+B, ... and a scored target counts (weight 1) exactly when its evidence is in the
  row (distance < its index in the row); text targets always count."""
  config = syn_config(MIXTURE)
  src = open_with(config, embedded)
  order = pipeline.documents(src, "train", config.seed)
  it = pipeline.train_iterator(config, src)
  batches = _take(it, 4)
  it.close()
  cut = 0
  for r in range(8):
    docs = [order[i] for i in range(r, 8 * 8, 8)]
    stream = {k: np.concatenate([d[k] for d in docs])[:4 * 129].reshape(4, 129) for k in ("tokens", "scored", "distance")}
    reachable = stream["distance"][:, 1:] < np.arange(1, 129)
    cut += int((stream["scored"][:, 1:] * ~reachable).sum())
    for s, b in enumerate(batches):
      np.testing.assert_array_equal(b["inputs"][r], stream["tokens"][s, :-1])
      np.testing.assert_array_equal(b["weights"][r], stream["scored"][s, 1:] * reachable[s])
      np.testing.assert_array_equal(b["distance"][r], stream["distance"][s, 1:])
  assert cut > 0                                           # some task documents straddle rows


@pytest.mark.parametrize("packing", ["concat", "pack"])
def test_every_counted_target_repeats_its_evidence(embedded, packing):
  """Across a mixture of both tasks and text: a target of weight 1 with distance d > 0 is the
  (input, target) pair seen d tokens earlier in its row (and document); in pack mode text targets
  weigh exactly what the segments say, and each MQAR row (its own document) counts its 6 queries."""
  config = syn_config(MIXTURE, **{"data.packing": packing})
  it = pipeline.train_iterator(config, open_with(config, embedded))
  batches = _take(it, 6)
  it.close()
  counted = mqar_rows = 0
  for b in batches:
    for r in range(8):
      w, d = b["weights"][r], b["distance"][r]
      j = np.flatnonzero((w > 0) & (d > 0))
      assert np.all(j - d[j] >= 0)
      np.testing.assert_array_equal(b["targets"][r, j - d[j]], b["targets"][r, j])
      np.testing.assert_array_equal(b["inputs"][r, j - d[j]], b["inputs"][r, j])
      counted += len(j)
      if packing == "pack":
        seg = b["segment_ids"][r]                          # of the inputs
        np.testing.assert_array_equal(seg[j - d[j]], seg[j])
        for s in set(seg[seg > 0].tolist()):
          inside = seg == s
          if d[inside].any() and _in(b["inputs"][r, :16:2], KEYS):
            mqar_rows += 1
            assert inside.all() and w.sum() == 6 and np.array_equal(w > 0, d > 0)
          elif not d[inside].any():                        # text: a target counts when it stays in its document
            k = np.flatnonzero(inside[:-1])
            np.testing.assert_array_equal(w[k], seg[k + 1] == s)
  assert counted > 20 and (packing == "concat" or mqar_rows > 3)


@pytest.mark.parametrize("packing", ["concat", "pack"])
def test_global_batches_do_not_depend_on_the_number_of_hosts(embedded, packing):
  config = syn_config(MIXTURE, **{"data.packing": packing})
  src = open_with(config, embedded)
  one, _ = _global_batches(config, src, 1, 3)
  assert one[0]["distance"].shape == (8, 128)
  two, _ = _global_batches(syn_config(MIXTURE, **{"data.packing": packing, "data.num_threads": 1}), src, 2, 3)
  _assert_same(two, one)


@pytest.mark.parametrize("packing", ["concat", "pack"])
def test_iterator_state_resumes_exactly(embedded, packing):
  config = syn_config(MIXTURE, **{"data.packing": packing})
  src = open_with(config, embedded)
  straight, _ = _global_batches(config, src, 1, 6)
  first, states = _global_batches(config, src, 1, 3)
  resumed, _ = _global_batches(config, src, 1, 3, states)
  _assert_same(first + resumed, straight)
  _, two_host_states = _global_batches(config, src, 2, 3)
  _assert_same(_global_batches(config, src, 2, 3, two_host_states)[0], resumed)


@pytest.mark.parametrize("packing", ["concat", "pack"])
def test_without_synthetic_sources_batches_are_as_before(packing):
  docs = [np.arange(n, dtype=np.int32) + 1000 * d for d, n in enumerate([5, 40, 3, 9, 16, 2, 7])]
  src = [(sources.Source("list", {"train": docs, "validation": docs}, lambda r: r), 1.0)]
  config = small_config(batch_size=2, seq_len=15, **{"data.packing": packing})
  assert not pipeline.with_features(src) and isinstance(pipeline.documents(src, "train", 0)[0], np.ndarray)
  it = pipeline.train_iterator(config, src)
  batch = next(it)
  assert sorted(batch) == (["inputs", "targets"] if packing == "concat" else
                           ["inputs", "positions", "segment_ids", "targets", "weights"])
  assert sorted(pipeline._holder(it.get_state(), "row_states")["row_states"][0]) == (
      ["doc_len", "offset", "parent"] if packing == "concat" else ["counter", "next_row", "parent"])
  it.close()


# ---- config ----

BAD = [
    ({"data.source": "synthetic:xyz"}, "data.source"),
    ({"data.mixture": "synthetic:xyz=1,embedded=1"}, "data.mixture"),
    ({"data.synthetic.min_distance": 110}, "data.synthetic.min_distance"),       # 14 + 110 + 12 > 129
    ({"data.synthetic.num_pairs": 40, "data.synthetic.num_queries": 30, "data.synthetic.key_vocab": 64},
     "data.synthetic.num_pairs"),                                               # 140 tokens > 129
    ({"data.synthetic.num_pairs": 20}, "data.synthetic.num_pairs"),             # > key_vocab 16
    ({"data.synthetic.num_queries": 9}, "data.synthetic.num_queries"),          # > num_pairs 8
    ({"data.synthetic.min_distance": -1}, "data.synthetic.min_distance"),
    ({"data.synthetic.key_vocab": 4060}, "model.vocab_size"),                  # no filler ids left
    ({"data.synthetic.filler": "synthetic:mqar"}, "data.synthetic.filler"),
    ({"data.synthetic.filler": "/no/such/dir"}, "data.synthetic.filler"),
    ({"data.source": "synthetic:passkey", "data.synthetic.passkey_depth": 1.5}, "data.synthetic.passkey_depth"),
    ({"data.source": "synthetic:passkey", "data.synthetic.value_vocab": 8}, "data.synthetic.value_vocab"),
    ({"data.source": "synthetic:passkey", "data.synthetic.passkey_digits": 64}, "data.synthetic.passkey_digits"),
]


@pytest.mark.parametrize("overrides,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_config_names_its_field(overrides, field):
  from trainer import validate
  config = syn_config(**overrides)
  if "data.mixture" in overrides:
    config.data.source = "embedded"
  for check in (lambda: validate.validate(config, num_devices=1), lambda: sources.open_sources(config)):
    with pytest.raises(ConfigError) as e:
      check()
    assert e.value.field == field
  if "xyz" in str(overrides):
    assert str(e.value).endswith("unknown synthetic task; allowed: synthetic:mqar, synthetic:passkey")


def test_good_configs_validate_and_describe_themselves():
  from trainer import validate
  validate.validate(syn_config(), num_devices=1)
  validate.validate(syn_config(MIXTURE, **{"data.synthetic.filler": "embedded"}), num_devices=1)
  validate.validate(small_config(**{"data.synthetic.min_distance": 10**6}), num_devices=1)   # unused: not checked
  assert [sources.exists(s) for s in ("synthetic:mqar", "synthetic:passkey", "synthetic:xyz")] == [True, True, False]
  assert sources.describe(sources.open_sources(syn_config("synthetic:mqar=3,synthetic:passkey=1"))) == (
      "synthetic:mqar (10,000,000 train records, weight 3), synthetic:passkey (10,000,000 train records, weight 1)")


# ---- evaluation/retrieval.py ----

def test_distance_buckets_are_powers_of_four_windows():
  assert retrieval.distance_buckets(4) == [0, 4]
  assert retrieval.distance_buckets(4, 3) == [0, 4]
  assert retrieval.distance_buckets(4, 4) == [0, 4, 16]
  assert retrieval.distance_buckets(512, 5000) == [0, 512, 2048, 8192]


def test_accuracy_by_distance_and_beyond_count_scored_targets_only():
  correct = np.array([[1, 0, 1, 1], [0, 1, 0, 1]])
  distance = np.array([[0, 2, 5, 17], [17, 40, 70, 3]])
  weights = np.array([[0, 1, 1, 1], [1, 1, 1, 0]], np.float32)       # the first and last are not scored
  rows = retrieval.accuracy_by_distance(correct, distance, weights, window=4)
  assert [(r["bucket"], r["lo"], r["hi"], r["count"]) for r in rows] == [
      ("<1w", 0, 4, 1), ("1-4w", 4, 16, 1), ("4-16w", 16, 64, 3), ("16-64w", 64, 256, 1)]
  assert [r["accuracy"] for r in rows] == pytest.approx([0, 1, 2 / 3, 0])
  assert retrieval.beyond(correct, distance, weights, window=4) == {"count": 2, "accuracy": 0.5}   # >= 32
  assert retrieval.beyond(correct, distance, weights, window=4, windows=1) == {"count": 5, "accuracy": 0.6}
  empty = retrieval.accuracy_by_distance(correct, distance, weights * (distance == 70), window=4)
  assert [r["count"] for r in empty] == [0, 0, 0, 1] and np.isnan(empty[0]["accuracy"]) and empty[3]["accuracy"] == 0
  assert np.isnan(retrieval.beyond(correct, distance, weights, window=4, windows=100)["accuracy"])


def test_chance_is_one_over_the_values_guessed():
  assert retrieval.chance(syn_config()) == 1 / 32
  assert retrieval.chance(syn_config("synthetic:passkey")) == 0.1
  assert retrieval.chance(syn_config(MIXTURE), "mqar") == 1 / 32
  for config in (syn_config(MIXTURE), small_config()):
    with pytest.raises(ValueError, match="name one"):
      retrieval.chance(config)


def test_retrieval_metrics_from_bucket_counts():
  """The train-time eval's reduction: hits and counts per bucket of [0, w, 4w, 8w, 16w, ...]
  (8 windows an edge), text targets (distance 0) left out."""
  import jax.numpy as jnp
  config = small_config(**{"seq_len": 128, "eval.retrieval_window": 8})
  edges = retrieval.eval_edges(config)
  assert edges == [0, 8, 32, 64, 128, 512]
  correct = jnp.array([[1, 0, 1, 1, 1, 0]], bool)
  distance = jnp.array([[0, 3, 40, 70, 100, 127]])
  weights = jnp.array([[1, 1, 1, 1, 1, 0]], jnp.float32)
  hits, counts = retrieval.bucket_counts(correct, distance, weights, edges)
  assert hits.tolist() == [0, 0, 1, 2, 0] and counts.tolist() == [1, 0, 1, 2, 0]
  got = retrieval.metrics(hits, counts, edges, 8)
  assert got == {"retrieval_acc_<1w": 0.0, "retrieval_acc_4-8w": 1.0, "retrieval_acc_8-16w": 1.0,
                 "retrieval_acc_beyond_8w": 1.0}


@pytest.mark.slow
def test_train_py_reports_retrieval_by_distance(tmp_path):
  """eval.retrieval on synthetic:mqar: every eval step logs the accuracy per distance bucket; with
  min_distance 8 windows every query is in the 8-16w bucket or beyond. The run has no tokenizer
  (random filler), so scripts/evaluate.py reports retrieval and skips passkey."""
  from conftest import read_metrics, run_train
  result = run_train(tmp_path, {"data.source": "synthetic:mqar", "steps": 4, "eval_every": 2, "eval_batches": 1,
                                "eval.retrieval": True, "eval.retrieval_window": 8, "data.synthetic.num_pairs": 8,
                                "data.synthetic.num_queries": 8, "data.synthetic.min_distance": 64,
                                "data.tokenizer": ""})
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = read_metrics(tmp_path)
  for step in (2, 4):
    got = {k: v for k, v in metrics[step].items() if k.startswith("retrieval_acc_")}
    assert set(got) == {"retrieval_acc_8-16w", "retrieval_acc_beyond_8w"}, got
    assert all(0 <= v <= 1 for v in got.values())
  # scripts/evaluate.py on the run: the table, CSV and plot of retrieval by distance.
  import subprocess
  import sys

  from conftest import REPO
  evaluated = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), "--workdir", str(tmp_path),
                              "--passkey-lengths", "128", "--passkey-trials", "1", "--eval-batches", "1"],
                             capture_output=True, text=True, timeout=600, cwd=REPO)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert "## Retrieval by distance (synthetic targets; window 8 tokens, chance 0.016)" in evaluated.stdout
  assert evaluated.stdout.rstrip().endswith("## Passkey retrieval: not run (the run has no tokenizer: "
                                            "data.tokenizer is empty)")
  out = tmp_path / "eval" / "step_4"
  assert not (out / "passkey.png").exists() and json.loads((out / "summary.json").read_text())["passkey"] is None
  assert (out / "retrieval.png").is_file() and (out / "retrieval.csv").read_text().startswith("bucket,lo,hi,count,accuracy")
  summary = json.loads((out / "summary.json").read_text())["retrieval"]
  assert [b["bucket"] for b in summary["buckets"] if b["count"]] == ["4-16w"]     # distances 64..127
  assert summary["beyond_8w"]["count"] == sum(b["count"] for b in summary["buckets"])


def test_mqar_preset_kinds_validate_and_dsa_starts_from_mla():
  """configs/mqar.py: every kind and sweep point validates with every query 8+ windows from its
  key, and the MLA run's parameters are the DSA model's less its indexer (init_from)."""
  import jax
  from flax import linen as nn

  from configs import mqar
  from model import transformer
  from trainer import validate

  shapes = lambda c: jax.tree.map(lambda x: x.shape, nn.unbox(jax.eval_shape(
      transformer.build(c).init, jax.random.key(0), jax.ShapeDtypeStruct((1, c.seq_len), "int32"))))
  points = [mqar.get_config(kind) for kind in mqar.KINDS]
  for point in mqar.sweep():
    points.append(mqar.get_config("nsa"))
    points[-1].update_from_flattened_dict(point)
  for c in points:
    validate.validate(c, num_devices=1)
    assert c.seq_len >= 512 and synthetic.task(c, c.data.source).min_distance >= 8 * mqar.WINDOW
  dsa = shapes(mqar.get_config("dsa"))
  dsa["params"]["layers"]["attn"].pop("indexer")
  assert shapes(mqar.get_config("mla")) == dsa
  with pytest.raises(ValueError, match="allowed are dense, nsa"):
    mqar.get_config("nsa,long")


def test_retrieval_report_tabulates_and_plots_the_runs(tmp_path):
  """scripts/retrieval_report.py: per run, the last accuracy beyond 8 windows, the first step at
  0.9 or more, the evaluated accuracy and the last diagnostics; a missing run says so."""
  import subprocess
  import sys

  from conftest import REPO
  (tmp_path / "dense").mkdir()
  (tmp_path / "dense" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
      {"step": 100, "loss": 2.0, "retrieval_acc_beyond_8w": 0.5},
      {"step": 200, "retrieval_acc_beyond_8w": 0.95, "gate_slc": 0.25},
      {"step": 300, "loss": 0.1, "retrieval_acc_beyond_8w": 0.99}]) + "\n")
  (tmp_path / "dense" / "eval" / "step_300").mkdir(parents=True)
  (tmp_path / "dense" / "eval" / "step_300" / "summary.json").write_text(json.dumps(
      {"step": 300, "retrieval": {"chance": 0.0625, "beyond_8w": {"accuracy": 0.985, "count": 2048}}}))
  result = subprocess.run([sys.executable, str(REPO / "scripts" / "retrieval_report.py"), "--runs-dir", str(tmp_path),
                           "--runs", "dense,nsa"], capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = (tmp_path / "retrieval.md").read_text().splitlines()
  assert lines[2] == "| dense | 0.990 | 300 | 200 | 0.985 (2048 targets, step 300) | 0.062 | gate_slc 0.25 |"
  assert lines[3].startswith("| nsa | not found or no eval yet |")
  assert (tmp_path / "retrieval_by_step.png").stat().st_size > 1000


def test_evidence_selected_counts_the_targets_whose_evidence_block_was_chosen():
  """evaluation/retrieval.py evidence_selected: per layer and KV head, over scored targets only."""
  block_indices = np.full((2, 1, 40, 2, 2), -1)        # [L, B, T, HKV, n], blocks of 8 tokens
  weights, distance = np.zeros((1, 40)), np.zeros((1, 40), np.int32)
  weights[0, [20, 30]] = 1
  distance[0, 20], distance[0, 30] = 18, 25            # evidence at 2 (block 0) and 5 (block 0)
  block_indices[0, 0, 20, 0] = [0, 2]                  # layer 0, head 0: both targets hit
  block_indices[0, 0, 30, 0] = [3, 0]
  block_indices[0, 0, 20, 1] = [1, 2]                  # head 1: one miss, one hit
  block_indices[0, 0, 30, 1] = [0, -1]
  block_indices[1, 0, 5, :] = 0                        # layer 1: a selection at an unscored position
  got = retrieval.evidence_selected(block_indices, distance, weights, slc_block=8)
  np.testing.assert_allclose(got, [[1.0, 0.5], [0.0, 0.0]])
