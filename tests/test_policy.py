"""The comparison helper and the finite-difference check must be able to fail."""

from __future__ import annotations

import numpy as np
import pytest
from policy import EPS32, assert_close_policy

import numpy_ref as ref


def test_policy_float64_accepts_rounding_and_rejects_a_real_error() -> None:
    r = np.linspace(-3, 3, 50)
    assert assert_close_policy("v", r + 1e-13, r) < 1e-12
    bad = r.copy()
    bad[17] += 1e-6
    with pytest.raises(AssertionError, match=r"v: max error 1e-06; at index \(17,\)"):
        assert_close_policy("v", bad, r)


def test_policy_float32_scales_with_torchs_own_error() -> None:
    r = np.random.default_rng(0).standard_normal(100)
    torch32 = (r + 1e-4).astype(np.float32)  # torch's error 1e-4: far above the floor
    ok = (r + 1.9e-4).astype(np.float32)
    assert_close_policy("v", ok, r, torch32=torch32)
    with pytest.raises(AssertionError, match=r"v: max error .* > allowed .* = 2 \* torch"):
        assert_close_policy("v", (r + 2.5e-4).astype(np.float32), r, torch32=torch32)
    assert_close_policy("d_v", (r + 2.5e-4).astype(np.float32), r, torch32=torch32, grad=True)
    with pytest.raises(AssertionError, match="d_v"):
        assert_close_policy("d_v", (r + 3.5e-4).astype(np.float32), r, torch32=torch32,
                            grad=True)


def test_policy_float32_floor_when_torch_is_exact() -> None:
    r = np.ones(4)
    exact = r.astype(np.float32)
    assert_close_policy("v", exact + np.float32(4 * EPS32), r, torch32=exact)
    with pytest.raises(AssertionError, match="8 \\* eps32"):
        assert_close_policy("v", exact + np.float32(16 * EPS32), r, torch32=exact)


def test_gradcheck_passes_a_right_gradient_and_names_a_wrong_one() -> None:
    x = np.array([0.3, -1.2, 2.0])
    w = np.array([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]])

    def loss() -> float:
        return float(np.sum(np.tanh(w @ x) * np.array([1.0, -2.0])))

    g = np.array([1.0, -2.0]) * (1 - np.tanh(w @ x) ** 2)
    errors = ref.gradcheck(loss, {"x": x, "w": w}, {"x": w.T @ g, "w": np.outer(g, x)})
    assert max(errors.values()) < 1e-8
    wrong_w = np.outer(g, x)
    wrong_w[1, 2] += 1e-4
    with pytest.raises(AssertionError, match=r"gradcheck w: at index \(1, 2\)"):
        ref.gradcheck(loss, {"x": x, "w": w}, {"x": w.T @ g, "w": wrong_w})
    np.testing.assert_array_equal(x, [0.3, -1.2, 2.0])  # inputs restored


def test_gradcheck_refuses_float32() -> None:
    with pytest.raises(TypeError, match="float64"):
        ref.numerical_gradient(lambda: 0.0, np.zeros(3, np.float32))
