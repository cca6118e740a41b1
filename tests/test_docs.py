"""The documentation is checked like the code: help() gives every public function's math,
every cache field is documented, the README's links resolve, and the checking guide runs."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import kernels
import numpy_ref
import numpy_ref.contract

ROOT = Path(__file__).resolve().parents[1]


def _modules():
    for package in (numpy_ref, numpy_ref.contract, kernels):
        yield package
        for info in pkgutil.iter_modules(package.__path__):
            if info.name not in ("golden", "warmup") and not info.ispkg:
                yield importlib.import_module(f"{package.__name__}.{info.name}")


def _named_tuples():
    seen = {}
    for module in _modules():
        for obj in vars(module).values():
            if (inspect.isclass(obj) and hasattr(obj, "_fields")
                    and obj.__module__.split(".")[0] in ("numpy_ref", "kernels")):
                seen[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return seen


def test_every_cache_field_is_documented() -> None:
    classes = _named_tuples()
    assert {"numpy_ref.lstm.LSTMCellCache", "numpy_ref.attention.AttentionCache",
            "kernels.attention.KernelAttentionCache"} <= set(classes)
    undocumented = [f"{name}.{field}" for name, cls in classes.items() for field in cls._fields
                    if not (getattr(cls, field).__doc__ or "").startswith(f"{field}: ")]
    assert not undocumented, undocumented


def test_the_attention_cache_keeps_the_scores_before_the_softmax() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4))
    _, w, cache = numpy_ref.attention_forward(q, k, k, score="scaled_dot", lengths=[5, 2])
    s = q @ k.transpose(0, 2, 1) / 2  # scaled_dot: 1/sqrt(4)
    np.testing.assert_allclose(cache.logits[0, 0], s[0], rtol=1e-14)
    np.testing.assert_allclose(cache.logits[1, 0, :, :2], s[1, :, :2], rtol=1e-14)
    e = np.exp(cache.logits[1, 0, :, :2] - cache.logits[1, 0, :, :2].max(-1, keepdims=True))
    np.testing.assert_allclose(w[1, :, :2], e / e.sum(-1, keepdims=True), rtol=1e-14)


PUBLIC = [name for name in numpy_ref.__all__
          if inspect.isfunction(getattr(numpy_ref, name))
          or (inspect.isclass(getattr(numpy_ref, name))
              and not hasattr(getattr(numpy_ref, name), "_fields"))]


@pytest.mark.parametrize("name", PUBLIC)
def test_help_gives_the_math_and_points_at_the_derivation(name: str) -> None:
    doc = inspect.getdoc(getattr(numpy_ref, name)) or ""
    summary = "\n\n".join(doc.split("\n\n")[:2])  # what help() shows first
    assert re.search(r"=|~", summary), f"{name}: no formula in its summary:\n{summary}"
    assert "module docstring" in doc, f"{name}: does not point at its module's derivation"


def test_every_public_function_of_testing_has_a_docstring_with_shapes_or_rules() -> None:
    import numpy_ref.testing as testing

    for name in testing.__all__:
        obj = getattr(testing, name)
        if callable(obj):
            assert inspect.getdoc(obj), name


def _markdown_files():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
            *sorted((ROOT / "examples").glob("**/*.md"))]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_links_resolve_and_nothing_cites_a_file_outside_the_repository(path) -> None:
    text = path.read_text()
    for outside in ("DESIGN", "STYLE"):  # notes kept outside the repository, never cited
        assert f"{outside}.md" not in text, f"{path.name} cites {outside}.md"
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+://", target):
            assert (path.parent / target).exists(), f"{path.name}: broken link {target}"


_NUMBER = re.compile(r"-?\d+\.?\d*(?:e[-+]?\d+)?")


def _same_text(got: str, want: str) -> bool:
    """Equal up to the last digits of the numbers in them (BLAS may sum in another order)."""
    if _NUMBER.sub("#", got) != _NUMBER.sub("#", want):
        return False
    pairs = zip(_NUMBER.findall(got), _NUMBER.findall(want), strict=True)
    return all(abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b))) for a, b in pairs)


def _blocks(path: Path):
    """The guide's python blocks, each with the output it says it prints (its ``#>`` lines)."""
    for block in re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S):
        yield block, [line[3:] for line in block.splitlines() if line.startswith("#> ")]


def test_the_checking_guide_runs_and_prints_what_it_says(capsys) -> None:
    namespace: dict = {}
    blocks = list(_blocks(ROOT / "docs" / "checking.md"))
    assert len(blocks) >= 6
    for block, expected in blocks:
        exec(compile(block, "docs/checking.md", "exec"), namespace)
        printed = capsys.readouterr().out.splitlines()
        assert len(printed) == len(expected), (printed, expected)
        for got, want in zip(printed, expected, strict=True):
            assert _same_text(got, want), f"the guide says\n  {want}\nthe code prints\n  {got}"
