r"""Launch train.py on a Cloud TPU VM pod slice (or on GKE through xpk) with one command.

  python scripts/launch_tpu.py [run|status|logs|delete] --name my-run --tpu v5p-64 --zone us-east5-a \
      [--project P] --config configs/1b.py --workdir gs://BUCKET/runs/1b-nsa [--spot | --reserved] \
      [--via gcloud|xpk] [--cluster C] [--num-slices S] [--dry-run] [--sweep FIELD=V1,V2,... ...] \
      [-- --config.attention.kind=nsa --config.seq_len=32768 ...]

--sweep FIELD=V1,V2,... (repeat; or --sweep alone for the config file's sweep()) runs scripts/sweep.py
  instead of train.py: the points one after another, each on the whole slice, in WORKDIR/<point>.
run (the default): create the slice through a queued resource and wait until it is ACTIVE, copy the
  code (git ls-files: tracked and untracked files, not ignored ones) to every worker, install
  Python 3.11, requirements.txt and the TPU jax build (versions read from requirements*.txt), then
  start `train.py --config CONFIG --workdir WORKDIR OVERRIDES` on all workers in the background, its
  log in ~/sparse-attn/logs/train.log on each worker. Re-running the same command is always safe:
  a preempted or failed slice is deleted and created again and train.py resumes from the newest
  checkpoint in WORKDIR (a gs:// path, so it outlives the VMs); if train.py already runs on worker 0
  nothing is started.
status: the queued resource's state, whether train.py runs, the end of worker 0's log.
logs:   tail (-f: follow) the log of one worker (--worker N) or all (--worker all).
delete: delete the queued resource and its TPU VMs.

--num-slices S: S such slices as one job over DCN (one queued resource of S TPU VMs NAME-0 ..
  NAME-(S-1), or xpk's --num-slices); train.py's mesh puts its data axis across the slices.
--via xpk submits the same job to a GKE cluster made by `xpk cluster create`.
--dry-run prints every command, one per line, ready to paste, and runs nothing.
`--config.FIELD=VALUE` overrides go after `--` (or anywhere among the options).
"""
import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

from perf.chips import ALLOWED, parse_accelerator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("run", "status", "logs", "delete")
REMOTE = "$HOME/sparse-attn"     # on each worker: code/, venv/, logs/train.log, train.pid
PYTHON = "python3.11"            # requirements.txt is pinned for Python 3.11; the TPU images ship 3.10
# The TPU software version for JAX of each generation (cloud.google.com/tpu/docs/runtimes).
RUNTIME = {"v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite",
           "v6e": "v2-alpha-tpuv6e"}
# Queued-resource and TPU VM states that mean gone for good (preempted or failed): delete, create again.
DEAD = {"FAILED", "SUSPENDING", "SUSPENDED"}
NODE_DEAD = {"PREEMPTED", "TERMINATED"}
# Prints "train.py running (pid N) on HOST" (train.py, or a sweep.py running train.py) or "train.py not
# running on HOST". A pid file, not `pgrep -f train.py`: the remote shell running this line has
# "train.py" in its own command line.
CHECK = (f'p=$(cat {REMOTE}/train.pid 2>/dev/null); '
         f'if [ -n "$p" ] && grep -qaE "train.py|sweep.py" /proc/$p/cmdline 2>/dev/null; '
         f'then echo "train.py running (pid $p) on $(hostname)"; else echo "train.py not running on $(hostname)"; fi')


def pinned(filename: str, package: str):
  """The version `package==V` pins in REPO/filename, or None."""
  try:
    with open(os.path.join(REPO, filename)) as f:
      for line in f:
        m = re.match(rf"{re.escape(package)}==([^\s;#]+)", line.strip())
        if m:
          return m[1]
  except FileNotFoundError:
    pass
  return None


def usage_error(message):
  """A bad argument: one line naming it, exit status 2 (like train.py's config errors)."""
  print(f"launch_tpu.py: error: {message}", file=sys.stderr)
  sys.exit(2)


class Parser(argparse.ArgumentParser):
  def error(self, message):
    usage_error(message)


def fail(message):
  print(f"launch_tpu.py: error: {message}", file=sys.stderr)
  sys.exit(1)


