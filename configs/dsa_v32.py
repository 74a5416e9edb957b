"""dsa_v32: DeepSeek-V3.2-Exp's attention (MLA + DSA) on a dense SwiGLU trunk, for TPU pod slices.

Attention as in DeepSeek-V3.2: 128 heads, q_lora 1536, kv_lora 512, qk nope 128 + rope 64,
v 128; lightning indexer 64 heads x 128, top-2048 keys. The trunk (7168 wide, dense MLP 18432,
24 layers) stands in for V3's MoE layers. Needs a prepared dataset and its tokenizer:
  python train.py --config configs/dsa_v32.py:dense_warmup --workdir gs://... \\
      --config.data.source=DIR --config.data.tokenizer=MODEL --config.init_from=DENSE_MLA_RUN
"""
from configs import base


def get_config(stage: str = "sparse"):
  c = base.get_config()
  # DeepSeek-V3.2-Exp's continued training: warm-up 1000 steps x 16 sequences of 128k at lr 1e-3,
  # then 15000 sparse steps x 480 sequences at lr 7.3e-6.
  warmup = stage == "dense_warmup"
  c.steps = 1000 if warmup else 15_000
  c.batch_size = 16 if warmup else 480
  c.seq_len = 131_072
  c.eval_every = 2000
  c.checkpoint_every = 500
  c.model.update(vocab_size=129_280, d_model=7168, n_layers=24, n_heads=128, n_kv_heads=128,
                 head_dim=192, mlp_dim=18_432, remat="full")
  base.use_v32_attention(c, q_lora_rank=1536, index_heads=64)
  c.dsa.stage = stage
  c.mesh.update(data=1, fsdp=-1, tensor=8)
  c.optimizer.update(lr=1e-3 if warmup else 7.3e-6, warmup_steps=100)
  c.data.tokenizer = ""
  return c
