"""Text documents: the embedded corpus (this Python's standard library) and plain text files.

The embedded corpus needs nothing downloaded: every Python install ships its standard library,
~670 real, long source files (~11 MB) once the test suites and IDLE are left out.
"""
import glob
import os
import sysconfig
import zlib

EMBEDDED = "embedded"
# Every HOLDOUT_EVERY-th document (by a stable hash of its path) goes to the validation split.
HOLDOUT_EVERY = 50
_SKIP_PARTS = ("site-packages", "dist-packages", "/test/", "/tests/", "/idlelib/", "/lib2to3/tests/")


def embedded_paths() -> list[str]:
  """The standard library's .py files, sorted, tests left out (they are repetitive)."""
  root = sysconfig.get_paths()["stdlib"]
  paths = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
  return sorted(p for p in paths if not any(s in p for s in _SKIP_PARTS))


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
