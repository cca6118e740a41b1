"""Verifying golden files: every case recomputed with numpy_ref and held to its stored
tolerances, every hash and every name, shape and dtype checked against the manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from numpy_ref.golden.files import compute, float_dtype, option_str, read_file, st_dtype, tolerances
from numpy_ref.golden.registry import (
    CHECKED_ROLES,
    CONFIGS,
    CONSISTENCY,
    FORMAT,
    MANIFEST,
    ROLES,
    SCALE_FLOOR,
    TOL_SLACK,
    VERSION,
    Arrays,
    all_cases,
)
from numpy_ref.testing import EPS32, compare

# --------------------------------------------------------------------------------------------
# verify


def _compare(name: str, got: np.ndarray, want: np.ndarray, *, rtol: float, atol: float
             ) -> str | None:
    """None when ``|got - want| <= atol + rtol * |want|`` everywhere, else a message naming the
    worst index, got, want and the allowed error (`numpy_ref.testing.compare`)."""
    result = compare(name, got, want, rtol=rtol, atol=atol)
    return None if result.ok else str(result)



def verify_case(directory: Path, name: str, entry: Mapping[str, Any]) -> list[str]:
    """Every problem of one case, as messages starting with the case name ([] when it passes)."""
    problems: list[str] = []

    def bad(msg: str) -> None:
        problems.append(f"{name}: {msg}")

    if name not in {n for n, _, _ in all_cases()}:
        bad("not a case this module knows (no way to recompute it)")
        return problems
    stem, dtype = name.rsplit("-", 1)
    config = CONFIGS[stem]
    path = directory / str(entry.get("file", ""))
    if entry.get("file") != f"{name}.safetensors" or not path.is_file():
        bad(f"file {entry.get('file')!r} missing (expected {name}.safetensors)")
        return problems
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        bad(f"sha256 of {path.name} is {hashlib.sha256(data).hexdigest()}, the manifest says "
            f"{entry.get('sha256')}")
    if entry.get("size") != len(data):
        bad(f"size of {path.name} is {len(data)} bytes, the manifest says {entry.get('size')}")
    for key, want in (("dtype", dtype), ("family", config.family), ("config", config.config),
                      ("op", config.op), ("functions", config.functions),
                      ("semantics", config.semantics),
                      ("options", config.options), ("seed", config.seed)):
        if entry.get(key) != want:
            bad(f"manifest {key} is {entry.get(key)!r}, expected {want!r}")
    try:
        tensors, meta = read_file(path)
    except Exception as e:  # a damaged file: say so and stop
        bad(f"cannot read {path.name}: {e}")
        return problems
    listed = entry.get("tensors", {})
    for t in sorted(set(listed) - set(tensors)):
        bad(f"tensor {t} is in the manifest but not in the file")
    for t in sorted(set(tensors) - set(listed)):
        bad(f"tensor {t} is in the file but not in the manifest")
    fdt = float_dtype(dtype)
    for t, a in tensors.items():
        info = listed.get(t)
        if info is None:
            continue
        if list(a.shape) != info.get("shape"):
            bad(f"tensor {t}: shape {list(a.shape)} in the file, {info.get('shape')} in the "
                "manifest")
        if st_dtype(a) != info.get("dtype"):
            bad(f"tensor {t}: dtype {st_dtype(a)} in the file, {info.get('dtype')} in the "
                "manifest")
        if np.issubdtype(a.dtype, np.floating) and a.dtype != fdt:
            bad(f"tensor {t}: dtype {a.dtype}, the case is {dtype}")
        if t.split(".", 1)[0] not in ROLES or t.split(".", 1)[0] != info.get("role"):
            bad(f"tensor {t}: role {info.get('role')!r} does not match its name")
    want_meta = {"case": name, "family": config.family, "config": config.config,
                 "op": config.op, "functions": config.functions, "dtype": dtype,
                 "semantics": config.semantics,
                 **{k: option_str(v) for k, v in config.options.items()}}
    for t, info in listed.items():
        if "atol" in info:
            want_meta[f"atol.{t}"] = repr(float(info["atol"]))
            want_meta[f"rtol.{t}"] = repr(float(info["rtol"]))
    for k in sorted(set(want_meta) | set(meta)):
        if meta.get(k) != want_meta.get(k):
            bad(f"metadata {k!r} is {meta.get(k)!r}, expected {want_meta.get(k)!r}")
    split: dict[str, Arrays] = {r: {} for r in ROLES}
    for t, a in tensors.items():
        role, _, rest = t.partition(".")
        if role in split:
            split[role][rest] = a
    try:
        exact = compute(config, split["input"], split["param"], split["cotangent"], np.float64)
        own = exact if dtype == "float64" else compute(config, split["input"], split["param"],
                                                    split["cotangent"], np.float32)
    except Exception as e:
        bad(f"numpy_ref failed on the stored inputs: {type(e).__name__}: {e}")
        return problems
    grad_scale = max((float(np.abs(g).max()) for g in exact["grad"].values() if g.size),
                     default=0.0)
    # The stored tolerances must be the policy's, recomputed here: a float64 one or a
    # float32 one at most TOL_SLACK times it (another BLAS rounds the float32 run a little
    # differently), so an inflated tolerance cannot make a wrong value pass.
    policy = tolerances(dtype, exact, None if dtype == "float64" else own)
    for t, (atol, rtol) in sorted(policy.items()):
        info = listed.get(t, {})
        if "atol" not in info:
            continue
        stored_atol, stored_rtol = float(info["atol"]), float(info["rtol"])
        if stored_rtol != rtol or not stored_atol <= TOL_SLACK * atol:
            bad(f"{t}: stored tolerance atol={stored_atol:.3g}, rtol={stored_rtol:.3g}; the "
                f"policy gives atol={atol:.3g}, rtol={rtol:.3g}")
    for role in CHECKED_ROLES:
        for t in sorted(set(exact[role]) - set(split[role])):
            bad(f"{role}.{t} is computed but not stored")
        for t in sorted(set(split[role]) - set(exact[role])):
            bad(f"{role}.{t} is stored but not computed")
        for t in sorted(set(exact[role]) & set(split[role])):
            full = f"{role}.{t}"
            stored, w = split[role][t], exact[role][t]
            if stored.shape != w.shape:
                bad(f"{full}: stored shape {list(stored.shape)}, computed {list(w.shape)}")
                continue
            scale = grad_scale if role == "grad" else (float(np.abs(w).max()) if w.size else 0)
            msg = _compare(full, stored, w, rtol=0.0 if dtype == "float64" else EPS32,
                           atol=CONSISTENCY * max(scale, SCALE_FLOOR))
            if msg:
                bad(f"[stored vs numpy_ref float64] {msg}")
            info = listed.get(full, {})
            if "atol" not in info:
                continue
            msg = _compare(full, own[role][t], stored, rtol=float(info["rtol"]),
                           atol=float(info["atol"]))
            if msg:
                bad(f"[numpy_ref {dtype} vs stored, stored tolerance] {msg}")
    return problems


def verify(directory: str | Path) -> list[str]:
    """Every problem of the golden directory (see the module docstring); [] when it passes."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        cases = manifest["cases"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{directory / MANIFEST}: cannot read the manifest ({e})"]
    if not isinstance(cases, dict) or not all(isinstance(e, dict) for e in cases.values()):
        return [f"{directory / MANIFEST}: 'cases' must map each case name to its entry"]
    if not cases:
        return [f"{directory / MANIFEST}: lists no case (nothing would be verified)"]
    problems = []
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        problems.append(f"manifest: format {manifest.get('format')!r} version "
                        f"{manifest.get('version')!r}, expected {FORMAT!r} {VERSION}")
    listed = {str(e.get("file")) for e in cases.values()}
    for f in sorted(p.name for p in directory.glob("*.safetensors")):
        if f not in listed:
            problems.append(f"{f}: a file the manifest does not list")
    for name, entry in cases.items():
        problems.extend(verify_case(directory, name, entry))
    return problems
