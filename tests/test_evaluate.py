"""Long-context evaluation (evaluation/, scripts/evaluate.py): the position buckets agree
with a direct loss, the passkey harness scores 1 with a model that retrieves and chance without,
and the CLI evaluates a tiny run end to end."""
import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import EMBEDDED_TOKENIZER
from conftest import FAST_COMPILE, REPO, run_train, small_config
from data.tokenizer import Tokenizer
from evaluation import by_position, passkey
from trainer.steps import cross_entropy

VOCAB = 4096


@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer(EMBEDDED_TOKENIZER)


@pytest.fixture(scope="module")
def filler(tokenizer):
  with open(os.path.join(os.path.dirname(os.__file__), "argparse.py")) as f:
    return tokenizer.encode([f.read()])[0][:3000]


def test_bucket_edges():
  assert by_position.bucket_edges(128) == [0, 128]
  assert by_position.bucket_edges(256) == [0, 256]
  assert by_position.bucket_edges(1000) == [0, 256, 1000]
  assert by_position.bucket_edges(16384) == [0, 256, 1024, 4096, 16384]
  assert by_position.bucket_edges(20000) == [0, 256, 1024, 4096, 16384, 20000]
  assert passkey.default_lengths(4096) == [256, 1024, 4096]


def test_loss_by_position_agrees_with_cross_entropy():
  rng = np.random.default_rng(0)
  B, T, V = 3, 1200, 50
  logits = jnp.asarray(rng.normal(size=(B, T, V)) * 3, jnp.float32)
  targets = jnp.asarray(rng.integers(V, size=(B, T)), jnp.int32)
  # Pack-like rows: positions restart at document starts, some targets masked out.
  positions = np.concatenate([np.arange(T)[None], np.r_[np.arange(700), np.arange(500)][None],
                              np.r_[np.arange(300), np.arange(900)][None]])
  weights = (rng.random((B, T)) > 0.2).astype(np.float32)
  edges = by_position.bucket_edges(T)
  buckets = by_position.loss_by_position(by_position.token_losses(logits, targets), positions, weights, edges)
  assert [(b["lo"], b["hi"]) for b in buckets] == [(0, 256), (256, 1024), (1024, 1200)]
  for b in buckets:
    mask = weights * ((positions >= b["lo"]) & (positions < b["hi"]))
    assert b["tokens"] == int(mask.sum()) > 0
    np.testing.assert_allclose(b["loss"], float(cross_entropy(logits, targets, jnp.asarray(mask))), rtol=1e-5)
  # All buckets together are the plain weighted mean loss.
  total = sum(b["loss"] * b["tokens"] for b in buckets) / sum(b["tokens"] for b in buckets)
  np.testing.assert_allclose(total, float(cross_entropy(logits, targets, jnp.asarray(weights))), rtol=1e-5)
  assert buckets[2]["loss"] != pytest.approx(buckets[0]["loss"], rel=1e-3)   # the buckets differ


def test_prompt_has_the_needle_at_its_depth_and_is_deterministic(tokenizer, filler):
  needle_len = len(passkey.prompt_parts(tokenizer, "12345")[0])
  _, question = passkey.prompt_parts(tokenizer, "12345")
  for depth in passkey.DEPTHS:
    p = passkey.make_prompt(tokenizer, filler, 256, depth, (0, 256, 1, 0))
    assert len(p.tokens) == 256 - passkey.ANSWER_TOKENS
    assert re.fullmatch(r"[1-9]\d{4}", p.key)
    n = len(p.tokens) - needle_len - len(question)
    assert p.needle_at == round(depth * n)
    assert f"The pass key is {p.key}." in tokenizer.decode(p.tokens[p.needle_at:p.needle_at + needle_len])
    assert (p.tokens[-len(question):] == question).all()
  same = passkey.make_prompt(tokenizer, filler, 256, 0.5, (0, 256, 1, 0))
  other = passkey.make_prompt(tokenizer, filler, 256, 0.5, (1, 256, 1, 0))
  assert (same.tokens == passkey.make_prompt(tokenizer, filler, 256, 0.5, (0, 256, 1, 0)).tokens).all()
  assert same.key != other.key
  with pytest.raises(ValueError, match="too short"):
    passkey.make_prompt(tokenizer, filler, 30, 0.5, 0)


def rigged_retriever(tokenizer, reach=None):
  """logits_fn that reads the key from the needle in the prompt and spells " KEY" after the
  question; with `reach`, only when the needle is within the last `reach` fraction of the prompt
  (a model with a short memory), else it answers token 0."""
  question = passkey.prompt_parts(tokenizer, "00000")[1]

  def logits_fn(tokens_BT):
    tokens_BT = np.asarray(tokens_BT)
    logits = np.zeros((*tokens_BT.shape, VOCAB), np.float32)
    for b, row in enumerate(tokens_BT):
      # The prompt ends with the question; the answer's j-th token is predicted at end + j.
      end = max(t for t in range(len(question), len(row) + 1) if (row[t - len(question):t] == question).all()) - 1
      text = tokenizer.decode(row[:end + 1])
      found = re.search(r"The pass key is (\d{5})\.", text)
      if reach is not None and found.start() < (1 - reach) * len(text):
        continue
      for j, token in enumerate(tokenizer.encode([" " + found[1]])[0]):
        logits[b, end + j, token] = 1.0
    return logits
  return logits_fn


