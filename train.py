"""Pretrain a decoder-only LM with dense, NSA or DSA attention.

  python train.py --config configs/tiny.py --workdir runs/tiny [--config.FIELD=VALUE ...]

Re-running the same command with the same --workdir resumes from its latest checkpoint. The
workdir may be on shared storage (gs://bucket/run). On a multi-host Cloud TPU slice every host
runs this same command; the hosts find each other by themselves. Elsewhere (CPU or GPU clusters,
tests) name the cluster: --coordinator_address=HOST:PORT --num_processes=N --process_id=I.
"""
import logging
import signal
import sys

from absl import flags
from ml_collections import config_flags

from configs import ConfigError, parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/tiny.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics.jsonl and logs go (local or gs://)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0, for a multi-process run off Cloud TPU")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes (hosts) in the run")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0 .. num_processes - 1")


def main(config, workdir: str) -> int:
  import jax
  import numpy as np

  from data import pipeline, sources
  from evaluation import passkey
  from model import transformer
  from parallel.mesh import batch_sharding, make_mesh, num_slices
  from trainer import checkpoint, divergence, steps, validate
  from trainer.metrics import MetricsWriter, Profiler, Throughput, summarize
  from trainer.state import restore_or_init

  slices = num_slices(jax.devices())
  validate.validate(config, num_devices=jax.device_count(), num_slices=slices)
  validate.validate_workdir(workdir)
  is_main = jax.process_index() == 0

  # Data before the model: a tokenizer or dataset that does not fit fails before any compile.
  # This host feeds the global batch rows its devices hold (the same rows for any host count).
  mesh = make_mesh(config.mesh)
  host = (jax.process_index(), jax.process_count())
  rows = pipeline.sharded_rows(batch_sharding(mesh), config.batch_size)
  data_sources = sources.open_sources(config)
  data_iter = pipeline.train_iterator(config, data_sources, *host, rows=rows)
  eval_data = pipeline.eval_batches(config, data_sources, *host, rows=rows) if config.eval_every else []
  program = steps.build(config, mesh)
  passkey_probe = passkey.passkey_probe(config, program.model, mesh, data_sources, validate.passkey_lengths(
      config, jax.device_count(), slices)) if config.eval.passkey else None
  guard = divergence.Monitor(config)
  ckpt = checkpoint.Checkpointer(workdir, config)
  writer, profiler = None, Profiler(config, workdir, is_main=is_main)
  try:
    state, start_step, init_notes = restore_or_init(config, program, mesh, ckpt, data_iter)
    writer = MetricsWriter(workdir, config, start_step=start_step, is_main=is_main)
    for note in init_notes:      # parameters init_from lacked, and how they start
      writer.print(f"new parameter {note}")
    writer.print(f"data: {sources.describe(data_sources)}, packing {config.data.packing}")
    num_params = transformer.count_params(state.params)
    writer.print(f"{num_params / 1e6:.2f}M parameters, mesh {dict(mesh.shape)}, "
                 f"{jax.process_count()} process(es), attention {config.attention.kind}/{config.attention.impl}, "
                 + (f"resumed from step {start_step}" if start_step else
                    f"parameters from {config.init_from}" if config.init_from else "starting from scratch"))
    to_global = lambda b: {k: jax.make_array_from_process_local_data(batch_sharding(mesh), v)
                           for k, v in b.items()}
    eval_loss = lambda: float(np.mean([program.eval_step(state.params, to_global(b)) for b in eval_data]))
    if config.init_from and not start_step and config.eval_every:   # where the parameters start from
      start_loss = eval_loss()
      writer.write(0, {"eval_loss": start_loss})
      writer.print(f"step 0: eval_loss {start_loss:.4f} with the parameters from {config.init_from}")
    stop_signal = []
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, lambda signum, _: stop_signal.append(signum))

    timer = Throughput(config.batch_size * config.seq_len, transformer.flops_per_token(config, state.params),
                       jax.device_count())
    interval = []   # device-side metrics since the last log: fetched together, no per-step sync
    for step in range(start_step + 1, config.steps + 1):
      batch = to_global(next(data_iter))
      evaluate = config.eval_every and (step % config.eval_every == 0 or step == config.steps)
      log = evaluate or step % config.log_every == 0 or step == config.steps
      # Costly diagnostics (DSA's indexer recall) on the logged batch, with the parameters it meets.
      diagnostics = program.diagnostics_step(state.params, batch) if log and program.diagnostics_step else {}
      profiler.before(step)
      state, metrics = program.train_step(state, batch)
      profiler.after(step, metrics)
      interval.append(metrics)
      if step == start_step + 1:   # the first step compiles: time from its end
        jax.block_until_ready(metrics)
        timer.restart(step)
      writer.step_done()
      if log:
        metrics = {**summarize(interval, diagnostics), **timer.rates(step), "params": num_params}
        if (epoch := pipeline.epoch(data_iter, data_sources, host[1])) is not None:
          metrics["epoch"] = epoch
        if evaluate:
          metrics["eval_loss"] = eval_loss()
          if program.retrieval_step:
            metrics.update(retrieval_metrics(program, state.params, eval_data, to_global))
          if passkey_probe:
            metrics["passkey_acc"] = passkey_probe(state.params)
        writer.write(step, metrics)
        guard.saw(step, interval)
        interval = []
        timer.restart(step)
      preempted = _agree(bool(stop_signal))
      save = ckpt.due(step, force=preempted or step == config.steps)
      # Too many non-finite steps in a row: stop before saving (checked only where a sync happens anyway).
      if (log or save) and (stop := guard.check(step, state, interval, ckpt)):
        writer.print(stop)
        return divergence.EXIT_CODE
      ckpt.save(step, state, data_iter, force=save)
      if preempted:
        writer.print(f"stopped by signal at step {step}; checkpoint saved, re-run the command to resume")
        return 128 + (stop_signal[0] if stop_signal else signal.SIGTERM)
    return 0
  finally:
    profiler.close()
    data_iter.close()
    ckpt.close()
    if writer is not None:
      writer.close()


def retrieval_metrics(program, params, eval_data, to_global) -> dict:
  """eval.retrieval: accuracy by distance over the eval batches (evaluation/retrieval.py)."""
  import jax
  import numpy as np

  from evaluation import retrieval
  counts = [jax.device_get(program.retrieval_step(params, to_global(b))) for b in eval_data]
  hits, totals = (np.sum([c[i] for c in counts], axis=0) for i in (0, 1))
  config = program.model.config
  return retrieval.metrics(hits, totals, retrieval.eval_edges(config), retrieval.window_of(config))


def _agree(flag: bool) -> bool:
  """All hosts stop together: one host's signal stops every host (at the same step)."""
  import jax
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(multihost_utils.process_allgather(flag).any())


def run(argv) -> int:
  if error := parse_flags(argv, _CONFIG):
    print(error, file=sys.stderr)
    return 2
  if _CONFIG.value is None or not _WORKDIR.value:
    print("error: --config and --workdir are required, e.g. "
          "python train.py --config configs/tiny.py --workdir runs/tiny", file=sys.stderr)
    return 2
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  for noisy in ("absl", "jax._src", "orbax", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    from trainer import distributed
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    return main(_CONFIG.value, _WORKDIR.value)
  except ConfigError as e:
    print(str(e), file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(run(sys.argv))
