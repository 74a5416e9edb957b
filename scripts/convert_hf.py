"""Convert a Hugging Face model directory into a checkpoint of this project, once.

  python scripts/convert_hf.py --hf-dir DIR --output runs/llama-base [--config configs/1b.py]
      [--config.attention.kind=nsa] [--config.FIELD=VALUE ...]

The checkpoint (OUTPUT/checkpoints/0: the parameters and the config, and DIR's config.json as
OUTPUT/hf_config.json) is what --config.init_from=OUTPUT reads, so a pod run need not read
safetensors on every start; that run takes the architecture from hf_config.json, as
init_from=hf:DIR would. The architecture comes from DIR's config.json (hf.load_hf); the rest of
the config from --config (default configs/base.py) and its overrides. With attention.kind=nsa the checkpoint is already
converted: NSA's new parameters hold their dense-start values (model/convert.py).

Host memory: the parameters in float32 (4 bytes each: 32 GB for an 8B model) plus one layer's
largest tensor; each is read lazily from the safetensors files. Exit code 2 with one line for
bad input.
"""
import logging
import sys

from absl import flags
from ml_collections import config_flags

from configs import ConfigError, parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (default configs/base.py)")
_HF_DIR = flags.DEFINE_string("hf-dir", None, "the Hugging Face model directory (config.json + safetensors)")
_OUTPUT = flags.DEFINE_string("output", None, "the directory to write the checkpoint in (a workdir)")


def main(hf_dir: str, output: str, config) -> int:
  import jax
  import orbax.checkpoint as ocp
  from etils import epath

  from configs import base
  from configs import hf as hf_config
  from hf import load_hf
  from model import transformer
  from trainer import checkpoint

  overrides = config_flags.get_override_values(flags.FLAGS["config"]) if config is not None else {}
  config, params = load_hf(hf_dir, config if config is not None else base.get_config(), keep=set(overrides))
  config.init_from = ""
  directory = checkpoint.workdir_path(output) / "checkpoints"
  with ocp.CheckpointManager(directory, item_names=("state", "config")) as manager:
    if manager.latest_step() is not None:
      raise ConfigError("output", output, "already holds a checkpoint; name a new directory")
    manager.save(0, args=ocp.args.Composite(state=ocp.args.PyTreeSave({"params": params}),
                                            config=ocp.args.JsonSave(config.to_dict())))
    manager.wait_until_finished()
  # The architecture travels with the checkpoint: init_from=OUTPUT reads it (configs/hf.py).
  (checkpoint.workdir_path(output) / hf_config.CONVERTED_CONFIG).write_text(
      (epath.Path(hf_dir) / "config.json").read_text())
  n = transformer.count_params(params)
  print(f"{hf_dir} -> {directory}/0: {n / 1e6:.2f}M parameters, attention {config.attention.kind} "
        f"(use --config.init_from={output})")
  jax.effects_barrier()
  return 0


def run(argv) -> int:
  if error := parse_flags(argv, _CONFIG):
    print(error, file=sys.stderr)
    return 2
  if not _HF_DIR.value or not _OUTPUT.value:
    print("error: --hf-dir and --output are required, e.g. "
          "python scripts/convert_hf.py --hf-dir ~/Llama-3.2-1B --output runs/llama-base", file=sys.stderr)
    return 2
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  try:
    return main(_HF_DIR.value, _OUTPUT.value, _CONFIG.value)
  except ConfigError as e:
    print(str(e), file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(run(sys.argv))
