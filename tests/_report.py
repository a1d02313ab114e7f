"""The reliability summary printed at the end of a session (rows added by the fault, load
and bad-input tests through the ``reliability_report`` fixture of tests/conftest.py).

The rows travel with each test's report (``user_properties``); the hooks that gather
and print them are the top-level conftest's."""
from __future__ import annotations

import json
import os
from collections import defaultdict

PROPERTY = "mar3d_reliability_row"

# section -> rows, in the order the tests' reports arrive
SECTIONS: dict[str, list[dict]] = defaultdict(list)


def printable(row: dict) -> dict:
    """The row with values a report can carry between processes (plain types)."""
    return {k: v if isinstance(v, (int, float, bool)) or v is None else str(v) for k, v in row.items()}


def collect(report) -> None:
    """``pytest_runtest_logreport``: the rows of a finished test (its teardown report
    holds every property the test added)."""
    if report.when != "teardown":
        return
    for name, value in report.user_properties:
        if name == PROPERTY:
            section, row = value
            SECTIONS[section].append(row)


def _table(rows: list[dict]) -> list[str]:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return out


def summary(terminalreporter) -> None:
    """``pytest_terminal_summary``: the tables, and the JSON file if asked for."""
    if not SECTIONS:
        return
    tr = terminalreporter
    tr.section("mar3d reliability summary")
    for name, rows in SECTIONS.items():
        tr.write_line(f"{name}:")
        for line in _table(rows):
            tr.write_line("  " + line)
    path = os.environ.get("MAR3D_RELIABILITY_JSON")
    if path:
        with open(path, "w") as f:
            json.dump(SECTIONS, f, indent=2)