class Shell:
  """Runs commands, or with --dry-run only prints them (notes as `# ...` so the output stays pasteable)."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def note(self, text):
    print(f"# {text}" if self.dry_run else text, flush=True)

  def step(self, cmd):
    """Runs cmd with the terminal attached; a failure stops the launch."""
    print(shlex.join(cmd) if self.dry_run else f"$ {shlex.join(cmd)}", flush=True)
    if not self.dry_run:
      check(self._run(cmd), cmd)

  def query(self, cmd, stderr=True, show=True):
    """Runs cmd capturing its output (stderr too when asked); None in a dry run (printed instead)."""
    if self.dry_run:
      if show:
        print(shlex.join(cmd), flush=True)
      return None
    return self._run(cmd, capture=True, stderr=stderr)

  def _run(self, cmd, capture=False, stderr=True):
    try:
      return subprocess.run(cmd, text=True, stdout=subprocess.PIPE if capture else None,
                            stderr=subprocess.PIPE if capture and stderr else None)
    except FileNotFoundError:
      fail(f"{cmd[0]} not found on PATH" + (" (pip install xpk)" if cmd[0] == "xpk" else
                                            " (install the Google Cloud CLI: cloud.google.com/sdk)"))


def check(proc, cmd):
  """A failed command stops the launch, naming it and its exit status."""
  if proc.returncode:
    if proc.stderr:
      print(proc.stderr.rstrip(), file=sys.stderr)
    fail(f"exit status {proc.returncode} from: {shlex.join(cmd)}\n"
         f"(fix the cause and re-run the same launch_tpu.py command: every step is safe to repeat)")


class Gcloud:
  """The gcloud command lines for one queued resource and its TPU VM slices: one slice named like
  the queued resource, or with --num-slices S the multislice NAME-0 .. NAME-(S-1) (one DCN-joined
  job: jax sees every slice's chips, each with its slice_index, and train.py's mesh puts its data
  axis across them)."""

  def __init__(self, args):
    self.name = args.name
    self.nodes = [args.name] if args.num_slices == 1 else [f"{args.name}-{i}" for i in range(args.num_slices)]
    self.where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
    self.ssh_flags = ["--strict-host-key-checking=no"] + (["--internal-ip"] if args.internal_ip else [])

  def qr(self, verb, *flags):
    return ["gcloud", "compute", "tpus", "queued-resources", verb, self.name, *self.where, *flags]

  def create_flags(self):
    """One slice: its TPU VM's id; several: how many, and the prefix of their ids (NAME-i)."""
    if len(self.nodes) == 1:
      return [f"--node-id={self.name}"]
    return [f"--node-count={len(self.nodes)}", f"--node-prefix={self.name}"]

  def node(self, verb, *flags, node=None):
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, node or self.nodes[0], *self.where, *flags]

  # Host keys change when a slice is recreated after a preemption; gcloud would then refuse to connect.
  def ssh(self, worker, command, node=None):
    return self.node("ssh", f"--worker={worker}", *self.ssh_flags, f"--command={command}", node=node)

  def scp(self, local, remote, node):
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{node}:{remote}", *self.where,
            "--worker=all", *self.ssh_flags]


def describe(sh, cmd, show=True):
  """The resource as a dict, None when it does not exist (or in a dry run)."""
  proc = sh.query(cmd, show=show)
  if proc is None:
    return None
  if proc.returncode:
    if re.search(r"NOT_FOUND|not found", proc.stderr, re.I):
      return None
    check(proc, cmd)
  return json.loads(proc.stdout or "{}")


def qr_state(qr):
  return (qr.get("state") or {}).get("state", "UNKNOWN")


def qr_accelerator(qr):
  specs = (qr.get("tpu") or {}).get("nodeSpec") or [{}]
  return (specs[0].get("node") or {}).get("acceleratorType")


