"""SentencePiece tokenizer: text -> int32 ids, with an EOS id that separates documents."""
import os

import numpy as np
import sentencepiece as spm
from etils import epath


class Tokenizer:
  def __init__(self, model_path: str):
    path = epath.Path(model_path)            # local or gs://: read through etils.epath
    if not path.is_file():
      raise FileNotFoundError(f"tokenizer model {model_path!r} does not exist "
                              "(make one with scripts/train_tokenizer.py)")
    self.path = model_path
    self._sp = spm.SentencePieceProcessor(model_proto=path.read_bytes())

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  def encode(self, texts: list[str], num_threads: int = 0) -> list[np.ndarray]:
    """One int32 array per text (num_threads=0: all cores)."""
    ids = self._sp.encode(texts, num_threads=num_threads or (os.cpu_count() or 1))
    return [np.asarray(x, np.int32) for x in ids]

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])
