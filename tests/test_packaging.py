"""numpy_ref needs NumPy alone: an oracle user in another language does not download torch.

Each test runs a fresh interpreter in which the other packages cannot be imported (a finder
at the front of ``sys.meta_path`` refuses them), as on a machine where only NumPy is installed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOT_NUMPY = ("torch", "numba", "scipy", "safetensors", "threadpoolctl", "tqdm", "matplotlib",
             "ml_dtypes")

BLOCKER = f"""
import sys, importlib.abc
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {NOT_NUMPY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Refuse())
"""


def run_without_extras(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_numpy_ref_runs_every_op_family_with_numpy_alone() -> None:
    proc = run_without_extras("""
        import numpy as np
        import numpy_ref as ref
        import numpy_ref.golden  # the tool imports; only reading/writing files needs safetensors
        rng = np.random.default_rng(0)
        x = rng.standard_normal((5, 3, 4))
        p = ref.init_lstm_params(4, 6, bidirectional=True, rng=rng)
        out, _, cache = ref.lstm_forward(x, p, bidirectional=True)
        ref.lstm_backward(np.ones_like(out), cache)
        q, k = rng.standard_normal((2, 3, 5, 8)), rng.standard_normal((2, 3, 7, 8))
        ctx, w, cache = ref.attention_forward(q, k, k, score="scaled_dot", need_weights=False)
        ref.attention_backward(np.ones_like(ctx), cache)
        ids = rng.integers(0, 10, (2, 5))
        params = ref.init_bilstm_attention_params(10, 4, 3, 2, rng=rng)
        logits, _, cache = ref.bilstm_attention_forward(ids, params)
        ref.bilstm_attention_backward(np.ones_like(logits), cache)
        h = x.astype(np.float16)  # float16 is NumPy's own: no ml_dtypes needed
        out, _, cache = ref.lstm_forward(h, {k: v.astype(np.float16) for k, v in p.items()},
                                         bidirectional=True)
        assert out.dtype == np.float16
        ref.lstm_backward(np.ones_like(out), cache)
        from numpy_ref.testing import error_budget
        assert error_budget(ref.gelu_forward, (h,), got={"y": ref.gelu_forward(h)[0]}).ok
        mods = sorted(m for m in {NOT_NUMPY!r} if m in sys.modules)
        assert not mods, mods
        print("ok")
    """.replace("{NOT_NUMPY!r}", repr(NOT_NUMPY)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


@pytest.mark.parametrize(("code", "message"), [
    ("import kernels", "pip install 'lstm-attention-reference[kernels]'"),
    ("import torch_impl", "pip install 'lstm-attention-reference[torch]'"),
    ("from numpy_ref.golden import main; main(['write', 'unused-dir'])",
     "pip install 'lstm-attention-reference[golden]'"),
])
def test_the_other_parts_name_the_extra_they_need(code: str, message: str) -> None:
    proc = run_without_extras(code)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_the_package_requires_numpy_alone() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0] for d in project["dependencies"]] == ["numpy"]
    extras = project["optional-dependencies"]
    # the quick start's two commands install these: everything the suite and the tests import
    assert "lstm-attention-reference[kernels,torch,examples]" in extras["bench"]
    assert "lstm-attention-reference[bench,bfloat16,golden,cuda,frameworks]" in extras["test"]
