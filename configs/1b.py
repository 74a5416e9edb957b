"""1b: ~1.2B parameters, seq_len 8192, for a TPU pod slice (FSDP)."""
from configs import base


def get_config(attention: str = ""):
  """attention=dsa (`--config configs/1b.py:dsa`): DSA with DeepSeek-V3.2's MLA and indexer shapes."""
  c = base.get_config()
  c.steps = 100_000
  c.batch_size = 256
  c.seq_len = 8192
  c.eval_every = 2000
  c.checkpoint_every = 1000
  c.model.update(vocab_size=32_768, d_model=2048, n_layers=22, n_heads=16, n_kv_heads=4, head_dim=128,
                 mlp_dim=5632, remat="full")
  c.optimizer.update(lr=3e-4, warmup_steps=2000)
  c.data.tokenizer = ""
  if attention == "dsa":
    base.use_v32_attention(c, q_lora_rank=768, index_heads=16)
  elif attention:
    raise ValueError(f"configs/1b.py:{attention}: the argument may be dsa")
  return c
