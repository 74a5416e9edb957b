"""Hugging Face safetensors <-> this project's parameter tree (dense GQA layers; NSA's shared ones).

Import is lazy: each parameter is built with jax.make_array_from_callback on its sharding, and a
callback reads only the layers its shard covers, one layer's tensor at a time (safetensors maps
the file; a bf16 tensor becomes float32 only per layer). So a host needs one layer's largest
tensor in float32 (Llama-3-8B: the 14336 x 4096 MLP matrix, 235 MB) on top of the shards its
devices hold, never a whole second copy of the model.

HF Linear weights are [out, in]; our kernels are [in..., out...] named by logical axes, so a
kernel is the HF matrix transposed and reshaped ([H*D, E] -> [E, H, D]); biases and norm scales
are reshaped only.
"""
import json
import os

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from configs import ConfigError

# Our path inside one layer -> (HF name inside model.layers.{i}., how to convert). "in:N": a
# kernel whose first N dims are the input (HF [out, in] transposed); "flat": a bias of [H, D].
LAYER_TENSORS = {
    ("attn", "q", "kernel"): ("self_attn.q_proj.weight", "in:1"),
    ("attn", "k", "kernel"): ("self_attn.k_proj.weight", "in:1"),
    ("attn", "v", "kernel"): ("self_attn.v_proj.weight", "in:1"),
    ("attn", "o", "kernel"): ("self_attn.o_proj.weight", "in:2"),
    ("attn", "q", "bias"): ("self_attn.q_proj.bias", "flat"),
    ("attn", "k", "bias"): ("self_attn.k_proj.bias", "flat"),
    ("attn", "v", "bias"): ("self_attn.v_proj.bias", "flat"),
    ("attn", "q_norm", "scale"): ("self_attn.q_norm.weight", "same"),
    ("attn", "k_norm", "scale"): ("self_attn.k_norm.weight", "same"),
    ("attn_norm", "scale"): ("input_layernorm.weight", "same"),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", "same"),
    ("mlp", "gate", "kernel"): ("mlp.gate_proj.weight", "in:1"),
    ("mlp", "up", "kernel"): ("mlp.up_proj.weight", "in:1"),
    ("mlp", "down", "kernel"): ("mlp.down_proj.weight", "in:1"),
}
TOP_TENSORS = {
    ("embedding",): ("model.embed_tokens.weight", "same"),
    ("unembed",): ("lm_head.weight", "in:1"),
    ("final_norm", "scale"): ("model.norm.weight", "same"),
}
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
SHARD_BYTES = 4 << 30          # export: safetensors files of at most ~4 GiB (as the hub's tools write)


def to_ours(hf_array: np.ndarray, shape, how: str) -> np.ndarray:
  if how.startswith("in:"):
    hf_array = hf_array.T
  return np.asarray(hf_array, np.float32).reshape(shape)


def to_hf(ours: np.ndarray, how: str) -> np.ndarray:
  if how.startswith("in:"):
    n_in = int(how[3:])
    fan_in = int(np.prod(ours.shape[:n_in]))
    return ours.reshape(fan_in, -1).T
  return ours.reshape(-1) if how == "flat" else ours


def _key_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", k)) for k in path)


def hf_source(names: tuple[str, ...], scanned: bool, alias=lambda names: names):
  """(HF name with {layer} for the layer index or None, how, stacked) of one of our leaves; None when
  HF has no such tensor (NSA's compression and gates). `alias` maps NSA's separate-K/V names to the
  dense ones they start from (model/convert.py)."""
  if names in TOP_TENSORS:
    name, how = TOP_TENSORS[names]
    return name, how, False
  if scanned and names[0] == "layers":
    inner, stacked = names[1:], True
  elif not scanned and names[0].startswith("layer_"):
    inner, stacked = names[1:], False
  else:
    return None
  inner = alias(inner)
  if inner not in LAYER_TENSORS:
    return None
  name, how = LAYER_TENSORS[inner]
  layer = "{layer}" if stacked else names[0][len("layer_"):]
  return f"model.layers.{layer}.{name}", how, stacked


