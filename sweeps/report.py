"""A sweep's results, rebuilt from what is on disk: WORKDIR/sweep.json (the points), each point's
metrics.jsonl and status file. Writes WORKDIR/results.csv and results.md (one row per point) and
PNG plots: every point's loss curve (loss_curves.png), final eval loss (eval_loss.png) and tokens/s
(tokens_per_sec.png) against each swept field."""
import csv
import io
import json
import math
import statistics

from etils import epath

from sweeps.grid import fields_of
from sweeps.runner import Point, read_status

MANIFEST = "sweep.json"
# (csv column, markdown header, markdown format) after the swept fields.
COLUMNS = (("status", "status", str), ("steps", "steps", str), ("train_loss", "train loss", "{:.4f}".format),
           ("start_eval_loss", "start eval loss", "{:.4f}".format),
           ("best_eval_loss", "best eval loss", "{:.4f}".format),
           ("final_eval_loss", "final eval loss", "{:.4f}".format),
           ("retrieval_beyond_8w", "retrieval >= 8 windows", "{:.3f}".format),
           ("tokens_per_sec", "tokens/s", "{:,.0f}".format), ("tflops_per_device", "TFLOP/s", "{:.3g}".format),
           ("params", "params", lambda p: f"{p / 1e6:.2f}M"), ("run_dir", "run dir", "`{}`".format),
           ("error", "error", str))
PLOTS = ("loss_curves.png", "eval_loss.png", "tokens_per_sec.png")
RETRIEVAL = "retrieval_acc_beyond_8w"      # train.py's eval.retrieval: the last value a run logged
RETRIEVAL_PLOT = "retrieval.png"           # written when some point logged it


def save_manifest(workdir: str, name: str, config: str, fixed: list[str], points: list[Point]) -> None:
  """Records the sweep in WORKDIR/sweep.json, after the points of earlier sweeps into the same
  workdir (so --report shows them all)."""
  path = epath.Path(workdir) / MANIFEST
  path.parent.mkdir(parents=True, exist_ok=True)
  old = json.loads(path.read_text())["points"] if path.exists() else []
  new = [{"name": p.name, "overrides": p.overrides} for p in points]
  given = {p["name"] for p in new}
  manifest = {"name": name, "config": config, "fixed": fixed,
              "points": [p for p in old if p["name"] not in given] + new}
  path.write_text(json.dumps(manifest, indent=1))


def load_points(workdir: str) -> tuple[str, list[Point]]:
  path = epath.Path(workdir) / MANIFEST
  if not path.exists():
    raise FileNotFoundError(f"{path}: no sweep here (scripts/sweep.py writes it when a sweep starts)")
  manifest = json.loads(path.read_text())
  return manifest["name"], [Point(p["name"], p["overrides"], str(epath.Path(workdir) / p["name"]))
                            for p in manifest["points"]]


def read_metrics(directory: str) -> list[dict]:
  path = epath.Path(directory) / "metrics.jsonl"
  records = []
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        records.append(json.loads(line))
      except ValueError:
        pass    # a line cut short by a crash
  return records


def row(point: Point, records: list[dict]) -> dict:
  """One table row: the swept values, how the point ended and what its metrics say."""
  status = read_status(point.directory) or {}
  evals = [r["eval_loss"] for r in records if "eval_loss" in r]
  median = lambda key: statistics.median(v) if (v := [r[key] for r in records if key in r]) else None
  return {**point.overrides, "name": point.name, "status": status.get("status", "unfinished"),
          "steps": records[-1]["step"] if records else 0,
          "train_loss": records[-1].get("loss") if records else None,
          "start_eval_loss": next((r["eval_loss"] for r in records if r["step"] == 0 and "eval_loss" in r), None),
          "best_eval_loss": min(evals) if evals else None, "final_eval_loss": evals[-1] if evals else None,
          "retrieval_beyond_8w": next((r[RETRIEVAL] for r in reversed(records) if RETRIEVAL in r), None),
          "tokens_per_sec": median("tokens_per_sec"), "tflops_per_device": median("tflops_per_device"),
          "params": records[-1].get("params") if records else None,
          "run_dir": point.directory, "error": status.get("error", "")}


