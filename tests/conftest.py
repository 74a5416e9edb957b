"""Shared helpers: a test-sized model config and a way to run train.py as users do."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The suite runs on 2 xdist workers; both load libtpu for the ahead-of-time TPU compiles (no TPU is
# attached, so there is nothing to share), which its single-process lockfile would otherwise refuse.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# Most of a CPU test's time is XLA:CPU compiling programs that then run for milliseconds: tests
# (this process and every train.py they start) compile without the backend's optimisation passes,
# 2-3x faster. Numbers move by float rounding only; runs compared bitwise share the flags.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
# One persistent compilation cache for the session (this process, the xdist workers and every
# train.py they start): a resumed, killed or second-host run loads the programs the first one
# compiled. A fresh directory per session, so nothing stale is ever read.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax-test-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# A model small enough to train a step in well under a second on one CPU core.
SMALL_OVERRIDES = {
    "seq_len": 128, "batch_size": 8, "log_every": 1, "eval_every": 0, "checkpoint_every": 5,
    "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2,
    "model.head_dim": 16, "model.mlp_dim": 128, "optimizer.warmup_steps": 2,
    "wandb.mode": "disabled",
}


def small_config(preset=None, **overrides):
  from configs import tiny
  config = (preset or tiny.get_config)()
  for field, value in {**SMALL_OVERRIDES, **overrides}.items():
    node = config
    *parents, leaf = field.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def run_train(workdir, overrides=None, *, devices=1, env=None, timeout=600, wait=True, config="configs/tiny.py",
              args=(), kill_after_step=None, small_model=True):
  """Runs `python train.py --config CONFIG` with SMALL_OVERRIDES + overrides (+ more flags `args`);
  with kill_after_step, through tests/kill_after.py: SIGKILLed right after that step. small_model
  False: the model fields of SMALL_OVERRIDES are left out (init_from=hf:DIR sets them)."""
  killer = [str(REPO / "tests" / "kill_after.py"), str(kill_after_step)] if kill_after_step else []
  args = [sys.executable, *killer, str(REPO / "train.py"), "--config", str(REPO / config),
          "--workdir", str(workdir), *args]
  small = {k: v for k, v in SMALL_OVERRIDES.items() if small_model or not k.startswith("model.")}
  args += [f"--config.{k}={v}" for k, v in {**small, **(overrides or {})}.items()]
  full_env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
              "JAX_PLATFORMS": "cpu", **(env or {})}
  if not wait:
    return subprocess.Popen(args, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
  return subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def read_metrics(workdir) -> dict[int, dict]:
  """{step: record} from WORKDIR/metrics.jsonl."""
  with open(Path(workdir) / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f if line.strip()]
  return {r["step"]: r for r in records}


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
  """20 uninterrupted steps of the small model, checkpoints every 5: the baseline for resume tests."""
  workdir = tmp_path_factory.mktemp("reference")
  result = run_train(workdir, {"steps": 20})
  assert result.returncode == 0, result.stderr
  return workdir


def pytest_collection_modifyitems(config, items):
  """Long tests first (trainings in subprocesses, marked slow, and the TPU ahead-of-time
  compiles): the two xdist workers then steal short tests at the end instead of one waiting on
  the other's minute-long test."""
  long = lambda item: item.get_closest_marker("slow") is not None or "compile" in item.name
  items.sort(key=lambda item: not long(item))