def test_passkey_scores_one_with_a_retriever(tokenizer, filler):
  result = passkey.passkey_eval(rigged_retriever(tokenizer), tokenizer, filler, [128, 256], trials=3, batch_size=4)
  assert result["accuracy"] == 1.0 and result["digit_accuracy"] == 1.0
  assert [(c["length"], c["depth"]) for c in result["cells"]] == [(n, d) for n in (128, 256) for d in passkey.DEPTHS]
  assert all(c["accuracy"] == 1.0 and c["trials"] == 3 for c in result["cells"])


def test_passkey_cells_follow_the_needle_depth(tokenizer, filler):
  result = passkey.passkey_eval(rigged_retriever(tokenizer, reach=0.6), tokenizer, filler, [256], trials=2, batch_size=4)
  assert [c["accuracy"] for c in result["cells"]] == [0.0, 0.0, 1.0, 1.0, 1.0]
  assert result["accuracy"] == pytest.approx(0.6)


def test_passkey_is_chance_without_retrieval(tokenizer, filler):
  uniform = lambda tokens: jnp.zeros((*tokens.shape, VOCAB))
  assert passkey.passkey_accuracy(uniform, tokenizer, filler, [128], trials=2, batch_size=5) == 0.0
  digits = np.array([tokenizer.encode([str(d)])[0][-1] for d in range(10)])

  def guesser(tokens):      # a random digit at every position: right by chance only
    logits = np.zeros((*tokens.shape, VOCAB), np.float32)
    rng = np.random.default_rng(int(np.asarray(tokens).sum()))
    np.put_along_axis(logits, digits[rng.integers(10, size=tokens.shape)][..., None], 1.0, axis=-1)
    return logits
  result = passkey.passkey_eval(guesser, tokenizer, filler, [128, 256], trials=10, batch_size=25)
  assert result["accuracy"] == 0.0                            # 1e-5 per key
  assert 0.06 < result["digit_accuracy"] < 0.14, result       # 0.1 per digit, 500 digits


def test_training_passkey_lengths_are_those_the_config_takes():
  """eval.passkey's lengths (trainer/validate.py): 256, 1k, ... up to seq_len, less those the
  model's shape rules refuse (here NSA's selection blocks in context-parallel chunks)."""
  from trainer import validate
  nsa = {"attention.kind": "nsa", "seq_len": 1024}
  assert validate.passkey_lengths(small_config(**nsa), num_devices=1) == [256, 1024]
  # 8 devices, context 4: 256 tokens split in 8 chunks of 32 hold no whole 64-token selection block
  assert validate.passkey_lengths(small_config(**nsa, **{"mesh.context": 4, "mesh.fsdp": 2}), num_devices=8) == [1024]
  assert validate.passkey_lengths(small_config(seq_len=64), num_devices=1) == [64]


def evaluate(*args):
  env = {**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), *map(str, args)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_evaluates_a_run_and_refuses_a_bad_step(tmp_path):
  tiny_run = tmp_path
  trained = run_train(tiny_run, {"steps": 2, "seq_len": 256, "batch_size": 2, "model.n_layers": 1,
                                 "checkpoint_every": 1})
  assert trained.returncode == 0, trained.stderr
  result = evaluate("--workdir", tiny_run, "--step", 1, "--seq-len", 512, "--passkey-trials", 2, "--eval-batches", 1)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert re.fullmatch(r"passkey accuracy \d\.\d{3}", lines[-1])
  assert "| [0, 256) |" in result.stdout and "| [256, 512) |" in result.stdout
  out = tiny_run / "eval" / "step_1"
  summary = json.loads((out / "summary.json").read_text())
  assert (summary["step"], summary["seq_len"], summary["trained_seq_len"]) == (1, 512, 256)
  assert [(b["lo"], b["hi"], b["tokens"]) for b in summary["loss_by_position"]] == [(0, 256, 512), (256, 512, 512)]
  assert all(7.0 < b["loss"] < 9.0 for b in summary["loss_by_position"])       # ~ln(4096) after 1 step
  assert [(c["length"], c["depth"]) for c in summary["passkey"]["cells"]] == [
      (n, d) for n in (256, 512) for d in passkey.DEPTHS]
  assert lines[-1] == f"passkey accuracy {summary['passkey']['accuracy']:.3f}"
  for name in ("loss_by_position.png", "passkey.png"):
    assert (out / name).read_bytes()[:4] == b"\x89PNG"
  assert len((out / "passkey.csv").read_text().splitlines()) == 1 + 10
  # Bad input: one line, exit 2 (one test: under xdist a second would train its own run).
  result = evaluate("--workdir", tiny_run, "--step", 7)
  assert result.returncode == 2
  assert result.stderr.strip() == "config error: step=7: no finished checkpoint at this step; available: 1, 2"
