"""Write tiny, randomly initialised Hugging Face checkpoints with golden logits.

The fixtures under ``tests/fixtures/hf/`` let the JAX importer be tested
against ``transformers`` without needing torch or transformers at test time.
One directory per family (llama, mistral, qwen2, qwen3), each holding
``config.json``, float32 safetensors weights (llama: sharded in two files plus
``model.safetensors.index.json``) and ``golden.npz`` with ``input_ids`` int32
[2, 48] and ``logits`` float32 [2, 48, 320] from the transformers model
(eager attention, no attention mask, positions 0..47). ``llama/`` also holds a
byte-level BPE tokenizer (``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``) trained on this Python's standard library sources.

torch and transformers must NOT be installed in the project's environment;
use a separate venv. Generated with:

    python 3.11.7, torch 2.13.0+cpu, transformers 4.57.6, tokenizers 0.22.2,
    safetensors 0.8.0, numpy 2.4.6, huggingface_hub 0.36.2

Install:

    python3.11 -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install numpy safetensors tokenizers
    /tmp/hfvenv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
    /tmp/hfvenv/bin/pip install "transformers==4.57.6"

(transformers 4.57.6 pins tokenizers to <=0.23.0, so pip picks 0.22.2.) Stay
on transformers 4.x: 5.x writes ``rope_parameters`` instead of ``rope_theta``
/ ``rope_scaling`` in config.json.

Run from the repository root (rewrites tests/fixtures/hf/ from scratch, except
README.md):

    /tmp/hfvenv/bin/python scripts/make_hf_fixtures.py

The script is deterministic: fixed seeds for the weights and input ids, sorted
file order for the tokenizer's training text. The tokenizer text comes from
the running interpreter's standard library, so a different Python version
gives a different (but equally valid) tokenizer.json.
"""

import glob
import math
import os
import shutil
import sys

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "hf")

VOCAB = 320
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<pad>"
BATCH, SEQ = 2, 48

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=96,
    hidden_act="silu",
    initializer_range=0.08,
    max_position_embeddings=256,
    bos_token_id=0,
    eos_token_id=1,
    torch_dtype="float32",
    attn_implementation="eager",
)

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def llama3_bands(rope_theta, head_dim, scaling):
    """Count frequencies in the (high, medium, low) llama3 bands."""
    inv_freq = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / inv_freq
    old = scaling["original_max_position_embeddings"]
    low_wl = old / scaling["low_freq_factor"]
    high_wl = old / scaling["high_freq_factor"]
    high = int(np.sum(wavelen < high_wl))
    low = int(np.sum(wavelen > low_wl))
    return wavelen, (high, len(wavelen) - high - low, low), (high_wl, low_wl)


def pick_llama_theta():
    # rope_theta=500000 puts no frequency in the medium band for head_dim 16
    # (wavelengths 6.3, 32.4, ...), so fall back to 10000 (6.3, 19.9, 62.8, ...).
    for theta in (500000.0, 10000.0):
        wavelen, bands, (high_wl, low_wl) = llama3_bands(theta, COMMON["head_dim"], LLAMA3_SCALING)
        print(f"llama3 rope_theta={theta}: wavelengths {np.round(wavelen, 1).tolist()}")
        print(f"  high band (< {high_wl}), medium, low band (> {low_wl}) counts: {bands}")
        if min(bands) >= 1:
            return theta
    raise SystemExit("no rope_theta puts a frequency in all three llama3 bands")


