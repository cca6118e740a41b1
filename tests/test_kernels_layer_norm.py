"""What the layer norm and GELU kernels (`kernels.layer_norm`, `kernels.activations`) must do
beyond matching numpy_ref through the public API (the Transformer tests run both backends):
results to rounding, bitwise the same run to run, whatever the thread count and on one thread
or several; any layout of x and d_y; the caches (the layer norm's its own, a TypeError on the
other backend; GELU's shared with numpy_ref); a weight or an x changed in place refused; NaN
confined to its row; the fitted normal CDF against libm's erf; every kernel compiled by
`kernels.warmup` in both dtypes. Everything here also runs with NUMBA_DISABLE_JIT=1.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest

import kernels
import numpy_ref
from kernels import activations as ka
from kernels import layer_norm as kl
from numpy_ref.contract.unchanged import InputChanged

JIT_OFF = bool(numba.config.DISABLE_JIT)
VARIANTS = ("torch", "annotated")
AFFINE = {"weight and bias": ("weight", "bias"), "weight": ("weight",), "none": ()}


def _inputs(shape, dtype, affine=("weight", "bias"), seed=0):
    rng = np.random.default_rng(seed)
    E = shape[-1]
    x = (3 * rng.standard_normal(shape) + 1).astype(dtype)
    params = {k: rng.standard_normal(E).astype(dtype) for k in affine}
    d_y = rng.standard_normal(shape).astype(dtype)
    return x, params, d_y


def _both(mod, x, params, d_y, variant="torch"):
    eps = 1e-5 if variant == "torch" else 1e-6
    y, cache = mod.layer_norm_forward(x, params, eps=eps, variant=variant)
    d_x, d_params = mod.layer_norm_backward(d_y, cache)
    return {"y": y, "d_x": d_x, **{f"d_{k}": v for k, v in d_params.items()}}


def _same_bits(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


@pytest.fixture
def threads():
    """Restores Numba's thread count after a test that changes it."""
    before = numba.get_num_threads()
    yield
    numba.set_num_threads(before)


@pytest.fixture(params=[False, True], ids=["serial", "parallel"])
def parallel(request, monkeypatch) -> bool:
    """Every call on the calling thread, or every call on Numba's threads."""
    monkeypatch.setattr(kl, "_PARALLEL_MIN", 0 if request.param else 1 << 62)
    return request.param


def test_the_package_exports_the_compiled_pairs() -> None:
    assert kernels.layer_norm_forward is kl.layer_norm_forward
    assert kernels.layer_norm_backward is kl.layer_norm_backward
    assert kernels.gelu_forward is ka.gelu_forward and kernels.gelu_backward is ka.gelu_backward
    assert kernels.KernelLayerNormCache is kl.KernelLayerNormCache
    assert kernels.GeluCache is numpy_ref.GeluCache


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("affine", list(AFFINE))
@pytest.mark.parametrize("shape", [(2, 3, 7), (5,), (130, 300), (0, 4)],
                         ids=["3d", "one-row", "chunks", "no-rows"])
def test_layer_norm_matches_numpy_ref(dtype, variant, affine, shape, parallel) -> None:
    x, params, d_y = _inputs(shape, dtype, AFFINE[affine])
    ours, ref = _both(kl, x, params, d_y, variant), _both(numpy_ref, x, params, d_y, variant)
    assert ours.keys() == ref.keys()
    tol = 1e-13 if dtype == np.float64 else 2e-6
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape, k
        scale = max(float(np.max(np.abs(ref[k]), initial=0)), 1.0)
        np.testing.assert_allclose(ours[k], ref[k], rtol=0, atol=tol * scale, err_msg=k)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_layer_norm_is_bitwise_the_same_run_to_run_and_on_any_thread_count(dtype, threads,
                                                                          parallel) -> None:
    x, params, d_y = _inputs((300, 257), dtype)  # chunks of 64 rows and a rest
    first = _both(kl, x, params, d_y)
    for _ in range(3):
        _same_bits(_both(kl, x, params, d_y), first)
    numba.set_num_threads(1)
    _same_bits(_both(kl, x, params, d_y), first)