def ensure_slice(args, tpu, sh, g):
  """Creates the slice if it is missing, recreates it if it was preempted or failed; waits until ACTIVE."""
  capacity = "spot" if args.spot else "reserved" if args.reserved else "on-demand"
  slices = f"{len(g.nodes)} x " if len(g.nodes) > 1 else ""
  sh.note(f"[1/5] slice {args.name}: {slices}{tpu.name} ({tpu.chips} chips, {tpu.hosts} workers each) in {args.zone}, "
          f"{capacity}")
  describe_qr = g.qr("describe", "--format=json")
  delete = g.qr("delete", "--force", "--quiet")   # --force: its TPU VMs too
  create = g.qr("create", *g.create_flags(), f"--accelerator-type={tpu.name}",
                f"--runtime-version={args.runtime_version or RUNTIME[tpu.generation]}")
  create += ["--spot"] if args.spot else ["--reserved"] if args.reserved else []
  for _ in range(3):   # a preemption while we wait sends us round again
    qr = describe(sh, describe_qr)
    if qr is not None:
      state, accelerator = qr_state(qr), qr_accelerator(qr)
      if accelerator and accelerator != tpu.name:
        fail(f"queued resource {args.name} holds a {accelerator}, not --tpu={tpu.name}; "
             f"delete it first: python scripts/launch_tpu.py delete --name {args.name} --zone {args.zone}")
      if state in DEAD:
        sh.note(f"queued resource {args.name} is {state} (preempted or failed): deleting it to create it again")
        sh.step(delete)
      elif state == "DELETING":
        wait_for(sh, describe_qr, lambda s: s is None, "to be deleted", args)
      else:
        sh.note(f"queued resource {args.name} exists: {state}")
    if sh.dry_run:
      sh.note(f"if it is {'/'.join(sorted(DEAD))} (preempted or failed), first: {shlex.join(delete)}")
    if qr is None or qr_state(qr) in DEAD | {"DELETING"}:
      sh.step(create)
    state = wait_for(sh, describe_qr, lambda s: s == "ACTIVE" or s in DEAD, "to become ACTIVE", args)
    if state == "FAILED":
      details = (describe(sh, describe_qr, show=False) or {}).get("state", {})
      fail(f"queued resource {args.name} FAILED: {json.dumps(details)}")
    if state in DEAD:
      continue
    dead = [(name, node["state"]) for name in g.nodes
            if (node := describe(sh, g.node("describe", "--format=json", node=name))) is not None
            and node.get("state") in NODE_DEAD]
    if dead:
      sh.note(f"TPU VM {dead[0][0]} is {dead[0][1]}: deleting the queued resource to create it again")
      sh.step(delete)
      continue
    return
  fail(f"slice {args.name} was preempted three times while coming up; try again later")


def wait_for(sh, describe_qr, done, what, args):
  """Polls the queued resource's state until done(state); prints each change and a heartbeat."""
  sh.note(f"waiting for queued resource {args.name} {what} (polling every {args.poll_seconds:g} s)")
  if sh.dry_run:
    print(shlex.join(describe_qr))
    return "ACTIVE"
  start, last, said = time.monotonic(), None, 0.0
  while True:
    qr = describe(sh, describe_qr, show=False)
    state = None if qr is None else qr_state(qr)
    minutes = (time.monotonic() - start) / 60
    if done(state):
      sh.note(f"  {state or 'deleted'} after {minutes:.1f} min")
      return state
    if state != last or minutes - said >= 5:
      sh.note(f"  {state or 'deleted'} ({minutes:.1f} min)")
      last, said = state, minutes
    if args.wait_minutes and minutes > args.wait_minutes:
      fail(f"queued resource {args.name} still {state} after --wait-minutes={args.wait_minutes:g}; "
           f"re-run later or delete it")
    time.sleep(args.poll_seconds)


LS_FILES = "git ls-files -z --cached --others --exclude-standard"


def repo_files():
  """What ships: the files git knows (tracked, and untracked ones that are not ignored)."""
  out = subprocess.run(["git", "-C", REPO, *LS_FILES.split()[1:]], capture_output=True, text=True)
  if out.returncode:
    fail(f"{REPO} is not a git checkout ({LS_FILES}: {out.stderr.strip()})")
  return sorted(f for f in out.stdout.split("\0") if f and os.path.isfile(os.path.join(REPO, f)))


