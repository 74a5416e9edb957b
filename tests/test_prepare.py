"""scripts/prepare_data.py and training on prepared data: bad data never crashes a job nor silently
drops whole files, re-runs are idempotent, interrupted runs leave nothing complete, two hosts split
the documents and assemble the one-host batches, and a killed run resumes on exactly the same
batches."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import ConfigError
from conftest import REPO, read_metrics, run_train, small_config
from data import corpus, prepare, sources

TOKENIZER = str(REPO / "data/assets/stdlib_4k.model")


def prepare_cli(*args, timeout=600):
  return subprocess.run([sys.executable, str(REPO / "scripts/prepare_data.py"), *args],
                        capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  """Real text (stdlib modules) as .txt, .txt.gz, .jsonl and .jsonl.gz, plus every kind of bad item."""
  root = tmp_path_factory.mktemp("corpus")
  texts = [text for _, text in corpus.embedded_documents("train")[:120]]
  for i, text in enumerate(texts[:30]):
    (root / f"doc{i:02d}.txt").write_text(text)
  with gzip.open(root / "more.txt.gz", "wt") as f:
    f.write(texts[30])
  with open(root / "lines.jsonl", "w") as f:
    for text in texts[31:80]:
      f.write(json.dumps({"text": text, "id": 1}) + "\n")
    f.write("{this is not json\n")
    f.write(json.dumps({"body": "no text field"}) + "\n")
    f.write(json.dumps({"text": "   "}) + "\n")
  with gzip.open(root / "lines.jsonl.gz", "wt") as f:
    for text in texts[80:]:
      f.write(json.dumps({"text": text}) + "\n")
  (root / "empty.txt").write_text("")
  (root / "latin1.txt").write_bytes("caf\xe9 na\xefve r\xe9sum\xe9\n".encode("latin-1") * 20)
  return root


@pytest.fixture(scope="module")
def prepared(corpus_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("prepared") / "ds"
  result = prepare_cli("--input", str(corpus_dir / "*"), "--output", str(out), "--tokenizer", TOKENIZER,
                       "--val-fraction", "0.1")
  assert result.returncode == 0, result.stderr
  return out, result.stdout


def test_prepare_writes_both_splits_with_counts_and_reports_problems(prepared):
  out, stdout = prepared
  meta = prepare.read_metadata(str(out))
  docs = meta["train"]["documents"] + meta["validation"]["documents"]
  assert docs == 30 + 1 + 49 + 40 + 1             # every good document; latin1 kept (replaced)
  assert meta["validation"]["documents"] >= 5
  assert meta["train"]["skipped_bad_json"] == 1 and meta["train"]["skipped_missing_field"] == 1
  assert meta["train"]["skipped_empty"] == 2 and meta["train"]["invalid_utf8"] == 1
  assert "skipped_bad_json 1" in stdout and "tokens/s" in stdout
  src = sources.open_sources(small_config(**{"data.source": str(out)}))[0][0]
  lengths = [len(src.to_tokens(src.splits["train"][i])) for i in range(len(src.splits["train"]))]
  assert sum(lengths) == meta["train"]["tokens"]
  assert all(src.to_tokens(src.splits["train"][i])[-1] == 3 for i in range(5))     # EOS-terminated


def test_prepared_text_round_trips(prepared, corpus_dir):
  out, _ = prepared
  from data.tokenizer import Tokenizer
  tokenizer = Tokenizer(TOKENIZER)
  src = sources.open_sources(small_config(**{"data.source": str(out)}))[0][0]
  train = src.splits["train"]
  decoded = {tokenizer.decode(src.to_tokens(train[i])[:-1]) for i in range(len(train))}
  in_train = {p.read_text() for p in corpus_dir.glob("doc*.txt")
              if prepare.split_of(str(p), 0, 0.1) == "train"}
  assert len(in_train) >= 20 and in_train <= decoded     # every document comes back verbatim


def test_long_documents_tokenize_in_pieces_exactly_as_whole():
  from data.tokenizer import Tokenizer
  tokenizer = Tokenizer(TOKENIZER)
  text = max((t for _, t in corpus.embedded_documents("train")), key=len)       # ~750 KB
  pieces = list(prepare.text_chunks(text, 1 << 14))
  assert len(pieces) > 40 and "".join(pieces) == text
  whole = tokenizer.encode([text])[0]
  np.testing.assert_array_equal(np.concatenate(tokenizer.encode(pieces)), whole)
  assert tokenizer.decode(whole) == text


def test_rerun_is_idempotent_and_a_different_dataset_is_refused(prepared, corpus_dir):
  out, _ = prepared
  before = sorted(os.listdir(prepare.dataset_dir(str(out))))
  again = prepare_cli("--input", str(corpus_dir / "*"), "--output", str(out), "--tokenizer", TOKENIZER,
                      "--val-fraction", "0.1")
  assert again.returncode == 0 and "already prepared" in again.stdout
  assert sorted(os.listdir(prepare.dataset_dir(str(out)))) == before
  other = prepare_cli("--input", str(corpus_dir / "doc0*.txt"), "--output", str(out), "--tokenizer", TOKENIZER)
  assert other.returncode == 2 and "already holds a different dataset" in other.stderr


@pytest.mark.parametrize("args,message", [
    (["--input", "/no/such/*.txt"], "matches no file"),
    (["--input", __file__], "unknown file type"),
    (["--val-fraction", "1.5"], "--val-fraction"),
    (["--tokenizer", "/no/such.model"], "--tokenizer"),
])
def test_bad_arguments_fail_before_any_work(tmp_path, corpus_dir, args, message):
  base = {"--input": str(corpus_dir / "*.txt"), "--tokenizer": TOKENIZER, "--output": str(tmp_path / "o")}
  base.update(dict(zip(args[::2], args[1::2])))
  result = prepare_cli(*[x for kv in base.items() for x in kv])
  assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
  assert not (tmp_path / "o").exists()


def test_unreadable_input_fails_before_any_work(tmp_path, monkeypatch):
  locked = tmp_path / "locked.txt"
  locked.write_text("secret")
  monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(locked))  # root reads all
  with pytest.raises(PermissionError, match="locked.txt' is not readable"):
    corpus.expand_inputs([str(tmp_path / "*.txt")])


def test_interrupted_prepare_leaves_nothing_that_looks_complete(tmp_path, corpus_dir):
  out = tmp_path / "ds"
  proc = subprocess.Popen([sys.executable, str(REPO / "scripts/prepare_data.py"), "--input",
                           str(corpus_dir / "*"), "--output", str(out), "--tokenizer", TOKENIZER,
                           "--val-fraction", "0.1"],
                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while time.time() < deadline and not list(out.glob(f"{prepare.NAME}/incomplete*")):
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert list(out.glob(f"{prepare.NAME}/incomplete*")), "prepare finished before it could be killed"
  assert not prepare.is_prepared(str(out))
  with pytest.raises(ConfigError, match="data.source"):
    sources.open_sources(small_config(**{"data.source": str(out)}))
  result = prepare_cli("--input", str(corpus_dir / "*"), "--output", str(out), "--tokenizer", TOKENIZER,
                       "--val-fraction", "0.1")
  assert result.returncode == 0, result.stderr
  assert prepare.is_prepared(str(out))


def test_a_100_mb_document_is_split_into_records_not_dropped(tmp_path):
  text = "".join(t for _, t in corpus.embedded_documents("train"))
  big = (text * (100_000_000 // len(text) + 1))[:100_000_000]
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "huge.txt").write_text(big)
  out = tmp_path / "ds"
  result = prepare_cli("--input", str(tmp_path / "in/*.txt"), "--output", str(out), "--tokenizer", TOKENIZER,
                       "--val-fraction", "0")
  assert result.returncode == 0, result.stderr
  meta = prepare.read_metadata(str(out))
  assert meta["train"]["documents"] == 1
  assert meta["train"]["tokens"] > 25_000_000
  assert meta["train"]["records"] == -(-meta["train"]["tokens"] // 131_072)


def test_dataset_of_another_tokenizer_is_refused(prepared, monkeypatch):
  out, _ = prepared
  with pytest.raises(ConfigError, match="model.vocab_size=5000: the dataset .* vocab size 4096"):
    sources.open_sources(small_config(**{"data.source": str(out), "data.tokenizer": "", "model.vocab_size": 5000}))
  monkeypatch.setattr(prepare, "file_sha256", lambda path: "another tokenizer")
  with pytest.raises(ConfigError, match="data.tokenizer=.*must be the tokenizer"):
    sources.open_sources(small_config(**{"data.source": str(out)}))


def test_tfds_name_source_reads_the_same_dataset(prepared):
  out, _ = prepared
  by_dir = sources.open_sources(small_config(**{"data.source": str(out)}))[0][0]
  by_name = sources.open_sources(small_config(**{"data.source": f"tfds:{prepare.NAME}",
                                                 "data.data_dir": str(out)}))[0][0]
  assert len(by_name.splits["train"]) == len(by_dir.splits["train"])
  np.testing.assert_array_equal(by_name.to_tokens(by_name.splits["train"][3]),
                                by_dir.to_tokens(by_dir.splits["train"][3]))
  with pytest.raises(ConfigError, match="no prepared TFDS dataset"):
    sources.open_sources(small_config(**{"data.source": "tfds:nothing_here", "data.data_dir": str(out)}))


def test_two_hosts_read_disjoint_documents_and_assemble_the_one_host_batches(prepared, tmp_path):
  out, _ = prepared
  port = 12500 + os.getpid() % 1000
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  procs = [subprocess.Popen([sys.executable, str(REPO / "tests/two_hosts_data.py"), str(i), str(port),
                             str(out), TOKENIZER, str(tmp_path / f"host{i}.json")], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
  hosts = [json.loads((tmp_path / f"host{i}.json").read_text()) for i in range(2)]
  assert [h["process"] for h in hosts] == [0, 1] and hosts[0]["count"] == 2 and hosts[0]["devices"] == 4
  assert [h["rows"] for h in hosts] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  for mesh in hosts[0]["meshes"]:                          # jax places host p's rows at [4p, 4p + 4)
    rows = [list(range(8))] * 2 if "'tensor': 4" in mesh else [h["rows"] for h in hosts]
    assert [h["meshes"][mesh] for h in hosts] == [{"rows": r, "same": True} for r in rows], mesh
  seen = [set(h["docs"]) for h in hosts]
  assert not seen[0] & seen[1]
  assert sum(len(h["docs"]) for h in hosts) == hosts[0]["total"]
  src = sources.open_sources(small_config(**{"data.source": str(out)}))[0][0]
  everything = {src.to_tokens(src.splits["train"][i]).tobytes().hex() for i in range(hosts[0]["total"])}
  assert seen[0] | seen[1] == everything


@pytest.mark.slow
def test_killed_run_on_prepared_data_resumes_on_the_same_batches(prepared, tmp_path):
  out, _ = prepared
  overrides = {"steps": 16, "data.source": str(out), "data.packing": "pack"}
  straight = run_train(tmp_path / "straight", overrides)
  assert straight.returncode == 0, straight.stderr
  killed = run_train(tmp_path / "killed", overrides, kill_after_step=7)
  assert killed.returncode == -signal.SIGKILL
  resumed = run_train(tmp_path / "killed", overrides)
  assert resumed.returncode == 0 and "resumed from step 5" in resumed.stderr, resumed.stderr
  a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")
  assert [a[s]["loss"] for s in range(1, 17)] == [b[s]["loss"] for s in range(1, 17)]
  assert 0 < b[16]["epoch"] < 1
