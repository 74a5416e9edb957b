"""Config validation: bad values stop the run with one line naming field, value and what is allowed;
the presets build and validate."""
import importlib.util
import json
import subprocess
import sys

import jax
import pytest
from flax import linen as nn

from configs import ConfigError, base
from conftest import REPO, run_train, small_config
from model import transformer
from trainer import validate

BAD_CONFIGS = [
    ({"steps": 0}, "steps"),
    ({"batch_size": -4}, "batch_size"),
    ({"seq_len": 0}, "seq_len"),
    ({"model.n_heads": 6, "model.n_kv_heads": 4}, "model.n_heads"),
    ({"model.d_model": 0}, "model.d_model"),
    ({"model.head_dim": 15}, "model.head_dim"),
    ({"model.dtype": "int8"}, "model.dtype"),
    ({"model.remat": "sometimes"}, "model.remat"),
    ({"attention.kind": "linear"}, "attention.kind"),
    ({"attention.impl": "cuda"}, "attention.impl"),
    ({"attention.impl": "pallas", "seq_len": 200}, "seq_len"),
    ({"optimizer.lr": 0.0}, "optimizer.lr"),
    ({"optimizer.warmup_steps": 10_000}, "optimizer.warmup_steps"),
    ({"optimizer.b2": 1.0}, "optimizer.b2"),
    ({"eval_every": -1}, "eval_every"),
    ({"keep_checkpoints": 0}, "keep_checkpoints"),
    ({"wandb.mode": "cloud"}, "wandb.mode"),
    ({"data.source": "/no/such/dir"}, "data.source"),
    ({"data.mixture": "embedded=lots"}, "data.mixture"),
    ({"data.packing": "zip"}, "data.packing"),
    ({"init_from": "/no/such/run"}, "init_from"),
    ({"optimizer.max_skipped_steps": 0}, "optimizer.max_skipped_steps"),
    ({"eval.passkey_trials": 0}, "eval.passkey_trials"),
    ({"eval.passkey": True, "eval_every": 0}, "eval.passkey"),
    ({"eval.passkey": True, "eval_every": 10, "seq_len": 32}, "seq_len"),
]


@pytest.mark.parametrize("overrides,field", BAD_CONFIGS, ids=[f for _, f in BAD_CONFIGS])
def test_bad_value_names_its_field(overrides, field):
  with pytest.raises(ConfigError) as e:
    validate.validate(small_config(**overrides), num_devices=1)
  assert e.value.field == field
  assert str(e.value).startswith(f"config error: {field}=")


NSA_BAD = [
    ({"nsa.cmp_block": 24}, "nsa.cmp_block"),                       # d=16 does not divide l
    ({"nsa.slc_block": 40}, "nsa.slc_block"),                       # d does not divide l'
    ({"nsa.cmp_block": 128}, "nsa.cmp_block"),                      # l > l'
    ({"nsa.num_selected": 2}, "nsa.num_selected"),                  # < 1 initial + 2 local
    ({"nsa.window": 0}, "nsa.window"),
    ({"nsa.branches": "win+sel"}, "nsa.branches"),
    ({"nsa.branches": "win+win"}, "nsa.branches"),
    ({"nsa.converted_gates": (0.1, 1.0, 0.5)}, "nsa.converted_gates"),
    ({"nsa.initial_gates": (0.0, 0.5, 0.5)}, "nsa.initial_gates"),
    ({"model.rope_scaling.type": "yarn"}, "model.rope_scaling.type"),
    ({"seq_len": 16}, "seq_len"),                                   # shorter than one compression block
    ({"data.packing": "pack", "data.max_docs_per_row": -1}, "data.max_docs_per_row"),
    ({"attention.impl": "pallas", "seq_len": 100}, "seq_len"),      # 8 | T (window walk), l' | T
    ({"attention.impl": "pallas", "seq_len": 384, "nsa.slc_block": 256}, "seq_len"),   # l' | T
    ({"attention.impl": "pallas", "model.n_heads": 12}, "model.n_heads"),   # G=6 does not divide 128
]


