"""scripts/sweep.py: a grid with invalid points gives finished and failed rows and plots, an
interrupted sweep resumes where it stopped, --report rebuilds the table from disk; failures of every
kind become rows; a config file's sweep(); bench_attention.py's kernel-level sweep; the wandb group;
launch_tpu.py --sweep."""
import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import types

import pytest
from test_model import NSA_SMALL

from conftest import FAST_COMPILE, REPO, SMALL_OVERRIDES, read_metrics
from sweeps import report as sweep_report
from sweeps import runner as sweep_runner
from sweeps.runner import Point, Runner, error_line, read_status

SWEEP = str(REPO / "scripts" / "sweep.py")
# The training tests' shrunk tiny NSA model, one layer.
TINY_NSA = {**SMALL_OVERRIDES, **NSA_SMALL, "model.n_layers": 1, "batch_size": 2}
PNG = b"\x89PNG\r\n\x1a\n"


def _load(name):
  spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sweep(workdir, *args, config=REPO / "configs" / "tiny.py", overrides=None, wait=True):
  """`python scripts/sweep.py` as users run it, on the shrunk tiny NSA model (less the swept fields),
  with the tests' env."""
  swept = {a.split("=")[0] for a in args if "=" in a}
  cmd = [sys.executable, SWEEP, "--config", str(config), "--workdir", str(workdir), *args,
         *(f"--config.{k}={v}" for k, v in {**TINY_NSA, **(overrides or {})}.items() if k not in swept)]
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}", "JAX_PLATFORMS": "cpu"}
  if not wait:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


@pytest.mark.slow
def test_grid_with_invalid_points_interrupted_resumed_and_reported(tmp_path, capsys):
  """One user story (each train.py start costs seconds): a 2x2 grid on the shrunk tiny NSA whose
  slc_block=36 points are invalid (the stride 8 does not divide the block); Ctrl-C during the
  second point; the same command again skips the first, resumes the second from its checkpoint
  and records the invalid points as failed rows; --report rebuilds the table and plots."""
  workdir, steps = tmp_path / "sw", 16
  grid = ("--sweep", "nsa.slc_block=32,36", "--sweep", "seed=0,1")     # points (32,0) (32,1) (36,0) (36,1)
  overrides = {"steps": steps, "checkpoint_every": 1000}           # no eval (seconds of compile): the
                                                                   # eval columns are tested from files below
  proc = sweep(workdir, *grid, overrides=overrides, wait=False)
  second = workdir / "slc_block=32,seed=1"
  deadline = time.time() + 300
  while not ((second / "metrics.jsonl").exists() and len((second / "metrics.jsonl").read_text().splitlines()) >= 2):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()
    time.sleep(0.02)
  proc.send_signal(signal.SIGINT)                                  # Ctrl-C
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 130, stdout + stderr
  rows = read_csv(workdir / "results.csv")
  assert [(r["nsa.slc_block"], r["seed"], r["status"]) for r in rows] == [
      ("32", "0", "finished"), ("32", "1", "unfinished"), ("36", "0", "unfinished"), ("36", "1", "unfinished")]
  stopped = int(rows[1]["steps"])
  assert 2 <= stopped < steps
  assert os.listdir(second / "checkpoints") == [str(stopped)]      # saved at the Ctrl-C
  first_log = (workdir / "slc_block=32,seed=0" / "train.log").read_text()

  again = sweep(workdir, *grid, overrides=overrides)               # the same command
  assert again.returncode == 1, again.stdout + again.stderr         # it ran every point; some failed
  assert "[1/4] slc_block=32,seed=0: finished before, skipped" in again.stdout
  assert "2 finished, 2 failed" in again.stdout
  assert (workdir / "slc_block=32,seed=0" / "train.log").read_text() == first_log   # not trained again
  assert f"resumed from step {stopped}" in (second / "train.log").read_text()
  rows = read_csv(workdir / "results.csv")
  assert [(r["nsa.slc_block"], r["seed"], r["status"]) for r in rows] == [
      ("32", "0", "finished"), ("32", "1", "finished"), ("36", "0", "failed"), ("36", "1", "failed")]
  assert rows[0]["run_dir"] == str(workdir / "slc_block=32,seed=0")
  for row in rows[:2]:
    metrics = read_metrics(row["run_dir"])
    assert sorted(metrics) == list(range(1, steps + 1)) and int(row["steps"]) == steps
    assert float(row["train_loss"]) == metrics[steps]["loss"] and row["final_eval_loss"] == ""
    assert float(row["tokens_per_sec"]) > 0 and float(row["tflops_per_device"]) > 0
    assert int(row["params"]) == metrics[steps]["params"] > 100_000
    assert row["error"] == ""
  assert rows[0]["params"] == rows[1]["params"] and rows[0]["train_loss"] != rows[1]["train_loss"]
  for row in rows[2:]:
    assert row["error"] == "config error: nsa.slc_block=36: must be a multiple of nsa.cmp_stride=8 (d | l')"
    assert row["steps"] == "0" and row["train_loss"] == row["final_eval_loss"] == ""
  table = (workdir / "results.md").read_text().splitlines()
  assert len(table) == 2 + 4 and table[0].startswith("| nsa.slc_block | seed | status |")
  assert "| 36 | 1 | failed | 0 |" in table[5] and "config error: nsa.slc_block=36" in table[5]
  for name in sweep_report.PLOTS:
    assert (workdir / name).read_bytes()[:8] == PNG, name

  # --report rebuilds the same table and the plots from what is on disk.
  built = {name: (workdir / name).read_text() for name in ("results.csv", "results.md")}
  for name in (*built, *sweep_report.PLOTS):
    (workdir / name).unlink()
  assert _load("sweep").main(["--workdir", str(workdir), "--report"]) == 0
  assert {name: (workdir / name).read_text() for name in built} == built
  assert built["results.md"] in capsys.readouterr().out
  for name in sweep_report.PLOTS:
    assert (workdir / name).read_bytes()[:8] == PNG, name


