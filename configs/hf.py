"""A Hugging Face config.json <-> this project's model fields, for Llama, Mistral, Qwen2 and Qwen3
(init_from=hf:DIR; the weights: hf/).

Reads both layouts of RoPE settings: `rope_theta` + `rope_scaling` (most hub checkpoints) and
transformers 5's `rope_parameters`. Anything these families may set that the model cannot run
(a sliding window, an MLP bias, another RoPE scaling, another activation) is a ConfigError that
names the field, so a conversion never silently computes something else.
"""
import json

from etils import epath

from configs import ConfigError

# architecture -> (model_type, q/k/v biases, q/k RMSNorm)
FAMILIES = {
    "LlamaForCausalLM": ("llama", False, False),
    "MistralForCausalLM": ("mistral", False, False),
    "Qwen2ForCausalLM": ("qwen2", True, False),
    "Qwen3ForCausalLM": ("qwen3", False, True),
}
ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}   # HF rope_type -> ours
# The model fields a config.json sets (the architecture); everything else stays the run's own.
MODEL_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim",
                "tie_embeddings", "tied_unembed_scale", "rope_theta", "rope_scaling", "norm_eps",
                "qkv_bias", "qk_norm")


HF_PREFIX = "hf:"
# scripts/convert_hf.py keeps the model's config.json beside the checkpoint under this name, so
# init_from of the converted checkpoint gets the architecture as init_from=hf:DIR would.
CONVERTED_CONFIG = "hf_config.json"


def init_dir(init_from: str) -> str | None:
  """The HF model directory of init_from="hf:DIR", else None."""
  return init_from[len(HF_PREFIX):] if init_from.startswith(HF_PREFIX) else None


def resolve(config, overrides=()) -> None:
  """With init_from="hf:DIR", the model's architecture fields come from DIR's config.json, and
  data.tokenizer is DIR when it holds a tokenizer.json; with init_from a checkpoint that
  scripts/convert_hf.py wrote, from the config.json kept with it. Fields set on the command line
  (`overrides`: dotted field names) stay. parse_flags calls it, before anything reads the config."""
  if directory := init_dir(config.init_from):
    apply(config, directory, keep=set(overrides))
    if "data.tokenizer" not in overrides and (epath.Path(directory) / "tokenizer.json").is_file():
      config.data.tokenizer = directory      # the model's own tokenizer, unless one is named
  elif config.init_from and (epath.Path(config.init_from) / CONVERTED_CONFIG).is_file():
    apply(config, config.init_from, keep=set(overrides), name=CONVERTED_CONFIG)


def read(directory: str, field: str = "init_from", name: str = "config.json") -> dict:
  """The parsed config.json (or `name`) of an HF model directory; `field` names the setting in errors."""
  path = epath.Path(directory) / name
  if not path.is_file():
    raise ConfigError(field, directory, f"must be a Hugging Face model directory with a {name}")
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ConfigError(field, str(path), f"cannot be read as JSON ({e})") from None


