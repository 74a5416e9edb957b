"""Where metrics go: WORKDIR/metrics.jsonl (one JSON object per logged step), a live progress bar,
and wandb (offline by default: no network needed; `--config.wandb.mode=online` to sync)."""
import json
import os
import sys
import time
import uuid

import tqdm


class MetricsWriter:
  def __init__(self, workdir: str, config, *, start_step: int, is_main: bool):
    self.is_main = is_main
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._wandb = None
    if not is_main:
      return
    _truncate_after(self.path, start_step)   # steps past the checkpoint are about to be redone
    self._file = open(self.path, "a", encoding="utf-8")
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
    self._file.write(json.dumps(record) + "\n")
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


def _truncate_after(path: str, step: int):
  """Drop records of steps > `step` (written before a crash, redone after the resume)."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = [line for line in f if line.strip()]
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        kept.append(line)
    except (ValueError, KeyError):
      pass   # a line cut short by a crash
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(kept)
  os.replace(tmp, path)


def _start_wandb(workdir: str, config):
  import wandb   # imported lazily: it is slow to import and optional at run time
  id_file = os.path.join(workdir, "wandb_run_id")
  run_id = open(id_file).read().strip() if os.path.exists(id_file) else uuid.uuid4().hex[:12]
  with open(id_file, "w") as f:
    f.write(run_id)
  return wandb.init(project=config.wandb.project, name=config.wandb.name or None, id=run_id,
                    resume="allow", dir=workdir, mode=config.wandb.mode, config=config.to_dict())
