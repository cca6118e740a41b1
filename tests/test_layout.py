"""The layout's import rules, read from the source (no import is run):

- `numpy_ref.contract` (checking and plumbing) imports nothing of numpy_ref outside itself, so
  the math modules can import it without a circle;
- no module of `numpy_ref`'s math imports the `numpy_ref` package itself (a default argument or
  an attribute read through it would bind a half-initialised package while it imports that
  module); the golden-vector tool, which calls the public API and is not imported by the
  package, may;
- `kernels` takes no private name (``_x``) from numpy_ref;
- the torch reference (`torch_impl.reference`, and the converter it loads params with) imports
  neither numpy_ref nor kernels: it must stay independent of what it checks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import statement at any depth of `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def files(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("path", files("numpy_ref/contract"), ids=lambda p: p.name)
def test_the_contract_imports_only_itself_from_numpy_ref(path: Path) -> None:
    for module, _ in imports(path):
        if module.startswith("numpy_ref"):
            assert module.startswith("numpy_ref.contract"), f"{path.name} imports {module}"


@pytest.mark.parametrize("path", [p for p in files("numpy_ref") if "golden" not in p.parts],
                         ids=lambda p: str(p.relative_to(REPO / "numpy_ref")))
def test_no_math_module_imports_its_own_package(path: Path) -> None:
    for module, names in imports(path):
        assert module != "numpy_ref", f"{path.name} imports the numpy_ref package ({names})"


@pytest.mark.parametrize("path", files("kernels"), ids=lambda p: str(p.relative_to(REPO)))
def test_kernels_take_no_private_name_from_numpy_ref(path: Path) -> None:
    for module, names in imports(path):
        if module.startswith("numpy_ref"):
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{path.name} imports {private} from {module}"


@pytest.mark.parametrize("path", [*files("torch_impl/reference"), REPO / "torch_impl/convert.py"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_the_torch_reference_imports_nothing_it_checks(path: Path) -> None:
    for module, _ in imports(path):
        assert not module.startswith(("numpy_ref", "kernels")), f"{path.name} imports {module}"
        if module.startswith("torch_impl"):
            assert module in ("torch_impl.convert", "torch_impl.reference") or \
                module.startswith("torch_impl.reference."), f"{path.name} imports {module}"
