"""Runs a sweep's points, each an ordinary train.py run in its own directory (WORKDIR/NAME): one at a
time, or `parallel` at once. A point that fails is recorded with the first line of its error and
the sweep goes on; Ctrl-C (SIGINT) or SIGTERM is passed on to the running points, which save a
checkpoint and stop, and the sweep stops. How each point's last train.py ended is kept in its
directory (STATUS_FILE), so re-running the same sweep skips finished points and resumes the others
from their checkpoints. A point's train.py output goes to NAME/train.log."""
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

from etils import epath

from sweeps.grid import flag_value

TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
STATUS_FILE = "sweep_point.json"
LOG_FILE = "train.log"
STOPPED = (128 + signal.SIGINT, 128 + signal.SIGTERM)   # train.py: stopped by a signal, checkpoint saved


class Point(NamedTuple):
  name: str
  overrides: dict      # swept field -> value
  directory: str       # WORKDIR/NAME


def read_status(directory: str) -> dict | None:
  path = epath.Path(directory) / STATUS_FILE
  try:
    return json.loads(path.read_text()) if path.exists() else None
  except ValueError:   # cut short by a crash: as if never written
    return None


def _write_status(directory: str, record: dict) -> None:
  path = epath.Path(directory) / STATUS_FILE
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(json.dumps(record, indent=1))
  tmp.replace(path)


def train_args(config: str, point: Point, fixed: list[str], group: str) -> list[str]:
  """train.py's command line for a point (after the interpreter): the fixed --config.FIELD=VALUE
  overrides, the point's own, and the sweep's wandb group (unless fixed) with the point's name."""
  args = ["--config", config, "--workdir", point.directory, *fixed]
  args += [f"--config.{f}={flag_value(v)}" for f, v in point.overrides.items()]
  given = {a.split("=", 1)[0] for a in fixed}
  args += [] if "--config.wandb.group" in given else [f"--config.wandb.group={group}"]
  args += [] if "--config.wandb.name" in given else [f"--config.wandb.name={point.name}"]
  return args


def is_finished(point: Point, args: list[str]) -> bool:
  """Its last train.py, run with these same arguments, ended with exit status 0."""
  status = read_status(point.directory)
  return bool(status) and status.get("status") == "finished" and status.get("args") == args


def error_line(output: str, returncode: int) -> str:
  """The first line of a failed train.py's error: the exception line after the last traceback,
  else the last line that names an error (train.py's one-line config errors), else the last line."""
  if returncode < 0:
    sig = signal.Signals(-returncode).name
    return f"killed by {sig}" + (" (out of memory? the kernel's OOM killer sends SIGKILL)"
                                 if -returncode == signal.SIGKILL else "")
  lines = [line.rstrip() for line in re.split(r"[\r\n]+", output)]
  # tqdm's bar redraws ("train:  40%|####  | 4/10 [...]") are not messages.
  lines = [line for line in lines if line.strip() and not re.match(r"\s*train:\s+\d+%\|", line)]
  starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
  found = None
  if starts:
    found = next((line for line in lines[starts[-1] + 1:] if not line[0].isspace()), None)
  if found is None:
    found = next((line for line in reversed(lines) if re.search(r"error", line, re.I)), None)
  if found is None:
    found = lines[-1] if lines else ""
  found = found.strip()
  return (found[:300] + "...") if len(found) > 300 else found or f"exit status {returncode}"


def _die_with_parent():
  """In the child: SIGTERM when the sweep dies, even by SIGKILL (Linux), so that no train.py runs
  on unwatched; it saves a checkpoint and stops, and re-running the sweep resumes it."""
  try:
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)     # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


class _Running(NamedTuple):
  proc: subprocess.Popen
  point: Point
  index: int
  args: list[str]
  start: float
  log: object          # the open log file (local path or a temporary copy of a remote one)
  offset: int          # where this run's output starts in it


