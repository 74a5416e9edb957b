"""Sparse-attention sweeps on the tiny model (scripts/sweep.py runs a config file's sweep()):

  python scripts/sweep.py --config configs/nsa_sweep.py --workdir runs/nsa_sweep
      NSA on tiny: selection block {32, 64, 128} x selected blocks {8, 16, 32} x compression
      stride {8, 16}, 18 points.
  python scripts/sweep.py --config configs/nsa_sweep.py:dsa --workdir runs/dsa_topk
      DSA's sparse stage on dsa_tiny (seq_len 512): index_topk {32, 64, 128, 256}, 4 points (add
      --config.init_from=runs/dsa_warmup to start each from a warm-up run, README: DSA).

train.py reads the same file (`--config configs/nsa_sweep.py[:dsa]`): get_config() is the base
every point overrides; --config.FIELD=VALUE on the sweep command applies to every point.
"""
from configs import dsa_tiny, tiny

SWEEPS = ("nsa", "dsa")


def get_config(arg: str = "nsa"):
  if arg not in SWEEPS:
    raise ValueError(f"configs/nsa_sweep.py:{arg}: allowed are {', '.join(SWEEPS)}")
  if arg == "dsa":
    return dsa_tiny.get_config("sparse")
  c = tiny.get_config()
  c.attention.kind = "nsa"
  return c


def sweep(arg: str = "nsa"):
  if arg not in SWEEPS:
    raise ValueError(f"configs/nsa_sweep.py:{arg}: allowed are {', '.join(SWEEPS)}")
  if arg == "dsa":
    return [{"dsa.index_topk": k} for k in (32, 64, 128, 256)]
  return [{"nsa.slc_block": block, "nsa.num_selected": n, "nsa.cmp_stride": stride}
          for block in (32, 64, 128) for n in (8, 16, 32) for stride in (8, 16)]
