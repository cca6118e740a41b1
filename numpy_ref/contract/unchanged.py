"""Arrays changed in place between a forward and its backward: refused, not differentiated.

A cache holds references to the caller's arrays, not copies: the inputs and params a backward
reads (``x`` for ``d_weight_ih = da^T x``, ``params['weight_hh_l0']`` for ``d_h = da W_hh``),
and the outputs it reads (the attention weights). Change one of them in place before the
backward (``x[:] += 1``) and its gradients would mix two sets of inputs, silently; torch raises
there ("one of the variables needed for gradient computation has been modified by an inplace
operation"). So does every backward here: the forward `record`s a fingerprint of each such
array, exactly those its backward reads and the forward did not copy (an array it copied
cannot change; see `shared`), and the backward `check`s them before anything else and raises
`InputChanged`, a `ValueError` that names the argument and both ops. Changing them after the
backward (an optimizer's step) is what training does, and nothing checks it. A write that
leaves every bit as it was is no change (torch's version counter would still count it).

A composite op (multi-head attention, the models) calls public op pairs, whose own checks see
its caller's arrays; `reported_as` renames what they find to the composite's argument and ops.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple

import numpy as np

from numpy_ref.contract.fields import documented

# --------------------------------------------------------------------------------------------
# the fingerprint

_WORDS = 1 << 15  # uint64 words per chunk: 256 KiB, held in L2 with its temporary
_EXACT = 8 * _WORDS  # bytes up to which an array is kept whole instead (one chunk's worth)
_PIECE = 1 << 21  # elements copied at a time from an array whose memory is not one block
_COEFFICIENTS = (np.random.default_rng(0x5EED).integers(
    np.iinfo(np.uint64).max, size=_WORDS, dtype=np.uint64, endpoint=True) | np.uint64(1))
_SHIFT = np.uint64(29)


@documented
class Fingerprint(NamedTuple):
    """An array's layout and contents: its bytes, or one checksum per chunk of them (see
    `fingerprint`)."""

    shape: tuple[int, ...]  # the array's shape
    strides: tuple[int, ...]  # its strides, in bytes
    dtype: str  # its dtype (``dtype.str``)
    contents: bytes  # up to 256 KiB: the bytes themselves (C order); else the checksums of
    #                  its chunks, uint64 each, in order


def fingerprint(a: np.ndarray) -> Fingerprint:
    """The layout and contents of `a`, to compare with a later `fingerprint` of the same array.

    An array of at most 256 KiB is kept whole, a copy of its bytes: the comparison is exact,
    and cheaper (0.1 to 10 us, where a checksum's calls alone take 10 us). A larger one is
    read as uint64 words (the last 1 to 7 bytes padded with zeros into one more), in chunks
    of 2^15 words, each chunk's checksum

        sum_i  k_i g(w_i)  mod 2^64,     g(w) = w ^ (w >> 29),

    with fixed random odd coefficients k_i, one checksum per chunk, so a permutation that moves
    whole chunks shows too. g is invertible and an odd k_i is invertible mod 2^64, so a change
    of one element changes its chunk's checksum, always. A permutation goes unseen only by
    chance: two words a and b swapped, with probability 2^(t - 63), where t counts the trailing
    zero bits of d ^ (d >> 29), d = a ^ b; t < 34, at most 2^-30, unless d's low bits repeat its
    bits 29 places up (a sign flip alone gives t = 34). The shift brings each word's top bits
    down into the product: without it t would count d's own trailing zeros, 52 for 1.0 and 2.0
    in float64 (a one-hot row reversed, unseen with probability 2^-11). Memory that is not one
    block (strided, a negative step) is copied 2^21 elements at a time in C order; a broadcast
    axis (stride 0) is read once.

    Cost, measured on the 2-core machine these numbers come from (numpy 2.4; medians of
    interleaved runs, other jobs running): 17-19 ms for 128 MiB, about 7 GB/s. Measured
    against it: a plain ``a.view(np.uint64).sum()`` 4.3 ms (no position: blind to any
    permutation); the same checksum without the shift 16.6 ms (the weakness above); row and
    column sums of each 32 x 1021-word block 9-10 ms (blind to permutations that keep them,
    equal values in a rectangle); ``zlib.crc32`` 37 ms; ``hashlib.sha1`` 70 ms. A forward
    and its backward each take it once per array, so against numpy_ref's own forward +
    backward at the benchmark's default sizes, float32:

    - attention, one query per row, B256 T512 H256, keys is values (one 128 MiB array): 2 x
      18 ms on 147-170 ms, ratios of 0.20 to 0.26 over five runs (0.16 to 0.19 with the row and
      column sums, about 0.22 without the shift): more than the 0.1 aimed at, which none of
      them reaches on this memory-bound op, whose own passes over the 128 MiB cost about what
      a checksum's does;
    - LSTM T128 B64 I256 H256, bidirectional (x 8 MiB and the weights 4 MiB, twice): 3.5-4 ms
      on 475 ms, 0.008 (on the kernels' 320-330 ms, 0.012);
    - a training step (forward, loss, backward) of the classifier (B64 T64 E128 H256 V1000),
      the Luong and the Bahdanau encoder-decoders (B32 T32 E128 H256 V4000): 2, 9 and 18 ms
      on 255, 290 and 630 ms, 0.01 to 0.03 (each array taken once per pass: `memoized`).
    """
    a = _compact(a)
    if a.nbytes <= _EXACT:
        return Fingerprint(a.shape, a.strides, a.dtype.str, a.tobytes())
    sums: list[np.ndarray] = []
    work = np.empty(_WORDS, np.uint64)
    for piece in _pieces(a):
        _chunk_sums(piece.view(np.uint8), sums, work)
    return Fingerprint(a.shape, a.strides, a.dtype.str,
                       np.array(sums, np.uint64).tobytes())


def _compact(a: np.ndarray) -> np.ndarray:
    """`a` with each broadcast axis (stride 0) cut to length 1: the same memory, read once."""
    if 0 not in a.strides or a.size == 0:
        return a
    return a[tuple(slice(0, 1) if s == 0 else slice(None) for s in a.strides)]


def _pieces(a: np.ndarray) -> Iterator[np.ndarray]:
    """`a`'s elements as C-contiguous 1-D arrays: itself when its memory is one block (in
    memory order), else copies of at most about `_PIECE` elements, in C order."""
    if a.flags.c_contiguous:
        yield a.reshape(-1)
    elif a.flags.f_contiguous:
        yield a.T.reshape(-1)
    elif a.size <= _PIECE:
        yield np.ascontiguousarray(a).reshape(-1)
    else:
        step = max(1, _PIECE // (a.size // a.shape[0]))
        for start in range(0, a.shape[0], step):
            yield from _pieces(a[start:start + step])


def _chunk_sums(raw: np.ndarray, sums: list, work: np.ndarray) -> None:
    """Append one checksum per chunk of `_WORDS` words of the bytes `raw` (uint8, 1-D); `work`
    is room for one chunk (uint64)."""
    whole = raw.size - raw.size % 8
    words = raw[:whole].view(np.uint64)
    tail = raw[whole:]
    if tail.size:  # the last 1 to 7 bytes, padded with zeros into one word
        last = np.zeros(8, np.uint8)
        last[:tail.size] = tail
        sums.append(_checksum(last.view(np.uint64), work))
    for start in range(0, words.size, _WORDS):
        chunk = words[start:start + _WORDS]
        sums.append(_checksum(chunk if chunk.flags.aligned else chunk.copy(), work))


def _checksum(w: np.ndarray, work: np.ndarray) -> np.ndarray:
    """``sum_i k_i (w_i ^ (w_i >> 29)) mod 2^64`` for up to `_WORDS` uint64 words, computed
    in `work`."""
    t = work[:w.size]
    np.right_shift(w, _SHIFT, out=t)
    np.bitwise_xor(t, w, out=t)
    np.multiply(t, _COEFFICIENTS[:w.size], out=t)
    return np.add.reduce(t)  # integer arithmetic wraps mod 2^64, without a warning


# --------------------------------------------------------------------------------------------
# what a forward records and its backward checks


class InputChanged(ValueError):
    """An array a cache holds a reference to changed between the forward and the backward.

    `name` names it as the forward's caller knows it (``x``, ``params['weight_ih_l0']``, or an
    output such as ``weights``); `array` is the array itself."""

    def __init__(self, name: str, forward: str, backward: str, array: np.ndarray,
                 output: bool = False) -> None:
        advice = ("change a copy of it, or run the forward again" if output else
                  "pass a copy to the forward, or run the forward again")
        super().__init__(
            f"{name} changed between {forward} and {backward} (the cache holds a reference to "
            f"it, and the gradients would be those of other {'outputs' if output else 'inputs'}"
            f"): {advice}")
        self.name, self.forward, self.backward = name, forward, backward
        self.array, self.output = array, output


@documented
class Fingerprints(NamedTuple):
    """What a forward recorded of the caller's arrays its backward reads (see `record`)."""

    forward: str  # the op that recorded them, e.g. "lstm_forward"
    backward: str  # the op that checks them first, e.g. "lstm_backward"
    arrays: tuple[tuple[str, np.ndarray, Fingerprint, bool], ...]  # (name, the array itself,
    #       its fingerprint, whether it is one of the forward's outputs) for each


