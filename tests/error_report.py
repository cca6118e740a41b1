"""The largest errors the parity properties saw, printed at the end of the test run.

A parity test compares one drawn case with torch and asserts it is within the policy; what a
reader of the run also wants is how close the whole run came: the largest float64 error per
op family and option, over every example. Each test hands its errors to `record`, which keeps
the largest per key and checks each against the family's measured bound (stricter than the
policy's 1e-7: every float64 comparison in this suite stays under 1e-9, and a case that passes
it has found something worth a look); ``conftest.py``'s ``pytest_terminal_summary`` prints the
tables that any test filled. Nothing is checked at the end of the run, so a test never depends
on which tests ran before it.
"""

from __future__ import annotations

FLOAT64_BOUND = 1e-9
"""The largest float64 |ours - torch| any parity property has measured, rounded up to a power
of ten: torch.testing's float64 defaults allow 1e-7, so a result between the two passes the
policy but is checked here, case by case."""

TABLES: dict[str, dict[str, float]] = {}
"""title -> {key: largest error seen}, in the order the tables were first filled."""


def record(title: str, key: str, error: float, *, bound: float | None = FLOAT64_BOUND) -> None:
    """Keep the largest `error` under ``TABLES[title][key]``; raise if it passes `bound`.

    title : the table's heading in the summary (``"attention properties, float64 |ours -
        torch| by score"``).
    key : the row (``"general"``, ``"luong (kernels)"``).
    error : this case's error (a max abs or relative difference, as the title says).
    bound : the bound a single case must stay within (None: no bound).
    """
    table = TABLES.setdefault(title, {})
    table[key] = max(table.get(key, 0.0), float(error))
    if bound is not None and not error <= bound:
        raise AssertionError(f"{title}, {key}: {error:.3g} is over {bound:.0e}, the bound every "
                             "float64 case has kept so far (the policy's 1e-7 still holds)")


def summary_lines() -> list[str]:
    """The report: one heading per filled table, one indented line per key."""
    lines = []
    for title, table in TABLES.items():
        lines.append(f"{title}:")
        lines += [f"  {key}: {value:.3g}" for key, value in sorted(table.items())]
    return lines
