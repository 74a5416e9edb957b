"""Hugging Face import and export (hf/, configs/hf.py) and HF tokenizers (data/tokenizer.py).

The fixtures under tests/fixtures/hf are tiny random models saved by transformers with the logits
it computes (scripts/make_hf_fixtures.py made them; neither torch nor transformers is needed here).
"""
import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from configs import ConfigError, base
from configs import hf as hf_config
from conftest import REPO, run_train, small_config
from data.tokenizer import Tokenizer
from hf import export_hf, load_hf
from model import transformer

FIXTURES = REPO / "tests" / "fixtures" / "hf"
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def fp32_config(**overrides):
  config = base.get_config()
  config.model.dtype = "float32"
  config.update_from_flattened_dict(overrides)
  return config


def hf_tensors(directory) -> dict:
  tensors = {}
  for file in sorted(directory.glob("*.safetensors")):
    tensors.update(load_file(str(file)))
  return tensors


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family):
  """Llama (llama3 RoPE scaling, sharded safetensors), Mistral, Qwen2 (q/k/v biases, tied) and
  Qwen3 (q/k norms, head_dim != d_model / heads, tied): within 1e-4 relative in float32."""
  golden = np.load(FIXTURES / family / "golden.npz")
  config, params = load_hf(str(FIXTURES / family), fp32_config())
  logits = np.asarray(transformer.build(config).apply({"params": params}, golden["input_ids"]))
  expected = golden["logits"]
  assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()
  fields = {"llama": ("llama3", False, False, False), "mistral": ("none", False, False, False),
            "qwen2": ("none", True, False, True), "qwen3": ("none", False, True, True)}[family]
  m = config.model
  assert (m.rope_scaling.type, m.qkv_bias, m.qk_norm, m.tie_embeddings) == fields


def test_rope_scaling_changes_the_logits():
  """The llama fixture's scaling matters (so the test above checks it): without it the logits differ."""
  golden = np.load(FIXTURES / "llama" / "golden.npz")
  config, params = load_hf(str(FIXTURES / "llama"), fp32_config(), keep={"model.rope_scaling"})
  logits = np.asarray(transformer.build(config).apply({"params": params}, golden["input_ids"]))
  assert np.abs(logits - golden["logits"]).max() > 0.1


def test_transformers_5_rope_parameters_layout_reads_the_same(tmp_path):
  hf = json.loads((FIXTURES / "llama" / "config.json").read_text())
  hf["rope_parameters"] = {**hf.pop("rope_scaling"), "rope_theta": hf.pop("rope_theta")}
  (tmp_path / "config.json").write_text(json.dumps(hf))
  new = hf_config.model_fields(hf_config.read(str(tmp_path)), str(tmp_path))
  old = hf_config.model_fields(hf_config.read(str(FIXTURES / "llama")), "llama")
  assert new == old and new["rope_scaling"]["type"] == "llama3" and new["rope_theta"] == 10_000.0


def test_command_line_fields_win_over_config_json():
  """init_from=hf:DIR takes the architecture from config.json, but a field set on the command line
  (a longer context's RoPE theta) stays, and the directory's tokenizer becomes data.tokenizer."""
  config = base.get_config()
  config.init_from = f"hf:{FIXTURES / 'llama'}"
  config.model.rope_theta = 1e6
  hf_config.resolve(config, {"init_from": config.init_from, "model.rope_theta": 1e6})
  assert (config.model.d_model, config.model.vocab_size, config.model.rope_theta) == (64, 320, 1e6)
  assert config.data.tokenizer == str(FIXTURES / "llama")


@pytest.mark.parametrize("family", FAMILIES)
def test_import_then_export_gives_back_the_same_tensors(tmp_path, family):
  config, params = load_hf(str(FIXTURES / family), fp32_config())
  export_hf(str(tmp_path), params, config, "float32")
  original, exported = hf_tensors(FIXTURES / family), hf_tensors(tmp_path)
  assert sorted(original) == sorted(exported)
  for name, array in original.items():
    assert exported[name].dtype == array.dtype and np.array_equal(exported[name], array), name
  fields = lambda d: hf_config.model_fields(hf_config.read(str(d)), str(d))
  assert fields(tmp_path) == fields(FIXTURES / family)