FAKE_TRAIN = r"""
import os, signal, sys, time
mode = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--config.mode="))
print("train:  40%|####      | 4/10 [00:01<00:02]", end="\r", file=sys.stderr, flush=True)
if mode == "config":
  print("config error: mode='config': allowed are ok", file=sys.stderr)
  sys.exit(2)
if mode == "oom":                      # what the kernel's OOM killer does
  os.kill(os.getpid(), signal.SIGKILL)
if mode == "crash":
  raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 2.00GiB\nsecond line")
if mode.startswith("together"):       # finishes only while another point runs alongside it (--parallel)
  workdir = sys.argv[sys.argv.index("--workdir") + 1]
  open(workdir + ".started", "w").close()
  for _ in range(500):
    if len([f for f in os.listdir(os.path.dirname(workdir)) if f.endswith(".started")]) >= 2:
      sys.exit(0)
    time.sleep(0.02)
  sys.exit(1)
"""


def test_every_kind_of_failure_is_a_row_and_the_sweep_goes_on(tmp_path, monkeypatch):
  fake = tmp_path / "fake_train.py"
  fake.write_text(FAKE_TRAIN)
  monkeypatch.setattr(sweep_runner, "TRAIN", str(fake))
  modes = ("config", "oom", "crash", "ok")
  points = [Point(m, {"mode": m}, str(tmp_path / m)) for m in modes]
  said = []
  interrupted, statuses = Runner("configs/tiny.py", [], "g", echo=said.append).run(points)
  assert not interrupted and statuses == ["failed", "failed", "failed", "finished"]
  errors = [read_status(p.directory)["error"] for p in points]
  assert errors == ["config error: mode='config': allowed are ok",
                    "killed by SIGKILL (out of memory? the kernel's OOM killer sends SIGKILL)",
                    "RuntimeError: RESOURCE_EXHAUSTED: Out of memory allocating 2.00GiB", ""]
  assert [read_status(p.directory)["returncode"] for p in points] == [2, -signal.SIGKILL, 1, 0]
  assert "[1/4] config: failed (exit status 2): config error" in said[1]
  # Re-running skips the finished point only (same arguments), and reruns failed ones.
  said.clear()
  Runner("configs/tiny.py", [], "g", echo=said.append).run(points)
  assert "[4/4] ok: finished before, skipped" in said and sum("finished before" in s for s in said) == 1
  # A changed command (another fixed override) runs it again.
  said.clear()
  Runner("configs/tiny.py", ["--config.steps=9"], "g", echo=said.append).run(points[3:])
  assert not any("finished before" in s for s in said)
  # --parallel 2: two points at once (each waits for the other).
  pair = [Point(m, {"mode": m}, str(tmp_path / "par" / m)) for m in ("together1", "together2")]
  assert Runner("configs/tiny.py", [], "g", parallel=2, echo=said.append).run(pair) == (False, ["finished"] * 2)