def pack(sh, tarball):
  if sh.dry_run:
    print(f"(cd {shlex.quote(REPO)} && {LS_FILES} | tar --null -T - -czf {shlex.quote(tarball)})")
    return
  files = repo_files()
  with tarfile.open(tarball, "w:gz") as tar:
    for f in files:
      tar.add(os.path.join(REPO, f), arcname=f)
  mib = os.path.getsize(tarball) / 2**20
  print(f"packed {len(files)} files ({mib:.1f} MiB) into {tarball}"
        + (": large; is a dataset or a checkpoint in git or missing from .gitignore?" if mib > 100 else ""))


def copy_code(sh, dest):
  """xpk builds --script-dir into its image: give it the shipped files only (not runs/, .venv/, ...)."""
  if sh.dry_run:
    q = shlex.quote
    print(f"rm -rf {q(dest)} && mkdir -p {q(dest)} && (cd {q(REPO)} && {LS_FILES} | tar --null -T - -cf -) "
          f"| tar -xf - -C {q(dest)}")
    return
  shutil.rmtree(dest, ignore_errors=True)
  for f in repo_files():
    os.makedirs(os.path.dirname(os.path.join(dest, f)), exist_ok=True)
    shutil.copy2(os.path.join(REPO, f), os.path.join(dest, f))


def install_script(pins):
  """Unpacks the code and installs Python 3.11 + the pinned requirements and TPU jax on one worker."""
  apt = "sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600"   # waits out unattended-upgrades
  return "; ".join([
      "set -e", f"R={REMOTE}", "mkdir -p $R/logs", "rm -rf $R/code.new", "mkdir $R/code.new",
      "tar -xzf $HOME/sparse-attn.tar.gz -C $R/code.new", "rm -rf $R/code", "mv $R/code.new $R/code",
      "rm -f $HOME/sparse-attn.tar.gz",
      f"command -v {PYTHON} >/dev/null || {{ {apt} update -qq && {apt} install -y -qq {PYTHON} {PYTHON}-venv; }}",
      f"[ -x $R/venv/bin/python ] || {PYTHON} -m venv $R/venv",
      "$R/venv/bin/pip install -q --upgrade pip",
      # One resolver run over everything, so jax[tpu]'s libtpu pin and ours must agree.
      f"$R/venv/bin/pip install -q -r $R/code/requirements.txt {pins}",
      'echo "installed on $(hostname)"'])


def start_script(train, env):
  """Stops a stale train.py (pid file) and starts train.py detached, appending to logs/train.log."""
  assigns = " ".join(["PYTHONUNBUFFERED=1"] + [f"{k}={shlex.quote(v)}" for k, v in env])
  return "; ".join([
      f"R={REMOTE}", 'p=$(cat $R/train.pid 2>/dev/null)',
      # A stale copy (worker 0 died, this one hangs in a collective) holds the TPU: SIGTERM, then SIGKILL.
      'if [ -n "$p" ] && grep -qaE "train.py|sweep.py" /proc/$p/cmdline 2>/dev/null; then echo "stopping train.py '
      '(pid $p) on $(hostname)"; kill $p; for i in $(seq 240); do '
      'grep -qaE "train.py|sweep.py" /proc/$p/cmdline 2>/dev/null || break; sleep 0.5; done; '
      'kill -9 $p 2>/dev/null || true; fi',
      "mkdir -p $R/logs", "cd $R/code || exit 1",
      'echo "=== $(date -u +%FT%TZ) launch_tpu.py starts train.py ===" >> $R/logs/train.log',
      # setsid + nohup: train.py outlives this ssh session; $! is its pid (no job control, no fork).
      f"{assigns} setsid nohup $R/venv/bin/python {train} >> $R/logs/train.log 2>&1 < /dev/null & "
      "echo $! > $R/train.pid",
      'echo "train.py started (pid $!) on $(hostname)"'])


def train_args(args, overrides):
  """train.py's command line; with --sweep, scripts/sweep.py's: its points one after another, each
  a train.py on the whole slice (every host runs the same sweep, in step)."""
  if args.sweep is None:
    return shlex.join(["train.py", "--config", args.config, "--workdir", args.workdir, *overrides])
  grid = [a for spec in args.sweep if spec for a in ("--sweep", spec)]
  return shlex.join(["scripts/sweep.py", "--config", args.config, "--workdir", args.workdir, *grid, *overrides])


