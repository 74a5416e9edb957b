"""The retrieval runs side by side (docs/evaluation.md#retrieval-runs): a table and a plot of the
accuracy beyond 8 windows, from each run's metrics.jsonl and its newest scripts/evaluate.py output.

  python scripts/retrieval_report.py --runs-dir runs/mqar [--runs dense,nsa,win,dsa,local]

Writes RUNS_DIR/retrieval.md (also printed) and RUNS_DIR/retrieval_by_step.png: each run's accuracy
beyond 8 windows at every eval step, with chance as a dashed line. A run not found is a row that
says so.
"""
import argparse
import json
import sys

from etils import epath

from evaluation.report import markdown, plot_by_step
from sweeps.report import read_metrics

RUNS = ("dense", "nsa", "win", "dsa", "local")
FAR = "retrieval_acc_beyond_8w"
# Last values of the diagnostics that explain a run (NSA gates and selection, DSA indexer recall).
DIAGNOSTICS = ("gate_cmp", "gate_slc", "gate_win", "selected_beyond_window", "indexer_recall")


def newest_eval(run: epath.Path) -> dict | None:
  """summary.json of the newest evaluated step, if scripts/evaluate.py ran on the run."""
  steps = sorted(run.glob("eval/step_*/summary.json"), key=lambda p: int(p.parent.name.split("_")[1]))
  return json.loads(steps[-1].read_text()) if steps else None


def run_row(run: epath.Path) -> tuple[list, list[dict]]:
  records = read_metrics(run)
  far = [(r["step"], r[FAR]) for r in records if FAR in r]
  if not far:
    return [run.name, "not found or no eval yet", *[""] * 5], records
  summary = newest_eval(run)
  chance = summary["retrieval"]["chance"] if summary and summary.get("retrieval") else None
  evaluated = (f"{summary['retrieval']['beyond_8w']['accuracy']:.3f} ({summary['retrieval']['beyond_8w']['count']} "
               f"targets, step {summary['step']})") if chance is not None else ""
  first_90 = next((s for s, a in far if a >= 0.9), None)
  last = lambda key: next((r[key] for r in reversed(records) if key in r), None)
  diagnostics = ", ".join(f"{k} {v:.2f}" for k in DIAGNOSTICS if (v := last(k)) is not None)
  return [run.name, f"{far[-1][1]:.3f}", far[-1][0], first_90 if first_90 is not None else "never", evaluated,
          "" if chance is None else f"{chance:.3f}", diagnostics], records


def main(argv) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs-dir", required=True, help="the directory holding the runs")
  parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated run directories in it")
  args = parser.parse_args(argv[1:])
  root = epath.Path(args.runs_dir)
  if not root.is_dir():
    print(f"error: --runs-dir={args.runs_dir}: not a directory", file=sys.stderr)
    return 2
  rows, curves = [], {}
  for name in filter(None, args.runs.split(",")):
    row, records = run_row(root / name)
    rows.append(row)
    curves[name] = [(r["step"], r[FAR]) for r in records if FAR in r]
  table = markdown(["run", "accuracy >= 8 windows (last eval)", "at step", "first step >= 0.9",
                    "scripts/evaluate.py", "chance", "diagnostics (last)"], rows)
  (root / "retrieval.md").write_text(table + "\n")
  print(table)
  chances = [float(r[5]) for r in rows if r[5]]
  plot_by_step(curves, chances[0] if chances else None, root / "retrieval_by_step.png",
               ylabel="accuracy beyond 8 windows", title=f"retrieval, {root.name}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
