"""Long-context evaluation of a run's checkpoint: eval loss by position and passkey retrieval.

  python scripts/evaluate.py --workdir runs/tiny [--step N] [--seq-len T] [--passkey-trials 10]
      [--passkey-lengths 256,1024] [--batch-size B] [--eval-batches K] [--seed S] [--output DIR]

The run's config comes from the checkpoint (step N, default the newest); --seq-len sets the length
evaluated (default the trained one; longer is allowed: how RoPE extrapolates is what it measures).
- Loss by position: the mean loss of the validation rows (the run's packing, --eval-batches x
  --batch-size rows of T tokens) in position buckets [0, 256), [256, 1k), [1k, 4k), ... up to T.
- Retrieval (runs with synthetic:mqar / synthetic:passkey data): the accuracy of the model's top
  prediction on the synthetic targets of the validation rows, by how far back the evidence is,
  in buckets of [0, 1), [1, 4), [4, 16), ... windows (eval.retrieval_window, else nsa.window, or
  dsa.index_topk for DSA), and beyond 8 windows.
- Passkey: a random 5-digit key hidden at depths 0, 25, 50, 75, 100% of validation-split filler,
  prompts of each --passkey-lengths (default 256, 1k, 4k, ... up to T); the model answers greedily
  after a fixed question; a cell is the exact-match accuracy over --passkey-trials keys. Skipped
  for a run without a tokenizer (data.tokenizer "": synthetic tasks on random filler).
Markdown tables go to stdout (last line, when passkey ran: `passkey accuracy X.XXX`), and with CSVs, PNGs and
summary.json to WORKDIR/eval/step_N (or --output). Exit code 2 with one line for bad input.
One process (the devices of this host); the run's mesh without context parallelism.
"""
import functools
import logging
import sys

from absl import flags

from configs import ConfigError, parse_flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "the run's workdir (or its checkpoints/ directory)")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)")
_SEQ_LEN = flags.DEFINE_integer("seq-len", None, "tokens per evaluated row (default: the run's seq_len)")
_BATCH = flags.DEFINE_integer("batch-size", None, "rows per forward pass (default: the run's batch_size)")
_EVAL_BATCHES = flags.DEFINE_integer("eval-batches", None, "validation batches for the loss (default: the run's)")
_TRIALS = flags.DEFINE_integer("passkey-trials", 10, "keys per depth x length cell")
_LENGTHS = flags.DEFINE_list("passkey-lengths", None, "prompt lengths (default: 256, 1k, 4k, ... up to seq-len)")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the passkey keys and filler offsets")
_OUTPUT = flags.DEFINE_string("output", None, "output directory (default: WORKDIR/eval/step_N)")


def main(workdir: str) -> int:
  import jax
  import numpy as np

  from data import pipeline, sources
  from data.tokenizer import Tokenizer
  from evaluation import by_position, passkey, report, retrieval
  from model import transformer
  from parallel.mesh import batch_sharding, make_mesh
  from trainer import checkpoint, optim, validate
  from trainer.state import state_shardings

  directory = checkpoint.checkpoint_dir(workdir)
  config, step = checkpoint.saved_config(directory, _STEP.value)
  trained_seq_len = config.seq_len
  for field, value in (("seq_len", _SEQ_LEN.value), ("batch_size", _BATCH.value), ("eval_batches", _EVAL_BATCHES.value)):
    if value is not None:                 # validate() below names a bad one
      config[field] = value
  if config.mesh.context != 1:             # no load-balanced layout here: its devices go to fsdp
    config.mesh.update(context=1, fsdp=-1, data=1)
  validate.validate(config, num_devices=jax.device_count())
  lengths = [int(n) for n in _LENGTHS.value] if _LENGTHS.value else passkey.default_lengths(config.seq_len)
  for n in lengths:
    if not 64 <= n <= config.seq_len:
      raise ConfigError("passkey-lengths", n, f"each must be in [64, seq-len={config.seq_len}]")
  if _TRIALS.value < 1:
    raise ConfigError("passkey-trials", _TRIALS.value, "must be >= 1")

  mesh = make_mesh(config.mesh)
  model = transformer.build(config)
  abstract, _ = state_shardings(config, model, optim.make_optimizer(config), mesh)
  params = checkpoint.saved_params(directory, step, abstract.params)
  data_sources = sources.open_sources(config)

  # Loss by position on the validation rows, at the evaluated length.
  losses_fn = functools.partial(by_position.jit_token_losses(model, mesh), params)
  rows = pipeline.sharded_rows(batch_sharding(mesh), config.batch_size)
  parts = [by_position.batch_token_losses(b, losses_fn)
           for b in pipeline.eval_batches(config, data_sources, rows=rows)]
  losses, positions, weights = (np.concatenate(x) for x in zip(*parts))
  buckets = by_position.loss_by_position(losses, positions, weights, by_position.bucket_edges(config.seq_len))

  retrieval_result = None
  if tasks := sources.synthetic_tasks(config):     # retrieval by distance on the synthetic validation rows
    eval_rows = pipeline.eval_batches(config, data_sources, rows=rows)
    chance = retrieval.chance(config) if len(tasks) == 1 else float("nan")
    retrieval_result = retrieval.evaluate(eval_rows, functools.partial(retrieval.jit_correct(model, mesh), params),
                                          retrieval.window_of(config), chance)

  passkey_result = None                # passkey needs text: a run without a tokenizer has none
  if config.data.tokenizer:
    logits_fn = functools.partial(passkey.jit_apply(model, mesh), params)
    filler = passkey.filler_tokens(data_sources, 4 * max(lengths))
    passkey_result = passkey.passkey_eval(logits_fn, Tokenizer(config.data.tokenizer), filler, lengths,
                                          trials=_TRIALS.value, seed=_SEED.value, batch_size=config.batch_size)

  meta = {"workdir": str(workdir), "step": step, "seq_len": config.seq_len, "trained_seq_len": trained_seq_len,
          "seed": _SEED.value, "loss_tokens": int(weights.sum()), "attention": config.attention.kind}
  report.write(_OUTPUT.value or checkpoint.workdir_path(workdir) / "eval" / f"step_{step}", meta, buckets,
               passkey_result, retrieval_result)
  print(report.report(meta, buckets, passkey_result, retrieval_result), flush=True)
  return 0


def run(argv) -> int:
  if error := parse_flags(argv):
    print(error, file=sys.stderr)
    return 2
  if not _WORKDIR.value:
    print("error: --workdir is required, e.g. python scripts/evaluate.py --workdir runs/tiny", file=sys.stderr)
    return 2
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  try:
    return main(_WORKDIR.value)
  except ConfigError as e:
    print(str(e), file=sys.stderr)
    return 2
  except FileNotFoundError as e:         # e.g. the run's tokenizer is not on this machine
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(run(sys.argv))
