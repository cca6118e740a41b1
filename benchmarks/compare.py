"""Compare two runs of ``python -m benchmarks --json``: which rows got slower, which faster.

Rows are matched by the key (``id``, ``dtype``). For a row present in both runs, with medians
``old_s`` and ``new_s``:

- ``ratio = new_s / old_s`` (above 1 is slower);
- ``rel_iqr(row) = iqr_s / median_s`` of the row in its own run;
- ``drift(run) = |header.noise.probe_drift|`` (0 when null): how much a fixed probe moved
  between the start and the end of that run, i.e. the machine's own noise during it;
- ``band = max(MIN_BAND, rel_iqr_old + rel_iqr_new, drift_old, drift_new)``, with
  ``MIN_BAND = 0.10``: the relative change the two runs' noise can explain;
- the verdict is ``"slower"`` (a regression) when ``ratio > 1 + band``, ``"faster"`` when
  ``ratio < 1 / (1 + band)``, and ``"same"`` otherwise (the bounds themselves are "same").

A row whose status is ``"FAIL"`` in either run is untrusted (its result is wrong, or it
raised): its verdict is always ``"same"``, its ``trusted`` is False, and the comparison's notes
name it. Rows that are ``"too small"`` (their ceiling is a call's overhead, but their own time
is looped and real), ``"noisy"`` (their samples spread wide; a wide IQR widens their band) or
``"above ceiling"`` (the time is real, only suspiciously good) are judged like ``"ok"`` ones
and named in the notes.

Why not pyperf's test (``compare_to`` calls a change significant from a Student's t-test on the
two runs' samples): our rows have few samples (``--repeat`` defaults to 5) and the noise that
matters between two runs is the machine's state, which a row's within-run samples barely see;
a band built from each row's spread plus each run's probe drift, with a 10 % floor, is what
separates a real change from that noise. A uniform slowdown by a factor f is flagged exactly
when f > 1 + band, so a row whose relative IQR reaches 50 % in both runs can hide even a 2x.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SCHEMA = "lstm-attention-reference/benchmarks/1"
MIN_BAND = 0.10
UNTRUSTED_STATUSES = frozenset({"FAIL"})

Key = tuple[str, str]


def load(path: str | Path) -> dict:
    """Read one run's JSON file, checking only that it is an object of our schema.

    Raises ValueError, naming the file, when it is not JSON, not an object, or its ``schema``
    is not ``SCHEMA`` (full validation against benchmarks/schema.json is jsonschema's job).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    found = data.get("schema", "<no schema key>")
    if found != SCHEMA:
        raise ValueError(f"{path}: schema is {found!r}, expected {SCHEMA!r}")
    if not isinstance(data.get("rows"), list):
        raise ValueError(f"{path}: 'rows' is not a list")
    return data


@dataclass(frozen=True)
class Change:
    """One row present in both runs, with its medians and verdict (see the module docstring)."""

    id: str
    dtype: str
    old_s: float
    new_s: float
    ratio: float
    band: float
    verdict: str
    trusted: bool = True
    """False when either run's status is FAIL: then the verdict is "same"."""


@dataclass(frozen=True)
class Comparison:
    """The outcome of comparing an old run with a new one."""

    old_label: str
    new_label: str
    changes: list[Change]
    only_old: list[str]
    only_new: list[str]
    notes: list[str]

    @property
    def regressions(self) -> list[Change]:
        """The rows that got slower by more than their noise band."""
        return [c for c in self.changes if c.verdict == "slower"]

    @property
    def improvements(self) -> list[Change]:
        """The rows that got faster by more than their noise band."""
        return [c for c in self.changes if c.verdict == "faster"]


def _get(mapping: object, *keys: str) -> object:
    """``mapping[k1][k2]...``, or None where a level is missing (headers may be partial)."""
    for key in keys:
        if not isinstance(mapping, Mapping):
            return None
        mapping = mapping.get(key)
    return mapping


def _label(run: Mapping) -> str:
    date = _get(run, "header", "date") or "?"
    commit = _get(run, "header", "git", "commit")
    ref = str(commit)[:7] if commit else "no-git"
    if _get(run, "header", "git", "dirty"):
        ref += "+dirty"
    return f"{date} {ref}"


def _drift(run: Mapping) -> float:
    drift = _get(run, "header", "noise", "probe_drift")
    if not isinstance(drift, int | float) or not math.isfinite(drift):
        return 0.0
    return abs(float(drift))


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def _key_text(key: Key) -> str:
    return f"{key[0]} [{key[1]}]"


def _index(run: Mapping, which: str, notes: list[str]) -> dict[Key, Mapping]:
    """The run's rows by key, in file order; malformed or repeated rows go into notes."""
    default_dtype = _get(run, "header", "options", "dtype") or "?"
    rows: dict[Key, Mapping] = {}
    for n, row in enumerate(run.get("rows") or []):
        if not isinstance(row, Mapping) or not isinstance(row.get("id"), str):
            notes.append(f"{which} run: row {n} has no id; skipped")
            continue
        key = (row["id"], str(row.get("dtype") or default_dtype))
        if key in rows:
            # The schema makes ids unique; a repeat means a hand-merged file. Keep the first.
            notes.append(f"{which} run: {_key_text(key)} appears more than once; the first kept")
            continue
        rows[key] = row
    return rows


def _header_notes(old: Mapping, new: Mapping) -> list[str]:
    """What differs between the runs' setups, which a timing change may be due to."""
    notes = []
    for what, keys in (
        ("dtype", ("options", "dtype")),
        ("CPU", ("machine", "cpu")),
        ("logical CPUs", ("machine", "logical_cpus")),
        ("CUDA device", ("machine", "cuda_device")),
        ("threads", ("options", "threads")),
        ("sizes", ("options", "sizes")),
        ("commit", ("git", "commit")),
    ):
        a, b = _get(old, "header", *keys), _get(new, "header", *keys)
        if a != b:
            notes.append(f"different {what}: old {a!r}, new {b!r}")
    for which, run in (("old", old), ("new", new)):
        if _get(run, "header", "git", "dirty"):
            notes.append(f"the {which} run had uncommitted changes")
        drift = _drift(run)
        if drift > MIN_BAND:
            notes.append(f"the {which} run's probe drifted {drift:.0%}: every band is at least "
                         "that wide")
    return notes


def _rel_iqr(row: Mapping) -> float:
    iqr = row.get("iqr_s")
    if not isinstance(iqr, int | float) or not math.isfinite(iqr) or iqr < 0:
        return 0.0
    return float(iqr) / float(row["median_s"])


def compare(old: dict, new: dict, *, min_band: float = MIN_BAND) -> Comparison:
    """Compare two loaded runs row by row (the rule is in the module docstring; `min_band`
    replaces MIN_BAND, for a machine whose runs move more than their own noise shows).

    ``changes`` follows the new run's row order; ``only_old`` and ``only_new`` name the rows
    missing from the other run as ``"id [dtype]"``.
    """
    notes = _header_notes(old, new)
    old_rows = _index(old, "old", notes)
    new_rows = _index(new, "new", notes)
    drift = max(_drift(old), _drift(new))
    changes = []
    for key, new_row in new_rows.items():
        old_row = old_rows.get(key)
        if old_row is None:
            continue
        statuses = (str(old_row.get("status", "ok")), str(new_row.get("status", "ok")))
        old_s, new_s = old_row.get("median_s"), new_row.get("median_s")
        if not (_positive(old_s) and _positive(new_s)):
            notes.append(f"{_key_text(key)}: median_s not a positive number "
                         f"(old {old_s!r}, new {new_s!r}); not compared")
            continue
        ratio = new_s / old_s
        band = max(min_band, _rel_iqr(old_row) + _rel_iqr(new_row), drift)
        trusted = not UNTRUSTED_STATUSES.intersection(statuses)
        if trusted and ratio > 1 + band:
            verdict = "slower"
        elif trusted and ratio < 1 / (1 + band):
            verdict = "faster"
        else:
            verdict = "same"
        if statuses != ("ok", "ok"):
            why = "not judged" if not trusted else "judged as usual"
            notes.append(f"{_key_text(key)}: status old {statuses[0]!r}, new {statuses[1]!r} "
                         f"({why})")
        changes.append(Change(id=key[0], dtype=key[1], old_s=float(old_s), new_s=float(new_s),
                              ratio=ratio, band=band, verdict=verdict, trusted=trusted))
    return Comparison(
        old_label=_label(old),
        new_label=_label(new),
        changes=changes,
        only_old=[_key_text(k) for k in old_rows if k not in new_rows],
        only_new=[_key_text(k) for k in new_rows if k not in old_rows],
        notes=notes,
    )


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.4f}" if ms < 0.1 else f"{ms:.3f}"


