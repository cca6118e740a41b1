"""The comparison helper and the finite-difference check must be able to fail."""

from __future__ import annotations

import numpy as np
import pytest

import numpy_ref as ref
from numpy_ref.testing import (
    EPS32,
    assert_all_close,
    assert_allclose_named,
    assert_close_policy,
    compare,
    float32_allowance,
)


def test_policy_float64_accepts_rounding_and_rejects_a_real_error() -> None:
    r = np.linspace(-3, 3, 50)
    assert assert_close_policy("v", r + 1e-13, r) < 1e-12
    bad = r.copy()
    bad[17] += 1e-6
    with pytest.raises(AssertionError, match=r"v: FAIL, max error 1e-06; at index \(17,\)"):
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


def test_compare_nan_and_infinity_rules() -> None:
    want = np.array([1.0, np.nan, np.inf, -np.inf])
    assert compare("v", want.copy(), want).ok  # NaN matches NaN, inf the same inf
    for j, bad in [(0, np.nan), (1, 1.0), (2, 1e300), (3, np.inf)]:
        got = want.copy()
        got[j] = bad
        result = compare("v", got, want)
        assert not result.ok and result.index == (j,), (j, bad, result)
        with pytest.raises(AssertionError, match=rf"v: FAIL.*at index \({j},\)"):
            assert_allclose_named("v", got, want, rtol=1e-7, atol=1e-7)


def test_policy_float32_rejects_nan() -> None:
    r = np.ones(3)
    bad = r.astype(np.float32)
    bad[1] = np.nan
    with pytest.raises(AssertionError, match=r"at index \(1,\)"):
        assert_close_policy("v", bad, r, torch32=r.astype(np.float32))


def test_compare_reports_the_worst_excess_not_the_largest_error() -> None:
    want = np.array([1000.0, 1.0])
    got = want + np.array([5e-5, 3e-7])  # 5e-5 is allowed at 1000, 3e-7 is not at 1
    result = compare("w", got, want)
    assert not result.ok and result.index == (1,) and result.max_error == pytest.approx(5e-5)
    assert "w: FAIL" in str(result) and "> allowed" in str(result)
    assert "ok" in str(compare("w", want, want))


def test_assert_all_close_names_every_problem() -> None:
    want = {"a": np.zeros(2), "b": np.ones((2, 2)), "c": np.ones(1)}
    got = {"a": np.zeros(3), "b": np.ones((2, 2)) + np.eye(2) * 1e-3, "d": np.ones(1)}
    with pytest.raises(AssertionError, match="4 of 4 tensors differ") as info:
        assert_all_close(got, want)
    message = str(info.value)
    assert "missing: c" in message and "unexpected: d" in message
    assert r"a: shape (3,) != reference (2,)" in message
    assert r"b: FAIL, max error 0.001; at index (0, 0)" in message
    assert assert_all_close(want, want) == {"a": 0.0, "b": 0.0, "c": 0.0}


def test_compare_takes_torch_tensors_and_refuses_a_shape_mismatch() -> None:
    import torch

    t = torch.linspace(0, 1, 5, dtype=torch.float64, requires_grad=True)
    assert compare("t", t * 1, t.detach().numpy()).ok
    with pytest.raises(ValueError, match=r"t: shape \(5,\) != reference \(4,\)"):
        compare("t", t, np.zeros(4))


def test_float32_allowance_is_the_documented_formula() -> None:
    assert float32_allowance(1e-6, 2.0) == pytest.approx(2e-6 + 16 * EPS32)
    assert float32_allowance(1e-6, 2.0, grad=True) == pytest.approx(3e-6 + 16 * EPS32)


def test_gradcheck_fails_a_nan_gradient() -> None:
    x = np.array([0.5, -1.0])

    def loss() -> float:
        return float(np.sum(x**2))

    with pytest.raises(AssertionError, match=r"gradcheck x: at index \(1,\)"):
        ref.gradcheck(loss, {"x": x}, {"x": np.array([1.0, np.nan])})


def test_policy_refuses_arguments_it_cannot_compare_even_under_python_O() -> None:
    r = np.ones((2, 3))
    with pytest.raises(ValueError, match=r"shapes ours \(3,\)"):
        assert_close_policy("v", np.ones(3, np.float32), r, torch32=np.ones(3, np.float32))
    with pytest.raises(TypeError, match="torch32="):
        assert_close_policy("v", r.astype(np.float32), r)
    with pytest.raises(TypeError, match="reference must be float64"):
        assert_close_policy("v", r, r.astype(np.float32))
