"""Tokenizers: text -> int32 ids, with an EOS id that separates documents.

data.tokenizer names a SentencePiece model (this project's own, scripts/train_tokenizer.py) or a
Hugging Face tokenizer: a tokenizer.json, or a model directory holding one (read with the
`tokenizers` library). A document is encoded with the tokenizer's own special tokens (a Llama
tokenizer prepends its BOS; Qwen's adds none) and the pipeline appends the EOS after it.
"""
import json
import os

import numpy as np
import sentencepiece as spm
from etils import epath

HF_TOKENIZER_FILE = "tokenizer.json"
# EOS spellings tried, in order, when neither tokenizer_config.json nor config.json names one.
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>")


def is_hf_tokenizer(path: str) -> bool:
  p = epath.Path(path)
  return p.name == HF_TOKENIZER_FILE or (p.is_dir() and (p / HF_TOKENIZER_FILE).is_file())


def tokenizer_file(path: str) -> str:
  """The file that defines a tokenizer: path itself, or an HF directory's tokenizer.json."""
  p = epath.Path(path)
  return str(p / HF_TOKENIZER_FILE) if p.is_dir() else path


class Tokenizer:
  """One interface over SentencePiece and HF tokenizers: vocab_size, eos_id, bos_id, encode, decode."""

  def __init__(self, model_path: str):
    path = epath.Path(model_path)            # local or gs://: read through etils.epath
    self.path = model_path
    if is_hf_tokenizer(model_path):
      self._hf, self._sp = _HFTokenizer(path if path.is_dir() else path.parent), None
    elif path.is_file():
      self._hf, self._sp = None, spm.SentencePieceProcessor(model_proto=path.read_bytes())
    else:
      raise FileNotFoundError(f"tokenizer {model_path!r} does not exist: give a SentencePiece .model "
                              "(make one with scripts/train_tokenizer.py), a tokenizer.json or an HF model "
                              "directory holding one")

  @property
  def vocab_size(self) -> int:
    return self._hf.vocab_size if self._hf else self._sp.vocab_size()

  @property
  def eos_id(self) -> int:
    return self._hf.eos_id if self._hf else self._sp.eos_id()

  @property
  def bos_id(self) -> int | None:
    if self._hf:
      return self._hf.bos_id
    return self._sp.bos_id() if self._sp.bos_id() >= 0 else None

  def encode(self, texts: list[str], num_threads: int = 0, special_tokens: bool = True) -> list[np.ndarray]:
    """One int32 array per text (num_threads=0: all cores). special_tokens: the tokenizer's own
    (an HF tokenizer's post-processor, e.g. Llama's BOS); False for pieces spliced into a text."""
    if self._hf:
      return [np.asarray(e.ids, np.int32) for e in self._hf.tokenizer.encode_batch(texts, add_special_tokens=special_tokens)]
    ids = self._sp.encode(texts, num_threads=num_threads or (os.cpu_count() or 1))
    return [np.asarray(x, np.int32) for x in ids]

  def decode(self, ids) -> str:
    ids = [int(i) for i in ids]
    return self._hf.tokenizer.decode(ids) if self._hf else self._sp.decode(ids)


class _HFTokenizer:
  """tokenizer.json through `tokenizers`; BOS / EOS from tokenizer_config.json, else config.json."""

  def __init__(self, directory: epath.Path):
    from tokenizers import Tokenizer as HFTokenizer
    self.tokenizer = HFTokenizer.from_str((directory / HF_TOKENIZER_FILE).read_text())
    self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
    settings = _json(directory / "tokenizer_config.json")
    model = _json(directory / "config.json")
    self.bos_id = self._id(settings.get("bos_token"), model.get("bos_token_id"))
    self.eos_id = self._id(settings.get("eos_token"), model.get("eos_token_id"))
    if self.eos_id is None:
      self.eos_id = next((i for i in map(self.tokenizer.token_to_id, _EOS_NAMES) if i is not None), None)
    if self.eos_id is None:
      raise ValueError(f"tokenizer {directory / HF_TOKENIZER_FILE} has no EOS token: name one as eos_token "
                       "in tokenizer_config.json beside it")

  def _id(self, token, model_id) -> int | None:
    if isinstance(token, dict):
      token = token.get("content")
    if token is not None and (i := self.tokenizer.token_to_id(token)) is not None:
      return i
    if isinstance(model_id, list):
      model_id = model_id[0] if model_id else None
    return model_id


def _json(path: epath.Path) -> dict:
  return json.loads(path.read_text()) if path.is_file() else {}
