"""Writing golden files: a case's tensors, tolerances and metadata as a .safetensors file, and
the manifest (the format is the `numpy_ref.golden` package docstring).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from numpy_ref.golden.registry import (
    CHECKED_ROLES,
    F64_TOL,
    FORMAT,
    MANIFEST,
    ROLES,
    SCALE_FLOOR,
    VERSION,
    Arrays,
    Config,
    all_cases,
)
from numpy_ref.testing import float32_allowance

# --------------------------------------------------------------------------------------------
# tolerances and files


def float_dtype(dtype: str) -> type:
    return np.float64 if dtype == "float64" else np.float32


def cast(arrays: Mapping[str, np.ndarray], dtype: Any) -> Arrays:
    """Float arrays to `dtype`; integer and bool arrays as they are."""
    return {k: np.array(v, dtype=dtype if np.issubdtype(v.dtype, np.floating) else v.dtype,
                        order="C") for k, v in arrays.items()}


def compute(config: Config, inputs: Arrays, params: Arrays, cots: Arrays, dtype: Any
         ) -> dict[str, Arrays]:
    """The config's computation in `dtype`, as {role: {name: array}} for the checked roles."""
    outputs, grads, cache = config.run(cast(inputs, dtype), cast(params, dtype),
                                       cast(cots, dtype))
    return {"output": dict(outputs), "grad": dict(grads), "cache": dict(cache)}


def tolerances(dtype: str, want: dict[str, Arrays], low: dict[str, Arrays] | None
                ) -> dict[str, tuple[float, float]]:
    """{"<role>.<name>": (atol, rtol)} of every checked tensor (see the module docstring).

    want : the float64 answers.  low : numpy_ref's float32 results (float32 cases only).
    """
    tol = {}
    if dtype == "float64":
        for role in CHECKED_ROLES:
            for name in want[role]:
                tol[f"{role}.{name}"] = (F64_TOL, F64_TOL)
        return tol
    assert low is not None
    grad_scale = max((float(np.abs(g).max()) for g in want["grad"].values() if g.size),
                     default=0.0)
    for role in CHECKED_ROLES:
        for name, w in want[role].items():
            err = float(np.abs(low[role][name].astype(np.float64) - w).max()) if w.size else 0.0
            scale = grad_scale if role == "grad" else (float(np.abs(w).max()) if w.size else 0)
            atol = float32_allowance(err, max(scale, SCALE_FLOOR), grad=role == "grad")
            tol[f"{role}.{name}"] = (float(np.float64(atol)), 0.0)
    return tol