class Checkpoint:
  """The tensors of an HF model directory: one model.safetensors or shards with their index."""

  def __init__(self, directory: str, field: str = "init_from"):
    self.directory, self.field = directory, field
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
      with open(index) as f:
        self.files = json.load(f)["weight_map"]
    elif os.path.isfile(os.path.join(directory, "model.safetensors")):
      with safe_open(os.path.join(directory, "model.safetensors"), framework="numpy") as f:
        self.files = dict.fromkeys(f.keys(), "model.safetensors")
    else:
      raise ConfigError(field, directory, "holds no model.safetensors nor model.safetensors.index.json "
                        "(only safetensors weights are read; convert .bin files with transformers first)")
    self._open = {}

  def _file(self, name: str):
    if name not in self.files:
      raise ConfigError(self.field, self.directory, f"lacks the tensor {name}")
    file = self.files[name]
    if file not in self._open:
      self._open[file] = safe_open(os.path.join(self.directory, file), framework="numpy")
    return self._open[file]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._file(name).get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    return self._file(name).get_tensor(name)


def read_params(directory: str, config, abstract_params, field: str = "init_from", alias=lambda names: names):
  """(params, fresh): abstract_params' leaves (ShapeDtypeStructs, on their .sharding when they
  have one) filled from the HF directory; leaves HF has no tensor for are None, their names in
  `fresh`. A missing tensor or one of another shape raises ConfigError."""
  checkpoint = Checkpoint(directory, field)
  n_layers, scanned = config.model.n_layers, config.model.scan_layers
  fresh = []

  def load(path, leaf):
    names = _key_names(path)
    source = hf_source(names, scanned, alias)
    if source is None:
      fresh.append("/".join(names))
      return None
    name, how, stacked = source
    layer_shape = leaf.shape[1:] if stacked else leaf.shape
    for layer in range(n_layers) if stacked else (None,):
      layer_name = name.format(layer=layer)
      expected = to_hf(np.empty(layer_shape, np.float32), how).shape
      if checkpoint.shape(layer_name) != expected:
        raise ConfigError(field, directory, f"tensor {layer_name} has shape {checkpoint.shape(layer_name)}, "
                          f"the model's config.json implies {expected}")

    def tensor(index):
      if not stacked:
        return to_ours(checkpoint.get(name), leaf.shape, how)[index].astype(leaf.dtype)
      layers = range(n_layers)[index[0]]
      return np.stack([to_ours(checkpoint.get(name.format(layer=i)), layer_shape, how)[index[1:]]
                       for i in layers]).astype(leaf.dtype)

    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
      return jax.numpy.asarray(tensor(tuple(slice(None) for _ in leaf.shape)))
    return jax.make_array_from_callback(leaf.shape, sharding, tensor)

  params = jax.tree_util.tree_map_with_path(load, abstract_params)
  return params, fresh


def write(directory: str, params, model_config, dtype: str = "float32", shard_bytes: int = SHARD_BYTES) -> list[str]:
  """Writes a dense model's parameters as HF safetensors (sharded with an index past shard_bytes);
  returns the files written. Tied embeddings whose logits scale is not 1 (this project's own
  d_model ** -0.5) are written untied, lm_head = embedding * scale."""
  np_dtype = DTYPES[dtype]
  tensors = {}
  m = model_config
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = _key_names(path)
    source = hf_source(names, m.scan_layers)
    if source is None:
      raise ConfigError("export", "/".join(names), "has no Hugging Face equivalent (only dense models export)")
    name, how, stacked = source
    array = np.asarray(jax.device_get(leaf))
    for layer in range(m.n_layers) if stacked else (None,):
      tensors[name.format(layer=layer)] = to_hf(array[layer] if stacked else array, how).astype(np_dtype)
  if m.tie_embeddings and (m.tied_unembed_scale or m.d_model ** -0.5) != 1.0:
    embedding = np.asarray(jax.device_get(params["embedding"]), np.float32)
    tensors["lm_head.weight"] = (embedding * (m.tied_unembed_scale or m.d_model ** -0.5)).astype(np_dtype)

  os.makedirs(directory, exist_ok=True)
  shards, size = [{}], 0
  for name, array in tensors.items():
    if size and size + array.nbytes > shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = np.ascontiguousarray(array)
    size += array.nbytes
  if len(shards) == 1:
    files = ["model.safetensors"]
  else:
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {name: file for file, shard in zip(files, shards, strict=True) for name in shard}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map},
                f, indent=2)
  for file, shard in zip(files, shards, strict=True):
    save_file(shard, os.path.join(directory, file), metadata={"format": "pt"})
  return files


def untied(model_config) -> bool:
  """Whether write() unties this model's embeddings (the exported config must say so)."""
  m = model_config
  return bool(m.tie_embeddings) and (m.tied_unembed_scale or m.d_model ** -0.5) != 1.0
