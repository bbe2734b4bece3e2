"""One generated broken adapter per finding code (tests/surgery/validate/broken.py): each gives its finding,
with the expected ``where`` and message, a fix, and the code's severity."""

from __future__ import annotations

import re

import pytest

from lorasurg import validate
from lorasurg.findings import CODES

from tests.surgery.validate.broken import CASES, build


def test_every_code_has_a_broken_fixture():
    assert set(CASES) == set(CODES)


@pytest.mark.parametrize("code", sorted(CASES))
def test_broken_fixture_gives_its_finding(tmp_path, code):
    path, base = build(code, tmp_path / code)
    findings = validate(path, base, CASES[code].consumers)
    mine = [f for f in findings if f.code == code]
    assert mine, f"no {code} among {[(f.code, f.where, f.message) for f in findings]}"
    case = CASES[code]
    hits = [f for f in mine if f.where.endswith(case.where) and re.search(case.message, f.message)]
    assert hits, f"{code}: {[(f.where, f.message) for f in mine]}"
    assert all(f.severity == CODES[code].severity and f.fix for f in hits)


def test_findings_are_sorted_errors_first(tmp_path):
    path, base = build("init-reinit", tmp_path / "a")
    severities = [f.severity for f in validate(path)]
    assert severities == sorted(severities, key=["error", "warning", "info"].index)
    assert "warning" in severities and "info" in severities
