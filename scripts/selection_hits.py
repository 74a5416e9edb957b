"""Does NSA's selection find the evidence? For an NSA run on a synthetic task (configs/mqar.py),
per layer and KV head: the share of the validation targets whose evidence lies in a block the
selection chose at the target's position, beside the accuracy on those targets.

  python scripts/selection_hits.py --workdir runs/mqar/nsa [--step N] [--eval-batches K]

A share near 1 with a low accuracy says the keys are there and the model has not yet learnt to
use them; a low share says the selection misses them (docs/evaluation.md#retrieval-runs).
"""
import argparse
import sys


def main(workdir: str, step, eval_batches) -> int:
  import jax
  import numpy as np
  from flax import linen as nn

  from data import pipeline, sources
  from evaluation import retrieval
  from evaluation.report import markdown
  from model import transformer
  from trainer import checkpoint

  directory = checkpoint.checkpoint_dir(workdir)
  config, step = checkpoint.saved_config(directory, step)
  if config.attention.kind != "nsa" or "slc" not in config.nsa.branches:
    print(f"error: --workdir={workdir}: must be an NSA run with the slc branch (it is "
          f"{config.attention.kind}, branches {config.nsa.branches})", file=sys.stderr)
    return 2
  if not sources.synthetic_tasks(config):
    print(f"error: --workdir={workdir}: its data has no synthetic task, so no evidence positions", file=sys.stderr)
    return 2
  config.eval_batches = eval_batches or config.eval_batches
  model = transformer.build(config)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), np.zeros((1, config.seq_len), np.int32))))
  params = checkpoint.saved_params(directory, step, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract["params"]))
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))
  blocks, correct, distance, weights = [], [], [], []
  for batch in pipeline.eval_batches(config, sources.open_sources(config)):
    logits, sown = apply(params, batch["inputs"])
    blocks.append(np.asarray(sown["intermediates"]["layers"]["attn"]["block_indices"][0]))   # [L, B, T, HKV, n]
    correct.append(np.asarray(logits).argmax(-1) == batch["targets"])
    distance.append(batch["distance"])
    weights.append(batch["weights"])
  distance, weights = np.concatenate(distance), np.concatenate(weights)
  scored = retrieval.scored_targets(distance, weights)
  counts, hits = int(scored.sum()), int(np.concatenate(correct)[scored].sum())
  share = retrieval.evidence_selected(np.concatenate(blocks, axis=1), distance, weights, config.nsa.slc_block)
  print(f"{workdir} step {step}: {counts} targets, accuracy {hits / counts:.3f}; share of targets whose "
        f"evidence block is selected:\n")
  print(markdown(["layer", *(f"KV head {h}" for h in range(share.shape[1]))],
                 [(layer, *(f"{s:.3f}" for s in row)) for layer, row in enumerate(share)]))
  return 0


def run(argv) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="the NSA run")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  parser.add_argument("--eval-batches", type=int, default=None, help="validation batches (default: the run's)")
  args = parser.parse_args(argv[1:])
  return main(args.workdir, args.step, args.eval_batches)


if __name__ == "__main__":
  sys.exit(run(sys.argv))