def gcloud_run(args, tpu, overrides, sh):
  g = Gcloud(args)
  ensure_slice(args, tpu, sh, g)
  sh.note("[2/5] is train.py already running on worker 0?")
  proc = sh.query(g.ssh(0, CHECK), stderr=False)
  if proc is not None:
    check(proc, g.ssh(0, CHECK))
    if "train.py running" in proc.stdout:
      print(proc.stdout.strip())
      print(f"not starting a second copy; watch it with: python scripts/launch_tpu.py logs --name {args.name} "
            f"--zone {args.zone} -f")
      return 0
  hosts = tpu.hosts * len(g.nodes)
  sh.note(f"[3/5] copy the code to all {hosts} workers")
  tarball = os.path.join(tempfile.gettempdir(), f"launch_tpu-{args.name}.tar.gz")
  pack(sh, tarball)
  try:
    for node in g.nodes:
      sh.step(g.scp(tarball, "sparse-attn.tar.gz", node))
  finally:
    if not sh.dry_run and os.path.exists(tarball):
      os.remove(tarball)
  sh.note(f"[4/5] install {PYTHON}, requirements.txt, {args.pins} on all workers")
  for node in g.nodes:
    sh.step(g.ssh("all", install_script(args.pins), node=node))
  sh.note(f"[5/5] start train.py on all {hosts} workers (it resumes from the newest checkpoint in {args.workdir})")
  for node in g.nodes:
    sh.step(g.ssh("all", start_script(train_args(args, overrides), args.env), node=node))
  sh.note(f"started; logs: python scripts/launch_tpu.py logs --name {args.name} --zone {args.zone} -f")
  return 0


def gcloud_status(args, sh):
  g = Gcloud(args)
  qr = describe(sh, g.qr("describe", "--format=json"))
  if not sh.dry_run:
    if qr is None:
      print(f"queued resource {args.name}: not found in {args.zone}")
      return 0
    print(f"queued resource {args.name}: {qr_state(qr)} ({qr_accelerator(qr) or '?'}"
          f"{', spot' if 'spot' in qr else ''})", flush=True)
    if qr_state(qr) != "ACTIVE":
      return 0
  log = f"{REMOTE}/logs/train.log"
  sh.step(g.ssh(0, f'{CHECK}; echo; tail -n {args.lines} {log} 2>/dev/null || echo "(no log yet)"'))
  return 0


def gcloud_logs(args, sh):
  tail = f"tail -n {args.lines}{' -F' if args.follow else ''} {REMOTE}/logs/train.log"
  if args.worker == "all":   # lines from all workers interleave: prefix each with its host name
    tail += ' | sed -u "s/^/[$(hostname)] /"'
  sh.step(Gcloud(args).ssh(args.worker, tail))
  return 0


def gcloud_delete(args, sh):
  g = Gcloud(args)
  if describe(sh, g.qr("describe", "--format=json")) is None and not sh.dry_run:
    print(f"queued resource {args.name}: not found in {args.zone}; nothing to delete")
    return 0
  sh.step(g.qr("delete", "--force", "--quiet"))
  return 0


