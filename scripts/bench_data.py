"""Tokens per second one host's data pipeline delivers from a prepared dataset.

  python scripts/bench_data.py --source data/prepared/mycorpus [--seq-len 8192 32768] [--batch-size 8]

For each seq_len and packing mode: build the training iterator exactly as train.py does, skip a
warm-up, then time `--batches` batches. Prints a table.
"""
import argparse
import os
import time

from configs import base  # noqa: E402
from data import pipeline, sources  # noqa: E402


def measure(config, data_sources, batches: int, warmup: int = 3) -> dict:
  it = pipeline.train_iterator(config, data_sources)
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  real = 0
  for _ in range(batches):
    batch = next(it)
    real += int(batch["weights"].sum()) if "weights" in batch else batch["targets"].size
  seconds = time.perf_counter() - start
  it.close()
  tokens = batches * config.batch_size * config.seq_len
  return {"tokens_per_sec": tokens / seconds, "ms_per_batch": 1e3 * seconds / batches,
          "fill": real / tokens}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--source", required=True, help="dataset directory from prepare_data.py (or 'embedded')")
  parser.add_argument("--tokenizer", default="", help="its tokenizer (optional: checked when given)")
  parser.add_argument("--seq-len", type=int, nargs="+", default=[8192, 32768])
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--batches", type=int, default=50)
  parser.add_argument("--packing", nargs="+", default=["concat", "pack"], choices=["concat", "pack"])
  parser.add_argument("--threads", type=int, default=2, help="grain read threads")
  args = parser.parse_args()

  config = base.get_config()
  config.data.source = args.source
  config.data.tokenizer = args.tokenizer if args.tokenizer or args.source != "embedded" else config.data.tokenizer
  config.data.num_threads = args.threads
  config.batch_size = args.batch_size
  if args.source != "embedded":
    from data import prepare
    config.model.vocab_size = prepare.read_metadata(args.source)["vocab_size"]
  data_sources = sources.open_sources(config)
  print(f"source {sources.describe(data_sources)}; batch {args.batch_size}; {args.batches} batches; "
        f"{os.cpu_count()} CPUs")
  print(f"{'seq_len':>8} {'packing':>8} {'tokens/s':>12} {'ms/batch':>9} {'fill':>6}")
  for seq_len in args.seq_len:
    for packing in args.packing:
      config.seq_len, config.data.packing = seq_len, packing
      r = measure(config, data_sources, args.batches)
      print(f"{seq_len:>8} {packing:>8} {r['tokens_per_sec']:>12,.0f} {r['ms_per_batch']:>9.1f} {r['fill']:>6.1%}")


if __name__ == "__main__":
  main()