@pytest.mark.parametrize("overrides,field", NSA_BAD, ids=[f for _, f in NSA_BAD])
def test_bad_nsa_value_names_its_field(overrides, field):
  with pytest.raises(ConfigError) as e:
    validate.validate(small_config(**{"attention.kind": "nsa", **overrides}), num_devices=1)
  assert e.value.field == field


DSA_BAD = [
    ({"mla.kv_lora_rank": 0}, "mla.kv_lora_rank"),
    ({"mla.qk_rope_dim": 7}, "mla.qk_rope_dim"),
    ({"dsa.stage": "warmup"}, "dsa.stage"),
    ({"dsa.index_topk": 0}, "dsa.index_topk"),
    ({"dsa.index_head_dim": 8}, "dsa.index_head_dim"),              # < qk_rope_dim=16
    ({"dsa.indexer_loss_coef": -1.0}, "dsa.indexer_loss_coef"),
    ({"dsa.selector": "random"}, "dsa.selector"),
    ({"dsa.selector": "local", "dsa.stage": "dense_warmup"}, "dsa.selector"),
    ({"attention.impl": "pallas", "model.n_heads": 12}, "model.n_heads"),   # Pallas tiles: divides 128 or 8k
]


@pytest.mark.parametrize("overrides,field", DSA_BAD, ids=[f for _, f in DSA_BAD])
def test_bad_dsa_value_names_its_field(overrides, field):
  validate.validate(small_config(**{"attention.kind": "dsa"}), num_devices=1)
  with pytest.raises(ConfigError) as e:
    validate.validate(small_config(**{"attention.kind": "dsa", **overrides}), num_devices=1)
  assert e.value.field == field


@pytest.mark.parametrize("kind", ["nsa", "dsa"])
def test_packed_sparse_attention_is_accepted_without_context_parallelism(kind):
  validate.validate(small_config(**{"attention.kind": kind, "data.packing": "pack"}), num_devices=1)
  with pytest.raises(ConfigError) as e:
    validate.validate(small_config(**{"attention.kind": kind, "data.packing": "pack", "mesh.context": 2,
                                      "mesh.fsdp": 1}), num_devices=2)
  assert e.value.field == "data.packing" and "mesh.context=1" in str(e.value)


MESH_CASES = [
    ({"mesh.fsdp": 3}, 8, "mesh"),                                   # 1 x 3 x 1 != 8 devices
    ({"mesh.fsdp": -1, "mesh.tensor": -1}, 8, "mesh"),
    ({"mesh.fsdp": 2, "mesh.tensor": 4}, 8, "model.n_kv_heads"),     # 2 kv heads over tensor=4
    ({"mesh.fsdp": 8, "batch_size": 4}, 8, "batch_size"),
    ({"mesh.fsdp": 8, "model.d_model": 60, "model.n_heads": 4}, 8, "model.d_model"),
]


@pytest.mark.parametrize("overrides,devices,field", MESH_CASES)
def test_mesh_that_cannot_shard_the_model_is_rejected(overrides, devices, field):
  with pytest.raises(ConfigError) as e:
    validate.validate(small_config(**overrides), num_devices=devices)
  assert e.value.field == field


def test_good_config_on_eight_devices_passes():
  validate.validate(small_config(**{"mesh.fsdp": 4, "mesh.tensor": 2}), num_devices=8)


