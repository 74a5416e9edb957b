"""scripts/launch_tpu.py: the commands it prints (--dry-run), its argument errors, and its real path
against a fake `gcloud` on PATH that plays a queued resource (created, preempted, already running).

A few run the script as users do (a subprocess); the rest call its main() in this process (fast)."""
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from conftest import REPO
from scripts import launch_tpu

SCRIPT = str(REPO / "scripts" / "launch_tpu.py")
JOB = ["--name", "my-run", "--tpu", "v5p-64", "--zone", "us-east5-a", "--project", "proj",
       "--config", "configs/1b.py", "--workdir", "gs://bucket/runs/1b-nsa"]
OVERRIDES = ["--", "--config.attention.kind=nsa", "--config.seq_len=32768"]


def launch(*args):
  """`python scripts/launch_tpu.py ARGS` as a user runs it."""
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=REPO, timeout=60)


@pytest.fixture
def main(capfd, monkeypatch):
  """launch_tpu.main(ARGS) in this process -> (exit status, stdout, stderr), gcloud's output included."""
  monkeypatch.chdir(REPO)

  def run(*args):
    try:
      rc = launch_tpu.main(list(args))
    except SystemExit as e:
      rc = e.code
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)
  return run


def commands(out):
  """The printed commands (comment lines dropped), each split as a shell would."""
  return [shlex.split(line) for line in out.splitlines() if line and not line.startswith("#")]


def find(cmds, *words):
  found = [c for c in cmds if all(w in c for w in words)]
  assert found, f"no command with {words} in:\n" + "\n".join(map(shlex.join, cmds))
  return found


def remote(cmd):
  """The --command=... a `gcloud ... ssh` runs on the workers."""
  return next(a for a in cmd if a.startswith("--command="))[len("--command="):]


def jax_version():
  return next(l.split("==")[1].strip() for l in open(REPO / "requirements.txt") if l.startswith("jax=="))


def test_dry_run_prints_create_copy_install_start():
  r = launch(*JOB, "--dry-run", *OVERRIDES)
  assert r.returncode == 0, r.stderr
  cmds = commands(r.stdout)
  create, = find(cmds, "queued-resources", "create")
  assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "my-run"]
  for flag in ("--node-id=my-run", "--zone=us-east5-a", "--project=proj", "--accelerator-type=v5p-64",
               "--runtime-version=v2-alpha-tpuv5"):
    assert flag in create
  assert "--spot" not in create and "--reserved" not in create
  find(cmds, "queued-resources", "describe")                       # the wait for ACTIVE
  scp, = find(cmds, "scp", "--worker=all")
  assert "my-run:sparse-attn.tar.gz" in scp
  install, start = find(cmds, "ssh", "--worker=all")
  assert "pip install" in remote(install) and "requirements.txt" in remote(install)
  assert f'"jax[tpu]=={jax_version()}"' in remote(install)          # read from requirements.txt
  assert "libtpu==" in remote(install)                              # from requirements-dev.txt
  run = remote(start)
  assert ("train.py --config configs/1b.py --workdir gs://bucket/runs/1b-nsa "
          "--config.attention.kind=nsa --config.seq_len=32768") in run
  assert "setsid nohup" in run and "logs/train.log" in run
  # Order: slice, already-running check on worker 0, copy, install, start.
  text = r.stdout
  assert (text.index("queued-resources create") < text.index("--worker=0") < text.index("tpu-vm scp")
          < text.index("pip install") < text.index("setsid nohup"))


def test_spot_reserved_and_generations(main):
  spot = main(*JOB, "--spot", "--dry-run")
  assert "--spot" in find(commands(spot.stdout), "queued-resources", "create")[0]
  reserved = main(*JOB, "--reserved", "--dry-run")
  assert "--reserved" in find(commands(reserved.stdout), "queued-resources", "create")[0]
  for tpu, accelerator, runtime in [("v5e-16", "v5litepod-16", "v2-alpha-tpuv5-lite"),
                                    ("v6e-8", "v6e-8", "v2-alpha-tpuv6e"), ("v4-8", "v4-8", "tpu-ubuntu2204-base")]:
    r = main(*JOB[:2], "--tpu", tpu, *JOB[4:], "--dry-run")
    create, = find(commands(r.stdout), "queued-resources", "create")
    assert f"--accelerator-type={accelerator}" in create and f"--runtime-version={runtime}" in create
  r = main(*JOB, "--runtime-version", "v2-alpha-tpuv5-custom", "--dry-run")
  assert "--runtime-version=v2-alpha-tpuv5-custom" in find(commands(r.stdout), "create")[0]


