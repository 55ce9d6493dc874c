"""Hardening suite plumbing: the counts every test records, printed and written at the end.

Each hardening test records what it measured with the ``counts`` fixture
(``counts.add(area, metric, value)``); the session ends with one table per area in the
terminal summary (shown without ``-s``) and the same text in ``$IMGFS_HARDENING_REPORT``
(default ``.pytest_cache/imgfs-hardening-counts.txt`` under the repository).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.hardening.harden import Counts

REPORT_ENV = "IMGFS_HARDENING_REPORT"


_COUNTS = Counts()


@pytest.fixture(scope="session")
def counts() -> Counts:
    return _COUNTS


def report_path(config: pytest.Config) -> Path:
    configured = os.environ.get(REPORT_ENV)
    if configured:
        return Path(configured)
    return Path(str(config.rootpath)) / ".pytest_cache" / "imgfs-hardening-counts.txt"


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    if not _COUNTS.rows:
        return
    text = _COUNTS.render()
    terminalreporter.section("imgfs hardening counts")
    terminalreporter.write(text)
    path = report_path(config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        terminalreporter.write_line(f"(written to {path})")
    except OSError as exc:
        terminalreporter.write_line(f"(could not write {path}: {exc})")
