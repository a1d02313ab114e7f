"""The reliability report: tests record what they tried, pytest prints one summary.

Each test adds rows to the session's :class:`Report` (``reliability_report`` fixture);
at the end of the session the tables are printed under "mar3d reliability summary"
and, when ``MAR3D_RELIABILITY_JSON`` names a file, written there as JSON.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict

import pytest


class Report:
    """Rows per section; every row is a flat dict of printable values."""

    def __init__(self):
        self.sections: dict[str, list[dict]] = defaultdict(list)

    def add(self, section: str, **row) -> None:
        self.sections[section].append(row)


_REPORT = Report()


@pytest.fixture(scope="session")
def reliability_report() -> Report:
    return _REPORT


def _table(rows: list[dict]) -> list[str]:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return out


def pytest_terminal_summary(terminalreporter):
    if not _REPORT.sections:
        return
    tr = terminalreporter
    tr.section("mar3d reliability summary")
    for name, rows in _REPORT.sections.items():
        tr.write_line(f"{name}:")
        for line in _table(rows):
            tr.write_line("  " + line)
    path = os.environ.get("MAR3D_RELIABILITY_JSON")
    if path:
        with open(path, "w") as f:
            json.dump(_REPORT.sections, f, indent=2, default=str)
