"""kernels.cuda: the single-query attention core on the GPU, against numpy_ref.

Runs on a real GPU, or on numba's CUDA simulator:

    NUMBA_ENABLE_CUDASIM=1 .venv/bin/python -m pytest -q tests/test_cuda_kernels.py

(the variable must be set before numba is first imported, hence on the command line). Without
either, the whole module is skipped. The simulator runs every thread as a Python thread, about
0.5 s per launch at these sizes, so the shapes are tiny (B <= 3, T <= 9) and the block and
split knobs (`_warps`, `_splits`) are forced where a test needs a particular layout: several
warps per block, more than one column per thread (H > 32 with one warp), splits of which some
are empty (a row of length 1 cut in three).
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

if not cuda.is_available():
    pytest.skip("kernels.cuda needs a CUDA GPU or numba's simulator (run with "
                "NUMBA_ENABLE_CUDASIM=1); numba.cuda.is_available() is False",
                allow_module_level=True)

import numpy_ref
from kernels import cuda as kcuda
from kernels.cuda import attention_kernels as kak
from numpy_ref.testing import assert_allclose_named, assert_close_policy

NAMES = ("context", "weights", "d_query", "d_keys", "d_values")
TIGHT = 1e-12  # float64 against numpy_ref: the sums differ in order only


def make_inputs(B, T, H, Hv, dtype, seed, *, same=False):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H)).astype(dtype)
    k = rng.standard_normal((B, T, H)).astype(dtype)
    v = k if same else rng.standard_normal((B, T, Hv)).astype(dtype)
    dc = rng.standard_normal((B, v.shape[2])).astype(dtype)
    return q, k, v, dc


def run(module, q, k, v, dc, *, sum_kv=False, knobs=None, **options):
    """Forward then backward through `module` (numpy_ref or kernels.cuda): a dict of results.
    `knobs` (kernels.cuda's `_splits`, `_warps`) go to both passes."""
    knobs = knobs or {}
    context, weights, cache = module.attention_forward(q, k, v, **options, **knobs)
    d_q, d_k, d_v, d_params = module.attention_backward(dc, cache, sum_kv=sum_kv, **knobs)
    assert d_params == {}
    return dict(zip(NAMES, (context, weights, d_q, d_k, d_v), strict=True))


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint64 if a.dtype == np.float64 else np.uint32)


def assert_same_bits(got: dict, want: dict) -> None:
    for name in want:
        if want[name] is None:
            assert got[name] is None, name
        else:
            assert np.array_equal(bits(got[name]), bits(want[name])), name


CASES = [  # (B, T, H, Hv, options): auto layout (T = 8: two warps; T = 4: one)
    (3, 8, 5, 3, {"score": "scaled_dot", "lengths": np.array([8, 3, 1])}),
    (2, 4, 4, 4, {"score": "dot", "scale": 0.7}),
]


