"""The package rules hold: which package may import which (docs/design.md §2), read from the code's
own import statements; no script edits its import path; no test hook in the production path."""
import ast

import pytest

from conftest import REPO

# package -> the project packages it may import (itself always).
ALLOWED = {
    "parallel": set(),
    "kernels": {"parallel"},
    "perf": {"kernels", "parallel"},
    "configs": {"kernels"},
    "data": {"configs"},
    "model": {"kernels", "parallel", "configs"},
    "hf": {"model", "configs"},
    "evaluation": {"model", "parallel", "data", "configs"},
    "trainer": {"evaluation", "hf", "model", "data", "kernels", "parallel", "configs"},
    "sweeps": {"configs"},
}
PROJECT = set(ALLOWED) | {"scripts", "train"}


def _imported_packages(path) -> set[str]:
  """Top-level project packages a module imports (at any depth of the file, lazy imports too)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(alias.name.split(".")[0] for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      found.add(node.module.split(".")[0])
  return found & PROJECT


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_what_the_rules_allow(package):
  files = sorted((REPO / package).rglob("*.py"))
  assert files, package
  wrong = {str(f.relative_to(REPO)): sorted(_imported_packages(f) - ALLOWED[package] - {package}) for f in files}
  assert not {f: w for f, w in wrong.items() if w}


def test_the_rules_have_no_cycle():
  seen, order = set(), []

  def visit(package, path=()):
    assert package not in path, path + (package,)
    if package not in seen:
      for dep in ALLOWED[package]:
        visit(dep, path + (package,))
      seen.add(package)
      order.append(package)
  for package in ALLOWED:
    visit(package)
  assert len(order) == len(ALLOWED)


def test_no_script_edits_its_import_path():
  """The project is installed (`-e .` in requirements.txt): scripts and tests import its packages."""
  for path in [*(REPO / "scripts").glob("*.py"), *(REPO / "tests").glob("*.py"), REPO / "train.py"]:
    tree = ast.parse(path.read_text())
    edits = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in ("insert", "append")
             and isinstance(n.value, ast.Attribute) and n.value.attr == "path"
             and isinstance(n.value.value, ast.Name) and n.value.value.id == "sys"]
    assert not edits, path


def test_train_py_holds_no_fault_injection_hook():
  """Killing a run at a step is the tests' business (tests/kill_after.py), not train.py's."""
  text = (REPO / "train.py").read_text()
  assert "KILL" not in text and "SIGKILL" not in text and "environ" not in text
