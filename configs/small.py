"""small: ~125M parameters (GPT-2 small shape), seq_len 4096, for one TPU host."""
from configs import base


def get_config():
  c = base.get_config()
  c.steps = 50_000
  c.batch_size = 64
  c.seq_len = 4096
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.model.update(vocab_size=32_768, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, head_dim=64,
                 mlp_dim=2048, remat="save_dots")
  c.optimizer.update(lr=6e-4, warmup_steps=2000)
  c.data.tokenizer = ""  # set to the .model of scripts/train_tokenizer.py (vocab 32768)
  return c
