"""numpy_ref.gradcheck: every input is checked, and every wrong gradient is named at once."""

from __future__ import annotations

import re

import numpy as np
import pytest

import numpy_ref as ref


def test_gradcheck_checks_every_input_and_names_every_wrong_one() -> None:
    """Two wrong gradients (and a right one between them): one AssertionError names both, each
    with its worst index and both values; the right one is not listed."""
    x = np.array([0.3, -1.2, 2.0])
    w = np.array([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]])
    b = np.array([0.1, -0.4])

    def loss() -> float:
        return float(np.sum(np.tanh(w @ x + b) * np.array([1.0, -2.0])))

    g = np.array([1.0, -2.0]) * (1 - np.tanh(w @ x + b) ** 2)
    wrong_x = w.T @ g
    wrong_x[2] -= 1e-3
    wrong_w = np.outer(g, x)
    wrong_w[0, 1] = np.nan
    with pytest.raises(AssertionError) as info:
        ref.gradcheck(loss, {"x": x, "b": b, "w": w}, {"x": wrong_x, "b": g, "w": wrong_w})
    message = str(info.value)
    lines = message.splitlines()
    assert lines[0] == "gradcheck: 2 of 3 gradients are wrong", message
    assert re.fullmatch(rf"gradcheck x: at index \(2,\) analytic {wrong_x[2]:.10g} vs numeric "
                        r"\S+ \(error 0.001, allowed \S+\)", lines[1]), message
    assert re.fullmatch(r"gradcheck w: at index \(0, 1\) analytic nan vs numeric \S+ "
                        r"\(error nan, allowed \S+\)", lines[2]), message
    assert len(lines) == 3 and "gradcheck b" not in message
    np.testing.assert_array_equal(x, [0.3, -1.2, 2.0])  # every input restored
    np.testing.assert_array_equal(w, [[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]])


def test_gradcheck_refuses_a_misshaped_gradient_before_any_finite_difference() -> None:
    calls = []

    def loss() -> float:
        calls.append(1)
        return 0.0

    with pytest.raises(ValueError, match=r"w: analytic gradient has shape \(3,\), input has "
                                         r"\(2,\)"):
        ref.gradcheck(loss, {"x": np.zeros(2), "w": np.zeros(2)},
                      {"x": np.zeros(2), "w": np.zeros(3)})
    assert not calls