def test_threads_false_runs_every_call_serially(monkeypatch) -> None:
    calls = []
    for name in ("_forward_serial", "_forward_parallel", "_backward_serial",
                 "_backward_parallel"):
        kernel = getattr(kl, name)
        monkeypatch.setattr(kl, name, lambda *a, _k=kernel, _n=name: (calls.append(_n), _k(*a)))
    monkeypatch.setattr(kl, "_PARALLEL_MIN", 0)
    x, params, d_y = _inputs((3, 4), np.float64)
    _both(kl, x, params, d_y)
    monkeypatch.setattr(kl, "THREADS", False)
    _both(kl, x, params, d_y)
    assert calls == ["_forward_parallel", "_backward_parallel", "_forward_serial",
                     "_backward_serial"]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_layer_norm_takes_any_layout_of_x_and_d_y(dtype) -> None:
    x, params, d_y = _inputs((6, 5, 8), dtype)
    expected = _both(kl, x, params, d_y)
    big = np.zeros((6, 10, 16), dtype)
    big[:, ::2, ::2] = x
    grad = np.zeros_like(big)
    grad[:, ::2, ::2] = d_y
    strided = _both(kl, big[:, ::2, ::2], params, grad[:, ::2, ::2])
    _same_bits(strided, expected)
    transposed = _both(kl, np.ascontiguousarray(x.transpose(1, 0, 2)).transpose(1, 0, 2),
                       params, np.asfortranarray(d_y))
    _same_bits(transposed, expected)
    row = x[2, 3]  # one row broadcast: a read-only view with stride 0
    wide = np.broadcast_to(row, (4, 8))
    got = _both(kl, wide, params, d_y[0, :4])
    _same_bits(got, _both(kl, np.ascontiguousarray(wide), params, d_y[0, :4]))
    weight = np.zeros(16, dtype)
    weight[::2] = params["weight"]
    _same_bits(_both(kl, x, {"weight": weight[::2], "bias": params["bias"]}, d_y), expected)


def test_a_cache_of_the_other_backend_or_another_op_is_a_type_error() -> None:
    x, params, d_y = _inputs((3, 4), np.float64)
    _, ours = kl.layer_norm_forward(x, params)
    _, theirs = numpy_ref.layer_norm_forward(x, params)
    with pytest.raises(TypeError, match=r"KernelLayerNormCache returned by "
                                        r"kernels\.layer_norm_forward, got LayerNormCache"):
        kl.layer_norm_backward(d_y, theirs)
    with pytest.raises(TypeError, match="got KernelLayerNormCache"):
        numpy_ref.layer_norm_backward(d_y, ours)
    _, gelu = ka.gelu_forward(x)
    with pytest.raises(TypeError, match="got GeluCache"):
        kl.layer_norm_backward(d_y, gelu)
    with pytest.raises(TypeError, match="GeluCache returned by gelu_forward, got "
                                        "KernelLayerNormCache"):
        ka.gelu_backward(d_y, ours)


def test_layer_norm_refuses_what_numpy_ref_refuses() -> None:
    x, params, d_y = _inputs((3, 4), np.float64)
    cases = [
        ((x.astype(np.int64), params), {}, TypeError, "dtype float32 or float64"),
        ((x, {"weight": params["weight"][:3]}), {}, ValueError, "weight"),
        ((x, {"weight": params["weight"].astype(np.float32)}), {}, TypeError, "weight"),
        ((x, {"gamma": params["weight"]}), {}, ValueError, "unexpected keys"),
        ((x, params), {"variant": "mine"}, ValueError, "variant"),
        ((x, params), {"eps": 0.0}, ValueError, "eps"),
        ((x[:, :1], {}), {"variant": "annotated"}, ValueError, "E >= 2"),
        ((np.zeros((3, 0)), {}), {}, ValueError, "non-empty last axis"),
    ]
    for args, kw, error, message in cases:
        for mod in (numpy_ref, kl):
            with pytest.raises(error, match=message):
                mod.layer_norm_forward(*args, **kw)
    _, cache = kl.layer_norm_forward(x, params)
    with pytest.raises(ValueError, match="d_y"):
        kl.layer_norm_backward(d_y[:2], cache)
    with pytest.raises(TypeError, match="d_y"):
        kl.layer_norm_backward(d_y.astype(np.float32), cache)


def test_a_weight_changed_before_the_backward_is_refused_a_bias_is_not_read() -> None:
    x, params, d_y = _inputs((3, 4), np.float32)
    _, cache = kl.layer_norm_forward(x, params)
    params["bias"] += 1  # the backward does not read it
    x += 1  # nor x: the cache holds x^, the kernel's own
    kl.layer_norm_backward(d_y, cache)
    params["weight"][1] = np.nextafter(params["weight"][1], np.inf)
    with pytest.raises(InputChanged, match=r"params\['weight'\] changed between "
                                           r"kernels\.layer_norm_forward and kernels\.layer_"):
        kl.layer_norm_backward(d_y, cache)


@pytest.mark.parametrize("variant", VARIANTS)
def test_nan_and_inf_stay_in_their_row(variant, parallel) -> None:
    x, params, d_y = _inputs((130, 300), np.float32)
    x[5, 7], x[9, 0], d_y[20, 3] = np.nan, np.inf, np.nan
    got = _both(kl, x, params, d_y, variant)
    for bad in (5, 9):
        assert np.isnan(got["y"][bad]).all() and np.isnan(got["d_x"][bad]).all()
    assert np.isnan(got["d_x"][20]).all()
    good = np.setdiff1d(np.arange(130), [5, 9, 20])
    assert np.isfinite(got["y"][good]).all() and np.isfinite(got["d_x"][good]).all()
    assert np.isnan(got["d_weight"]).all() and np.isnan(got["d_bias"][3])
    ref = _both(numpy_ref, x, params, d_y, variant)
    for k in ref:
        np.testing.assert_array_equal(np.isnan(got[k]), np.isnan(ref[k]), err_msg=k)


