"""Where metrics go: WORKDIR/metrics.jsonl (one JSON object per logged step), a live progress bar,
and wandb (offline by default: no network needed; `--config.wandb.mode=online` to sync); all of
it from process 0 only. Also the step-range profiler (`profile.*`). The workdir may be remote
(gs://...): files go through etils.epath."""
import json
import os
import sys
import time
import uuid

import jax
import numpy as np
import tqdm
from etils import epath


class MetricsWriter:
  def __init__(self, workdir: str, config, *, start_step: int, is_main: bool):
    self.is_main = is_main
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self._wandb = None
    if not is_main:
      return
    # Steps past the checkpoint are about to be redone: their lines go. Object stores (gs://) have
    # no append, so a remote metrics.jsonl is rewritten whole at each log (small: one line a log).
    self._lines = _truncate_after(self.path, start_step)
    self._file = None if "://" in str(workdir) else self.path.open("a")
    self.bar = tqdm.tqdm(total=config.steps, initial=start_step, desc="train", unit="step",
                         dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
    if config.wandb.mode != "disabled":
      self._wandb = _start_wandb(workdir, config)

  def step_done(self, n: int = 1):
    if self.is_main:
      self.bar.update(n)

  def write(self, step: int, metrics: dict):
    if not self.is_main:
      return
    record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}, "time": time.time()}
    line = json.dumps(record) + "\n"
    if self._file is None:
      self._lines.append(line)
      self.path.write_text("".join(self._lines))
    else:
      self._file.write(line)
      self._file.flush()
    shown = {k: record[k] for k in ("loss", "eval_loss", "indexer_loss", "tokens_per_sec") if k in record}
    self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
    if self._wandb is not None:
      self._wandb.log(record, step=step)

  def print(self, message: str):
    if self.is_main:
      tqdm.tqdm.write(message, file=sys.stderr)

  def close(self):
    if not self.is_main:
      return
    self.bar.close()
    if self._file is not None:
      self._file.close()
    if self._wandb is not None:
      self._wandb.finish()


class Throughput:
  """Tokens/s, step time and model TFLOP/s per device since the last restart."""

  def __init__(self, tokens_per_step: int, flops_per_token: float, num_devices: int):
    self.tokens_per_step, self.flops_per_token, self.num_devices = tokens_per_step, flops_per_token, num_devices
    self.restart(0)

  def restart(self, step: int):
    self.step, self.start = step, time.perf_counter()

  def rates(self, step: int) -> dict:
    done, elapsed = step - self.step, time.perf_counter() - self.start
    if done <= 0:
      return {}
    tokens_per_sec = done * self.tokens_per_step / elapsed
    return {"tokens_per_sec": tokens_per_sec, "step_time": elapsed / done,
            "tflops_per_device": tokens_per_sec * self.flops_per_token / self.num_devices / 1e12}


def _plain(v):
  return v.item() if hasattr(v, "item") else v   # full precision: resume tests compare bitwise


def _truncate_after(path: epath.Path, step: int) -> list[str]:
  """Drop records of steps > `step` (written before a crash, redone after the resume); returns
  the lines kept."""
  if not path.exists():
    return []
  lines = [line + "\n" for line in path.read_text().splitlines() if line.strip()]
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        kept.append(line)
    except (ValueError, KeyError):
      pass   # a line cut short by a crash
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text("".join(kept))
  tmp.replace(path)
  return kept


def _start_wandb(workdir: str, config):
  import wandb  # imported lazily: it is slow to import and optional at run time
  id_file = epath.Path(workdir) / "wandb_run_id"
  run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
  id_file.write_text(run_id)
  # wandb writes its offline files locally: into the workdir, or ./wandb for a remote workdir.
  local = str(workdir) if "://" not in str(workdir) else os.path.abspath("wandb")
  return wandb.init(project=config.wandb.project, name=config.wandb.name or None, group=config.wandb.group or None,
                    id=run_id, resume="allow", dir=local, mode=config.wandb.mode, config=config.to_dict())


LAST, SUMMED = ("grad_norm", "lr"), ("skipped_steps",)


def summarize(interval: list, step_metrics: dict) -> dict:
  """One log line from the device-side metrics of the steps since the last one (fetched together
  here: no per-step sync): grad_norm and lr of the last step; skipped_steps summed (steps of the
  interval skipped for a non-finite loss, gradient norm or update, trainer/divergence.py); every
  other value averaged over all its steps, skipped ones included (a NaN loss makes the mean NaN)."""
  interval = jax.device_get(interval)
  last = interval[-1]
  return {**last, **{k: float(np.mean([m[k] for m in interval])) for k in last if k not in LAST + SUMMED},
          **{k: int(np.sum([m[k] for m in interval])) for k in SUMMED if k in last},
          **jax.device_get(step_metrics)}


class Profiler:
  """A jax.profiler trace of steps [start_step, start_step + num_steps) into WORKDIR/profile
  (TensorBoard / XProf), taken on process 0; start_step 0 turns it off."""

  def __init__(self, config, workdir: str, *, is_main: bool):
    self.first, self.last = config.profile.start_step, config.profile.start_step + config.profile.num_steps - 1
    self.directory = str(epath.Path(workdir) / "profile")
    self.enabled, self.active = is_main and config.profile.start_step > 0, False

  def before(self, step: int):
    if self.enabled and step == self.first:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, outputs):
    if self.active and step >= self.last:
      jax.block_until_ready(outputs)    # the trace holds the steps' device work, not just their dispatch
      jax.profiler.stop_trace()
      self.active = False

  def close(self):
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
