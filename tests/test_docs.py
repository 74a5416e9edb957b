"""The documentation holds together: every design-document citation (`§N`, `§N.M`) names a section
of docs/design.md, and every link to a manual page (`docs/NAME.md`, `NAME.md#anchor`) names a file
and a heading that exist. Code and docs cite the design, so a renamed section fails here."""
import re
import subprocess

import pytest

from conftest import REPO

DOCS = REPO / "docs"


def _files():
  listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout.split()
  return [REPO / f for f in listed if f.endswith((".py", ".md", ".txt", ".toml")) and (REPO / f).is_file()
          and f != "tests/test_docs.py"]   # this file spells the patterns out


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _headings(path):
  return [m[1] for m in re.finditer(r"^#+\s+(.+?)\s*$", path.read_text(), re.M)]


def _design_sections() -> set[str]:
  """'4', '4.6', ...: the numbers of docs/design.md's `## N. Title` and `### N.M Title` headings."""
  return {m[1].rstrip(".") for h in _headings(DOCS / "design.md") if (m := re.match(r"(\d+(?:\.\d+)*\.?)\s", h))}


def test_every_section_citation_resolves():
  sections = _design_sections()
  assert {str(n) for n in range(1, 12)} <= sections          # the eleven numbered sections
  missing = []
  for path in _files():
    for m in re.finditer(r"§(\d+(?:\.\d+)*)", path.read_text()):
      if m[1] not in sections:
        missing.append(f"{path.relative_to(REPO)}: §{m[1]}")
  assert not missing, missing


def test_the_brief_is_not_cited_any_more():
  """The design lives in the repository: nothing points at a DESIGN.md outside it."""
  cited = [str(p.relative_to(REPO)) for p in _files() if re.search(r"(?<![\w/])DESIGN\.md", p.read_text())]
  assert not cited, cited


def _links(path):
  """(target file, anchor or None) of each link to a docs page in `path`."""
  text = path.read_text()
  for m in re.finditer(r"(?<![\w/.-])((?:docs/)?[\w-]+\.md)(?:#([\w-]+))?", text):
    name, anchor = m[1], m[2]
    if name.startswith("docs/"):
      yield REPO / name, anchor
    elif path.parent == DOCS and (DOCS / name).exists() or anchor:
      yield (path.parent / name), anchor


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_manual_pages_exist_and_have_headings(page):
  assert _headings(DOCS / page), page


def test_every_docs_link_resolves():
  broken = []
  for path in _files():
    for target, anchor in _links(path):
      if target.name in ("README.md",) or target.parent not in (DOCS, REPO):
        continue
      if not target.exists():
        broken.append(f"{path.relative_to(REPO)} -> {target.relative_to(REPO)} (no such file)")
      elif anchor and anchor not in {_slug(h) for h in _headings(target)}:
        broken.append(f"{path.relative_to(REPO)} -> {target.relative_to(REPO)}#{anchor} (no such heading)")
  assert not broken, broken


def test_readme_is_a_front_page_linking_the_manual():
  readme = (REPO / "README.md").read_text()
  assert len(readme.splitlines()) <= 250
  for page in ("design", "training", "data", "sparse_attention", "sweeps", "evaluation", "tpu", "performance"):
    assert f"docs/{page}.md" in readme, page


def test_every_module_path_named_in_code_and_docs_exists():
  """A file path in a comment or a page breaks when the file moves: each `package/module.py`
  (or `docs/page.md`) named anywhere is there."""
  roots = ("kernels", "parallel", "perf", "trainer", "model", "data", "evaluation", "sweeps", "scripts", "tests", "docs")
  missing = []
  for path in _files():
    for m in re.finditer(r"(?<![\w./-])((?:[a-z_]+/)+[a-z_0-9]+\.(?:py|md))\b", path.read_text()):
      if m[1].split("/")[0] in roots and not (REPO / m[1]).exists() and not (path.parent / m[1]).exists():
        missing.append(f"{path.relative_to(REPO)}: {m[1]}")
  assert not missing, missing