def _rope(hf: dict, bad) -> tuple[float, dict]:
  """(theta, our rope_scaling fields) from either RoPE layout."""
  params = hf.get("rope_parameters")
  if isinstance(params, dict) and "full_attention" in params:   # per layer type (transformers 5)
    params = params["full_attention"]
  if params is not None:
    theta, scaling = params.get("rope_theta", hf.get("rope_theta", 10_000.0)), params
  else:
    theta, scaling = hf.get("rope_theta", 10_000.0), hf.get("rope_scaling") or {}
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind not in ROPE_TYPES:
    bad("rope_scaling.rope_type", kind, f"is not supported (supported: {', '.join(ROPE_TYPES)})")
  ours = {"type": ROPE_TYPES[kind], "factor": 1.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_len": 8192}
  if kind != "default":
    ours["factor"] = float(scaling["factor"])
  if kind == "llama3":
    ours.update(low_freq_factor=float(scaling["low_freq_factor"]), high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_len=int(scaling["original_max_position_embeddings"]))
  return float(theta), ours


def model_fields(hf: dict, directory: str, field: str = "init_from") -> dict:
  """config.json -> {model field: value} (the names of MODEL_FIELDS)."""
  def bad(name, value, why):
    raise ConfigError(field, directory, f"config.json {name}={value!r} {why}")

  architecture = (hf.get("architectures") or [None])[0]
  if architecture not in FAMILIES:
    bad("architectures", hf.get("architectures"), f"is not supported (supported: {', '.join(FAMILIES)})")
  _, qkv_bias, qk_norm = FAMILIES[architecture]
  if hf.get("hidden_act", "silu") != "silu":
    bad("hidden_act", hf["hidden_act"], "is not supported (the MLP is SwiGLU: silu)")
  for name in ("mlp_bias", "attention_bias"):    # Llama: biases on o and the MLP as well; Qwen3: on q/k/v/o
    if hf.get(name):
      bad(name, hf[name], "is not supported (q/k/v biases only, as Qwen2 has)")
  window = hf.get("sliding_window")
  if window and (architecture == "MistralForCausalLM" or hf.get("use_sliding_window")):
    bad("sliding_window", window, "is not supported (every layer attends to all earlier tokens); "
        "set it to null if the model was trained without one")
  if any(t != "full_attention" for t in hf.get("layer_types") or ()) and hf.get("use_sliding_window"):
    bad("layer_types", hf["layer_types"], "is not supported (only full_attention layers)")
  try:
    d_model, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    theta, scaling = _rope(hf, bad)
    fields = dict(
        vocab_size=int(hf["vocab_size"]), d_model=d_model, n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads, n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or d_model // n_heads), mlp_dim=int(hf["intermediate_size"]),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), tied_unembed_scale=1.0,
        rope_theta=theta, rope_scaling=scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=qkv_bias, qk_norm=qk_norm)
  except KeyError as e:
    raise ConfigError(field, directory, f"config.json lacks {e.args[0]!r}") from None
  return fields


def apply(config, directory: str, keep=(), field: str = "init_from", name: str = "config.json") -> dict:
  """Sets config.model's architecture fields from directory's config.json, except those named
  in `keep` (fields the command line set, e.g. model.rope_theta for a longer context); returns
  the HF config."""
  hf = read(directory, field, name)
  for field_name, value in model_fields(hf, directory, field).items():
    if field_name == "rope_scaling":
      for key, v in value.items():
        if f"model.rope_scaling.{key}" not in keep and "model.rope_scaling" not in keep:
          config.model.rope_scaling[key] = v
    elif f"model.{field_name}" not in keep:
      config.model[field_name] = value
  return hf


def to_hf(model_config, architecture: str, dtype: str, bos_id: int | None = None, eos_id: int | None = None) -> dict:
  """A config.json for this project's dense model (the inverse of model_fields)."""
  m = model_config
  model_type = FAMILIES[architecture][0]
  hf = {
      "architectures": [architecture], "model_type": model_type, "hidden_act": "silu",
      "vocab_size": m.vocab_size, "hidden_size": m.d_model, "num_hidden_layers": m.n_layers,
      "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_dim,
      "intermediate_size": m.mlp_dim, "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
      "tie_word_embeddings": bool(m.tie_embeddings), "dtype": dtype, "torch_dtype": dtype,
      "max_position_embeddings": max(m.rope_scaling.original_max_len, 8192), "attention_bias": False,
      "rope_scaling": None,
  }
  s = m.rope_scaling
  if s.type == "linear":
    hf["rope_scaling"] = {"rope_type": "linear", "factor": s.factor}
  elif s.type == "llama3":
    hf["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                          "high_freq_factor": s.high_freq_factor,
                          "original_max_position_embeddings": s.original_max_len}
  if model_type in ("qwen2", "qwen3", "mistral"):
    hf.update(sliding_window=None, use_sliding_window=False)
  if bos_id is not None:
    hf["bos_token_id"] = bos_id
  if eos_id is not None:
    hf["eos_token_id"] = eos_id
  return hf


def architecture_for(model_config) -> str:
  """The HF family that computes what this dense model computes."""
  if model_config.qk_norm:
    return "Qwen3ForCausalLM"
  if model_config.qkv_bias:
    return "Qwen2ForCausalLM"
  return "LlamaForCausalLM"
