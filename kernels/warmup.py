"""Compile every kernel ahead of use: ``kernels.warmup()``.

A Numba kernel compiles on its first call with a new combination of argument types (float32 or
float64, contiguous or broadcast views, read-only or not), which takes about a second per
kernel: a first attention or LSTM call of a fresh install can take tens of seconds. The
kernels are compiled with ``cache=True``, so the machine code lands next to the sources
(``__pycache__``) and later processes load it in milliseconds. `warmup` makes that first cost
explicit, with a progress bar: it calls every public op of this package, forward and backward,
in both dtypes, on tiny inputs that reach each compiled path (the fused single-query core with
and without masks and bias, the flash path with heads and grouped queries, every score, each
with and without the weights, the LSTM with lengths and projections, the layers, the layer
norm on one thread and on several, GELU exact and tanh, and the optimizers). Masks and
biases are warmed up both broadcast and full-shape; read-only input arrays (``flags.writeable``
False) are a type of their own and still compile on their first call.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

_DTYPES = (np.float32, np.float64)


def _attention_calls(k, dtype) -> list[tuple[str, Callable[[], object]]]:
    rng = np.random.default_rng(0)

    def arr(*shape):
        return rng.standard_normal(shape).astype(dtype)

    B, Tq, Tk, H, A = 2, 3, 5, 4, 6
    lengths = np.array([Tk, 2])
    general = {"W": arr(H, H)}
    additive = {"W_query": arr(A, H), "W_key": arr(A, H), "v": arr(A), "b": arr(A)}
    mask = rng.random(Tk) > 0.3
    mask[0] = True

    def both(query, keys, values, **kw):
        def run():
            context, weights, cache = k.attention_forward(query, keys, values, **kw)
            k.attention_backward(np.ones_like(context), cache, d_weights=np.ones_like(weights))
            if keys.shape == values.shape:
                k.attention_backward(np.ones_like(context), cache, sum_kv=True)
            context, _, cache = k.attention_forward(query, keys, values, need_weights=False,
                                                    **kw)
            k.attention_backward(np.ones_like(context), cache)
        return run

    q1, q3, kv = arr(B, H), arr(B, Tq, H), arr(B, Tk, H)
    q4, kv4 = arr(B, 4, Tq, H), arr(B, 2, Tk, H)
    # A mask or bias that broadcasts is passed to the kernels as a strided view, a full-shape
    # one as a contiguous array: Numba compiles each kind once, so both are warmed up.
    full = np.broadcast_to(mask, (B, Tk)).copy()
    full4 = np.broadcast_to(mask, (B, 4, Tq, Tk)).copy()
    calls = [
        ("attention, one query", both(q1, kv, kv, lengths=lengths)),
        ("attention, one query, mask and bias", both(q1, kv, kv, mask=mask, bias=arr(B, Tk))),
        ("attention, one query, full mask", both(q1, kv, kv, mask=full, bias=arr(Tk))),
        ("attention, one query, full mask and bias", both(q1, kv, kv, mask=full,
                                                          bias=arr(B, Tk))),
        ("attention, one query, general", both(q1, kv, kv, score="general", params=general)),
        ("attention, many queries", both(q3, kv, kv, lengths=lengths, causal=True)),
        ("attention, many queries, mask and bias", both(q3, kv, kv, mask=mask,
                                                        bias=arr(Tq, Tk))),
        ("attention, additive", both(q3, kv, kv, score="additive", params=additive)),
        ("attention, one query, additive", both(q1, kv, kv, score="additive",
                                                params=additive, lengths=lengths)),
        ("attention, heads (grouped)", both(q4, kv4, kv4, score="scaled_dot", causal=True)),
        ("attention, heads, mask and bias", both(q4, kv4, kv4, mask=mask, bias=arr(Tq, Tk))),
        ("attention, heads, full mask and bias", both(q4, kv4, kv4, mask=full4,
                                                      bias=arr(B, 4, Tq, Tk))),
    ]

    def softmax():
        for scores in (arr(B, Tk), arr(B, Tq, Tk)):
            w, cache = k.masked_softmax_forward(scores, lengths)
            k.masked_softmax_backward(np.ones_like(w), cache)

    def decoder_step():
        s, cache = k.additive_scores_forward(arr(B, A), arr(B, Tk, A), arr(A))
        k.additive_scores_backward(np.ones_like(s), cache)
        w, _ = k.masked_softmax_forward(s, lengths)
        c, cache = k.weighted_sum_forward(w, kv)
        k.weighted_sum_backward(np.ones_like(c), cache)

    return [*calls, ("masked softmax", softmax), ("decoder step", decoder_step)]


def _other_calls(k, dtype) -> list[tuple[str, Callable[[], object]]]:
    from numpy_ref import init_gru_params, init_lstm_params, init_rnn_params

    rng = np.random.default_rng(1)
    T, B, I, H = 4, 3, 5, 6

    def lstm(bidirectional: bool, proj_size: int, lengths):
        def run():
            params = init_lstm_params(I, H, num_layers=2, bidirectional=bidirectional,
                                      proj_size=proj_size, rng=0, dtype=dtype)
            x = rng.standard_normal((T, B, I)).astype(dtype)
            out, _, cache = k.lstm_forward(x, params, num_layers=2, bidirectional=bidirectional,
                                           lengths=lengths)
            k.lstm_backward(np.ones_like(out), cache)
        return run

    def gru_rnn(op: str, **options):
        def run():
            init = init_gru_params if op == "gru" else init_rnn_params
            params = init(I, H, num_layers=2, bidirectional=True, rng=0, dtype=dtype)
            x = rng.standard_normal((T, B, I)).astype(dtype)
            out, _, cache = getattr(k, f"{op}_forward")(x, params, num_layers=2,
                                                        bidirectional=True,
                                                        lengths=np.array([4, 2, 1]), **options)
            getattr(k, f"{op}_backward")(np.ones_like(out), cache)
        return run

    def layers():
        logits = rng.standard_normal((B, 7)).astype(dtype)
        targets = np.array([1, 0, 6])
        loss, cache = k.cross_entropy_forward(logits, targets, label_smoothing=0.1)
        k.cross_entropy_backward(np.ones_like(loss), cache)
        probabilities = np.full_like(logits, 1 / 7)  # class probabilities as targets
        loss, cache = k.cross_entropy_forward(logits, probabilities)
        k.cross_entropy_backward(np.ones_like(loss), cache)
        out, cache = k.embedding_forward(np.array([[0, 2], [1, 1]]), {"weight": logits})
        k.embedding_backward(np.ones_like(out), cache)

    def layer_norm():
        from kernels import layer_norm as ln

        x = rng.standard_normal((3, 8)).astype(dtype)
        w, b = rng.standard_normal(8).astype(dtype), rng.standard_normal(8).astype(dtype)
        # the serial kernels, then (every call on the threads for a moment) the parallel ones
        for parallel_min in (ln._PARALLEL_MIN, 0):
            saved, ln._PARALLEL_MIN = ln._PARALLEL_MIN, parallel_min
            try:
                for params, variant in (({"weight": w, "bias": b}, "torch"), ({}, "annotated")):
                    y, cache = k.layer_norm_forward(x, params, variant=variant)
                    k.layer_norm_backward(np.ones_like(y), cache)
            finally:
                ln._PARALLEL_MIN = saved

    def gelu():
        x = rng.standard_normal((3, 5)).astype(dtype)
        for approximate in ("none", "tanh"):
            y, cache = k.gelu_forward(x, approximate=approximate)
            k.gelu_backward(np.ones_like(y), cache)

    def optimizers():
        params = {"w": rng.standard_normal((3, 4)).astype(dtype)}
        grads = {"w": np.ones_like(params["w"])}
        for opt in (k.Adam(params), k.AdamW(params), k.SGD(params, lr=0.1, momentum=0.9)):
            opt.step(grads)

    return [("LSTM", lstm(False, 0, None)),
            ("LSTM, bidirectional, lengths", lstm(True, 0, np.array([4, 2, 1]))),
            ("LSTM, projections", lstm(True, 3, np.array([4, 2, 1]))),
            ("GRU", gru_rnn("gru")),
            ("GRU, linear_before_reset=False", gru_rnn("gru", linear_before_reset=False)),
            ("RNN, tanh", gru_rnn("rnn")), ("RNN, relu", gru_rnn("rnn", nonlinearity="relu")),
            ("cross-entropy, embedding", layers), ("layer norm", layer_norm), ("GELU", gelu),
            ("optimizers", optimizers)]


def warmup(*, progress: bool = True) -> dict[str, float]:
    """Compile (or load from the on-disk cache) every kernel, for float32 and float64.

    Parameters
    ----------
    progress : show a tqdm progress bar (on stderr) while compiling.

    Returns
    -------
    seconds : {"<op>, <dtype>": seconds} of each warm-up call: a few seconds each the first time
    on a machine, milliseconds once the cache holds them.
    """
    import kernels

    calls = [(f"{name}, {np.dtype(dtype).name}", run) for dtype in _DTYPES
             for name, run in _attention_calls(kernels, dtype) + _other_calls(kernels, dtype)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(calls), desc="compiling kernels", unit="op")
    seconds: dict[str, float] = {}
    for name, run in calls:
        if bar is not None:
            bar.set_postfix_str(name)
        start = time.perf_counter()
        run()
        seconds[name] = time.perf_counter() - start
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return seconds