def xpk(args, tpu, overrides, sh):
  where = [f"--cluster={args.cluster}"] + [f"--{k}={v}" for k, v in (("project", args.project),
                                                                     ("zone", args.zone)) if v]
  if args.command == "status":
    sh.step(["xpk", "workload", "list", *where, f"--filter-by-job={args.name}"])
  elif args.command == "delete":
    sh.step(["xpk", "workload", "delete", *where, f"--workload={args.name}"])
  elif args.command == "logs":   # xpk has no logs verb; its pods carry the JobSet's labels
    selector = f"jobset.sigs.k8s.io/jobset-name={args.name}"
    if args.worker != "all":
      selector += f",jobset.sigs.k8s.io/job-index=0,batch.kubernetes.io/job-completion-index={args.worker}"
    sh.step(["kubectl", "logs", "-l", selector, "--prefix", "--max-log-requests=1000", f"--tail={args.lines}"]
            + (["-f"] if args.follow else []))
  else:
    train = f"python {train_args(args, overrides)}"
    cmd = ["xpk", "workload", "create", *where, f"--workload={args.name}", f"--tpu-type={tpu.name}",
           f"--num-slices={args.num_slices}", f"--max-restarts={args.max_restarts}"]
    if args.docker_image:   # an image that holds the code and its dependencies; its WORKDIR is the repo
      cmd.append(f"--docker-image={args.docker_image}")
    else:                   # xpk layers --script-dir onto the base image; dependencies install at start
      src = os.path.join(tempfile.gettempdir(), f"launch_tpu-{args.name}-src")
      sh.note(f"the code for the image: the repository's git files, copied to {src}")
      copy_code(sh, src)
      cmd += [f"--base-docker-image={args.base_docker_image}", f"--script-dir={src}"]
      train = f"pip install -q -r requirements.txt {args.pins} && {train}"
    cmd += ["--spot"] if args.spot else []
    cmd += [f"--env={k}={v}" for k, v in [("PYTHONUNBUFFERED", "1"), *args.env]]
    sh.note(f"submit {args.name}: {args.num_slices} x {tpu.name} on cluster {args.cluster}; JobSet restarts "
            f"(preemptions) resume from {args.workdir}")
    sh.step(cmd + [f"--command={train}"])
  return 0


