"""One "host" of a two-process data test (run by test_prepare.py): joins a gloo cluster on
localhost, reads its share of one epoch of a prepared dataset and writes what it saw to a file."""
import json
import sys


def main(process_id: int, port: int, dataset: str, tokenizer: str, out: str):
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  from conftest import small_config
  from data import pipeline, sources
  config = small_config(**{"data.source": dataset, "data.tokenizer": tokenizer})
  src = sources.open_sources(config)
  index, count = jax.process_index(), jax.process_count()
  docs = pipeline.host_documents(config, src, index, count)
  total = len(src[0][0].splits["train"])
  mine = len(range(index, total, count))                       # this host's share of one epoch
  seen = [docs[i].tobytes().hex() for i in range(mine)]
  batch = next(pipeline.train_iterator(config, src, index, count))
  with open(out, "w") as f:
    json.dump({"process": index, "count": count, "docs": seen, "total": total,
               "batch_rows": batch["inputs"].shape[0]}, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6])
