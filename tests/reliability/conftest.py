"""The reliability report: tests record what they tried, pytest prints one summary.

Each test adds rows with the ``reliability_report`` fixture. A row travels with the
test's own report (``user_properties``, so ``--junitxml`` records it with the test too);
the tables are printed under "mar3d reliability summary" (tests/_report.py) and, when
``MAR3D_RELIABILITY_JSON`` names a file, written there as JSON.
"""
from __future__ import annotations

import pytest

from _report import PROPERTY, printable


class Report:
    """Adds one test's rows: ``add(section, column=value, ...)``."""

    def __init__(self, node: pytest.Item):
        self.node = node

    def add(self, section: str, **row) -> None:
        self.node.user_properties.append((PROPERTY, [section, printable(row)]))


@pytest.fixture
def reliability_report(request) -> Report:
    return Report(request.node)
