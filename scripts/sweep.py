r"""Sweep config fields in one command: a train.py run per point, a results table and plots.

  python scripts/sweep.py --config configs/tiny.py --workdir runs/sw \
      --sweep nsa.slc_block=32,64,128 --sweep nsa.num_selected=8,16 [--parallel N] [--dry-run] \
      [--name NAME] [--config.FIELD=VALUE ...]
  python scripts/sweep.py --config configs/nsa_sweep.py --workdir runs/nsa_sweep   # the file's sweep()
  python scripts/sweep.py --workdir runs/sw --report       # rebuild the table and plots from disk

The points are the product of the --sweep flags (the first one outermost) or, without them, the
config file's sweep() (a list of {FIELD: VALUE} dicts; `configs/x.py:arg` calls sweep(arg)).
--config.FIELD=VALUE overrides apply to every point. Each point is an ordinary train.py
run in WORKDIR/<name from its overrides> (its config, checkpoints, metrics.jsonl and train.log),
one at a time (--parallel N: N at once, for CPU). Re-running the same command skips finished
points and resumes the others from their checkpoints. A point that fails (a config error, out of
memory, a crash) becomes a row with status failed and the first line of its error; the sweep goes
on. Ctrl-C stops the running points at a checkpoint and the sweep; re-run to continue.

WORKDIR/results.csv and results.md get a row per point: the swept fields, status (finished, failed,
unfinished), steps done, final train loss, best and final eval loss, tokens/s, TFLOP/s per device,
parameters, run directory and error; loss_curves.png, eval_loss.png and tokens_per_sec.png plot
them. All runs share the wandb group --name (default: the workdir's last part).

Exit status: 0 every point finished, 1 some failed, 2 a bad argument, 130 interrupted.
On a TPU slice the same command runs on every host through scripts/launch_tpu.py --sweep; each
point then uses the whole slice, one after another.
"""
import argparse
import os
import re
import sys

from etils import epath

from sweeps import grid as sweep_grid  # noqa: E402
from sweeps import report as sweep_report
from sweeps.grid import SweepError  # noqa: E402
from sweeps.runner import Point, Runner, read_status  # noqa: E402


class Parser(argparse.ArgumentParser):
  def error(self, message):
    raise SweepError(message)


def parse(argv):
  p = Parser(prog="sweep.py", allow_abbrev=False, description=__doc__,
             formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", help="config file, e.g. configs/tiny.py (or configs/nsa_sweep.py:dsa)")
  p.add_argument("--workdir", required=True, help="the sweep's directory: a run directory per point, results")
  p.add_argument("--sweep", action="append", default=[], metavar="FIELD=V1,V2,...",
                 help="a config field and its values (repeat: the product)")
  p.add_argument("--parallel", type=int, default=1, help="points run at once (CPU; 1 on a TPU)")
  p.add_argument("--name", help="sweep name: the wandb group (default: the workdir's last part)")
  p.add_argument("--dry-run", action="store_true", help="list the points and their run directories, run nothing")
  p.add_argument("--report", action="store_true", help="only rebuild results.csv/.md and the plots from disk")
  args, extra = p.parse_known_args(argv)
  for a in extra:
    if not re.fullmatch(r"--config\.[A-Za-z_][\w.]*=.*", a, re.S):
      raise SweepError(f"{a!r}: not an option of sweep.py nor a --config.FIELD=VALUE override")
  args.fixed = extra
  if args.parallel < 1:
    raise SweepError(f"--parallel={args.parallel}: must be >= 1")
  if not args.report and not args.config:
    raise SweepError("--config is required (except with --report)")
  args.name = args.name or os.path.basename(os.path.normpath(args.workdir))
  return args


def points_of(args) -> list[Point]:
  grid = sweep_grid.product([sweep_grid.parse_axis(s) for s in args.sweep])
  try:
    module, arg = sweep_grid.load_config_file(args.config)
    config, file_points = sweep_grid.base_config(module, arg), sweep_grid.file_points(module, arg, args.config)
  except SweepError:
    raise
  except Exception as e:   # the config file's own error: one line, as train.py would say it
    raise SweepError(f"--config={args.config} cannot be loaded: {type(e).__name__}: {e}") from None
  points = sweep_grid.choose(file_points, grid)
  fixed = dict(a[len("--config."):].split("=", 1) for a in args.fixed)
  sweep_grid.check_fields(config, points, fixed)
  return [Point(n, p, str(epath.Path(args.workdir) / n)) for n, p in zip(sweep_grid.names(points), points)]


def report(workdir: str) -> list[dict]:
  """Rebuilds the table and plots, prints the table and where they are."""
  rows = sweep_report.write_report(workdir)
  print((epath.Path(workdir) / "results.md").read_text(), end="")
  print(f"results: {workdir}/results.md, results.csv; plots: "
        + ", ".join(f"{workdir}/{p}" for p in sweep_report.PLOTS), flush=True)
  return rows


def main(argv) -> int:
  try:
    args = parse(argv)
    if args.report:
      report(args.workdir)
      return 0
    points = points_of(args)
  except (SweepError, FileNotFoundError) as e:
    print(f"sweep.py: error: {e}", file=sys.stderr)
    return 2
  fields = sweep_grid.fields_of([p.overrides for p in points])
  runner = Runner(args.config, args.fixed, args.name, parallel=args.parallel)
  print(f"sweep {args.name}: {len(points)} points over {' x '.join(fields)}, {args.parallel} at a time", flush=True)
  if args.dry_run:
    for p in points:
      status = (read_status(p.directory) or {}).get("status", "not started")
      print(f"  {p.directory}  [{status}]  " + " ".join(f"{f}={v}" for f, v in p.overrides.items()))
    print("each point runs: python train.py " + " ".join(runner.args(points[0])))
    return 0
  sweep_report.save_manifest(args.workdir, args.name, args.config, args.fixed, points)
  # The table is rewritten after each point (current while the sweep runs); the plots at the end.
  interrupted, _ = runner.run(points, on_done=lambda: sweep_report.write_report(args.workdir, plots=False))
  rows = report(args.workdir)
  mine = {p.name for p in points}        # (the table may hold earlier sweeps' points too)
  statuses = [r["status"] for r in rows if r["name"] in mine]
  print(f"sweep {args.name}: " + ", ".join(f"{statuses.count(s)} {s}" for s in ("finished", "failed", "unfinished")
                                           if statuses.count(s)), flush=True)
  if interrupted:
    return 130
  return 1 if "failed" in statuses else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
