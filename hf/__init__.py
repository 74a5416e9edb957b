"""Hugging Face models in and out: Llama, Mistral, Qwen2 and Qwen3 checkpoints (safetensors).

One call loads a model directory; the model's ordinary apply then gives logits:

  from hf import load_hf
  from model import transformer
  config, params = load_hf("path/to/Qwen3-0.6B")
  logits = transformer.build(config).apply({"params": params}, tokens_BT)

configs/hf.py maps config.json to the model fields, weights.py maps the tensors (lazily, onto
shardings), and train.py reaches both through --config.init_from=hf:DIR.
"""
import jax
import ml_collections
from flax import linen as nn

from configs import ConfigError, base
from configs import hf as hf_config
from hf import weights
from model import convert, transformer


def load_hf(directory: str, config: ml_collections.ConfigDict | None = None, *, keep=(),
            abstract_params=None):
  """(config, params) of the HF model in `directory`.

  config: the run's config (default configs/base.py's); its model fields are set from
    config.json except those named in `keep` ("model.rope_theta", ...). attention.kind dense,
    or nsa (a dense -> NSA conversion: NSA's new parameters start as model/convert.py says).
  abstract_params: ShapeDtypeStructs with shardings to place each parameter on (default: the
    model's own shapes, on the default device)."""
  config = ml_collections.ConfigDict(config if config is not None else base.get_config())
  if config.attention.kind not in ("dense", "nsa"):
    raise ConfigError("attention.kind", config.attention.kind, "must be dense or nsa to start from a Hugging Face model")
  hf_config.apply(config, directory, keep=keep)
  model = transformer.build(config)
  if abstract_params is None:
    tokens = jax.ShapeDtypeStruct((1, config.seq_len), "int32")
    abstract_params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), tokens))["params"])
  params, fresh = weights.read_params(directory, config, abstract_params, alias=convert.alias)
  placeholder = lambda new, leaf: jax.numpy.zeros(leaf.shape, leaf.dtype) if new is None else new
  params = jax.tree.map(placeholder, params, abstract_params, is_leaf=lambda x: x is None)
  params, notes = convert.start_nsa_from_dense(params, fresh, config)
  missing = sorted(set(fresh) - {note.split(":")[0] for note in notes})
  if missing:
    raise ConfigError("init_from", directory, f"has no tensors for {', '.join(missing)}")
  return config, params


def export_hf(directory: str, params, config, dtype: str = "float32", bos_id=None, eos_id=None) -> list[str]:
  """Writes a dense model as an HF model directory (config.json + safetensors); returns the files."""
  import json
  import os
  if config.attention.kind != "dense":
    raise ConfigError("attention.kind", config.attention.kind, "must be dense to export to Hugging Face")
  if dtype not in weights.DTYPES:
    raise ConfigError("dtype", dtype, f"must be one of {', '.join(weights.DTYPES)}")
  files = weights.write(directory, params, config.model, dtype)
  hf = hf_config.to_hf(config.model, hf_config.architecture_for(config.model), dtype, bos_id, eos_id)
  if weights.untied(config.model):
    hf["tie_word_embeddings"] = False
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  return ["config.json", *files]