class Runner:
  def __init__(self, config: str, fixed: list[str], group: str, *, parallel: int = 1, echo=print):
    self.config, self.fixed, self.group, self.parallel, self.echo = config, fixed, group, parallel, echo

  def args(self, point: Point) -> list[str]:
    return train_args(self.config, point, self.fixed, self.group)

  def run(self, points: list[Point], on_done=None) -> tuple[bool, list[str]]:
    """Runs the points not finished yet; on_done() after each one ends. Returns (interrupted,
    statuses of the points run)."""
    total = len(points)
    pending = []
    for i, p in enumerate(points, 1):
      if is_finished(p, self.args(p)):
        self.echo(f"[{i}/{total}] {p.name}: finished before, skipped")
      else:
        pending.append((i, p))
    running, statuses, interrupted = [], [], False
    # SIGTERM stops the sweep like Ctrl-C. Both are set here: a process started in the background
    # of a script (or by a pytest-xdist worker) inherits SIGINT ignored. Only the main thread may.
    try:
      previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:
      previous = {}
    try:
      while pending or running:
        while pending and len(running) < self.parallel:
          running.append(self._start(*pending.pop(0), total))
        for r in [r for r in running if r.proc.poll() is not None]:
          running.remove(r)
          statuses.append(self._finish(r, total, interrupted=False))
          if on_done:
            try:
              on_done()
            except Exception as e:   # e.g. the interim table: never worth stopping the sweep for
              self.echo(f"warning: {type(e).__name__}: {e}")
        time.sleep(0.1)
    except KeyboardInterrupt:
      interrupted = True
      self.echo("interrupted: the running points save a checkpoint and stop (Ctrl-C again kills them); "
                "re-run the same command to continue")
      for r in running:
        if r.proc.poll() is None:
          r.proc.send_signal(signal.SIGINT)
      try:
        for r in running:
          r.proc.wait()
      except KeyboardInterrupt:
        for r in running:
          r.proc.kill()
          r.proc.wait()
      for r in running:
        statuses.append(self._finish(r, total, interrupted=True))
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)
    return interrupted, statuses

  def _start(self, index: int, point: Point, total: int) -> _Running:
    directory = epath.Path(point.directory)
    directory.mkdir(parents=True, exist_ok=True)
    args = self.args(point)
    how = "resumes" if (directory / "checkpoints").exists() else "starts"
    _write_status(point.directory, {"name": point.name, "overrides": point.overrides, "args": args,
                                    "status": "unfinished", "error": "", "returncode": None})
    remote = "://" in point.directory
    log = tempfile.TemporaryFile() if remote else open(directory / LOG_FILE, "a+b")
    log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} sweep.py runs: train.py {' '.join(args)}\n".encode())
    log.flush()
    offset = log.tell()
    proc = subprocess.Popen([sys.executable, TRAIN, *args], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    self.echo(f"[{index}/{total}] {point.name}: {how} in {point.directory}")
    return _Running(proc, point, index, args, time.time(), log, offset)

  def _finish(self, r: _Running, total: int, *, interrupted: bool) -> str:
    rc = r.proc.returncode
    r.log.flush()
    r.log.seek(r.offset)
    output = r.log.read().decode(errors="replace")
    if "://" in r.point.directory:      # a remote workdir: append this run's output to this host's log
      path = epath.Path(r.point.directory) / f"train-{socket.gethostname()}.log"
      r.log.seek(0)
      path.write_bytes((path.read_bytes() if path.exists() else b"") + r.log.read())
    r.log.close()
    if rc == 0:
      status, error = "finished", ""
    elif interrupted or rc in STOPPED:
      status, error = "unfinished", f"stopped by a signal (exit status {rc}); re-run to resume"
    else:
      status, error = "failed", error_line(output, rc)
    seconds = time.time() - r.start
    _write_status(r.point.directory, {"name": r.point.name, "overrides": r.point.overrides, "args": r.args,
                                      "status": status, "error": error, "returncode": rc,
                                      "seconds": round(seconds, 1)})
    said = {"finished": "finished", "unfinished": "stopped",
            "failed": f"failed (exit status {rc}): {error}"}[status]
    self.echo(f"[{r.index}/{total}] {r.point.name}: {said} after {seconds:.0f} s")
    return status


def _raise_interrupt(signum, frame):
  raise KeyboardInterrupt
