"""Export a dense run's checkpoint as a Hugging Face model directory (config.json + safetensors).

  python scripts/export_hf.py --workdir runs/tiny --output exported/tiny [--step N] [--dtype bfloat16]

The architecture written is the family that computes what the model computes: Qwen3 with
model.qk_norm, Qwen2 with model.qkv_bias, else Llama (transformers' LlamaForCausalLM loads it).
When the run's data.tokenizer is a Hugging Face tokenizer, its files are copied beside the
weights (a SentencePiece model is not converted). --dtype float32 (default, lossless) | bfloat16 |
float16. Exit code 2 with one line for bad input (a sparse model, a missing run).
"""
import logging
import shutil
import sys

from absl import flags

from configs import ConfigError, parse_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "the run's workdir (or its checkpoints/ directory)")
_OUTPUT = flags.DEFINE_string("output", None, "the Hugging Face model directory to write")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)")
_DTYPE = flags.DEFINE_string("dtype", "float32", "tensor dtype written: float32 | bfloat16 | float16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def main(workdir: str, output: str) -> int:
  import os

  from data.tokenizer import Tokenizer, is_hf_tokenizer, tokenizer_file
  from hf import export_hf
  from model import transformer
  from parallel.mesh import make_mesh
  from trainer import checkpoint, optim
  from trainer.state import state_shardings

  directory = checkpoint.checkpoint_dir(workdir)
  config, step = checkpoint.saved_config(directory, _STEP.value)
  if config.attention.kind != "dense":
    raise ConfigError("attention.kind", config.attention.kind, "must be dense to export to Hugging Face "
                      "(the run's own config)")
  config.mesh.update(data=1, fsdp=-1, context=1, tensor=1)    # this host's devices, whatever the run's mesh
  model = transformer.build(config)
  abstract, _ = state_shardings(config, model, optim.make_optimizer(config), make_mesh(config.mesh))
  params = checkpoint.saved_params(directory, step, abstract.params)
  bos = eos = None
  tokenizer_path = config.data.tokenizer
  if tokenizer_path:
    tokenizer = Tokenizer(tokenizer_path)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
  files = export_hf(output, params, config, _DTYPE.value, bos_id=bos, eos_id=eos)
  if tokenizer_path and is_hf_tokenizer(tokenizer_path):
    source = os.path.dirname(tokenizer_file(tokenizer_path))
    for name in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(source, name)):
        shutil.copy(os.path.join(source, name), os.path.join(output, name))
        files.append(name)
  print(f"step {step} of {workdir} -> {output}: {', '.join(files)}")
  return 0


def run(argv) -> int:
  if error := parse_flags(argv):
    print(error, file=sys.stderr)
    return 2
  if not _WORKDIR.value or not _OUTPUT.value:
    print("error: --workdir and --output are required, e.g. "
          "python scripts/export_hf.py --workdir runs/tiny --output exported/tiny", file=sys.stderr)
    return 2
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  try:
    return main(_WORKDIR.value, _OUTPUT.value)
  except ConfigError as e:
    print(str(e), file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(run(sys.argv))