def test_xpk_multislice(main):
  r = main(*JOB, "--via", "xpk", "--cluster", "my-gke", "--num-slices", "2", "--spot", "--dry-run",
           "--config.attention.kind=nsa", "--", "--config.seq_len=32768")
  assert r.returncode == 0, r.stderr
  create, = find(commands(r.stdout), "xpk", "workload", "create")
  for flag in ("--cluster=my-gke", "--workload=my-run", "--tpu-type=v5p-64", "--num-slices=2", "--spot",
               "--project=proj", "--zone=us-east5-a"):
    assert flag in create
  command = next(a for a in create if a.startswith("--command="))
  assert ("python train.py --config configs/1b.py --workdir gs://bucket/runs/1b-nsa "
          "--config.attention.kind=nsa --config.seq_len=32768") in command
  assert f'"jax[tpu]=={jax_version()}"' in command                   # installed in the base image at start
  r = main(*JOB, "--via", "xpk", "--cluster", "my-gke", "--docker-image", "gcr.io/p/sparse:1", "--dry-run")
  create, = find(commands(r.stdout), "xpk", "workload", "create")
  assert "--docker-image=gcr.io/p/sparse:1" in create and "pip install" not in " ".join(create)


def test_gcloud_multislice(main):
  """--num-slices 2 through gcloud: one queued resource of two TPU VMs (my-run-0, my-run-1); the
  code goes to, and train.py starts on, every worker of both; the already-running check and the
  ACTIVE wait are the queued resource's."""
  r = main(*JOB, "--num-slices", "2", "--dry-run", *OVERRIDES)
  assert r.returncode == 0, r.stderr
  cmds = commands(r.stdout)
  create, = find(cmds, "queued-resources", "create")
  assert "--node-count=2" in create and "--node-prefix=my-run" in create and "--accelerator-type=v5p-64" in create
  assert not any(a.startswith("--node-id") for a in create)
  for node in ("my-run-0", "my-run-1"):
    scp, = find(cmds, "scp", f"{node}:sparse-attn.tar.gz")
    install, start = find(cmds, "ssh", node, "--worker=all")
    assert "pip install" in remote(install) and "train.py --config configs/1b.py" in remote(start)
  assert "2 x v5p-64" in r.stdout and "all 16 workers" in r.stdout


def test_status_logs_delete_dry_run(main):
  where = ["--name", "my-run", "--zone", "us-east5-a", "--dry-run"]
  status = commands(main("status", *where).stdout)
  find(status, "queued-resources", "describe", "my-run")
  ssh, = find(status, "tpu-vm", "ssh", "--worker=0")
  assert "train.pid" in remote(ssh) and "tail -n 50" in remote(ssh)
  logs, = commands(main("logs", *where, "--worker", "all", "-f", "--lines", "20").stdout)
  assert "--worker=all" in logs and "tail -n 20 -F $HOME/sparse-attn/logs/train.log" in remote(logs)
  logs, = commands(main("logs", *where, "--worker", "3").stdout)
  assert "--worker=3" in logs
  delete = commands(main(*where, "delete").stdout)                # the subcommand may come anywhere
  assert ["gcloud", "compute", "tpus", "queued-resources", "delete", "my-run", "--zone=us-east5-a",
          "--force", "--quiet"] in delete
  xpk = ["--via", "xpk", "--cluster", "my-gke", "--name", "my-run", "--dry-run"]
  assert commands(main("status", *xpk).stdout) == [
      ["xpk", "workload", "list", "--cluster=my-gke", "--filter-by-job=my-run"]]
  assert commands(main("delete", *xpk).stdout) == [
      ["xpk", "workload", "delete", "--cluster=my-gke", "--workload=my-run"]]
  logs, = commands(main("logs", *xpk, "--worker", "all").stdout)
  assert logs[:2] == ["kubectl", "logs"] and "jobset.sigs.k8s.io/jobset-name=my-run" in logs