def test_error_line_is_the_first_line_of_the_last_exception():
  chained = ("Traceback (most recent call last):\n  File \"a.py\", line 1\nValueError: inner\n\n"
             "The above exception was the direct cause of the following exception:\n\n"
             "Traceback (most recent call last):\n  File \"train.py\", line 9, in main\n    x()\n"
             "jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory\nwhile allocating\n"
             "train:  90%|#########  | 9/10\r")
  assert error_line(chained, 1) == "jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory"
  assert error_line("INFO data: embedded\nerror: unknown config field nsa.foo on the command line\n", 2) == (
      "error: unknown config field nsa.foo on the command line")
  assert error_line("train:  10%|#  | 1/10\r", -signal.SIGSEGV) == "killed by SIGSEGV"
  assert error_line("", 3) == "exit status 3"


def test_report_numbers_from_metrics_and_status_files(tmp_path):
  workdir = tmp_path / "sw"
  points = [Point(n, {"nsa.slc_block": b}, str(workdir / n)) for n, b in (("a", 32), ("b", 36), ("c", 128))]
  sweep_report.save_manifest(str(workdir), "demo", "configs/tiny.py", [], points)
  (workdir / "a").mkdir()
  records = [{"step": 1, "loss": 8.0, "tokens_per_sec": 100.0, "tflops_per_device": 0.1, "params": 4_000_000},
             {"step": 2, "loss": 7.0, "eval_loss": 7.5, "tokens_per_sec": 300.0, "tflops_per_device": 0.3,
              "params": 4_000_000},
             {"step": 3, "loss": 6.0, "eval_loss": 7.0, "tokens_per_sec": 200.0, "tflops_per_device": 0.2,
              "params": 4_000_000},
             {"step": 4, "loss": 5.5, "eval_loss": 7.25, "tokens_per_sec": 250.0, "tflops_per_device": 0.25,
              "params": 4_000_000}]
  (workdir / "a" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "lo')
  (workdir / "a" / sweep_runner.STATUS_FILE).write_text(json.dumps({"status": "finished", "error": ""}))
  (workdir / "b").mkdir()
  (workdir / "b" / sweep_runner.STATUS_FILE).write_text(json.dumps({"status": "failed", "error": "config error: x|y"}))
  rows = sweep_report.write_report(str(workdir))      # c: never started
  a, b, c = rows
  assert (a["status"], a["steps"], a["train_loss"], a["best_eval_loss"], a["final_eval_loss"]) == (
      "finished", 4, 5.5, 7.0, 7.25)
  assert (a["tokens_per_sec"], a["tflops_per_device"], a["params"]) == (225.0, 0.225, 4_000_000)   # medians
  assert (b["status"], b["steps"], b["error"], b["final_eval_loss"]) == ("failed", 0, "config error: x|y", None)
  assert (c["status"], c["steps"], c["run_dir"]) == ("unfinished", 0, str(workdir / "c"))
  assert read_csv(workdir / "results.csv")[0] == {
      "nsa.slc_block": "32", "status": "finished", "steps": "4", "train_loss": "5.5", "start_eval_loss": "",
      "best_eval_loss": "7.0", "final_eval_loss": "7.25", "retrieval_beyond_8w": "", "tokens_per_sec": "225.0",
      "tflops_per_device": "0.225", "params": "4000000", "run_dir": str(workdir / "a"), "error": ""}
  table = (workdir / "results.md").read_text().splitlines()
  assert table[2] == f"| 32 | finished | 4 | 5.5000 |  | 7.0000 | 7.2500 |  | 225 | 0.225 | 4.00M | `{workdir / 'a'}` |  |"
  assert table[3].endswith("| config error: x\\|y |") and table[4].startswith("| 128 | unfinished | 0 |")
  for name in sweep_report.PLOTS:
    assert (workdir / name).read_bytes()[:8] == PNG


def test_config_file_sweep_dry_run_and_argument_errors(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(REPO)
  main = _load("sweep").main
  assert main(["--config", "configs/nsa_sweep.py", "--workdir", str(tmp_path / "nsa"), "--dry-run"]) == 0
  out = capsys.readouterr().out
  listed = [line.split() for line in out.splitlines() if line.startswith("  ")]
  assert len(listed) == 18 == len({d for d, *_ in listed})          # 3 blocks x 3 top-n x 2 strides
  assert listed[0][:2] == [f"{tmp_path}/nsa/slc_block=32,num_selected=8,cmp_stride=8", "[not", ]
  assert listed[-1][0].endswith("/slc_block=128,num_selected=32,cmp_stride=16")
  assert ("--config.nsa.slc_block=32 --config.nsa.num_selected=8 --config.nsa.cmp_stride=8 "
          "--config.wandb.group=nsa --config.wandb.name=slc_block=32,num_selected=8,cmp_stride=8") in out
  assert not (tmp_path / "nsa").exists()                            # a dry run writes nothing
  # The DSA top-k sweep of the same file; --sweep flags replace the file's sweep().
  assert main(["--config", "configs/nsa_sweep.py:dsa", "--workdir", str(tmp_path / "dsa"), "--dry-run",
               "--config.steps=50"]) == 0
  out = capsys.readouterr().out
  dirs = [line.split()[0].rsplit("/", 1)[1] for line in out.splitlines() if line.startswith("  ")]
  assert dirs == [f"index_topk={k}" for k in (32, 64, 128, 256)]
  assert "--config configs/nsa_sweep.py:dsa" in out and "--config.steps=50 --config.dsa.index_topk=32" in out
  assert main(["--config", "configs/nsa_sweep.py:dsa", "--workdir", str(tmp_path / "dsa"), "--dry-run",
               "--sweep", "optimizer.lr=1e-3,3e-3"]) == 0
  dirs = [line.split()[0].rsplit("/", 1)[1] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
  assert dirs == ["lr=0.001", "lr=0.003"]
  for args, message in [(["--sweep", "nsa.no_such=1,2"], "--sweep nsa.no_such: no such config field"),
                        (["--sweep", "nsa.slc_block"], "write FIELD=V1,V2,..."),
                        (["--sweep", "nsa.slc_block=32,64", "--config.nsa.slc_block=64"], "also given"),
                        ([], "nothing to sweep"), (["--sweep", "seed=1", "--bogus"], "'--bogus': not an option"),
                        (["--sweep", "seed=1", "--parallel", "0"], "--parallel=0")]:
    assert main(["--config", "configs/tiny.py", "--workdir", str(tmp_path / "x"), *args]) == 2, args
    err = capsys.readouterr().err
    assert err.startswith("sweep.py: error: ") and message in err and err.count("\n") == 1, err
  assert main(["--workdir", str(tmp_path / "none"), "--report"]) == 2
  assert "no sweep here" in capsys.readouterr().err


def test_runs_share_the_sweeps_wandb_group(tmp_path, monkeypatch):
  from conftest import small_config
  from trainer import metrics
  seen = {}
  monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: seen.update(kw)))
  config = small_config(**{"wandb.group": "sw", "wandb.name": "slc_block=32", "wandb.mode": "offline"})
  metrics._start_wandb(str(tmp_path), config)
  assert (seen["group"], seen["name"]) == ("sw", "slc_block=32")


def test_bench_attention_sweep_costs_each_point(monkeypatch, tmp_path, capsys):
  bench = _load("bench_attention")

  def run(*args):
    monkeypatch.setattr(sys, "argv", ["bench_attention.py", "--seq-lens", "512", "--heads", "4", "--kv-heads", "1",
                                      "--head-dim", "32", "--dsa-heads", "16", "--dsa-samples", "4", *args])
    return bench.main()

  rows = run("--sweep", "nsa.num_selected=4,8", "--sweep", "nsa.slc_block=32,64", "--no-compile",
             "--plot", str(tmp_path / "nsa.png"))                  # the traffic model only: fast
  out = capsys.readouterr().out
  assert [(r["nsa.num_selected"], r["nsa.slc_block"]) for r in rows] == [(4, 32), (4, 64), (8, 32), (8, 64)]
  assert len([line for line in out.splitlines() if line.split()[:1] in (["4"], ["8"])]) == 4
  for r in rows:
    assert r["traffic_gb"] >= r["min_gb"] > 0 and 0 < r["mxu_fill"] <= 1
  by = {(r["nsa.num_selected"], r["nsa.slc_block"]): r for r in rows}
  assert by[8, 32]["traffic_gb"] > by[4, 32]["traffic_gb"]         # more selected blocks, more bytes
  assert by[4, 64]["model_ms"] > by[4, 32]["model_ms"]             # bigger blocks: more keys, more modelled time
  assert (tmp_path / "nsa.png").read_bytes()[:8] == PNG
  small, large = run("--sweep", "dsa.index_topk=32,128", "--no-compile", "--plot", str(tmp_path / "dsa.png"))
  assert large["traffic_gb"] > small["traffic_gb"] > 0 and (tmp_path / "dsa.png").read_bytes()[:8] == PNG
  # (Without --no-compile each point also compiles one layer, seconds each: the README's run shows it.)


def test_launch_tpu_runs_a_sweep_on_the_slice(monkeypatch, capsys):
  monkeypatch.chdir(REPO)
  launch = _load("launch_tpu")
  job = ["--name", "sw", "--tpu", "v5p-64", "--zone", "us-east5-a", "--config", "configs/nsa_sweep.py",
         "--workdir", "gs://b/sw", "--dry-run"]
  assert launch.main([*job, "--sweep", "nsa.slc_block=64,128", "--sweep", "nsa.num_selected=8,16",
                      "--", "--config.seq_len=32768"]) == 0
  start = capsys.readouterr().out.splitlines()[-2]
  assert ("scripts/sweep.py --config configs/nsa_sweep.py --workdir gs://b/sw --sweep nsa.slc_block=64,128 "
          "--sweep nsa.num_selected=8,16 --config.seq_len=32768") in start and "setsid nohup" in start
  assert launch.main([*job, "--sweep"]) == 0                         # the config file's sweep()
  start = capsys.readouterr().out.splitlines()[-2]
  assert "scripts/sweep.py --config configs/nsa_sweep.py --workdir gs://b/sw >>" in start.replace("'", "")


def test_rows_carry_the_start_eval_loss_and_the_last_retrieval_accuracy(tmp_path):
  """A run from init_from logs eval_loss at step 0; eval.retrieval logs retrieval_acc_beyond_8w:
  the row takes the first and the last, the table shows them, and the plot is drawn."""
  records = [{"step": 0, "eval_loss": 3.0}, {"step": 10, "loss": 2.2, "eval_loss": 2.5, "retrieval_acc_beyond_8w": 0.4},
             {"step": 20, "loss": 1.9, "eval_loss": 2.25, "retrieval_acc_beyond_8w": 0.875}]
  rows = [sweep_report.row(Point("a", {"nsa.num_selected": 4}, str(tmp_path / "a")), records),
          sweep_report.row(Point("b", {"nsa.num_selected": 8}, str(tmp_path / "b")), records[:1])]
  assert (rows[0]["start_eval_loss"], rows[0]["final_eval_loss"], rows[0]["retrieval_beyond_8w"]) == (3.0, 2.25, 0.875)
  assert rows[1]["retrieval_beyond_8w"] is None
  table = sweep_report.markdown(rows, ["nsa.num_selected"])
  assert "retrieval >= 8 windows" in table.splitlines()[0] and "| 3.0000 | 2.2500 | 2.2500 | 0.875 |" in table
  sweep_report.plot_metric(rows, ["nsa.num_selected"], "retrieval_beyond_8w", "retrieval", tmp_path / "r.png", title="t")
  assert (tmp_path / "r.png").read_bytes()[:8] == PNG
