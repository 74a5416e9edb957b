"""Base config: every field a run reads, with its default. Presets override a few of them.

Config is code (ml_collections). Override anything on the command line:
  python train.py --config configs/tiny.py --workdir /tmp/run --config.steps=500 --config.model.n_layers=2
"""
import dataclasses
import os

import ml_collections

from kernels import KernelOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDED_TOKENIZER = os.path.join(REPO, "data", "assets", "stdlib_4k.model")


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.steps = 1000
  c.batch_size = 8          # global, in sequences
  c.seq_len = 1024
  c.log_every = 10
  c.eval_every = 100        # 0 disables evaluation
  c.eval_batches = 4
  # Passkey retrieval (evaluation/) at every eval step: passkey_acc in metrics.jsonl, over
  # eval.passkey_trials keys per depth x length (lengths 256, 1k, 4k, ... up to seq_len).
  c.eval = ml_collections.ConfigDict()
  c.eval.passkey = False
  c.eval.passkey_trials = 2
  # Retrieval accuracy by distance on the synthetic tasks (data.source or mixture synthetic:mqar /
  # synthetic:passkey; evaluation/retrieval.py) at every eval step: retrieval_acc_* in metrics.jsonl,
  # distances in lengths of eval.retrieval_window (0: nsa.window, or dsa.index_topk for DSA).
  c.eval.retrieval = False
  c.eval.retrieval_window = 0
  c.checkpoint_every = 100
  c.keep_checkpoints = 3
  c.init_from = ""          # a checkpoint directory (or a run's workdir) to take parameters from

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 4096
  c.model.d_model = 256
  c.model.n_layers = 4
  c.model.n_heads = 8
  c.model.n_kv_heads = 4
  c.model.head_dim = 32
  c.model.mlp_dim = 768
  c.model.tie_embeddings = False
  c.model.tied_unembed_scale = 0.0  # tied: logits = x @ embedding.T * this (0: d_model ** -0.5; imports: 1)
  c.model.rope_theta = 10_000.0
  # RoPE rescaled for a longer context (model/layers.py Rope): type none | linear | llama3
  c.model.rope_scaling = ml_collections.ConfigDict(dict(
      type="none", factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_len=8192))
  c.model.norm_eps = 1e-6
  c.model.qkv_bias = False          # biases on the q, k, v projections (Qwen2); dense and nsa
  c.model.qk_norm = False           # RMSNorm on each head's q and k before RoPE (Qwen3); dense and nsa
  c.model.dtype = "bfloat16"        # activations / matmul inputs; parameters stay float32
  c.model.param_dtype = "float32"
  c.model.scan_layers = True
  c.model.remat = "none"            # none | full | save_dots

  c.attention = ml_collections.ConfigDict()
  c.attention.kind = "dense"        # dense | nsa | mla | dsa
  c.attention.impl = "auto"         # xla | pallas | auto (pallas on TPU, xla elsewhere)

  # How the kernels run (kernels.KernelOptions): kernels.pallas_mode = auto (compiled on a TPU,
  # TPU interpret mode elsewhere) | compiled (ahead-of-time for TPU from any host) | interpret
  # (Pallas's plain interpreter: the same numbers, ~100x faster than TPU interpret mode on CPU);
  # the chunk and tile sizes of the XLA references and Pallas kernels.
  c.kernels = ml_collections.ConfigDict(dataclasses.asdict(KernelOptions()))

  # NSA (attention.kind = "nsa"); paper defaults. docs/design.md §4.
  c.nsa = ml_collections.ConfigDict()
  c.nsa.cmp_block = 32              # l: tokens summarised by one compressed token
  c.nsa.cmp_stride = 16             # d: distance between compressed tokens (d | l, d | l')
  c.nsa.slc_block = 64              # l': selection block (l <= l')
  c.nsa.num_selected = 16           # n: selected blocks per query, forced ones included
  c.nsa.num_initial = 1             # forced initial blocks
  c.nsa.num_local = 2               # forced local blocks (the query's own and the one before)
  c.nsa.window = 512                # w: sliding-window keys, the query included
  c.nsa.separate_kv = False         # independent K/V per branch (the paper's choice)
  c.nsa.branches = "cmp+slc+win"    # the gated branches, any non-empty '+'-joined subset (ablations;
                                    # "win" alone: sliding-window attention)
  # Trained from scratch: the gates (cmp, slc, win) start near these values (the bias; the kernel
  # adds a token's noise). The compressed branch starts nearly shut: open, its blurred summary of
  # the whole row is an easy partial answer that keeps a small model from learning recall
  # (docs/evaluation.md#retrieval-runs).
  c.nsa.initial_gates = (0.01, 0.5, 0.5)
  # Started from a dense model (init_from): the gates (cmp, slc, win) begin at these values
  # (model/convert.py, docs/continue.md).
  c.nsa.converted_gates = (0.1, 0.1, 0.9)

  # MLA (attention.kind = "mla" or "dsa"): DeepSeek-V2/V3 latent attention. docs/design.md §5.
  # model.n_heads heads; model.head_dim and model.n_kv_heads are not used by MLA.
  c.mla = ml_collections.ConfigDict()
  c.mla.q_lora_rank = 128
  c.mla.kv_lora_rank = 64           # the shared key/value row is kv_lora_rank + qk_rope_dim wide
  c.mla.qk_nope_dim = 32
  c.mla.qk_rope_dim = 16
  c.mla.v_head_dim = 32

  # DSA (attention.kind = "dsa"): lightning indexer + top-k sparse MLA. docs/design.md §5.
  c.dsa = ml_collections.ConfigDict()
  c.dsa.stage = "sparse"            # dense_warmup (only the indexer trains) | sparse (all train)
  c.dsa.selector = "indexer"        # indexer (the lightning indexer's top-k) | local (the last index_topk
                                    # keys, no indexer: the baseline the indexer must beat; stage sparse)
  c.dsa.index_heads = 4
  c.dsa.index_head_dim = 32         # >= mla.qk_rope_dim (RoPE on the first qk_rope_dim dims)
  c.dsa.index_topk = 2048           # keys attended per query
  c.dsa.indexer_loss_coef = 1.0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 3e-3
  c.optimizer.min_lr_ratio = 0.1    # cosine decays to lr * min_lr_ratio
  c.optimizer.warmup_steps = 100
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1
  c.optimizer.grad_clip = 1.0       # global norm; 0 disables
  c.optimizer.max_skipped_steps = 5   # non-finite steps in a row (each skipped) before the run stops (exit 3)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1                  # -1: all devices left over
  c.mesh.context = 1                # >1: each sequence split over this many devices (long context)
  c.mesh.tensor = 1

  c.data = ml_collections.ConfigDict()
  c.data.source = "embedded"        # embedded (stdlib source) | DIR from prepare_data.py | tfds:NAME
  c.data.mixture = ""               # "SRC=WEIGHT,SRC=WEIGHT": overrides data.source
  c.data.data_dir = ""              # TFDS data_dir for tfds:NAME sources
  c.data.text_field = "text"        # tfds:NAME without a `tokens` feature: tokenize this one
  c.data.tokenizer = EMBEDDED_TOKENIZER
  c.data.packing = "concat"         # concat (join + split) | pack (whole documents, segment ids)
  c.data.pack_bins = 8              # rows first-fit packed at once per row stream in pack mode
  c.data.max_docs_per_row = 0       # pack mode: documents per row at most (0: NSA max(4, seq_len/(8 l')),
                                    # the aligned row it runs on (model/packing.py); others no limit)
  c.data.num_threads = 2            # threads reading a host's row streams
  c.data.prefetch = 4               # batches prefetched
  # Synthetic retrieval tasks: data.source (or a data.mixture part) synthetic:mqar | synthetic:passkey
  # (data/synthetic.py). Keys and values are reserved ids at the top of the vocabulary (V = model.vocab_size):
  # keys [V - key_vocab - value_vocab, V - value_vocab), values [V - value_vocab, V).
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.num_pairs = 16        # mqar: key-value pairs opening each row
  c.data.synthetic.num_queries = 16      # mqar: keys asked again later (<= num_pairs), each then its value (scored)
  c.data.synthetic.key_vocab = 64        # reserved key ids (passkey: the first is the marker)
  c.data.synthetic.value_vocab = 64      # reserved value ids (passkey: the first 10 are its digits)
  c.data.synthetic.min_distance = 256    # mqar: tokens from a key to its query, at least
  c.data.synthetic.passkey_digits = 5
  c.data.synthetic.passkey_depth = -1.0  # passkey: the needle's depth in the filler, 0 (start) to 1 (end); -1: uniform
  c.data.synthetic.filler = "random"     # random ids, or a text source (embedded, DIR, tfds:NAME) cut to length

  # A jax.profiler trace of steps [start_step, start_step + num_steps) in WORKDIR/profile (process 0;
  # TensorBoard or XProf). start_step 0: no trace.
  c.profile = ml_collections.ConfigDict()
  c.profile.start_step = 0
  c.profile.num_steps = 3

  c.wandb = ml_collections.ConfigDict()
  c.wandb.mode = "offline"          # offline | online | disabled
  c.wandb.project = "sparse-attention-pretraining"
  c.wandb.name = ""
  c.wandb.group = ""                # runs of one sweep share a group (scripts/sweep.py sets it)
  return c


def use_v32_attention(c, *, q_lora_rank: int, index_heads: int) -> ml_collections.ConfigDict:
  """attention.kind = dsa with DeepSeek-V3.2's attention shapes (kv_lora 512 + rope 64: the
  576-wide latent row; heads of nope 128 + rope 64, v 128; indexer heads of 128, top-2048) at
  the given query rank and indexer width, for the pod presets (`configs/1b.py:dsa`)."""
  c.attention.kind = "dsa"
  c.mla.update(q_lora_rank=q_lora_rank, kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128)
  c.dsa.update(index_heads=index_heads, index_head_dim=128, index_topk=2048)
  return c