@pytest.mark.parametrize("change, names", [
    (["--tpu", "v5x-8"], ["--tpu", "v5x-8"]),
    (["--tpu", "v5p-12"], ["--tpu", "v5p-12"]),
    (["--workdir", "runs/1b"], ["--workdir", "runs/1b", "gs://"]),
    (["--config", "configs/nope.py"], ["--config", "configs/nope.py"]),
    (["--name", "My_Run"], ["--name", "My_Run"]),
    (["--num-slices", "0"], ["--num-slices=0", "at least 1"]),
    (["--config.seq_len", "32768"], ["--config.seq_len"]),
    (["--", "--steps=5"], ["--steps=5"]),
])
def test_bad_arguments_exit_2_with_one_line(main, change, names):
  args = list(JOB)
  if change[0] in args and not change[0].startswith("--config."):
    args[args.index(change[0]) + 1] = change[1]
  else:
    args += change
  r = main(*args, "--dry-run")
  assert r.returncode == 2 and r.stdout == ""
  assert len(r.stderr.strip().splitlines()) == 1, r.stderr
  for name in names:
    assert name in r.stderr


def test_bad_accelerator_as_a_user_sees_it():
  r = launch(*JOB[:2], "--tpu", "v5x-8", *JOB[4:], "--dry-run")
  assert r.returncode == 2 and r.stdout == ""
  assert r.stderr.count("\n") == 1 and "--tpu=v5x-8" in r.stderr and "v5p-N" in r.stderr


def test_missing_required_arguments(main):
  r = main("--name", "my-run", "--tpu", "v5p-64", "--zone", "z", "--config", "configs/1b.py", "--dry-run")
  assert r.returncode == 2 and "--workdir" in r.stderr
  r = main("status", "--name", "my-run", "--dry-run")
  assert r.returncode == 2 and "--zone" in r.stderr
  r = main(*JOB, "--via", "xpk", "--dry-run")
  assert r.returncode == 2 and "--cluster" in r.stderr


# A stand-in for gcloud (bash: starts in milliseconds): one queued resource whose life is scripted by
# files in $FAKE_GCLOUD: qr (its state; absent: not found), running, fail_scp; it appends to calls.
FAKE_GCLOUD = """#!/usr/bin/env bash
d=$FAKE_GCLOUD; verb="$3 $4"; last="${@: -1}"
echo "$verb" >> $d/calls
case "$verb" in
  "queued-resources describe")
    [ -f $d/qr ] || { echo "ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: $5" >&2; exit 1; }
    echo "{\\"state\\": {\\"state\\": \\"$(cat $d/qr)\\"},"
    echo " \\"tpu\\": {\\"nodeSpec\\": [{\\"node\\": {\\"acceleratorType\\": \\"v5p-64\\"}}]}}"
    case $(cat $d/qr) in WAITING_FOR_RESOURCES) echo PROVISIONING > $d/qr;; PROVISIONING) echo ACTIVE > $d/qr;; esac;;
  "queued-resources create") echo WAITING_FOR_RESOURCES > $d/qr;;
  "queued-resources delete") rm $d/qr;;
  "tpu-vm describe") echo '{"state": "READY"}';;
  "tpu-vm scp") tar -tzf "$5" > $d/shipped; [ ! -f $d/fail_scp ] || exit 7;;
  "tpu-vm ssh")
    echo "$last" > $d/last_ssh
    case "$last" in *"not running"*)
      if [ -f $d/running ]; then echo "train.py running (pid 42) on w0"; else echo "train.py not running on w0"; fi;;
    esac;;
esac
"""


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch, main):
  """Runs the launch of JOB + OVERRIDES against the fake -> (result, gcloud verbs called, fake's dir)."""
  if not shutil.which("bash"):
    pytest.skip("the fake gcloud is a bash script")
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "gcloud").write_text(FAKE_GCLOUD)
  (tmp_path / "bin" / "gcloud").chmod(0o755)
  monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_GCLOUD", str(tmp_path))
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

  def run(qr=None, running=False, fail_scp=False):
    for name, value in (("qr", qr), ("running", running), ("fail_scp", fail_scp)):
      if value:
        (tmp_path / name).write_text(str(value))
    r = main(*JOB, "--poll-seconds", "0", *OVERRIDES)
    return r, (tmp_path / "calls").read_text().splitlines(), tmp_path
  return run