def test_export_unties_this_projects_scaled_tied_embeddings(tmp_path):
  """Our own tied models scale logits by d_model ** -0.5, which HF's tying cannot: lm_head is written."""
  config = small_config(**{"model.tie_embeddings": True, "model.dtype": "float32"})
  model = transformer.build(config)
  tokens = np.arange(16, dtype=np.int32)[None] % config.model.vocab_size
  params = model.init(jax.random.key(0), tokens)["params"]
  params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params, is_leaf=lambda x: hasattr(x, "value"))
  export_hf(str(tmp_path), params, config)
  back, back_params = load_hf(str(tmp_path), fp32_config())
  assert not back.model.tie_embeddings
  np.testing.assert_allclose(transformer.build(back).apply({"params": back_params}, tokens),
                             model.apply({"params": params}, tokens), rtol=1e-5, atol=1e-5)


def test_dense_to_nsa_starts_on_the_documented_values():
  """NSA from a dense HF model: q/k/v/o copied, compression as mean pooling, gates at
  nsa.converted_gates; with the window covering the sequence, the window branch is dense
  attention, so the NSA logits stay close to the dense ones."""
  golden = np.load(FIXTURES / "qwen3" / "golden.npz")
  overrides = {"attention.kind": "nsa", "nsa.window": 64, "nsa.cmp_block": 16, "nsa.cmp_stride": 8,
               "nsa.slc_block": 16, "nsa.num_selected": 3, "nsa.separate_kv": True, "seq_len": 48}
  config, params = load_hf(str(FIXTURES / "qwen3"), fp32_config(**overrides))
  attn = params["layers"]["attn"]
  assert np.array_equal(attn["k_slc"]["kernel"], attn["k_win"]["kernel"])
  gates = jax.nn.sigmoid(attn["gate"]["bias"][0, 0])
  np.testing.assert_allclose(gates, config.nsa.converted_gates, rtol=1e-6)
  logits = np.asarray(transformer.build(config).apply({"params": params}, golden["input_ids"]))
  dense_loss = _next_token_loss(golden["logits"], golden["input_ids"])
  assert abs(_next_token_loss(logits, golden["input_ids"]) - dense_loss) < 0.05 * dense_loss


def _next_token_loss(logits, ids) -> float:
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  return float(-np.take_along_axis(np.asarray(logp), ids[:, 1:, None], axis=-1).mean())


def _copy_fixture(tmp_path, family="mistral"):
  target = tmp_path / family
  shutil.copytree(FIXTURES / family, target)
  return target


def _edit_config(directory, **changes):
  hf = json.loads((directory / "config.json").read_text())
  hf.update(changes)
  (directory / "config.json").write_text(json.dumps(hf))


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "architectures=['GPT2LMHeadModel'] is not supported"),
    ({"sliding_window": 4096}, "sliding_window=4096 is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type='yarn' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"mlp_bias": True}, "mlp_bias=True is not supported"),
    ({"hidden_size": 128}, "tensor model.embed_tokens.weight has shape (320, 64), the model's config.json implies (320, 128)"),
])
def test_bad_model_directories_name_the_problem(tmp_path, change, message):
  directory = _copy_fixture(tmp_path)
  _edit_config(directory, **change)
  with pytest.raises(ConfigError, match="^config error: init_from=") as error:
    load_hf(str(directory), fp32_config())
  assert message in str(error.value) and "\n" not in str(error.value)


def test_a_missing_tensor_is_named(tmp_path):
  directory = _copy_fixture(tmp_path)
  tensors = load_file(str(directory / "model.safetensors"))
  del tensors["model.layers.1.mlp.up_proj.weight"]
  from safetensors.numpy import save_file
  save_file(tensors, str(directory / "model.safetensors"))
  with pytest.raises(ConfigError, match="lacks the tensor model.layers.1.mlp.up_proj.weight"):
    load_hf(str(directory), fp32_config())