# --------------------------------------------------------------------------------------------
# GELU


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_matches_numpy_ref_and_shares_its_cache(dtype, approximate) -> None:
    rng = np.random.default_rng(1)
    x = (3 * rng.standard_normal((7, 33))).astype(dtype)
    x[0, :6] = [np.nan, np.inf, -np.inf, 0.0, 40.0, -40.0]
    d_y = rng.standard_normal(x.shape).astype(dtype)
    y, cache = ka.gelu_forward(x, approximate=approximate)
    y_ref, cache_ref = numpy_ref.gelu_forward(x, approximate=approximate)
    # to rounding, relative to the largest value (the derivative's terms cancel where it is
    # small: numpy_ref's own rounding there is 1e-15 of the terms, not of their sum)
    tol = 4e-15 if dtype == np.float64 else 2e-7
    np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol * np.nanmax(np.abs(y_ref[1:])))
    assert y.dtype == dtype and type(cache) is type(cache_ref)
    with np.errstate(invalid="ignore"):  # numpy_ref's own backward is quiet; the -inf row
        expected = numpy_ref.gelu_backward(d_y, cache_ref)
    for c in (cache, cache_ref):  # either backend's cache, the kernels' backward
        np.testing.assert_allclose(ka.gelu_backward(d_y, c), expected, rtol=tol,
                                   atol=tol * np.nanmax(np.abs(expected)))
    np.testing.assert_allclose(numpy_ref.gelu_backward(d_y, cache), expected, rtol=0, atol=0)
    strided = np.zeros((7, 66), dtype)
    strided[:, ::2] = x
    got, c = ka.gelu_forward(strided[:, ::2], approximate=approximate)
    assert got.tobytes() == y.tobytes()
    assert ka.gelu_backward(np.asfortranarray(d_y), c).tobytes() == \
        ka.gelu_backward(d_y, cache).tobytes()
    x[3, 3] += 1
    with pytest.raises(InputChanged, match="x changed between gelu_forward and gelu_backward"):
        ka.gelu_backward(d_y, cache)


def test_the_float32_normal_and_tanh_terms_are_within_float32_rounding() -> None:
    """The fitted Phi and phi of float32 data, relative to libm's in float64 (times
    1 + v^2 / 2: exp(-v^2 / 2) inherits the rounding of v^2), and 1 + tanh(u), sech(u)^2."""
    for v in np.concatenate([np.linspace(-14, 14, 4001), [-40.0, 0.0, 60.0]]).astype(np.float32):
        cdf, pdf = ka._normal_fitted(v)
        t = float(v)
        want = 0.5 * math.erfc(-t / math.sqrt(2))
        want_pdf = math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
        for got, ref in ((cdf, want), (pdf, want_pdf)):
            if ref > 1e-37:  # float32's normal range
                assert abs(got - ref) <= 6e-7 * ref * (1 + t * t / 2), (t, got, ref)
    for u in np.linspace(-12, 12, 4001).astype(np.float32):
        plus, sech2 = ka._tanh_terms32(u)
        a = float(u)
        want = 2 * math.exp(2 * a) / (1 + math.exp(2 * a)) if a < 0 else 1 + math.tanh(a)
        assert abs(plus - want) <= 6e-7 * want and abs(sech2 - math.cosh(a) ** -2) <= \
            8e-7 * math.cosh(a) ** -2, a
    for special in (np.nan, np.inf, -np.inf):
        cdf, pdf = ka._normal_fitted(np.float32(special))
        plus, sech2 = ka._tanh_terms32(np.float32(special))
        if np.isnan(special):
            assert np.isnan([cdf, pdf, plus, sech2]).all()
        else:
            assert (cdf, pdf, sech2) == (float(special > 0), 0, 0) and plus == 2 * (special > 0)


@pytest.mark.skipif(JIT_OFF, reason="no compiled dispatchers without JIT")
def test_warmup_compiles_every_layer_norm_and_gelu_kernel_in_both_dtypes() -> None:
    from numba.core.registry import CPUDispatcher

    kernels.warmup(progress=False)
    inner = {"_forward_row", "_backward_row", "_backward_chunk", "_normal_fitted",
             "_normal_libm", "_tanh_terms32"}  # compiled into their callers, one dtype each
    missing = []
    for module in (kl, ka):
        for name, obj in vars(module).items():
            if not isinstance(obj, CPUDispatcher) or name in inner \
                    or obj.py_func.__module__ != module.__name__:  # imported helpers
                continue
            text = " ".join(str(sig) for sig in obj.signatures)
            missing += [f"{module.__name__}.{name} ({d})" for d in ("float32", "float64")
                        if d not in text]
    assert not missing, f"not compiled by warmup: {missing}"
