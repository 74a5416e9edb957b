"""Document sources: random-access sequences of EOS-terminated int32 token arrays, per split.

  embedded     this Python's standard library, tokenized in memory at start-up (~3.6M tokens)
  DIR          a dataset written by scripts/prepare_data.py (TFDS ArrayRecord, read without TF)
  tfds:NAME    a TFDS dataset prepared in ArrayRecord format under data.data_dir, with a `tokens`
               feature, or a text feature (data.text_field) tokenized on the fly
  synthetic:T  a synthetic retrieval task (data/synthetic.py: mqar, passkey), generated per row;
               its documents are dicts of tokens and the per-token `scored` and `distance`
A mixture (`data.mixture = "SRC=WEIGHT,SRC=WEIGHT"`) draws documents from several by weight.
"""
import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
from etils import epath

from configs import ConfigError
from data import corpus, prepare, synthetic
from data.tokenizer import Tokenizer


@dataclasses.dataclass
class Source:
  name: str
  splits: dict[str, Sequence]                      # split -> random-access records
  to_tokens: Callable[[object], np.ndarray]        # record -> EOS-terminated int32 tokens (synthetic: a dict)
  synthetic: bool = False                          # documents carry `scored` and `distance` (data/synthetic.py)


def parse_mixture(spec: str) -> list[tuple[str, float]]:
  """'a=0.7,b=0.3' -> [('a', 0.7), ('b', 0.3)]."""
  parts = []
  for item in filter(None, (s.strip() for s in spec.split(","))):
    name, sep, weight = item.rpartition("=")
    try:
      value = float(weight)
    except ValueError:
      value = -1.0
    if not sep or not name or value <= 0:
      raise ConfigError("data.mixture", spec, "must look like 'SOURCE=WEIGHT,SOURCE=WEIGHT' with "
                        "positive weights")
    parts.append((name, value))
  return parts


def source_specs(config) -> list[tuple[str, float]]:
  return parse_mixture(config.data.mixture) if config.data.mixture else [(config.data.source, 1.0)]


def open_sources(config) -> list[tuple[Source, float]]:
  try:
    tokenizer = Tokenizer(config.data.tokenizer) if config.data.tokenizer else None
  except (OSError, ValueError) as e:
    raise ConfigError("data.tokenizer", config.data.tokenizer, str(e)) from None
  # Hub models often pad their vocabulary past the tokenizer's (Qwen: 151936 for 151665 tokens).
  if tokenizer is not None and tokenizer.vocab_size > config.model.vocab_size:
    raise ConfigError("model.vocab_size", config.model.vocab_size,
                      f"must be at least the vocab size {tokenizer.vocab_size} of data.tokenizer={tokenizer.path}")
  opened = {}
  def open_once(spec):      # synthetic filler text and a mixture may name the same source
    if spec not in opened:
      opened[spec] = open_source(spec, config, tokenizer, open_once)
    return opened[spec]
  return [(open_once(spec), weight) for spec, weight in source_specs(config)]


def open_source(spec: str, config, tokenizer, open_filler=None) -> Source:
  if spec.startswith(synthetic.PREFIX):
    return _synthetic(spec, config, open_filler or (lambda s: open_source(s, config, tokenizer)))
  if spec == corpus.EMBEDDED:
    return _embedded(tokenizer, config.data.tokenizer)
  if spec.startswith("tfds:"):
    return _tfds(spec, config, tokenizer)
  return _prepared(spec, config)


def source_field(config) -> str:
  """The config field a bad source came from, for error messages."""
  return "data.mixture" if config.data.mixture else "data.source"


def _embedded(tokenizer, path) -> Source:
  if tokenizer is None:
    raise ConfigError("data.tokenizer", path, "the embedded corpus needs a tokenizer model")
  eos = np.int32(tokenizer.eos_id)
  splits = {split: [np.append(ids, eos) for ids in tokenizer.encode([t for _, t in corpus.embedded_documents(split)])]
            for split in prepare.SPLITS}
  return Source(corpus.EMBEDDED, splits, lambda r: r)