def option_str(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        return repr(v)
    return json.dumps(v)


def _canonical(data: bytes) -> bytes:
    """The safetensors bytes with the header's ``__metadata__`` keys sorted.

    safetensors writes its metadata from a hash map, in an order that changes from process to
    process; sorting the keys (same bytes, same length, so every offset holds) makes two
    writes identical.
    """
    (n,) = struct.unpack("<Q", data[:8])
    raw = data[8:8 + n]
    header = json.loads(raw)
    meta = header.pop("__metadata__", None)
    new = {} if meta is None else {"__metadata__": dict(sorted(meta.items()))}
    new.update(header)
    text = json.dumps(new, separators=(",", ":"), ensure_ascii=False).encode()
    stripped = raw.rstrip(b" ")
    if len(text) != len(stripped) or json.loads(text) != json.loads(stripped):
        raise RuntimeError("safetensors header could not be canonicalised")  # pragma: no cover
    return data[:8] + text + raw[len(text):] + data[8 + n:]


def st_dtype(a: np.ndarray) -> str:
    return {"float64": "F64", "float32": "F32", "int64": "I64", "bool": "BOOL"}[a.dtype.name]


def build_case(config: Config, dtype: str) -> tuple[Arrays, dict[str, str], dict[str, Any]]:
    """Compute one case: (tensors {prefixed name: array}, metadata, manifest entry)."""
    save = safetensors_module().numpy.save

    rng = np.random.default_rng(config.seed)
    drawn = config.make(rng)
    fdt = float_dtype(dtype)
    stored = {role: cast(a, fdt) for role, a in zip(ROLES[:3], drawn, strict=True)}
    want = compute(config, *stored.values(), np.float64)
    low = compute(config, *stored.values(), np.float32) if dtype == "float32" else None
    tol = tolerances(dtype, want, low)
    tensors: Arrays = {}
    for role in ROLES:
        for name, a in (stored[role] if role in stored else want[role]).items():
            tensors[f"{role}.{name}"] = np.array(
                a, dtype=fdt if np.issubdtype(a.dtype, np.floating) else a.dtype, order="C")
    name = config.case(dtype)
    meta = {"case": name, "family": config.family, "config": config.config, "op": config.op,
            "functions": config.functions, "dtype": dtype, "semantics": config.semantics,
            **{k: option_str(v) for k, v in config.options.items()}}
    for t, (atol, rtol) in tol.items():
        meta[f"atol.{t}"] = repr(atol)
        meta[f"rtol.{t}"] = repr(rtol)
    data = _canonical(save(tensors, metadata=meta))
    entry = {
        "file": f"{name}.safetensors",
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "family": config.family,
        "config": config.config,
        "dtype": dtype,
        "op": config.op,
        "functions": config.functions,
        "seed": config.seed,
        "semantics": config.semantics,
        "options": config.options,
        "tensors": {
            t: {"role": t.split(".", 1)[0], "dtype": st_dtype(a), "shape": list(a.shape),
                **({"atol": tol[t][0], "rtol": tol[t][1]} if t in tol else {})}
            for t, a in tensors.items()},
    }
    return tensors, meta, {"data": data, "entry": entry}


def matches(name: str, patterns: Sequence[str] | None) -> bool:
    if not patterns:
        return True
    return any(fnmatch.fnmatchcase(name, p) if any(ch in p for ch in "*?[") else p in name
               for p in patterns)


def write(directory: str | Path, only: Sequence[str] | None = None) -> dict[str, Any]:
    """Write the cases matching `only` (all when None) and the manifest into `directory`.

    Files of a previous manifest in the directory that this one does not list are removed.
    Returns the manifest.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    selected = [(n, c, d) for n, c, d in all_cases() if matches(n, only)]
    if not selected:
        raise ValueError(f"no case matches {list(only or [])}")
    old = out / MANIFEST
    stale: set[str] = set()
    if old.exists():
        try:
            stale = {e["file"] for e in json.loads(old.read_text())["cases"].values()}
        except (ValueError, KeyError, TypeError):
            stale = set()
    cases = {}
    for name, config, dtype in selected:
        _, _, built = build_case(config, dtype)
        (out / built["entry"]["file"]).write_bytes(built["data"])
        cases[name] = built["entry"]
    for f in stale - {e["file"] for e in cases.values()}:
        if "/" not in f and f.endswith(".safetensors"):
            (out / f).unlink(missing_ok=True)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "written_by": "python -m numpy_ref.golden write",
        "tolerance_rule": (
            "pass when |got - want| <= atol + rtol * |want| elementwise; float64: rtol = "
            "atol = 1e-7; float32: rtol = 0, atol = factor * err + 8 * eps32 * scale (err: "
            "numpy_ref in float32 against the float64 answer; factor 2 outputs and caches, 3 "
            "gradients; scale: max|want|, for gradients the case's largest gradient "
            f"magnitude; scale >= {SCALE_FLOOR!r})"),
        "cases": cases,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest



def safetensors_module() -> Any:
    """The safetensors package (the golden extra), imported on first use: numpy_ref itself needs
    NumPy alone."""
    try:
        import safetensors
        import safetensors.numpy
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "golden files are safetensors files: pip install 'lstm-attention-reference[golden]' "
            "(or pip install safetensors)") from e
    return safetensors


def read_file(path: Path) -> tuple[Arrays, dict[str, str]]:
    with safetensors_module().safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