def test_unwritable_workdir_is_rejected(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(ConfigError) as e:
    validate.validate_workdir(str(blocker / "run"))
  assert e.value.field == "workdir"


@pytest.mark.parametrize("overrides,expected", [
    ({"model.n_kv_heads": 3}, "config error: model.n_heads=4: must be a multiple of model.n_kv_heads=3"),
    ({"steps": "many"}, "error: flag --config.steps=many"),
    ({"no_such_field": 1}, "error: unknown config field 'no_such_field'"),
    ({"model.vocab_size": 3000}, "config error: model.vocab_size=3000: must be at least the vocab size 4096"),
])
def test_train_py_exits_2_with_one_line(tmp_path, overrides, expected):
  result = run_train(tmp_path, overrides)
  _exits_2_with_one_line(result, expected)


@pytest.mark.parametrize("args,expected", [
    (["--num_processes=2", "--process_id=0"],
     "config error: --coordinator_address=None: --coordinator_address, --num_processes and --process_id go together"),
    (["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"],
     "config error: --process_id=2: must be in [0, --num_processes=2)"),
])
def test_bad_cluster_flags_exit_2_with_one_line(tmp_path, args, expected):
  _exits_2_with_one_line(run_train(tmp_path, args=args), expected)


@pytest.mark.parametrize("script,flag", [("train.py", "--workdir"), ("scripts/evaluate.py", "--passkey-trials"),
                                         ("scripts/aot_compile.py", "--topology")])
def test_help_prints_the_usage_and_the_flags(script, flag):
  """--help (absl alone would call it an unknown flag) prints the docstring and the script's flags."""
  result = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"python {script}" in result.stdout and f"{flag}:" in result.stdout


@pytest.mark.parametrize("overrides,expected", [
    ({"kernels.pallas_mode": "fast"}, "config error: kernels.pallas_mode='fast': allowed values are auto, compiled"),
    ({"kernels.query_chunk": 0}, "config error: kernels.query_chunk=0: must be a positive number"),
    ({"kernels.dsa_dkv": "scatter"}, "config error: kernels.dsa_dkv='scatter': allowed values are rows, tiles"),
    ({"kernels.dsa_tile_rows": 64}, "config error: kernels.dsa_tile_rows=64: allowed values are 128, 256"),
    ({"kernels.topk_recall": 1.5}, "config error: kernels.topk_recall=1.5: must be in (0, 1]"),
    ({"profile.start_step": -1}, "config error: profile.start_step=-1: must be >= 0"),
])
def test_bad_kernel_and_profile_options_are_refused(overrides, expected):
  with pytest.raises(ConfigError) as e:
    validate.validate(small_config(**overrides))
  assert str(e.value).startswith(expected), str(e.value)


def _exits_2_with_one_line(result, expected):
  assert result.returncode == 2
  assert result.stderr.startswith(expected), result.stderr
  assert "Traceback" not in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1


def _load_preset(name):
  spec = importlib.util.spec_from_file_location(f"preset_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("name,low,high", [
    ("tiny", 3e6, 8e6), ("dsa_tiny", 4e6, 7e6), ("small", 110e6, 140e6), ("1b", 1.0e9, 1.4e9),
    ("7b", 6.8e9, 7.5e9)])
def test_presets_validate_and_have_their_size(name, low, high):
  config = _load_preset(name)
  validate.validate(config, num_devices=1)
  model = transformer.build(config)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 128), "int32"))
  n = transformer.count_params(nn.unbox(abstract))
  assert low <= n <= high, n


def test_resume_check_ignores_init_only_fields_and_names_the_rest():
  """nsa.initial_gates only shapes a new model: a checkpoint made before the field existed, or
  with other starting gates, resumes; a changed window does not."""
  from trainer.checkpoint import check_compatible
  saved = json.loads(base.get_config().to_json())
  del saved["nsa"]["initial_gates"]
  config = base.get_config()
  config.nsa.initial_gates = (0.2, 0.5, 0.5)
  check_compatible(saved, json.loads(config.to_json()), "ckpt/800")
  config.nsa.window = 64
  with pytest.raises(ConfigError, match=r"nsa.window.*made with nsa.window=512"):
    check_compatible(saved, json.loads(config.to_json()), "ckpt/800")
