"""The security checklist's case report, a pytest plugin (``-p tests.security.report`` in
pyproject.toml, so that pytest-xdist's main process, which collects nothing, prints it too).

Tests name the cases they cover with ``@pytest.mark.case("J-01", ...)``; each report carries
them to the process that prints the summary: every case of ``cases.py`` covered, skipped (with
the reason), failed, or not run.
"""

from __future__ import annotations

import typing as t
from collections import defaultdict

import pytest

from tests.security.cases import CASES


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "case(*ids): the security checklist cases a test covers")


# --- the case report -------------------------------------------------------------------------

_outcomes: dict[str, dict[str, str]] = defaultdict(dict)  # case -> {nodeid: outcome}
_reasons: dict[str, str] = {}  # case -> why it was skipped


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for mark in item.iter_markers("case"):
            for case in mark.args:
                if case not in CASES:
                    raise pytest.UsageError(f"{item.nodeid}: unknown checklist case {case!r}")


def _cases(item: pytest.Item) -> list[str]:
    return [case for mark in item.iter_markers("case") for case in mark.args]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> t.Iterator[None]:
    """Carry the test's cases in its report (reports, not items, reach pytest-xdist's main
    process, which prints the summary)."""
    outcome = yield
    cases = _cases(item)
    if cases:
        outcome.get_result().user_properties.append(("checklist_cases", cases))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    cases = next((v for k, v in report.user_properties if k == "checklist_cases"), [])
    for case in cases:
        seen = _outcomes[case]
        if report.failed:
            seen[report.nodeid] = "failed"
        elif report.skipped and seen.get(report.nodeid) != "failed":
            seen[report.nodeid] = "skipped"
            longrepr = report.longrepr
            reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
            _reasons[case] = reason.removeprefix("Skipped: ")
        elif report.when == "call" and report.passed and report.nodeid not in seen:
            seen[report.nodeid] = "passed"


def pytest_terminal_summary(terminalreporter: t.Any) -> None:
    if not _outcomes:
        return
    covered, skipped, failed, missing = [], [], [], []
    for case in CASES:
        results = set(_outcomes.get(case, {}).values())
        if not results:
            missing.append(case)
        elif "failed" in results:
            failed.append(case)
        elif "passed" in results:
            covered.append(case)
        else:
            skipped.append(case)
    write = terminalreporter.write_line
    terminalreporter.section("security checklist")
    for case in skipped:
        write(f"skipped {case} ({CASES[case]}): {_reasons.get(case, '')}")
    for case in failed:
        write(f"FAILED  {case} ({CASES[case]})")
    if missing:
        write("not run: " + ", ".join(missing))
    write(f"{len(CASES)} cases: {len(covered)} covered, {len(skipped)} skipped, "
          f"{len(failed)} failed, {len(missing)} not run")
