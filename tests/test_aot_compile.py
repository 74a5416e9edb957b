"""scripts/aot_compile.py, run as users run it: the real train step of a small model compiled ahead
of time for a TPU slice (libtpu, no TPU), whether it fits, and its argument errors."""
import re
import subprocess
import sys

import pytest

from conftest import REPO, SMALL_OVERRIDES

SMALL = {**SMALL_OVERRIDES, "seq_len": 256}


def aot(*args, overrides=None):
  """`python scripts/aot_compile.py --config configs/tiny.py ARGS` with the small model's overrides."""
  argv = [sys.executable, str(REPO / "scripts" / "aot_compile.py"), "--config", str(REPO / "configs" / "tiny.py"),
          *(f"--config.{k}={v}" for k, v in {**SMALL, **(overrides or {})}.items()), *args]
  return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_small_dense_model_fits_a_v5e_slice():
  """Two sequence lengths, two rows; XLA's count scaled from the one scanned layer to both. No data
  is read: a data.source that is not on this host does not matter."""
  result = aot("--topology", "v5e:2x2", "--seq-lens", "256,512", overrides={"data.source": "/nonexistent/prepared"})
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "mesh: data=1, fsdp=4, context=1, tensor=1" in out
  assert re.search(r"HBM per chip [\d.]+ GiB = arguments", out), out
  assert re.search(r"\(3 Pallas kernel calls\)", out), out      # splash forward, dq, dK/dV
  rows = [line.split() for line in out.splitlines() if re.match(r"\s+(256|512) ", line)]
  assert [r[0] for r in rows] == ["256", "512"] and all(r[2] == "yes" for r in rows), out
  assert all("scaled" in " ".join(r) for r in rows), out
  model, xla = float(rows[0][3]), float(rows[0][5].rstrip("*"))
  assert 0.8 < xla / model < 1.5, (model, xla)                   # XLA's count + splash ~ the analytical one
  assert re.fullmatch(r"v5e:2x2 \S*configs/tiny\.py: fits \([\d.]+ of 16 GiB HBM per chip\)", out.splitlines()[-1])


@pytest.mark.slow
def test_a_batch_too_big_for_hbm_does_not_fit():
  result = aot("--topology", "v5e-4", "--noscale-layers", overrides={"batch_size": 65536})
  assert result.returncode == 1, result.stderr[-3000:]
  last = result.stdout.splitlines()[-1]
  gib = float(re.fullmatch(r"v5e-4 \S*configs/tiny\.py: does not fit \(([\d.]+) of 16 GiB HBM per chip\)", last)[1])
  assert gib > 16


@pytest.mark.slow
def test_multislice_data_axis_spans_the_slices():
  result = aot("--topology", "v5e-4", "--num-slices", "2", "--noscale-layers", overrides={"batch_size": 16})
  assert result.returncode == 0, result.stderr[-3000:]
  assert "v5e:2x2 x 2 slice(s) = 8 chips" in result.stdout and "mesh: data=2, fsdp=4, context=1, tensor=1" in result.stdout
  assert "1 layer body" in result.stdout


@pytest.mark.slow
def test_an_hf_model_is_checked_against_a_slice_from_its_config_json():
  """init_from=hf:DIR: the model is the one config.json describes (no weights are read)."""
  argv = [sys.executable, str(REPO / "scripts" / "aot_compile.py"), "--config", str(REPO / "configs" / "tiny.py"),
          "--topology", "v5e-4", "--noscale-layers", "--config.seq_len=256",
          f"--config.init_from=hf:{REPO / 'tests' / 'fixtures' / 'hf' / 'qwen3'}"]
  result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "model: d_model 64, 2 layers, 4/2 heads of 32, mlp 96, vocab 320 (config.json of hf:" in result.stdout
  assert result.stdout.splitlines()[-1].startswith("v5e-4 ") and ": fits (" in result.stdout.splitlines()[-1]


@pytest.mark.parametrize("args, message", [
    (["--topology", "v9-8"], "--topology=v9-8: allowed are v4-N"),
    (["--topology", "v5e-4", "--num-slices", "2", "--config.mesh.data=3", "--config.mesh.fsdp=1"],
     "mesh.data=3: must be a multiple of the 2 slices"),
    (["--topology", "v5e-4", "--config.model.n_heads=5"], "model.n_heads=5"),
    (["--topology", "v5e-4", "--bogus"], "Unknown command line flag 'bogus'"),
])
def test_bad_arguments_exit_2_naming_them(args, message):
  result = aot(*args)
  assert result.returncode == 2, result.stderr[-3000:]
  assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
def test_nsa_with_a_context_axis_reports_its_all_gathers():
  """NSA on Pallas with context=2 x fsdp=2 on v5p:2x2x1 (seq 512: query chunks of 128): it fits, and
  per layer each chip receives the other half of the keys it gathers: at least K and V for the
  selection and window kernels (bf16 [B/2, T/2, HKV, D] each), at most 3x that with the compressed
  branch's inputs and outputs."""
  nsa = {"attention.kind": "nsa", "nsa.cmp_block": 16, "nsa.cmp_stride": 8, "nsa.slc_block": 32,
         "nsa.num_selected": 3, "nsa.window": 32}
  result = aot("--topology", "v5p:2x2x1", "--noscale-layers",
               overrides={**nsa, "seq_len": 512, "mesh.context": 2, "mesh.fsdp": 2, "attention.impl": "pallas"})
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "mesh: data=1, fsdp=2, context=2, tensor=1" in out
  mb = float(re.search(r"context=2: per layer and chip the forward all-gathers bring ([\d.]+) MB", out)[1])
  kv = 2 * (SMALL["batch_size"] // 2) * (512 // 2) * SMALL["model.n_kv_heads"] * SMALL["model.head_dim"] * 2 / 1e6
  assert kv <= mb <= 3 * kv, (mb, kv, out)
  assert re.search(r"context all-gather/layer [\d.]+ MB = [\d.]+ ms vs attention [\d.]+ ms", out), out