def _verdict_text(change: Change) -> str:
    if not change.trusted:
        return "untrusted"
    return {"slower": "SLOWER", "faster": "faster"}.get(change.verdict, "same")


def _align(lines: Sequence[Sequence[str]]) -> list[str]:
    """Left-align the first column, right-align the figures, leave the verdict ragged."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for line in lines:
        cells = [line[0].ljust(widths[0])]
        cells += [cell.rjust(w) for cell, w in zip(line[1:-1], widths[1:-1], strict=True)]
        cells.append(line[-1])
        out.append("  ".join(cells).rstrip())
    return out


def format_comparison(comparison: Comparison) -> str:
    """The comparison as plain text: the two labels, one aligned line per common row, the rows
    found in one run only, the notes, and a one-line summary."""
    c = comparison
    text = [f"old: {c.old_label}", f"new: {c.new_label}", ""]
    if c.changes:
        show_dtype = len({ch.dtype for ch in c.changes}) > 1
        header = ["id", "old ms", "new ms", "change", "ratio", "band", "verdict"]
        lines = [header]
        for ch in c.changes:
            name = f"{ch.id} [{ch.dtype}]" if show_dtype else ch.id
            lines.append([name, _ms(ch.old_s), _ms(ch.new_s), f"{ch.ratio - 1:+.1%}",
                          f"x{ch.ratio:.2f}", f"±{ch.band:.0%}", _verdict_text(ch)])
        text += _align(lines)
    else:
        text.append("(no rows in common)")
    for title, keys in (("only in old", c.only_old), ("only in new", c.only_new)):
        if keys:
            text += ["", f"{title}:"] + [f"  {k}" for k in keys]
    if c.notes:
        text += ["", "notes:"] + [f"  {n}" for n in c.notes]
    untrusted = sum(not ch.trusted for ch in c.changes)
    same = sum(ch.verdict == "same" and ch.trusted for ch in c.changes)
    text += ["", f"{len(c.regressions)} slower, {len(c.improvements)} faster, {same} within "
                 f"noise, {untrusted} untrusted, {len(c.only_old)} only in old, "
                 f"{len(c.only_new)} only in new"]
    return "\n".join(text)
