"""The trainer as a pod program, proved without a TPU: the real train step (what train.py builds)
with Pallas kernels sharded over many devices, compiled ahead of time for multi-chip TPU slices,
and trained by several processes as one."""
import re
import signal
import socket

import numpy as np
import pytest
from jax.experimental import topologies
from test_model import NSA_SMALL

from conftest import read_metrics, run_train, small_config
from model import packing as packing_lib

pytestmark = pytest.mark.slow


def _losses(workdir, steps):
  metrics = read_metrics(workdir)
  return np.array([metrics[s]["loss"] for s in steps])


def test_sharded_pallas_train_step_matches_one_device(tmp_path):
  """fsdp=2 x context=2 x tensor=2 on 8 CPU devices, NSA on the Pallas kernels (interpreted per
  device inside the trainer's own shard_map), fp32: the losses of one device."""
  overrides = {"steps": 2, "seq_len": 256, "model.n_layers": 1, "model.dtype": "float32", "attention.impl": "pallas",
               "kernels.pallas_mode": "interpret", "optimizer.warmup_steps": 1, **NSA_SMALL}
  eight = run_train(tmp_path / "eight", {**overrides, "mesh.fsdp": 2, "mesh.context": 2, "mesh.tensor": 2}, devices=8,
                    wait=False)
  one = run_train(tmp_path / "one", overrides, wait=False)
  stderrs = [proc.communicate(timeout=900)[1] for proc in (eight, one)]
  for proc, stderr in zip((eight, one), stderrs):
    assert proc.returncode == 0, stderr
  assert "mesh {'data': 1, 'fsdp': 2, 'context': 2, 'tensor': 2}" in stderrs[0]
  np.testing.assert_allclose(_losses(tmp_path / "eight", [1, 2]), _losses(tmp_path / "one", [1, 2]), rtol=1e-5)


# ---- ahead-of-time compiles of the real train step for TPU slices ----

BATCH, SEQ = 8, 256     # distinct from every parameter dimension of the small model below


def _compiled_train_step(kind, chip, mesh_axes, packing="concat"):
  """(lowered HLO text, compiled HLO text) of train.py's train step for `chip` (4 chips)."""
  from parallel.mesh import make_mesh
  from trainer import steps, validate
  overrides = {"batch_size": BATCH, "seq_len": SEQ, "attention.impl": "pallas", "kernels.pallas_mode": "compiled",
               "mesh.fsdp": mesh_axes[0], "mesh.tensor": mesh_axes[1], "data.packing": packing}
  if kind == "nsa":
    overrides.update(NSA_SMALL)
  config = small_config(**overrides)
  topology = topologies.get_topology_desc(platform="tpu", topology_name=chip, chip_config_name="default",
                                          chips_per_host_bounds=(2, 2, 1), num_slices=1)
  validate.validate(config, num_devices=len(topology.devices))
  mesh = make_mesh(config.mesh, devices=topology.devices)
  program = steps.build(config, mesh)
  lowered = program.train_step.lower(program.abstract_state, steps.abstract_batch(config, mesh))
  return lowered.as_text(), lowered.compile().as_text()


@pytest.mark.parametrize("kind,min_kernels,chip,mesh_axes,packing", [("dense", 2, "v5e:2x2", (4, 1), "concat"),
                                                                   ("nsa", 6, "v5p:2x2x1", (2, 2), "pack")],
                         ids=["dense-v5e-fsdp4", "nsa-packed-v5p-fsdp2xtensor2"])