def shared(caller: np.ndarray | None, *held: np.ndarray | None) -> np.ndarray | None:
    """`caller` when one of the arrays a cache holds (`held`) may be a view of its memory, else
    None: an array the forward copied (padding zeroed, a strided input made contiguous) cannot
    change, and needs no fingerprint."""
    if not isinstance(caller, np.ndarray):
        return None
    return caller if any(h is not None and np.may_share_memory(caller, h) for h in held) else None


_RECORDING: ContextVar[bool] = ContextVar("numpy_ref_unchanged_recording", default=True)
_MEMO: ContextVar[dict[int, tuple[np.ndarray, Fingerprint]] | None] = ContextVar(
    "numpy_ref_unchanged_memo", default=None)


@contextmanager
def untracked() -> Iterator[None]:
    """Within it `record` records nothing (it returns None): around the public pairs an op
    calls on arrays whose fingerprints it records itself (attention_forward's scores, softmax
    and weighted sum), so that no array is fingerprinted twice and the error names the op the
    caller called."""
    token = _RECORDING.set(False)
    try:
        yield
    finally:
        _RECORDING.reset(token)


@contextmanager
def memoized() -> Iterator[None]:
    """Within it each array is fingerprinted once (the first `record` or `check` that meets it):
    around a composite's forward, and its backward, whose ops take the same arrays again and
    again (the Bahdanau decoder's cell weights and memory, once per step). Nothing within may
    write into an array it has fingerprinted, as no op and no composite here does. Also a
    decorator."""
    token = _MEMO.set({}) if _MEMO.get() is None else None
    try:
        yield
    finally:
        if token is not None:
            _MEMO.reset(token)