def randomise(model, seed, biases=False):
    """Make norms non-identity (1 + 0.1 N) and, if asked, biases non-zero (0.1 N)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif biases and name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def golden(model, directory, seed):
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(3, VOCAB, size=(BATCH, SEQ)).astype(np.int32)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor(input_ids, dtype=torch.long)).logits
    logits = logits.to(torch.float32).numpy()
    assert logits.shape == (BATCH, SEQ, VOCAB), logits.shape
    print(f"  logits std {logits.std():.4f}, mean |logit| {np.abs(logits).mean():.4f}")
    np.savez(os.path.join(directory, "golden.npz"), input_ids=input_ids, logits=logits)


def save(model, directory, **kwargs):
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    gen = os.path.join(directory, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)


def train_tokenizer():
    stdlib = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))
    texts, total = [], 0
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            t = fh.read()
        texts.append(t)
        total += len(t)
        if total >= 400_000:
            break
    print(f"tokenizer: training on {len(texts)} files of {stdlib} ({total} chars)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    assert [tok.token_to_id(t) for t in (BOS, EOS, PAD)] == [0, 1, 2]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS}:1 $B:1",
        special_tokens=[(BOS, 0)],
    )
    return tok


def make_llama():
    d = os.path.join(ROOT, "llama")
    theta = pick_llama_theta()
    cfg = transformers.LlamaConfig(
        **COMMON,
        rope_theta=theta,
        rope_scaling=dict(LLAMA3_SCALING),
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(cfg)
    randomise(model, seed=101)
    golden(model, d, seed=1001)
    save(model, d, max_shard_size="300KB")
    shards = sorted(f for f in os.listdir(d) if f.startswith("model-") and f.endswith(".safetensors"))
    assert len(shards) == 2, shards
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))

    tok = train_tokenizer()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    fast.save_pretrained(d)
    reloaded = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    ids = reloaded.encode("hello world").ids
    print(f"  tokenizer: specials {[(t, reloaded.token_to_id(t)) for t in (BOS, EOS, PAD)]}, "
          f"encode('hello world').ids = {ids}, decode -> {reloaded.decode(ids)!r}")
    assert ids[0] == 0
    assert reloaded.decode(ids, skip_special_tokens=True) == "hello world"


def make_mistral():
    d = os.path.join(ROOT, "mistral")
    cfg = transformers.MistralConfig(
        **COMMON, rope_theta=10000.0, sliding_window=None, rms_norm_eps=1e-5, tie_word_embeddings=False
    )
    torch.manual_seed(2)
    model = transformers.MistralForCausalLM(cfg)
    randomise(model, seed=102)
    golden(model, d, seed=1002)
    save(model, d)


def make_qwen2():
    d = os.path.join(ROOT, "qwen2")
    cfg = transformers.Qwen2Config(
        **COMMON, rope_theta=10000.0, use_sliding_window=False, rms_norm_eps=1e-6, tie_word_embeddings=True
    )
    torch.manual_seed(3)
    model = transformers.Qwen2ForCausalLM(cfg)
    randomise(model, seed=103, biases=True)
    golden(model, d, seed=1003)
    save(model, d)


def make_qwen3():
    d = os.path.join(ROOT, "qwen3")
    kw = dict(COMMON, head_dim=32)
    cfg = transformers.Qwen3Config(
        **kw, rope_theta=10000.0, use_sliding_window=False, rms_norm_eps=1e-6, tie_word_embeddings=True
    )
    torch.manual_seed(4)
    model = transformers.Qwen3ForCausalLM(cfg)
    randomise(model, seed=104)
    golden(model, d, seed=1004)
    save(model, d)


def describe(family):
    from safetensors import safe_open

    d = os.path.join(ROOT, family)
    print(f"\n===== {family} =====")
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            print(f"-- {f}")
            with safe_open(os.path.join(d, f), framework="np") as st:
                for k in sorted(st.keys()):
                    t = st.get_slice(k)
                    print(f"   {k:50s} {t.get_dtype():8s} {tuple(t.get_shape())}")
    with open(os.path.join(d, "config.json")) as fh:
        print("-- config.json\n" + fh.read())
    total = 0
    for f in sorted(os.listdir(d)):
        size = os.path.getsize(os.path.join(d, f))
        total += size
        print(f"   {size:9d}  {f}")
    print(f"   {total:9d}  total bytes in {family}/")
    assert total < 1_500_000, (family, total)
    return total


def main():
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")
    assert transformers.__version__.startswith("4."), "use transformers 4.x (5.x writes rope_parameters)"
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    families = {"llama": make_llama, "mistral": make_mistral, "qwen2": make_qwen2, "qwen3": make_qwen3}
    for family, make in families.items():
        d = os.path.join(ROOT, family)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        print(f"\n{family}:")
        make()
    total = sum(describe(f) for f in families)
    print(f"\ntotal fixture bytes: {total}")
    assert total < 2_500_000, total


if __name__ == "__main__":
    main()
