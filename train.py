"""Pretrain a decoder-only LM with dense, NSA or DSA attention.

  python train.py --config configs/tiny.py --workdir runs/tiny [--config.FIELD=VALUE ...]

Re-running the same command with the same --workdir resumes from its latest checkpoint.
"""
import logging
import os
import signal
import sys

from absl import flags
from ml_collections import config_flags

from configs import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/tiny.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics.jsonl and logs go")
# Fault injection for tests: SIGKILL this process right after the given step (like a lost host).
_KILL_AT_STEP = int(os.environ.get("TRAIN_KILL_AT_STEP", "0"))


def main(config, workdir: str) -> int:
  import jax
  import numpy as np

  from data import pipeline, sources
  from model import transformer
  from trainer import checkpoint, optim, sharding, steps, validate
  from trainer.metrics import MetricsWriter, Throughput

  validate.validate(config, num_devices=jax.device_count())
  validate.validate_workdir(workdir)
  is_main = jax.process_index() == 0

  # Data first: a tokenizer or dataset that does not fit the model fails before any compile.
  host = (jax.process_index(), jax.process_count())
  data_sources = sources.open_sources(config)
  data_iter = pipeline.train_iterator(config, data_sources, *host)
  eval_data = pipeline.eval_batches(config, data_sources, *host) if config.eval_every else []

  mesh = sharding.make_mesh(config.mesh)
  model = transformer.build(config)
  tx, schedule = optim.make_optimizer(config), optim.learning_rate(config)
  abstract_state, state_shardings = steps.state_shardings(config, model, tx, mesh)

  ckpt = checkpoint.Checkpointer(workdir, config)
  state, start_step = ckpt.restore_latest(abstract_state, data_iter)
  if state is None:
    state = steps.init_state(config, model, tx, mesh, state_shardings)
    if config.init_from:
      params, from_step, fresh = checkpoint.load_params(config.init_from, abstract_state.params)
      state = state.replace(params=jax.tree.map(lambda new, old: old if new is None else new,
                                                params, state.params, is_leaf=lambda x: x is None))
      logging.info("parameters from %s (step %d)%s", config.init_from, from_step,
                   f"; not in that checkpoint, freshly initialised: {', '.join(fresh)}" if fresh else "")

  num_params = transformer.count_params(state.params)
  flops_per_token = transformer.flops_per_token(config, state.params)
  train_step = steps.make_train_step(model, tx, schedule, mesh, state_shardings,
                                     trainable=optim.trainable(config, state.params))
  eval_step = steps.make_eval_step(model, mesh, state_shardings)
  diagnostics_step = steps.make_diagnostics_step(model, mesh, state_shardings)   # None for most kinds
  to_global = lambda b: {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), v)
                         for k, v in b.items()}

  writer = MetricsWriter(workdir, config, start_step=start_step, is_main=is_main)
  writer.print(f"data: {sources.describe(data_sources)}, packing {config.data.packing}")
  writer.print(f"{num_params / 1e6:.2f}M parameters, mesh {dict(mesh.shape)}, attention "
               f"{config.attention.kind}/{config.attention.impl}, "
               + (f"resumed from step {start_step}" if start_step else
                  f"parameters from {config.init_from}" if config.init_from else "starting from scratch"))

  stop_signal = []
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, _: stop_signal.append(signum))

  timer = Throughput(config.batch_size * config.seq_len, flops_per_token, jax.device_count())
  interval = []   # device-side metrics since the last log: fetched together, no per-step sync
  for step in range(start_step + 1, config.steps + 1):
    batch = to_global(next(data_iter))
    evaluate = config.eval_every and (step % config.eval_every == 0 or step == config.steps)
    log = evaluate or step % config.log_every == 0 or step == config.steps
    # Costly diagnostics (DSA's indexer recall) on the logged batch, with the parameters it meets.
    diagnostics = diagnostics_step(state.params, batch) if log and diagnostics_step else {}
    state, metrics = train_step(state, batch)
    interval.append(metrics)
    if step == start_step + 1:   # the first step compiles: time from its end
      jax.block_until_ready(metrics)
      timer.restart(step)
    writer.step_done()
    if log:
      interval = jax.device_get(interval)   # grad_norm, lr of this step; the rest averaged
      metrics = {**interval[-1], **{k: float(np.mean([m[k] for m in interval])) for k in interval[-1]
                                    if k not in ("grad_norm", "lr")},
                 **jax.device_get(diagnostics), **timer.rates(step)}
      if (epoch := pipeline.epoch(data_iter, data_sources, host[1])) is not None:
        metrics["epoch"] = epoch
      if evaluate:
        metrics["eval_loss"] = float(np.mean([eval_step(state.params, to_global(b)) for b in eval_data]))
      writer.write(step, metrics)
      interval = []
      timer.restart(step)
    preempted = _agree(bool(stop_signal))
    ckpt.save(step, state, data_iter, force=preempted or step == config.steps)
    if _KILL_AT_STEP == step:
      ckpt.wait()
      os.kill(os.getpid(), signal.SIGKILL)
    if preempted:
      data_iter.close()
      ckpt.close()
      writer.print(f"stopped by signal at step {step}; checkpoint saved, re-run the command to resume")
      writer.close()
      return 128 + (stop_signal[0] if stop_signal else signal.SIGTERM)

  data_iter.close()
  ckpt.close()
  writer.close()
  return 0


def _agree(flag: bool) -> bool:
  """All hosts stop together: one host's signal stops every host (at the same step)."""
  import jax
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(multihost_utils.process_allgather(flag).any())


def run(argv) -> int:
  try:
    flags.FLAGS(argv)
    if _CONFIG.value is not None:
      _CONFIG.value.to_dict()   # config_flags defers a bad --config path until first use
  except (AttributeError, KeyError) as e:
    print(f"error: unknown config field {str(e).strip(chr(34))} on the command line", file=sys.stderr)
    return 2
  except OSError as e:   # the config file itself: say why it could not be loaded
    print(f"error: --config cannot be loaded: {str(e).strip().splitlines()[-1].strip()}", file=sys.stderr)
    return 2
  except flags.Error as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  if _CONFIG.value is None or not _WORKDIR.value:
    print("error: --config and --workdir are required, e.g. "
          "python train.py --config configs/tiny.py --workdir runs/tiny", file=sys.stderr)
    return 2
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  for noisy in ("absl", "jax._src", "orbax", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    return main(_CONFIG.value, _WORKDIR.value)
  except ConfigError as e:
    print(str(e), file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(run(sys.argv))
