"""tiny: ~4M parameters, seq_len 1024; trains on a 2-core CPU in minutes on the embedded corpus."""
from configs import base


def get_config():
  c = base.get_config()
  c.steps = 200
  c.batch_size = 4
  c.seq_len = 1024
  c.log_every = 10
  c.eval_every = 50
  c.eval_batches = 2
  c.checkpoint_every = 50
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 20
  return c
