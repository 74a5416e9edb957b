"""7b: ~7.2B parameters (Mistral-7B shape: 32 query / 8 KV heads), seq_len 8192, for a TPU pod
slice (FSDP x tensor)."""
from configs import base


def get_config(attention: str = ""):
  """attention=dsa (`--config configs/7b.py:dsa`): DSA with DeepSeek-V3.2's MLA and indexer shapes."""
  c = base.get_config()
  c.steps = 200_000
  c.batch_size = 512
  c.seq_len = 8192
  c.eval_every = 2000
  c.checkpoint_every = 500
  c.model.update(vocab_size=32_768, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                 mlp_dim=14336, remat="full")
  c.optimizer.update(lr=3e-4, warmup_steps=2000)
  c.data.tokenizer = ""
  if attention == "dsa":
    base.use_v32_attention(c, q_lora_rank=1536, index_heads=32)
  elif attention:
    raise ValueError(f"configs/7b.py:{attention}: the argument may be dsa")
  return c