@pytest.mark.parametrize("overrides, message", [
    ({"init_from": "hf:/nonexistent/model"}, "init_from='/nonexistent/model': must be a Hugging Face model directory"),
    ({"init_from": f"hf:{FIXTURES / 'qwen3'}", "attention.kind": "dsa"},
     "attention.kind='dsa': must be dense or nsa to start from a Hugging Face model"),
])
def test_train_py_exits_2_with_one_line(tmp_path, overrides, message):
  result = run_train(tmp_path / "run", overrides)
  assert result.returncode == 2, result.stderr[-2000:]
  assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_train_py_names_a_tensor_that_does_not_fit_in_one_line(tmp_path):
  """A config.json that does not describe its weights: caught when the tensors are read, after the
  program is built, still one line and exit 2."""
  directory = _copy_fixture(tmp_path, "llama")       # its own tokenizer: the data fits the model
  _edit_config(directory, intermediate_size=128)
  result = run_train(tmp_path / "run", {"init_from": f"hf:{directory}", "seq_len": 64}, small_model=False)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].endswith(
      "tensor model.layers.0.mlp.down_proj.weight has shape (64, 96), the model's config.json implies (64, 128)")
  assert "Traceback" not in result.stderr


def test_hf_tokenizer_encodes_and_decodes_as_the_tokenizers_library():
  from tokenizers import Tokenizer as Reference
  reference = Reference.from_file(str(FIXTURES / "llama" / "tokenizer.json"))
  ours = Tokenizer(str(FIXTURES / "llama"))
  texts = ["def hello(world):\n    return world * 2\n", "Ünïcödé — text, 12345 and\ttabs."]
  ids = ours.encode(texts)
  for text, got in zip(texts, ids, strict=True):
    assert got.dtype == np.int32 and got.tolist() == reference.encode(text).ids
    assert got[0] == ours.bos_id == 0             # the model's own BOS, from its post-processor
    assert ours.decode(got) == reference.decode(got.tolist())
  assert ours.encode(texts[:1], special_tokens=False)[0].tolist() == reference.encode(texts[0], add_special_tokens=False).ids
  assert (ours.eos_id, ours.vocab_size) == (1, 320)
  assert Tokenizer(str(FIXTURES / "llama" / "tokenizer.json")).encode(texts)[0].tolist() == ids[0].tolist()


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
  """A dense run started from the llama fixture, on a dataset prepared with its HF tokenizer (the
  directory's tokenizer.json is data.tokenizer by itself): the README's commands."""
  import subprocess
  import sys

  from data import corpus
  root = tmp_path_factory.mktemp("hf_run")
  (root / "corpus").mkdir()
  for i, (_, text) in enumerate(corpus.embedded_documents("train")[:60]):
    (root / "corpus" / f"doc{i:02d}.txt").write_text(text)
  prepared = subprocess.run([sys.executable, str(REPO / "scripts/prepare_data.py"), "--input", str(root / "corpus" / "*"),
                             "--output", str(root / "data"), "--tokenizer", str(FIXTURES / "llama"), "--val-fraction", "0.2"],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
  assert prepared.returncode == 0, prepared.stderr[-2000:]
  overrides = {"init_from": f"hf:{FIXTURES / 'llama'}", "data.source": str(root / "data"), "steps": 10,
               "eval_every": 5, "eval_batches": 1, "optimizer.lr": 1e-2}
  result = run_train(root / "dense", overrides, small_model=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return root, [json.loads(line) for line in (root / "dense" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_prepared_dataset_with_an_hf_tokenizer_trains_from_an_hf_model(dense_run):
  root, records = dense_run
  evals = [r["eval_loss"] for r in records if "eval_loss" in r]
  losses = [r["loss"] for r in records if "loss" in r]
  assert records[0]["step"] == 0 and len(evals) == 3          # step 0: where the imported model starts
  assert losses[-1] < losses[0] - 0.3 and evals[-1] < evals[0]


def _script(name, *args):
  import subprocess
  import sys
  return subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], capture_output=True, text=True,
                        timeout=600, cwd=REPO)


def _params_of_run(workdir, config):
  from trainer import checkpoint
  model = transformer.build(config)
  tokens = jax.ShapeDtypeStruct((1, 16), "int32")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          jax.eval_shape(lambda: _unboxed(model.init(jax.random.key(0), tokens))["params"]))
  params, _, fresh = checkpoint.load_params(str(workdir), abstract)
  assert not fresh
  return params


def _unboxed(tree):
  from flax import linen as nn
  return nn.unbox(tree)


@pytest.mark.slow
def test_export_script_writes_the_runs_model_and_tokenizer(dense_run, tmp_path):
  root, _ = dense_run
  result = _script("export_hf.py", "--workdir", str(root / "dense"), "--output", str(tmp_path / "out"))
  assert result.returncode == 0, result.stderr[-2000:]
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
      p.name for p in (tmp_path / "out").iterdir()}
  config, exported = load_hf(str(tmp_path / "out"), fp32_config())
  trained = _params_of_run(root / "dense", config)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), exported, trained)
  assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == 1


