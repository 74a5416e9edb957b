"""Prepare a corpus once: text files -> tokens -> a TFDS dataset in ArrayRecord format (train and
validation splits), written through tensorflow_datasets without TensorFlow.

Each record is {"tokens": int32[n]}: one document with EOS appended, or a piece of one when the
document is longer than `record_tokens` (pieces stay in order and only the last ends with EOS),
so no record is huge and random access stays cheap. TFDS writes into an `incomplete.*` directory
and renames it when every split is done: an interrupted run never leaves a dataset that looks
complete. The metadata holds document and token counts, skipped items, the tokenizer's hash and
an input fingerprint that makes re-runs idempotent.
"""
import collections
import dataclasses
import glob
import hashlib
import multiprocessing
import os
import zlib

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from data import corpus
from data.tokenizer import Tokenizer

NAME = "tokenized_text"
VERSION = "1.0.0"
SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
  inputs: tuple[str, ...]          # files, already expanded and checked
  tokenizer: str                   # sentencepiece .model
  text_field: str = "text"
  val_fraction: float = 0.01
  record_tokens: int = 131_072     # longest record; longer documents are split into pieces
  workers: int = 0                 # tokenizer processes; 0: all cores

  def fingerprint(self) -> str:
    h = hashlib.sha256()
    h.update(file_sha256(self.tokenizer).encode())
    h.update(f"{self.text_field}|{self.val_fraction}|{self.record_tokens}".encode())
    for path in self.inputs:
      st = os.stat(path)
      h.update(f"|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def file_sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def split_of(path: str, doc_index: int, val_fraction: float) -> str:
  """Stable per-document split assignment (hash of file name and position)."""
  bucket = zlib.crc32(f"{os.path.basename(path)}:{doc_index}".encode()) % 100_000
  return "validation" if bucket < val_fraction * 100_000 else "train"


def dataset_dir(output: str) -> str:
  return os.path.join(output, NAME, VERSION)


def is_prepared(output: str) -> bool:
  return os.path.exists(os.path.join(dataset_dir(output), "dataset_info.json"))


# ---- worker side: one file -> token arrays of one split ----

_WORKER_TOKENIZER = None


def _init_worker(tokenizer_path: str):
  global _WORKER_TOKENIZER
  _WORKER_TOKENIZER = Tokenizer(tokenizer_path)


def _tokenize_file(task):
  path, split, text_field, val_fraction = task
  texts, problems = [], collections.Counter()
  for i, text, problem in corpus.read_documents(path, text_field):
    if problem:
      problems[problem] += 1
    if text is not None and split_of(path, i, val_fraction) == split:
      texts.append(text)
  eos = _WORKER_TOKENIZER.eos_id
  docs = [np.append(ids, np.int32(eos)) for ids in _WORKER_TOKENIZER.encode(texts, num_threads=1)]
  return path, docs, problems, os.path.getsize(path)


class TokenizedText(tfds.core.GeneratorBasedBuilder):
  """Tokenized documents, pieces of at most `record_tokens`, for the training pipeline."""

  VERSION = tfds.core.Version(VERSION)

  def __init__(self, options: PrepareOptions, **kwargs):
    self._options = options
    self._stats = {split: collections.Counter() for split in SPLITS}
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description="Token ids (int32) of text documents, EOS-terminated.",
        features=tfds.features.FeaturesDict({"tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32)}),
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    o, stats = self._options, self._stats[split]
    tasks = [(path, split, o.text_field, o.val_fraction) for path in o.inputs]
    total_bytes = sum(os.path.getsize(p) for p in o.inputs)
    workers = min(o.workers or os.cpu_count() or 1, len(tasks))
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (o.tokenizer,)) as pool, \
        tqdm.tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"tokenizing {split}") as bar:
      for file_index, (path, docs, problems, size) in enumerate(pool.imap(_tokenize_file, tasks)):
        if split == "train":            # every file is read once per split: count problems once
          stats.update({f"skipped_{k}" if k != "invalid_utf8" else k: v for k, v in problems.items()})
        for doc_index, doc in enumerate(docs):
          stats["documents"] += 1
          stats["tokens"] += len(doc)
          for piece_index, start in enumerate(range(0, len(doc), o.record_tokens)):
            stats["records"] += 1
            yield f"{file_index}:{doc_index}:{piece_index}", {"tokens": doc[start:start + o.record_tokens]}
        bar.update(size)
        bar.set_postfix(documents=stats["documents"], tokens=stats["tokens"], refresh=False)
    self.info.metadata[split] = dict(stats)
    self.info.metadata.update(fingerprint=o.fingerprint(), tokenizer_sha256=file_sha256(o.tokenizer),
                              vocab_size=Tokenizer(o.tokenizer).vocab_size, record_tokens=o.record_tokens)


class DifferentDatasetError(ValueError):
  pass


def prepare(options: PrepareOptions, output: str) -> tuple[dict, bool]:
  """Writes the dataset under `output` unless the same one is there. Returns (metadata, prepared_now)."""
  if is_prepared(output):
    info = read_metadata(output)
    if info.get("fingerprint") != options.fingerprint():
      raise DifferentDatasetError(
          f"--output {output!r} already holds a different dataset (other inputs, tokenizer or "
          "options); choose another --output or delete that directory")
    return info, False
  stray = [p for p in glob.glob(os.path.join(output, "*")) if os.path.basename(p) not in (NAME, "downloads")]
  if stray:
    raise DifferentDatasetError(f"--output {output!r} is not empty and holds no dataset of ours "
                                f"(found {os.path.basename(stray[0])!r}); choose an empty directory")
  builder = TokenizedText(options, data_dir=output, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return read_metadata(output), True


def read_metadata(output: str) -> dict:
  return dict(tfds.builder_from_directory(dataset_dir(output)).info.metadata)
