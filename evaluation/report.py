"""What scripts/evaluate.py shows and writes: markdown tables, CSVs, PNGs and summary.json."""
import csv
import io
import json

from etils import epath

from evaluation.by_position import short
from evaluation.passkey import KEY_DIGITS


def markdown(headers, rows) -> str:
  lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
  return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def loss_table(buckets) -> str:
  return markdown(["positions", "eval loss", "tokens"],
                  [("[" + short(b["lo"]) + ", " + short(b["hi"]) + ")", f"{b['loss']:.4f}", b["tokens"]) for b in buckets])


def _grid(cells, field):
  """(depths, lengths, {(depth, length): value})."""
  depths = sorted({c["depth"] for c in cells})
  lengths = sorted({c["length"] for c in cells})
  return depths, lengths, {(c["depth"], c["length"]): c[field] for c in cells}


def passkey_table(cells, field="accuracy") -> str:
  """Rows: needle depth; columns: prompt length."""
  depths, lengths, value = _grid(cells, field)
  return markdown(["depth \\ length", *map(short, lengths)],
                  [(f"{d:.0%}", *(f"{value[d, n]:.3f}" for n in lengths)) for d in depths])


def retrieval_table(retrieval) -> str:
  rows = [(b["bucket"], f"[{b['lo']}, {b['hi']})", b["count"], f"{b['accuracy']:.3f}") for b in retrieval["buckets"]]
  return markdown(["distance", "tokens back", "targets", "accuracy"], rows)


def retrieval_section(retrieval) -> list[str]:
  if not retrieval:
    return []
  far = retrieval["beyond_8w"]
  return ["", f"## Retrieval by distance (synthetic targets; window {retrieval['window']} tokens, "
          f"chance {retrieval['chance']:.3f})", "", retrieval_table(retrieval), "",
          f"beyond 8 windows: accuracy {far['accuracy']:.3f} over {far['count']} targets"]


def passkey_section(passkey, seed: int) -> list[str]:
  if passkey is None:
    return ["", "## Passkey retrieval: not run (the run has no tokenizer: data.tokenizer is empty)"]
  trials = passkey["cells"][0]["trials"] if passkey["cells"] else 0
  return ["", f"## Passkey retrieval: exact {KEY_DIGITS}-digit match, keys per cell {trials}, seed {seed}",
          "", passkey_table(passkey["cells"]), "",
          f"per-digit accuracy {passkey['digit_accuracy']:.3f}", f"passkey accuracy {passkey['accuracy']:.3f}"]


def report(meta: dict, buckets, passkey, retrieval=None) -> str:
  """The markdown stdout shows; its last line is `passkey accuracy X.XXX` when passkey ran
  (passkey None: a run without a tokenizer, e.g. synthetic tasks on random filler)."""
  return "\n".join([
      f"# {meta['workdir']} step {meta['step']}, seq_len {meta['seq_len']} (trained at {meta['trained_seq_len']})",
      "", f"## Eval loss by position ({meta['loss_tokens']:,} validation tokens)", "", loss_table(buckets),
      *retrieval_section(retrieval), *passkey_section(passkey, meta["seed"])])


def _csv(rows: list[dict]) -> str:
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
  writer.writeheader()
  writer.writerows(rows)
  return buffer.getvalue()


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path: epath.Path) -> None:
  buffer = io.BytesIO()            # through etils: the workdir may be gs://
  fig.tight_layout()
  fig.savefig(buffer, format="png", dpi=120)
  _pyplot().close(fig)
  path.write_bytes(buffer.getvalue())


def plot_loss(buckets, path, title: str) -> None:
  """Eval loss per bucket against position (log scale): a step curve over the buckets' spans."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  xs = [max(b["lo"], 1) for b in buckets] + [buckets[-1]["hi"]]
  ys = [b["loss"] for b in buckets]
  ax.stairs(ys, xs, baseline=None, lw=2)
  ax.plot([(max(b["lo"], 1) * b["hi"]) ** 0.5 for b in buckets], ys, "o")
  ax.set(xscale="log", xlabel="position (log scale)", ylabel="eval loss", title=title)
  ax.grid(alpha=0.3)
  _save(fig, path)


def plot_passkey(cells, path, title: str) -> None:
  """Heatmap of exact-match accuracy, depth x length, each cell annotated."""
  plt = _pyplot()
  depths, lengths, value = _grid(cells, "accuracy")
  fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 3, 4))
  image = ax.imshow([[value[d, n] for n in lengths] for d in depths], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
  for i, d in enumerate(depths):
    for j, n in enumerate(lengths):
      ax.text(j, i, f"{value[d, n]:.2f}", ha="center", va="center")
  ax.set_xticks(range(len(lengths)), [short(n) for n in lengths])
  ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
  ax.set(xlabel="prompt length (tokens)", ylabel="needle depth", title=title)
  fig.colorbar(image, ax=ax, label="passkey accuracy")
  _save(fig, path)


def plot_retrieval(retrieval, path, title: str) -> None:
  """Accuracy per distance bucket (in windows), with chance as a dashed line."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  shown = [b for b in retrieval["buckets"] if b["count"]]
  ax.plot(range(len(shown)), [b["accuracy"] for b in shown], "o-", lw=2, label="accuracy")
  ax.axhline(retrieval["chance"], ls="--", color="gray", label="chance")
  ax.set_xticks(range(len(shown)), [b["bucket"] for b in shown])
  ax.set(ylim=(0, 1.02), xlabel=f"evidence distance (windows of {retrieval['window']} tokens)", ylabel="accuracy",
         title=title)
  ax.legend()
  ax.grid(alpha=0.3)
  _save(fig, path)


def plot_by_step(curves: dict, chance, path, *, ylabel: str, title: str) -> None:
  """{run: [(step, accuracy)]} as one line per run, with chance (if given) as a dashed line."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8, 5))
  for name, points in curves.items():
    if points:
      ax.plot(*zip(*points), "o-", label=name)
  if chance is not None:
    ax.axhline(chance, ls="--", color="gray", label="chance")
  ax.set(ylim=(0, 1.02), xlabel="step", ylabel=ylabel, title=title)
  ax.legend()
  ax.grid(alpha=0.3)
  _save(fig, epath.Path(path))


def write(outdir, meta: dict, buckets, passkey, retrieval=None) -> epath.Path:
  """outdir/{report.md, loss_by_position.csv/.png, summary.json}, passkey.csv/.png when passkey
  ran, and retrieval.csv/.png when the run has synthetic tasks."""
  outdir = epath.Path(outdir)
  outdir.mkdir(parents=True, exist_ok=True)
  title = f"step {meta['step']}, seq_len {meta['seq_len']}"
  (outdir / "report.md").write_text(report(meta, buckets, passkey, retrieval) + "\n")
  if retrieval:
    (outdir / "retrieval.csv").write_text(_csv(retrieval["buckets"]))
    plot_retrieval(retrieval, outdir / "retrieval.png", f"retrieval by distance, {title}")
  (outdir / "loss_by_position.csv").write_text(_csv(buckets))
  plot_loss(buckets, outdir / "loss_by_position.png", f"eval loss by position, {title}")
  if passkey is not None:
    (outdir / "passkey.csv").write_text(_csv(passkey["cells"]))
    plot_passkey(passkey["cells"], outdir / "passkey.png", f"passkey retrieval, {title}")
  (outdir / "summary.json").write_text(json.dumps(
      {**meta, "loss_by_position": buckets, "passkey": passkey, "retrieval": retrieval}, indent=1,
      default=str) + "\n")
  return outdir