def _prepared(path: str, config) -> Source:
  import tensorflow_datasets as tfds
  if not prepare.is_prepared(path):
    raise ConfigError(source_field(config), path,
                      "must be 'embedded', 'tfds:NAME', 'synthetic:TASK' or a directory written by "
                      "scripts/prepare_data.py")
  builder = tfds.builder_from_directory(prepare.dataset_dir(path))
  meta = builder.info.metadata
  if meta.get("vocab_size") != config.model.vocab_size:
    raise ConfigError("model.vocab_size", config.model.vocab_size,
                      f"the dataset {path} was tokenized with vocab size {meta.get('vocab_size')}")
  if config.data.tokenizer and meta.get("tokenizer_sha256") != prepare.file_sha256(config.data.tokenizer):
    raise ConfigError("data.tokenizer", config.data.tokenizer,
                      f"must be the tokenizer {path} was prepared with (its sha256 differs)")
  splits = dict(builder.as_data_source())
  splits.setdefault("validation", splits["train"])      # prepared with --val-fraction 0
  return Source(path, splits, lambda r: r["tokens"])


def _tfds(spec: str, config, tokenizer) -> Source:
  import tensorflow_datasets as tfds
  name = spec[len("tfds:"):]
  try:
    builder = tfds.builder(name, data_dir=config.data.data_dir or None)
    sources = builder.as_data_source()
  except Exception as e:  # noqa: BLE001 - TFDS raises many kinds; all mean "not usable here"
    raise ConfigError(source_field(config), spec,
                      f"no prepared TFDS dataset {name!r} under data.data_dir={config.data.data_dir!r} "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
  splits = {s: sources[s] for s in prepare.SPLITS if s in sources}
  if "train" not in splits:
    raise ConfigError(source_field(config), spec, f"has no 'train' split (has {sorted(sources)})")
  splits.setdefault("validation", splits["train"])
  features = builder.info.features
  if "tokens" in features:
    return Source(spec, splits, lambda r: np.asarray(r["tokens"], np.int32))
  field = config.data.text_field
  if field not in features or tokenizer is None:
    raise ConfigError("data.text_field", field, f"{spec} has neither a 'tokens' feature nor this text "
                      f"feature (features: {sorted(features)}), or data.tokenizer is not set")
  eos = np.int32(tokenizer.eos_id)
  def to_tokens(record):
    text = record[field]
    text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
    return np.append(tokenizer.encode([text], num_threads=1)[0], eos)
  return Source(spec, splits, to_tokens)


def synthetic_tasks(config) -> list[synthetic.Task]:
  """The synthetic tasks that data.source or data.mixture names, checked against the config (a
  ConfigError names the field: an unknown task, a shape that does not fit seq_len, a bad filler)."""
  tasks = [synthetic.task(config, spec, source_field(config))
           for spec, _ in source_specs(config) if spec.startswith(synthetic.PREFIX)]
  if tasks:
    _check_filler(config)
  return tasks


def _check_filler(config) -> None:
  filler = config.data.synthetic.filler
  if filler != synthetic.RANDOM and not exists(filler):
    raise ConfigError("data.synthetic.filler", filler, f"must be '{synthetic.RANDOM}' or a text source: 'embedded', "
                      "'tfds:NAME' or a directory written by scripts/prepare_data.py")


def _synthetic(spec: str, config, open_filler) -> Source:
  task = synthetic.task(config, spec, source_field(config))
  _check_filler(config)
  if config.data.synthetic.filler == synthetic.RANDOM:
    fillers = dict.fromkeys(prepare.SPLITS, synthetic.random_filler(task))
  else:
    text = open_filler(config.data.synthetic.filler)
    fillers = {split: synthetic.TextFiller(text.splits[split], text.to_tokens, task) for split in prepare.SPLITS}
  splits = {split: synthetic.Records(task, config.seed, split, fillers[split]) for split in prepare.SPLITS}
  return Source(spec, splits, lambda r: r, synthetic=True)


def describe(sources) -> str:
  return ", ".join(f"{s.name} ({len(s.splits['train']):,} train records, weight {w:g})" for s, w in sources)


def exists(spec: str) -> bool:
  if spec.startswith(synthetic.PREFIX):
    return spec in synthetic.SPECS
  return spec == corpus.EMBEDDED or spec.startswith("tfds:") or epath.Path(spec).is_dir()
