"""Text documents: the embedded corpus (this Python's standard library) and plain text files.

The embedded corpus needs nothing downloaded: every Python install ships its standard library,
~670 real, long source files (~11 MB) once the test suites and IDLE are left out.
"""
import functools
import glob
import os
import sysconfig
import zlib

EMBEDDED = "embedded"
# Every HOLDOUT_EVERY-th document (by a stable hash of its path) goes to the validation split.
HOLDOUT_EVERY = 50
_SKIP_PARTS = ("site-packages", "dist-packages", "/test/", "/tests/", "/idlelib/", "/lib2to3/tests/")


@functools.cache     # a recursive glob of the stdlib: ~1 s, and each split asks for it
def embedded_paths() -> tuple[str, ...]:
  """The standard library's .py files, sorted, tests left out (they are repetitive)."""
  root = sysconfig.get_paths()["stdlib"]
  paths = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
  return tuple(sorted(p for p in paths if not any(s in p for s in _SKIP_PARTS)))


def split_of(path: str) -> str:
  """'train' or 'validation', stable across machines (hash of the path below the stdlib root)."""
  rel = os.path.relpath(path, sysconfig.get_paths()["stdlib"])
  return "validation" if zlib.crc32(rel.encode()) % HOLDOUT_EVERY == 0 else "train"


def read_text(path: str) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.read()


def embedded_documents(split: str) -> list[tuple[str, str]]:
  """[(relative path, text)] of one split of the embedded corpus, in a fixed order."""
  root = sysconfig.get_paths()["stdlib"]
  return [(os.path.relpath(p, root), read_text(p)) for p in embedded_paths() if split_of(p) == split]


# ---- User corpora: .txt, .txt.gz (one document per file), .jsonl, .jsonl.gz (one per line) ----

TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz")


def expand_inputs(patterns: list[str]) -> list[str]:
  """Sorted, de-duplicated files matching the globs; an error names any glob that matches
  nothing, any file of an unknown type, and any file that cannot be read, before any work."""
  paths = []
  for pattern in patterns:
    matched = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not matched:
      raise FileNotFoundError(f"--input {pattern!r} matches no file")
    paths += matched
  paths = sorted(set(paths))
  for path in paths:
    if not path.endswith(TEXT_SUFFIXES):
      raise ValueError(f"--input {path!r}: unknown file type; allowed: {', '.join(TEXT_SUFFIXES)}")
    if not os.access(path, os.R_OK):
      raise PermissionError(f"--input {path!r} is not readable")
  return paths


def read_documents(path: str, text_field: str = "text"):
  """Yields (document index in the file, text or None, problem or None) for every document.

  Problems are counted by the caller, never fatal: 'empty', 'invalid_utf8' (the text is kept with
  U+FFFD replacements), 'bad_json' (the line is skipped), 'missing_field' (skipped).
  """
  import gzip
  import json
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    if ".txt" in os.path.basename(path):
      yield (0, *_decode(f.read()))
      return
    for i, raw in enumerate(f):
      if not raw.strip():
        continue
      try:
        record = json.loads(raw)
      except ValueError:
        yield i, None, "bad_json"
        continue
      text = record.get(text_field) if isinstance(record, dict) else None
      if not isinstance(text, str):
        yield i, None, "missing_field"
        continue
      yield i, text if text.strip() else None, None if text.strip() else "empty"


def _decode(raw: bytes):
  try:
    text, problem = raw.decode("utf-8"), None
  except UnicodeDecodeError:
    text, problem = raw.decode("utf-8", errors="replace"), "invalid_utf8"
  if not text.strip():
    return None, "empty"
  return text, problem