def test_real_train_step_compiles_for_tpu_slices(chip, kind, min_kernels, mesh_axes, packing):
  """Mosaic compiles every kernel of the step for the chip; the kernels sit in the trainer's
  shard_map, and no all-gather brings the whole batch's activations ([B=8, T=256, ...]) to a
  device: each device attends over its own rows and heads (packed documents too: NSA's aligned
  rows are built and read back per row)."""
  lowered, compiled = _compiled_train_step(kind, chip, mesh_axes, packing)
  assert lowered.count("tpu_custom_call") >= min_kernels      # dense: splash fwd + bwd; NSA: 3 branches fwd + bwd
  gathers = re.findall(r"= (\w+)\[([\d,]+)\]\{[^}]*\} all-gather\(", compiled)
  assert gathers                                                # the regex reads this HLO (fsdp weights)
  # (the embedding gradient gathers the int32 token ids [B, T, 1]: indices, not activations)
  lengths = {str(SEQ), str(packing_lib.aligned_length(SEQ, NSA_SMALL["nsa.slc_block"], 4))}   # and NSA's aligned row
  whole_batch = [(dtype, dims) for dtype, dims in gathers
                 if dtype in ("bf16", "f32") and str(BATCH) in dims.split(",") and lengths & set(dims.split(","))]
  assert not whole_batch, whole_batch


def test_two_slice_train_step_compiles_on_train_pys_mesh():
  """Multislice: 2 x v5e:2x2 over DCN. parallel.mesh.make_mesh (train.py's own builder, given the
  topology's devices) puts the data axis across the slices and keeps fsdp inside each; the real
  train step (NSA on Pallas) compiles for that mesh, and its gradient all-reduce crosses the slices."""
  from parallel.mesh import make_mesh, num_slices
  from trainer import steps, validate
  config = small_config(**{"batch_size": BATCH, "seq_len": SEQ, "attention.impl": "pallas",
                           "kernels.pallas_mode": "compiled", "mesh.fsdp": -1, **NSA_SMALL})
  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
                                         chips_per_host_bounds=(2, 2, 1), num_slices=2).devices
  assert num_slices(devices) == 2
  validate.validate(config, num_devices=len(devices), num_slices=2)
  mesh = make_mesh(config.mesh, devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
  slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  assert (slice_of == np.arange(2)[:, None, None, None]).all()       # data index i = slice i, fsdp within it
  program = steps.build(config, mesh)
  compiled = program.train_step.lower(program.abstract_state, steps.abstract_batch(config, mesh)).compile()
  assert compiled.as_text().count("all-reduce") > 0


# ---- several processes train as one ----

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_hosts(workdir, overrides, kill_after_step=None):
  """train.py as 2 processes x 2 CPU devices on this machine, joined through gloo: [(rc, stderr)]."""
  port = _free_port()
  procs = [run_train(workdir, overrides, devices=2, wait=False, kill_after_step=kill_after_step,
                     args=[f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"])
           for i in range(2)]
  return [(p.communicate(timeout=600)[1], p.returncode)[::-1] for p in procs]


def test_two_processes_train_like_one_and_resume_after_kill_9(tmp_path):
  """2 hosts x 2 devices = 1 host x 4 devices, step by step (each host feeds its own rows of the
  same global batch); both hosts SIGKILLed after step 6 resume from step 5 and redo step 6 with
  bitwise the same loss."""
  overrides = {"steps": 8, "checkpoint_every": 5, "model.dtype": "float32", "attention.impl": "xla"}
  steps = range(1, 9)
  one = run_train(tmp_path / "one", overrides, devices=4)
  assert one.returncode == 0, one.stderr

  killed = _two_hosts(tmp_path / "two", overrides, kill_after_step=6)
  assert [code for code, _ in killed] == [-signal.SIGKILL] * 2, killed
  before_kill = _losses(tmp_path / "two", range(1, 7))
  resumed = _two_hosts(tmp_path / "two", overrides)
  for code, stderr in resumed:
    assert code == 0, stderr
  assert "resumed from step 5" in resumed[0][1] and "2 process(es)" in resumed[0][1]
  losses = _losses(tmp_path / "two", steps)
  assert list(losses[:6]) == list(before_kill)                      # step 6 redone bitwise
  np.testing.assert_allclose(losses, _losses(tmp_path / "one", steps), rtol=1e-5)