def _fingerprint(a: np.ndarray) -> Fingerprint:
    """`fingerprint(a)`, taken once per array within `memoized`."""
    memo = _MEMO.get()
    if memo is None:
        return fingerprint(a)
    seen = memo.get(id(a))
    if seen is None or seen[0] is not a:
        seen = memo[id(a)] = (a, fingerprint(a))  # the array kept: its id is not reused
    return seen[1]


def record(forward: str, backward: str, inputs: Iterable[tuple[str, np.ndarray | None]],
           outputs: Iterable[tuple[str, np.ndarray | None]] = ()) -> Fingerprints | None:
    """Fingerprint each (name, array) a forward's cache references and its backward reads: the
    caller's `inputs` (and params), and the forward's `outputs` the backward reads (the caller
    may change them too). None entries are skipped. One array given under several names (keys
    is values) is fingerprinted once, under its first name followed by the others. Returns
    None within `untracked`."""
    if not _RECORDING.get():
        return None
    entries: dict[int, tuple[str, np.ndarray, bool]] = {}
    for kind, named in ((False, inputs), (True, outputs)):
        for name, a in named:
            if a is None:
                continue
            if id(a) in entries:
                first, _, was_output = entries[id(a)]
                entries[id(a)] = (f"{first} (also {name})", a, was_output)
            else:
                entries[id(a)] = (name, a, kind)
    return Fingerprints(forward, backward, tuple(
        (name, a, _fingerprint(a), output) for name, a, output in entries.values()))


def check(fingerprints: Fingerprints | None) -> None:
    """Raise `InputChanged` for the first recorded array whose fingerprint differs now. A
    backward calls it before anything else; None (a cache whose forward recorded nothing, as
    the kernels' attention family) checks nothing."""
    if fingerprints is None:
        return
    for name, a, then, output in fingerprints.arrays:
        if _fingerprint(a) != then:
            raise InputChanged(name, fingerprints.forward, fingerprints.backward, a, output)


def names(inputs: Mapping[str, Any], outputs: Mapping[str, Any] | None = None
          ) -> tuple[tuple[str, np.ndarray, bool], ...]:
    """A composite's arguments and returned outputs by name, for `reported_as`: (name, array,
    whether it is an output) for each array, and for each array of a params dict (the
    ``params`` argument) under ``params['key']``; what is not an array (None) is left out."""
    out: list[tuple[str, np.ndarray, bool]] = []
    for output, named in ((False, inputs), (True, outputs or {})):
        for name, value in named.items():
            if name == "params" and isinstance(value, Mapping):
                out += [(f"params[{k!r}]", v, output) for k, v in value.items()
                        if isinstance(v, np.ndarray)]
            elif isinstance(value, np.ndarray):
                out.append((name, value, output))
    return tuple(out)


@contextmanager
def reported_as(forward: str, backward: str,
                named: Iterable[tuple[str, np.ndarray, bool]]) -> Iterator[None]:
    """Around a composite's backward: an `InputChanged` raised by one of the ops it calls, for
    an array that is (a view of) one of the composite's own arguments or returned outputs
    (`names`), is raised again naming that one and the composite's `forward` and `backward`.
    An array the composite made and kept to itself keeps the inner op's message (only a
    caller who changed the arrays a cache holds could see it)."""
    try:
        yield
    except InputChanged as e:
        for name, a, output in named:
            if np.may_share_memory(a, e.array):
                raise InputChanged(name, forward, backward, a, output) from e
        raise
