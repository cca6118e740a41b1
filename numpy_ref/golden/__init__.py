r"""Golden vectors: numpy_ref's answers stored as files, an oracle for other languages.

An implementation of these ops in C, Rust, CUDA or anything else can test itself against
`numpy_ref` without running Python: read a case's inputs, parameters and cotangents from its
file, run your forward and backward, and compare your outputs and gradients with the stored
ones under the stored tolerances. The files follow torch's semantics (each case says which
torch call it is; the tests re-run some of them in torch).

    python -m numpy_ref.golden write DIR [--only PATTERN]   # every case, or those matching
    python -m numpy_ref.golden verify DIR                   # recompute and check everything
    python -m numpy_ref.golden list [DIR]                   # the cases (and their tensors)
    python -m numpy_ref.golden write --format onnx DIR      # ONNX node tests (onnx_export)

Files
-----
``DIR/manifest.json`` and one ``DIR/<case>.safetensors`` per case. A case is named
``<family>-<config>-<dtype>`` (lowercase, words joined by ``_``, dtype ``float64`` or
``float32``), e.g. ``lstm_cell-basic-float64``, ``attention-scaled_dot_lengths-float32``.

A .safetensors file is an 8-byte little-endian u64 N, then N bytes of JSON header
``{"<tensor>": {"dtype": "F64"|"F32"|"I64"|"BOOL", "shape": [...], "data_offsets": [begin,
end]}, ..., "__metadata__": {str: str}}``, then the raw little-endian C-order data (offsets
count from the end of the header). The tensors of a case:

    input.<arg>            the op's inputs (token ids and lengths I64, masks BOOL)
    param.<key>            parameters, under their torch state_dict names (weight_ih_l0,
                           embedding.weight, out_proj.weight, ...)
    cotangent.<d_output>   the gradients fed to the backward (d_h_new, d_context, d_logits)
    output.<name>          the forward's results
    grad.d_<input>         gradients of the float inputs (grad.d_x, grad.d_query)
    grad.d_<key>           gradients of the parameters (grad.d_weight_ih_l0,
                           grad.d_embedding.weight); a gradient the op does not give is absent
    cache.<field>          intermediates, for debugging (cache.gates, cache.scores)

Every float tensor of a case has the case's dtype. In a float32 case the inputs, params and
cotangents are float32 values, and the outputs and gradients stored are the float64
computation on exactly those values, rounded to float32: the most accurate float32 answer.

``__metadata__`` holds ``case``, ``family``, ``config``, ``op`` (the family: ``lstm_cell``,
``attention``, ...: what a consumer dispatches on), ``functions`` (the numpy_ref pair that
computes it), ``dtype``, ``semantics`` (what the case computes, in torch's terms), the case's
options (strings as they are, floats as Python's repr, anything else as JSON: ``score`` =
``scaled_dot``, ``scale`` = ``0.4472135954999579``, ``bidirectional`` = ``true``), and
``atol.<tensor>`` / ``rtol.<tensor>`` (repr of a float) for every output, grad and cache
tensor, so a consumer needs only the one file. The manifest repeats all of it per case
(``file``, ``sha256``, ``size``, ``seed``, ``semantics``, ``options`` as JSON values, and per
tensor its ``role``, ``dtype``, ``shape`` and tolerances).

Tolerances
----------
An implementation passes a tensor when ``|got - want| <= atol + rtol * |want|`` elementwise.

- float64: rtol = atol = 1e-7 (torch.testing's float64 defaults).
- float32: rtol = 0 and ``atol = factor * err + 8 * eps32 * scale``, the project's float32
  policy: err is the max error of a plain float32 implementation (numpy_ref run in float32)
  against the float64 answer, factor 2 for outputs and caches and 3 for gradients, scale is
  max|want| of the tensor for outputs and, for gradients, the largest gradient magnitude of
  the whole case (a small gradient next to large ones comes from cancelling sums, whose
  rounding scales with the terms), never below 1e-30 (so a tensor of zeros has a positive
  tolerance). eps32 = 2**-23.

``verify`` recomputes each case from its stored inputs with numpy_ref and checks (a) the
float64 recomputation against the stored values within a tight consistency bound (float64:
1e-10 of the scale; float32: that plus eps32 * |want|, room for the rounding), (b) the
recomputation in the case's dtype against the stored values under the stored tolerances (for
float32 that is numpy_ref run in float32, the check any float32 implementation faces), (c)
every sha256, and (d) that the manifest, the metadata and the files agree on names, shapes and
dtypes. It exits 1 naming the case, the tensor, the worst index, got, want and the allowed
error.

Reading a file
--------------
From Python, with the safetensors package (no NumPy code needed)::

    from safetensors.torch import load_file      # or safetensors.numpy, .flax, ...
    t = load_file("golden/lstm_cell-basic-float64.safetensors")   # {name: tensor}

    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()                       # {"case": ..., "atol.output.h_new": ...}

or with the standard library alone (``struct``, ``json``, ``array``): read the u64 N, parse
the JSON header, and ``array.array("d")`` / ``"f"`` / ``"q"`` the bytes at ``8 + N +
data_offsets``. From C: ``examples/c/golden_check.c`` reads these files with libc alone (its
own JSON reader for the header), runs a plain C LSTM cell and attention on the four cases
``lstm_cell-basic-*`` and ``attention-scaled_dot_lengths-*`` and applies the tolerance rule
below; replace its functions with calls into your code to check yours.

Determinism
-----------
Each configuration's data come from ``numpy.random.default_rng(zlib.crc32(b"<family>-<config>"))``
drawn in float64 (the float32 case holds the same draws rounded), and the metadata keys are
written sorted, so two ``write`` runs on one machine produce byte-identical files.
"""

from numpy_ref.golden import cases as _cases  # noqa: F401  (registers every case at import)
from numpy_ref.golden import transformer_cases as _transformer_cases  # noqa: F401  (the same)
from numpy_ref.golden.cli import main
from numpy_ref.golden.files import build_case, cast, read_file, write
from numpy_ref.golden.registry import (
    CONFIGS,
    DTYPES,
    FORMAT,
    MANIFEST,
    ROLES,
    VERSION,
    Config,
    all_cases,
)
from numpy_ref.golden.verify import verify, verify_case

__all__ = ["CONFIGS", "DTYPES", "FORMAT", "MANIFEST", "ROLES", "VERSION", "Config", "all_cases",
           "build_case", "cast", "main", "read_file", "verify", "verify_case", "write"]