def parse(argv):
  argv, overrides = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
  p = Parser(prog="launch_tpu.py", allow_abbrev=False, description=__doc__,
             formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--name", help="queued resource, TPU VM and xpk workload name (lower case, digits, -)")
  p.add_argument("--tpu", help=f"accelerator type: {ALLOWED}")
  p.add_argument("--zone", help="e.g. us-east5-a (needed with --via gcloud)")
  p.add_argument("--project", help="GCP project (default: gcloud config)")
  p.add_argument("--config", help="config file in this repository, e.g. configs/1b.py (or configs/dsa_v32.py:sparse)")
  p.add_argument("--workdir", help="gs://BUCKET/PATH: checkpoints, metrics; the same one resumes")
  p.add_argument("--via", choices=("gcloud", "xpk"), default="gcloud",
                 help="gcloud: a TPU VM slice of your own (default); xpk: a workload on a GKE cluster")
  p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  p.add_argument("--sweep", action="append", nargs="?", const="", metavar="FIELD=V1,V2,...",
                 help="run scripts/sweep.py instead of train.py: this grid (repeat), or with no value the "
                      "config file's sweep(); the points run one after another, each on the whole slice")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment of train.py (repeat)")
  cap = p.add_mutually_exclusive_group()
  cap.add_argument("--spot", action="store_true", help="Spot TPU VMs (cheaper, preemptible)")
  cap.add_argument("--reserved", action="store_true", help="reserved capacity (gcloud)")
  g = p.add_argument_group("gcloud")
  g.add_argument("--runtime-version", help="TPU software version (default by generation: " +
                 ", ".join(f"{k}: {v}" for k, v in RUNTIME.items()) + ")")
  g.add_argument("--internal-ip", action="store_true", help="ssh/scp over internal IPs (launching from a GCE VM)")
  g.add_argument("--poll-seconds", type=float, default=30.0, help="queued resource polling interval")
  g.add_argument("--wait-minutes", type=float, default=0.0, help="give up waiting for ACTIVE after this (0: never)")
  p.add_argument("--num-slices", type=int, default=1,
                 help="slices joined over DCN (multislice): the mesh's data axis spans them")
  x = p.add_argument_group("xpk")
  x.add_argument("--cluster", help="GKE cluster made by `xpk cluster create`")
  x.add_argument("--docker-image", help="image with code and dependencies (default: build from --base-docker-image)")
  x.add_argument("--base-docker-image", default="python:3.11", help="base image xpk adds the code to")
  x.add_argument("--max-restarts", type=int, default=10, help="JobSet restarts (preemptions) before giving up")
  o = p.add_argument_group("status / logs")
  o.add_argument("--worker", default="0", help="logs: worker index or 'all'")
  o.add_argument("--lines", type=int, default=50, help="log lines to show")
  o.add_argument("-f", "--follow", action="store_true", help="logs: keep following")
  args, extra = p.parse_known_args(argv)
  verbs = [a for a in extra if a in COMMANDS]
  if len(verbs) > 1:
    usage_error(f"{verbs[1]}: one subcommand at a time ({verbs[0]} given too)")
  command = args.command = verbs[0] if verbs else "run"
  args.overrides = [a for a in extra if a not in COMMANDS] + overrides
  for arg in args.overrides:   # train.py's own overrides, in absl's --config.FIELD=VALUE form
    if not re.fullmatch(r"--config\.[A-Za-z_][\w.]*=.*", arg, re.S):
      usage_error(f"{arg!r}: not an option of launch_tpu.py nor a --config.FIELD=VALUE override for train.py")

  def need(*names):
    for n in names:
      if getattr(args, n.replace("-", "_")) in (None, ""):
        usage_error(f"--{n} is required for {command}" + (f" --via {args.via}" if n in ("zone", "cluster") else ""))

  need("name")
  if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", args.name) or len(args.name) > 40:
    usage_error(f"--name={args.name}: lower-case letters, digits and '-', starting with a letter, at most 40")
  need("cluster" if args.via == "xpk" else "zone")
  args.tpu_info = None
  if command == "run" or args.tpu:
    need("tpu")
    args.tpu_info = parse_accelerator(args.tpu)
    if args.tpu_info is None:
      usage_error(f"--tpu={args.tpu}: not a TPU accelerator type; use {ALLOWED}, e.g. v5p-64")
  if args.worker != "all":
    if not args.worker.isdigit() or (args.tpu_info and int(args.worker) >= args.tpu_info.hosts):
      usage_error(f"--worker={args.worker}: a worker index" + (f" below {args.tpu_info.hosts}" if args.tpu_info else "")
                  + " or 'all'")
  env = []
  for item in args.env:
    if not re.fullmatch(r"[A-Za-z_]\w*=.*", item, re.S):
      usage_error(f"--env={item}: write KEY=VALUE")
    env.append(tuple(item.split("=", 1)))
  args.env = env
  if args.num_slices < 1:
    usage_error(f"--num-slices={args.num_slices}: at least 1")
  if args.via == "xpk" and args.reserved:
    usage_error("--reserved: with xpk the capacity is the cluster's (xpk cluster create --reservation=...)")
  if args.poll_seconds < 0 or args.lines < 0 or args.max_restarts < 0:
    usage_error("--poll-seconds, --lines and --max-restarts cannot be negative")
  if command == "run":
    need("config", "workdir")
    path, sep, stage = args.config.partition(":")
    if not os.path.isfile(path):
      usage_error(f"--config={args.config}: no such file")
    rel = os.path.relpath(os.path.abspath(path), REPO)
    if rel.startswith(".."):
      usage_error(f"--config={args.config}: must be inside {REPO} (that is what is copied to the workers)")
    args.config = rel.replace(os.sep, "/") + sep + stage
    # Every host writes its part of each checkpoint to one shared directory, and a preempted VM
    # takes its disk with it: only a bucket both shares and survives.
    if not args.workdir.startswith("gs://") or len(args.workdir) <= len("gs://"):
      usage_error(f"--workdir={args.workdir}: must be gs://BUCKET/PATH (shared by all hosts, outlives the VMs)")
    # The TPU build of the pinned jax, and the libtpu the ahead-of-time compile tests use.
    jax, libtpu = pinned("requirements.txt", "jax"), pinned("requirements-dev.txt", "libtpu")
    if jax is None:
      fail("requirements.txt pins no jax version (jax==X)")
    args.pins = f'"jax[tpu]=={jax}"' + (f' "libtpu=={libtpu}"' if libtpu else "")
  return args


def main(argv):
  args = parse(list(argv))
  sh = Shell(args.dry_run)
  if args.via == "xpk":
    return xpk(args, args.tpu_info, args.overrides, sh)
  if args.command == "run":
    return gcloud_run(args, args.tpu_info, args.overrides, sh)
  return {"status": gcloud_status, "logs": gcloud_logs, "delete": gcloud_delete}[args.command](args, sh)


if __name__ == "__main__":
  try:
    sys.exit(main(sys.argv[1:]))
  except KeyboardInterrupt:   # e.g. while waiting for capacity: nothing is lost, the request stays queued
    print("\ninterrupted; re-run the same command to carry on", file=sys.stderr)
    sys.exit(130)