def test_convert_script_writes_what_load_hf_gives(tmp_path):
  """scripts/convert_hf.py: the one-time conversion (here to NSA) that init_from then reads."""
  nsa = ["--config.attention.kind=nsa", "--config.nsa.window=32", "--config.seq_len=128"]
  result = _script("convert_hf.py", "--hf-dir", str(FIXTURES / "qwen2"), "--output", str(tmp_path / "conv"),
                   "--config", str(REPO / "configs" / "tiny.py"), *nsa)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "attention nsa" in result.stdout
  config, expected = load_hf(str(FIXTURES / "qwen2"), small_config(**{"attention.kind": "nsa", "nsa.window": 32}))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               _params_of_run(tmp_path / "conv", config), expected)
  resumed = small_config(**{"init_from": str(tmp_path / "conv")})     # the architecture travels with it
  hf_config.resolve(resumed, {"init_from": resumed.init_from, "model.n_layers": 2})
  assert (resumed.model.mlp_dim, resumed.model.qkv_bias, resumed.model.tie_embeddings) == (96, True, True)
  again = _script("convert_hf.py", "--hf-dir", str(FIXTURES / "qwen2"), "--output", str(tmp_path / "conv"))
  assert again.returncode == 2 and "already holds a checkpoint" in again.stderr


@pytest.mark.slow
def test_a_dense_run_continues_as_nsa(tmp_path):
  """Dense -> NSA from a dense run of ours: the new parameters are reported with their starting
  values, the first eval loss sits near the dense run's last one, and training goes on finite."""
  dense = run_train(tmp_path / "dense", {"steps": 16, "eval_every": 16, "eval_batches": 1})
  assert dense.returncode == 0, dense.stderr[-3000:]
  nsa = run_train(tmp_path / "nsa", {"steps": 8, "eval_every": 8, "eval_batches": 1, "init_from": tmp_path / "dense",
                                     "attention.kind": "nsa", "nsa.window": 32, "nsa.cmp_block": 16,
                                     "nsa.cmp_stride": 8, "nsa.slc_block": 16, "nsa.num_selected": 4})
  assert nsa.returncode == 0, nsa.stderr[-3000:]
  assert "new parameter layers/attn/gate/bias: gates (cmp, slc, win) = (0.1, 0.1, 0.9)" in nsa.stderr
  assert "compress_k/fc1/kernel: identity" in nsa.stderr
  read = lambda run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
  dense_end = [r["eval_loss"] for r in read("dense") if "eval_loss" in r][-1]
  records = read("nsa")
  start = records[0]
  assert start["step"] == 0 and abs(start["eval_loss"] - dense_end) < 0.15 * dense_end
  losses = [r["loss"] for r in records if "loss" in r]
  assert all(np.isfinite(losses)) and all(r.get("skipped_steps", 0) == 0 for r in records)
  assert losses[-1] < losses[0]
