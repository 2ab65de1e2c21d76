"""RELIABILITY.md stays true: every test it cites exists, and its figures are the last soak report's."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from reliabilitykit import FIGURES_END, FIGURES_START, render

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "RELIABILITY.md").read_text()
REPORT = ROOT / "tests" / "reliability" / "soak-report.json"


def test_every_cited_test_exists():
    cited = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", DOC)
    assert cited
    for path, name in cited:
        assert (ROOT / path).is_file(), path
        if name:
            functions = {node.name for node in ast.walk(ast.parse((ROOT / path).read_text()))
                         if isinstance(node, ast.FunctionDef)}  # fmt: skip
            assert name in functions, f"{path}::{name}"


def test_every_reliability_test_file_is_cited():
    files = {f"tests/reliability/{p.name}" for p in (ROOT / "tests" / "reliability").glob("test_*.py")}
    assert {f for f in files if f"`{f}" not in DOC} == {"tests/reliability/test_reliability_doc.py"}


def test_the_figures_are_the_last_soak_reports():
    report = json.loads(REPORT.read_text())
    assert report["run"]["passed"] and report["scale"]["soak_requests"] == 2000
    section = DOC[DOC.index(FIGURES_START) + len(FIGURES_START) + 1 : DOC.index(FIGURES_END)]
    assert section == render(report)