def test_fresh_launch_runs_every_step_in_order(fake_gcloud):
  r, calls, d = fake_gcloud()
  assert r.returncode == 0, r.stderr
  assert calls == ["queued-resources describe", "queued-resources create"] + ["queued-resources describe"] * 3 + [
      "tpu-vm describe", "tpu-vm ssh", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"]
  assert "WAITING_FOR_RESOURCES" in r.stdout and "ACTIVE" in r.stdout and "[5/5]" in r.stdout
  shipped = (d / "shipped").read_text().split()
  assert {"train.py", "configs/1b.py", "requirements.txt", "scripts/launch_tpu.py"} <= set(shipped)
  assert not any(f.startswith((".git/", "runs/")) for f in shipped)
  assert "--workdir gs://bucket/runs/1b-nsa --config.attention.kind=nsa --config.seq_len=32768" in (
      d / "last_ssh").read_text()
  assert not (d / "launch_tpu-my-run.tar.gz").exists()              # the tarball is cleaned up


def test_preempted_slice_is_recreated(fake_gcloud):
  r, calls, _ = fake_gcloud(qr="SUSPENDED")
  assert r.returncode == 0, r.stderr
  assert calls[:3] == ["queued-resources describe", "queued-resources delete", "queued-resources create"]
  assert "SUSPENDED" in r.stdout and calls[-1] == "tpu-vm ssh"


def test_already_running_starts_nothing(fake_gcloud):
  r, calls, _ = fake_gcloud(qr="ACTIVE", running=True)
  assert r.returncode == 0, r.stderr
  assert calls == ["queued-resources describe", "queued-resources describe", "tpu-vm describe", "tpu-vm ssh"]
  assert "not starting a second copy" in r.stdout


def test_failing_step_stops_with_its_command(fake_gcloud):
  r, calls, _ = fake_gcloud(qr="ACTIVE", fail_scp=True)
  assert r.returncode == 1
  assert calls[-1] == "tpu-vm scp"                                  # nothing after the failed copy
  assert "exit status 7" in r.stderr and "gcloud compute tpus tpu-vm scp" in r.stderr


@pytest.mark.skipif(not (shutil.which("bash") and shutil.which("setsid") and os.path.isdir("/proc/self")),
                    reason="needs bash, setsid and /proc (Linux, like a TPU VM)")
def test_remote_scripts_start_detect_and_restart_train(tmp_path):
  """The worker-side shell lines, run in a local bash with a fake $HOME and a train.py that waits."""
  home = tmp_path / "home"
  (home / "sparse-attn" / "code").mkdir(parents=True)
  (home / "sparse-attn" / "venv" / "bin").mkdir(parents=True)
  (home / "sparse-attn" / "venv" / "bin" / "python").symlink_to(sys.executable)
  (home / "sparse-attn" / "code" / "train.py").write_text(textwrap.dedent("""\
      import os, signal, sys, time
      signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
      print("args", sys.argv[1:], os.environ["RUN_TAG"], flush=True)
      while True:
        time.sleep(0.05)
      """))
  env = dict(os.environ, HOME=str(home))
  bash = lambda script: subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                                       timeout=30).stdout
  assert "not running" in bash(launch_tpu.CHECK)
  start = launch_tpu.start_script("train.py --workdir gs://b/r '--config.wandb.name=a b'", [("RUN_TAG", "x y")])
  log = home / "sparse-attn" / "logs" / "train.log"
  line = "args ['--workdir', 'gs://b/r', '--config.wandb.name=a b'] x y"   # arguments and environment intact

  def until(condition):   # the background child needs a moment to exec python and print
    for _ in range(200):
      if condition():
        return True
      time.sleep(0.05)

  try:
    assert "started" in bash(start)
    pid = int((home / "sparse-attn" / "train.pid").read_text())
    assert until(lambda: log.read_text().count(line) == 1)
    assert "python\0train.py" in open(f"/proc/{pid}/cmdline").read() and os.getsid(pid) == pid   # detached
    assert f"running (pid {pid})" in bash(launch_tpu.CHECK)
    assert "stopping train.py" in bash(start)                       # a second start replaces the first
    assert not os.path.exists(f"/proc/{pid}/cmdline") or "train.py" not in open(f"/proc/{pid}/cmdline").read()
    assert until(lambda: log.read_text().count(line) == 2)
    assert log.read_text().count("launch_tpu.py starts train.py") == 2
  finally:
    subprocess.run(["kill", "-9", (home / "sparse-attn" / "train.pid").read_text().strip()], capture_output=True)
  assert subprocess.run(["bash", "-n", "-c", launch_tpu.install_script('"jax[tpu]==1"')]).returncode == 0