def write_report(workdir: str, plots: bool = True) -> list[dict]:
  """Rebuilds results.csv, results.md and (unless not `plots`) the plots from disk; returns the rows."""
  name, points = load_points(workdir)
  fields = fields_of([p.overrides for p in points])
  metrics = {p.name: read_metrics(p.directory) for p in points}
  rows = [row(p, metrics[p.name]) for p in points]
  out = epath.Path(workdir)
  columns = [*fields, *(c for c, _, _ in COLUMNS)]
  text = io.StringIO()
  writer = csv.DictWriter(text, columns, extrasaction="ignore", lineterminator="\n")
  writer.writeheader()
  writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
  (out / "results.csv").write_text(text.getvalue())
  (out / "results.md").write_text(markdown(rows, fields))
  if not plots:
    return rows
  plot_curves(rows, [p.name for p in points], metrics, out / PLOTS[0], title=f"sweep {name}: loss")
  plot_metric(rows, fields, "final_eval_loss", "final eval loss", out / PLOTS[1], title=f"sweep {name}")
  plot_metric(rows, fields, "tokens_per_sec", "tokens/s", out / PLOTS[2], title=f"sweep {name}")
  if any(r["retrieval_beyond_8w"] is not None for r in rows):
    plot_metric(rows, fields, "retrieval_beyond_8w", "retrieval accuracy beyond 8 windows", out / RETRIEVAL_PLOT,
                title=f"sweep {name}")
  return rows


def markdown(rows: list[dict], fields: list[str]) -> str:
  def cell(value, fmt):
    return "" if value is None or value == "" else fmt(value).replace("|", "\\|")
  lines = ["| " + " | ".join([*fields, *(h for _, h, _ in COLUMNS)]) + " |",
           "|" + "---|" * len(fields) + "".join("---|" if c in ("status", "run_dir", "error") else "---:|"
                                                 for c, _, _ in COLUMNS)]
  for r in rows:
    lines.append("| " + " | ".join([*(cell(r.get(f), str) for f in fields),
                                    *(cell(r[c], fmt) for c, _, fmt in COLUMNS)]) + " |")
  return "\n".join(lines) + "\n"


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path: epath.Path) -> None:
  buffer = io.BytesIO()           # through etils: the workdir may be gs://
  fig.savefig(buffer, format="png", dpi=120)
  _pyplot().close(fig)
  path.write_bytes(buffer.getvalue())


def plot_curves(rows, names, metrics, path, *, title: str) -> None:
  """Every point's train loss against step (lines) and eval loss (markers, same colour)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8, 5))
  for r, name in zip(rows, names):
    records = metrics[name]
    if not records:
      continue
    line, = ax.plot([m["step"] for m in records if "loss" in m], [m["loss"] for m in records if "loss" in m],
                    lw=1, label=f"{name} ({r['status']})" if r["status"] != "finished" else name)
    evals = [(m["step"], m["eval_loss"]) for m in records if "eval_loss" in m]
    if evals:
      ax.plot(*zip(*evals), "o", color=line.get_color(), ms=4)
  ax.set(xlabel="step", ylabel="loss (lines: train, dots: eval)", title=title)
  if ax.lines:
    ax.legend(fontsize="small")
  else:
    ax.text(0.5, 0.5, "no metrics yet", ha="center", transform=ax.transAxes)
  fig.tight_layout()
  _save(fig, path)


def plot_metric(rows, fields, key, label, path, *, title: str) -> None:
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(fields), figsize=(4.5 * len(fields) + 1, 3.8), squeeze=False)
  against_fields(axes[0], rows, fields, key, label)
  fig.suptitle(f"{title}: {label}")
  fig.tight_layout()
  _save(fig, path)


def _numeric(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def against_fields(axes, rows, fields, key, label, extra=()) -> None:
  """On axes[i]: rows[key] against fields[i], a line per combination of the other fields' (and
  `extra` columns') values; rows where key is missing (failed points) are left out."""
  for ax, field in zip(axes, fields):
    others = [f for f in (*fields, *extra) if f != field]
    values = list(dict.fromkeys(r.get(field) for r in rows if r.get(field) is not None))
    numeric = all(_numeric(v) for v in values)
    position = (lambda v: v) if numeric else (lambda v: values.index(v))
    groups = {}
    for r in rows:
      if r.get(key) is not None and r.get(field) is not None:
        groups.setdefault(tuple(r.get(f) for f in others), []).append((position(r[field]), r[key]))
    for group, pts in groups.items():
      pts.sort()
      name = ", ".join(f"{f.rsplit('.', 1)[-1]}={v}" for f, v in zip(others, group)) or None
      ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=name)
    if numeric and values and min(values) > 0 and max(values) / min(values) >= 4:
      ax.set_xscale("log", base=2)
    if values:
      ax.set_xticks([position(v) for v in values], [str(v) for v in values])
      ax.minorticks_off()
    ax.set(xlabel=field, ylabel=label)
    if len(groups) > 1:
      ax.legend(fontsize="x-small")
    if not groups:
      ax.text(0.5, 0.5, "no finished points", ha="center", transform=ax.transAxes)