@pytest.mark.parametrize("case", CASES, ids=["scaled_dot-lengths", "dot-scale"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_forward_backward_match_numpy_ref(case, dtype) -> None:
    B, T, H, Hv, options = case
    q, k, v, dc = make_inputs(B, T, H, Hv, dtype, seed=1)
    got = run(kcuda, q, k, v, dc, **options)
    for name, x in got.items():
        assert isinstance(x, np.ndarray) and x.dtype == dtype, name
    want = run(numpy_ref, *(a.astype(np.float64) for a in (q, k, v, dc)), **options)
    if dtype == np.float64:
        for name in NAMES:
            assert_allclose_named(name, got[name], want[name], rtol=TIGHT, atol=TIGHT)
    else:  # the project's float32 policy, numpy_ref's own float32 run as the trusted one
        numpy32 = run(numpy_ref, q, k, v, dc, **options)
        for name in NAMES:
            assert_close_policy(name, got[name], want[name], torch32=numpy32[name],
                                grad=name.startswith("d_"))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_need_weights_false_and_lse(dtype) -> None:
    """need_weights=False: None for the weights, the same context and gradients bit for bit
    (the kernels are the same), and cache.lse (host, the data's dtype) is numpy_ref's."""
    q, k, v, dc = make_inputs(3, 8, 5, 3, dtype, seed=3)
    options = {"score": "scaled_dot", "lengths": np.array([8, 3, 1])}
    with_weights = run(kcuda, q, k, v, dc, **options)
    got = run(kcuda, q, k, v, dc, need_weights=False, **options)
    assert got.pop("weights") is None
    assert_same_bits(got, {n: x for n, x in with_weights.items() if n != "weights"})
    _, _, cache = kcuda.attention_forward(q, k, v, need_weights=False, **options)
    _, _, want = numpy_ref.attention_forward(q, k, v, **options)
    assert cache.lse.dtype == dtype and cache.lse.shape == (3,)
    assert_allclose_named("lse", cache.lse, want.lse, rtol=1e-12 if dtype == np.float64
                          else 1e-6, atol=0)


def test_more_columns_than_threads() -> None:
    """H = 40 and Hv = 33 with one warp: two columns per thread, lanes loop past 32."""
    q, k, v, dc = make_inputs(2, 5, 40, 33, np.float64, seed=2)
    options = {"score": "scaled_dot", "lengths": [5, 2]}
    assert kak.plan(2, 5, 40, None, 1)[2] == 2
    got = run(kcuda, q, k, v, dc, knobs={"_warps": 1}, **options)
    want = run(numpy_ref, q, k, v, dc, **options)
    for name in NAMES:
        assert_allclose_named(name, got[name], want[name], rtol=TIGHT, atol=TIGHT)


def test_running_max_rescaled_across_tiles() -> None:
    """Scores that grow along the keys: every tile of four keys (one warp) raises the running
    max, so the sums of the tiles before it are rescaled by exp(m_old - m_new)."""
    q, k, v, dc = make_inputs(2, 9, 3, 2, np.float64, seed=11)
    k = q[:, None, :] * np.linspace(-2.0, 3.0, 9)[None, :, None] + 0.1 * k
    for knobs in ({"_warps": 1}, {"_warps": 1, "_splits": 2}):
        got = run(kcuda, q, k, v, dc, knobs=knobs, lengths=[9, 8])
        want = run(numpy_ref, q, k, v, dc, lengths=[9, 8])
        for name in NAMES:
            assert_allclose_named(name, got[name], want[name], rtol=TIGHT, atol=TIGHT)


def test_sum_kv_and_out_buffers() -> None:
    """keys is values; the backward called twice on one cache: sum_kv into out[1], then the
    two gradients separately with d_values into out[2]."""
    q, k, _, dc = make_inputs(2, 6, 3, 3, np.float64, seed=3, same=True)
    lengths = np.array([6, 4])
    _, _, cache = kcuda.attention_forward(q, k, k, lengths=lengths, _warps=1)
    _, _, ref_cache = numpy_ref.attention_forward(q, k, k, lengths=lengths)
    r_q, r_k, r_v, _ = numpy_ref.attention_backward(dc, ref_cache)
    b_q, b_kv = np.full_like(q, np.nan), np.full_like(k, np.nan)
    d_q, d_kv, d_v, _ = kcuda.attention_backward(dc, cache, sum_kv=True, out=(b_q, b_kv, None),
                                                 _warps=1)
    assert d_q is b_q and d_kv is b_kv and d_v is None
    assert_allclose_named("d_query", d_q, r_q, rtol=TIGHT, atol=TIGHT)
    assert_allclose_named("d_keys + d_values", d_kv, r_k + r_v, rtol=TIGHT, atol=TIGHT)
    b_v = np.full_like(k, np.nan)
    d_q2, d_k2, d_v2, _ = kcuda.attention_backward(dc, cache, out=(None, None, b_v))
    assert d_v2 is b_v
    assert np.array_equal(d_q2, d_q)  # the same kernel pass: the same bits
    assert_allclose_named("d_keys", d_k2, r_k, rtol=TIGHT, atol=TIGHT)
    assert_allclose_named("d_values", d_v2, r_v, rtol=TIGHT, atol=TIGHT)


def test_padding_is_not_data() -> None:
    """NaN and inf past lengths change no output bit; weights and the padding rows of d_keys
    and d_values are exact zeros."""
    q, k, v, dc = make_inputs(3, 7, 4, 2, np.float32, seed=4)
    lengths = np.array([7, 3, 1])
    pad = np.arange(7)[None, :] >= lengths[:, None]
    k0, v0 = k.copy(), v.copy()
    k0[pad], v0[pad] = 0, 0
    k1, v1 = k.copy(), v.copy()
    k1[pad], v1[pad] = np.nan, np.inf
    clean = run(kcuda, q, k0, v0, dc, lengths=lengths, knobs={"_warps": 1})
    dirty = run(kcuda, q, k1, v1, dc, lengths=lengths, knobs={"_warps": 1})
    assert_same_bits(dirty, clean)
    assert not dirty["weights"][pad].any()
    assert not dirty["d_keys"][pad].any() and not dirty["d_values"][pad].any()


def test_nan_in_data_reaches_its_row_only() -> None:
    q, k, v, dc = make_inputs(3, 5, 3, 3, np.float64, seed=5)
    k[1, 2, 0] = np.nan
    got = run(kcuda, q, k, v, dc, knobs={"_warps": 1})
    want = run(numpy_ref, q, k, v, dc)
    assert np.isnan(got["context"][1]).all() and np.isnan(got["weights"][1]).all()
    for name in NAMES:  # NaN matches NaN; the other rows as accurate as ever
        assert_allclose_named(name, got[name], want[name], rtol=TIGHT, atol=TIGHT)


def test_split_path_agrees_and_is_deterministic() -> None:
    """Flash-Decoding forced on a tiny shape: three splits per row (row 1, of length 1, has two
    empty ones), two warps, merged and reduced; the same as numpy_ref and the unsplit path to
    rounding, and the same bits on a second run (no recompilation for it)."""
    q, k, v, dc = make_inputs(2, 9, 3, 2, np.float64, seed=6)
    options = {"lengths": np.array([9, 1]), "score": "scaled_dot"}
    split = run(kcuda, q, k, v, dc, knobs={"_splits": 3, "_warps": 1}, **options)
    compiled = kak.build.cache_info().currsize
    again = run(kcuda, q, k, v, dc, knobs={"_splits": 3, "_warps": 1}, **options)
    assert kak.build.cache_info().currsize == compiled
    assert_same_bits(again, split)
    whole = run(kcuda, q, k, v, dc, knobs={"_splits": 1, "_warps": 2}, **options)
    want = run(numpy_ref, q, k, v, dc, **options)
    for name in NAMES:
        assert_allclose_named(name, split[name], want[name], rtol=TIGHT, atol=TIGHT)
        assert_allclose_named(name, split[name], whole[name], rtol=TIGHT, atol=TIGHT)


def test_device_inputs_give_device_outputs() -> None:
    """Device arrays in (lengths too): device arrays out, with the host path's bits; device
    gradient buffers are written in place and returned."""
    q, k, v, dc = make_inputs(2, 5, 3, 3, np.float32, seed=7)
    lengths = np.array([5, 2])
    host = run(kcuda, q, k, v, dc, sum_kv=True, lengths=lengths, knobs={"_warps": 1})
    dq_, dk_, dv_, ddc = (cuda.to_device(a) for a in (q, k, v, dc))
    context, weights, cache = kcuda.attention_forward(dq_, dk_, dv_,
                                                      lengths=cuda.to_device(lengths), _warps=1)
    b_q, b_kv = cuda.device_array(q.shape, q.dtype), cuda.device_array(k.shape, k.dtype)
    d_q, d_kv, d_v, _ = kcuda.attention_backward(ddc, cache, sum_kv=True,
                                                 out=(b_q, b_kv, None), _warps=1)
    assert d_q is b_q and d_kv is b_kv and d_v is None
    for x in (context, weights):
        assert cuda.devicearray.is_cuda_ndarray(x)
    device = dict(zip(NAMES, [x if x is None else x.copy_to_host()
                              for x in (context, weights, d_q, d_kv, d_v)], strict=True))
    assert_same_bits(device, host)


def test_torch_cuda_tensors_in_place() -> None:
    """On a real GPU: torch CUDA tensors (`__cuda_array_interface__`) in, wrapped without a
    copy; torch out buffers filled and returned as given."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs torch with a CUDA device (the simulator has no CUDA tensors)")
    q, k, v, dc = make_inputs(3, 8, 5, 4, np.float32, seed=8)
    host = run(kcuda, q, k, v, dc, score="scaled_dot", lengths=[8, 3, 1])
    tq, tk, tv, tdc = (torch.from_numpy(a).cuda() for a in (q, k, v, dc))
    context, weights, cache = kcuda.attention_forward(
        tq, tk, tv, score="scaled_dot", lengths=torch.tensor([8, 3, 1]).cuda())
    bq, bk, bv = torch.empty_like(tq), torch.empty_like(tk), torch.empty_like(tv)
    d_q, d_k, d_v, _ = kcuda.attention_backward(tdc, cache, out=(bq, bk, bv))
    assert d_q is bq and d_k is bk and d_v is bv
    got = {"context": torch.as_tensor(context, device="cuda").cpu().numpy(),
           "weights": torch.as_tensor(weights, device="cuda").cpu().numpy(),
           "d_query": bq.cpu().numpy(), "d_keys": bk.cpu().numpy(), "d_values": bv.cpu().numpy()}
    assert_same_bits(got, host)


def test_plan_splits_only_when_rows_are_few(monkeypatch) -> None:
    monkeypatch.setattr(kak, "_sm_count", lambda: 132)
    assert kak.plan(256, 512, 256, None, None) == (3, 8, 1)  # 256 rows < 4 blocks per SM
    assert kak.plan(1024, 512, 256, None, None) == (1, 8, 1)  # enough rows: no split
    assert kak.plan(4, 4096, 128, None, None)[0] == 64  # at least 64 keys per split
    assert kak.plan(4, 100, 128, None, None)[0] == 1  # too short to split
    assert kak.plan(2, 8, 4096, None, None) == (1, 2, 64)  # wide rows: 64 columns a thread


# --------------------------------------------------------------------------------------------
# bad input: checked before anything is launched


@pytest.fixture(scope="module")
def small():
    q, k, v, dc = make_inputs(2, 3, 2, 2, np.float64, seed=9)
    cache = kcuda.attention_forward(q, k, v, _warps=1)[2]
    return q, k, v, dc, cache


@pytest.mark.parametrize("change, error, match", [
    ({"query": np.zeros(2)}, ValueError, "query: expected a 2-D"),
    ({"query": np.zeros((2, 1, 2))}, ValueError, "rank-3 query .* not implemented in "
                                                  "kernels.cuda; use kernels"),
    ({"query": np.zeros((2, 2), np.float32)}, TypeError, "keys: dtype float64 does not match"),
    ({"query": [[0.0, 0.0]] * 2}, TypeError, "query: expected a numpy.ndarray or a CUDA array"),
    ({"query": np.zeros((2, 2), np.int64)}, TypeError, "query: expected dtype float32"),
    ({"query": np.zeros((3, 2))}, ValueError, "batch 3 does not match"),
    ({"values": np.zeros((2, 4, 2))}, ValueError, "values: expected shape"),
    ({"query": np.zeros((0, 2)), "keys": np.zeros((0, 3, 2)), "values": np.zeros((0, 3, 2))},
     ValueError, "keys: expected at least one key and one row"),  # the contract's message
    ({"keys": np.zeros((2, 0, 2)), "values": np.zeros((2, 0, 2))}, ValueError,
     "keys: expected at least one key and one row"),
    ({"query": np.zeros((2, 0)), "keys": np.zeros((2, 3, 0)), "values": np.zeros((2, 3, 0))},
     ValueError, "every axis must be non-empty"),
    ({"score": "general", "params": {"W": np.eye(2)}}, ValueError,
     "'general' score is not implemented in kernels.cuda"),
    ({"score": "additive"}, ValueError, "'additive' score is not implemented"),
    ({"score": "cosine"}, ValueError, "score: expected one of"),
    ({"params": {"W": np.eye(2)}}, ValueError, "unexpected keys"),
    ({"mask": np.ones((2, 3), bool)}, ValueError, "mask: .* not implemented in kernels.cuda"),
    ({"bias": np.zeros((2, 3))}, ValueError, "bias: .* not implemented"),
    ({"causal": True}, ValueError, "causal: .* not implemented"),
    ({"lengths": [0, 3]}, ValueError, "every length must be in 1..3"),
    ({"lengths": [1, 4]}, ValueError, "every length must be in 1..3"),
    ({"lengths": [1, 2, 3]}, ValueError, r"lengths: expected shape \[B\]"),
    ({"scale": float("nan")}, TypeError, "scale: expected a finite"),
])
def test_forward_bad_input(small, change, error, match) -> None:
    q, k, v, _, _ = small
    args = {"query": q, "keys": k, "values": v, **change}
    with pytest.raises(error, match=match):
        kcuda.attention_forward(args.pop("query"), args.pop("keys"), args.pop("values"),
                                **args)


def test_mixed_host_and_device_inputs(small) -> None:
    q, k, v, dc, cache = small
    with pytest.raises(TypeError, match="mixed host and device inputs"):
        kcuda.attention_forward(q, cuda.to_device(k), v)
    with pytest.raises(TypeError, match="d_context: the forward's inputs were on the host"):
        kcuda.attention_backward(cuda.to_device(dc), cache)
    with pytest.raises(TypeError, match=r"out\[0\] \(d_query\): the forward's inputs were on"):
        kcuda.attention_backward(dc, cache, out=(cuda.device_array(q.shape), None, None))


def test_device_lengths_are_checked(small) -> None:
    q, k, v, _, _ = small
    d = [cuda.to_device(a) for a in (q, k, v)]
    with pytest.raises(ValueError, match=r"every length must be in 1\.\.3"):
        kcuda.attention_forward(*d, lengths=cuda.to_device(np.array([3, 0])))
    with pytest.raises(TypeError, match="lengths: expected integers"):
        kcuda.attention_forward(*d, lengths=cuda.to_device(np.array([3.0, 1.0])))


@pytest.mark.parametrize("change, error, match", [
    ({"cache": ("not", "a", "cache")}, TypeError,
     "cache: expected the CudaAttentionCache returned by kernels.cuda.attention_forward"),
    ({"d_context": np.zeros((2, 3))}, ValueError, r"d_context: expected shape \[B, Hv\]"),
    ({"d_context": np.zeros((2, 2), np.float32)}, TypeError, "d_context: dtype float32"),
    ({"d_weights": np.zeros((2, 3))}, ValueError, "d_weights: .* not implemented"),
    ({"sum_kv": 1}, TypeError, "sum_kv: expected a bool"),
    ({"out": [None, None]}, TypeError, "out: expected a tuple"),
    ({"sum_kv": True, "out": (None, None, np.zeros((2, 3, 2)))}, ValueError,
     r"out\[2\] must be None"),
    ({"out": (np.zeros((2, 3)), None, None)}, ValueError, r"out\[0\] \(d_query\): expected shape"),
    ({"out": (np.zeros((2, 2), np.float32), None, None)}, TypeError, "dtype float32"),
    ({"out": (np.zeros((2, 2)).T, None, None)}, ValueError, "C-contiguous"),
    ({"out": (np.ma.zeros((2, 2)), None, None)}, TypeError,  # the contract's rule
     r"out\[0\] \(d_query\): masked arrays .* are not accepted"),
])
def test_backward_bad_input(small, change, error, match) -> None:
    _, _, _, dc, cache = small
    args = {"d_context": dc, "cache": cache, **change}
    with pytest.raises(error, match=match):
        kcuda.attention_backward(args.pop("d_context"), args.pop("cache"), **args)


def test_backward_out_buffers_must_not_overlap(small) -> None:
    _, k, _, dc, cache = small
    buf = np.zeros(k.shape)
    with pytest.raises(ValueError, match=r"out\[1\] \(d_keys\): overlaps the memory of out\[2\]"):
        kcuda.attention_backward(dc, cache, out=(None, buf, buf))
    with pytest.raises(ValueError, match="overlaps the memory of d_context"):
        kcuda.attention_backward(dc, cache, out=(dc, None, None))


def test_device_out_buffers_get_the_contracts_checks(small) -> None:
    """On the device path `out` goes through the contract's checks too, on device arrays:
    dtype, shape, C-contiguity (the device message), no overlap with the inputs or each
    other."""
    q, k, v, dc, _ = small
    dq_, dk_, dv_, ddc = (cuda.to_device(a) for a in (q, k, v, dc))
    cache = kcuda.attention_forward(dq_, dk_, dv_, _warps=1)[2]
    buf = cuda.device_array(k.shape)
    for out, error, match in [
        ((cuda.device_array(q.shape, np.float32), None, None), TypeError,
         r"out\[0\] \(d_query\): dtype float32 does not match"),
        ((cuda.device_array((2, 3)), None, None), ValueError,
         r"out\[0\] \(d_query\): expected shape like the gradient = \(2, 2\)"),
        ((cuda.device_array(q.shape, order="F"), None, None), ValueError,
         r"out\[0\] \(d_query\): expected a C-contiguous device array"),
        ((None, dk_, None), ValueError, r"out\[1\] \(d_keys\): overlaps the memory of keys"),
        ((None, buf, buf), ValueError, r"out\[1\] \(d_keys\): overlaps the memory of out\[2\]"),
        ((ddc, None, None), ValueError, "overlaps the memory of d_context"),
        ((np.zeros(q.shape), None, None), TypeError,
         r"out\[0\] \(d_query\): the forward's inputs were on the device"),
    ]:
        with pytest.raises(error, match=match):
            kcuda.attention_backward(ddc, cache, out=out)


def test_sum_kv_needs_one_shape() -> None:
    q, k, v, dc = make_inputs(1, 2, 2, 3, np.float64, seed=10)
    cache = kcuda.attention_forward(q, k, v, _warps=1)[2]
    with pytest.raises(ValueError, match="sum_kv: d_keys \\+ d_values needs"):
        kcuda.attention_backward(dc, cache, sum_kv=True)


def test_import_needs_no_driver() -> None:
    """`kernels` does not import kernels.cuda, and `is_available` reports numba's answer."""
    import subprocess
    import sys

    code = ("import sys, kernels; assert 'kernels.cuda' not in sys.modules; "
            "import kernels.cuda as kc; print(kc.is_available())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, env={"PATH": "", "NUMBA_ENABLE_CUDASIM": "0"})
    assert result.stdout.strip() in ("True", "False")
    assert kcuda.is_available() is True
