"""dsa_tiny: the tiny model (configs/tiny.py) with DeepSeek Sparse Attention on MLA at seq_len
512; trains on a 2-core CPU.

The two-stage recipe (docs/design.md §5), the stage named after the config file:
  python train.py --config configs/dsa_tiny.py:dense_warmup --workdir runs/dsa_warmup
  python train.py --config configs/dsa_tiny.py:sparse --workdir runs/dsa_sparse \\
      --config.init_from=runs/dsa_warmup
Warm-up trains only the lightning indexer (dense attention is the teacher); the sparse stage takes
the warm-up's parameters (fresh optimizer) and trains everything with top-k attention.
A dense MLA run (--config.attention.kind=mla) can seed the warm-up the same way: the indexer,
absent from its checkpoint, starts fresh.
"""
from configs import tiny


def get_config(stage: str = "sparse"):
  c = tiny.get_config()
  c.steps = {"dense_warmup": 60}.get(stage, 200)
  c.seq_len = 512
  c.optimizer.warmup_steps = 10
  c.attention.kind = "dsa"
  c.mla.update(q_lora_rank=128, kv_lora_rank=64, qk_nope_dim=32, qk_rope_dim=16, v_head_dim=32)
  c.dsa.update(stage=stage, index_heads=4, index_head_dim=32, index_topk=64)
  return c
