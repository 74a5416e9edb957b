"""One "host" of a two-process data test (run by test_prepare.py): joins a gloo cluster on
localhost with 2 CPU devices, reads its share of one epoch of a prepared dataset, builds global
batches the way train.py does and writes what it saw to a file."""
import json
import sys


def main(process_id: int, port: int, dataset: str, tokenizer: str, out: str):
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  import numpy as np
  from jax.experimental import multihost_utils

  from conftest import small_config
  from data import pipeline, sources
  from parallel.mesh import batch_sharding, make_mesh
  config = small_config(**{"data.source": dataset, "data.tokenizer": tokenizer})
  src = sources.open_sources(config)
  index, count = jax.process_index(), jax.process_count()
  total, batch = len(src[0][0].splits["train"]), config.batch_size
  rows = pipeline.host_rows(config, index, count)
  streams = pipeline.host_documents(config, src, index, count)   # stream r: documents r, r+B, ...
  first_epoch = [docs[k] for r, docs in zip(rows, streams) for k in range(len(range(r, total, batch)))]
  seen = [doc.tobytes().hex() for doc in first_epoch]

  # The global batch jax assembles from the hosts' local rows equals the one-host batch, whatever
  # the mesh: process p's devices hold rows [p*L, (p+1)*L) of the batch axis (data x fsdp), or all
  # of them when tensor spans both processes (sharded_rows tells which).
  meshes = {}
  for packing, mesh in (("concat", dict(data=1, fsdp=-1, tensor=1)), ("pack", dict(data=1, fsdp=-1, tensor=1)),
                        ("concat", dict(data=2, fsdp=2, tensor=1)), ("concat", dict(data=1, fsdp=2, tensor=2)),
                        ("concat", dict(data=1, fsdp=1, tensor=4))):
    config = small_config(**{"data.source": dataset, "data.tokenizer": tokenizer, "data.packing": packing,
                             **{f"mesh.{k}": v for k, v in mesh.items()}})
    sharding = batch_sharding(make_mesh(config.mesh))
    held = pipeline.sharded_rows(sharding, batch)
    local = pipeline.train_iterator(config, src, index, count, rows=held)
    single = pipeline.train_iterator(config, src)
    same = True
    for _ in range(3):
      local_batch, expected = next(local), next(single)
      for k, v in local_batch.items():
        global_array = jax.make_array_from_process_local_data(sharding, v)
        same &= np.array_equal(multihost_utils.process_allgather(global_array, tiled=True), expected[k])
    meshes[f"{packing} {mesh}"] = {"rows": held, "same": bool(same)}
    local.close()
    single.close()
  with open(out, "w") as f:
    json.dump({"process": index, "count": count, "devices": jax.device_count(), "docs": seen, "total": total,
               "rows": rows, "meshes": meshes}, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6])
