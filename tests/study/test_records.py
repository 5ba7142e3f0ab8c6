"""The trial record is declared once (``study.records``): the README's tables, the report's columns, the
tracking split and the dashboard note follow from it, and no attribute the package writes is undeclared.

After changing a declaration, ``python tests/study/test_records.py --write`` rewrites the README's tables.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from llmflow_hpo.study import records

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "llmflow_hpo"
TABLES = {"study attributes": records.study_table, "trial attributes": records.trial_table}


def _block(text: str, what: str) -> re.Match[str] | None:
    return re.search(rf"<!-- {what}: generated from [^>]*-->\n((?:\|.*\|\n)+)", text)


def test_the_readme_tables_are_the_declaration() -> None:
    readme = (REPO / "README.md").read_text()
    for what, table in TABLES.items():
        found = _block(readme, what)
        assert found is not None, f"README.md has no generated table of {what}"
        assert found.group(1).rstrip("\n") == table(), f"README's {what} differ; run python {__file__} --write"


def test_every_name_is_declared_once() -> None:
    names = [a.name for a in records.TRIAL_ATTRS]
    assert len(names) == len(set(names))
    constants = {v for k, v in vars(records).items() if k.isupper() and isinstance(v, str) and not k.endswith("PREFIX")}
    declared = {n for n in names if "*" not in n} | {a.name for a in records.STUDY_ATTRS}
    assert constants == declared, constants ^ declared  # a constant per name, a declaration per constant
    assert all(a.help for a in (*records.TRIAL_ATTRS, *records.STUDY_ATTRS))


def _written_names() -> set[str]:
    """Attribute names the package spells as literals: set_user_attr("x"), user_attrs["x"] / .get("x")."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            key = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
                owner = node.func.value
                if node.func.attr == "set_user_attr" or (
                    node.func.attr == "get" and isinstance(owner, ast.Attribute) and owner.attr == "user_attrs"
                ):
                    key = node.args[0]
            elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute):
                key = node.slice if node.value.attr == "user_attrs" else None
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                found.add(key.value)
    return found


def test_the_package_writes_no_undeclared_attribute() -> None:
    declared = {a.name for a in (*records.TRIAL_ATTRS, *records.STUDY_ATTRS)}
    assert _written_names() - declared == set()


def test_what_follows_from_the_declaration() -> None:
    # the report's columns: dev/test metrics sorted, then the run's costs in declaration order
    present = {"dev_f1", "dev_accuracy", "test_f1", "best_step", "peak_memory_mb", "seed", "train_time_s"}
    assert records.report_columns(present) == [
        "dev_accuracy",
        "dev_f1",
        "test_f1",
        "best_step",
        "train_time_s",
        "peak_memory_mb",
    ]
    # tracking: tags, and numbers that measure (not those that name a trial or a seed, nor booleans)
    assert set(records.tag_names()) == {
        "fail_reason",
        "pruned_at_step",
        "retry_of",
        "resumed_at_step",
        "worker",
        "device",
        "confirms",  # a confirmation trial: the search trial it re-runs (llmflow-hpo confirm)
        "origin",  # defaults, warm-start, design: where the parameters came from
        "stopped_by_budget",
    }
    assert records.tracked_as_metric("dev_f1", 0.5) and records.tracked_as_metric("train_time_s", 3)
    assert records.tracked_as_metric("added_by_a_later_version", 1.0)
    for name, value in (("seed", 7), ("retry_of", 2), ("stopped_early", True), ("precision", "fp32")):
        assert not records.tracked_as_metric(name, value), name
    assert records.dev("f1") == "dev_f1" and records.kind_of("dev_f1_PER") == "metric"


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    path = REPO / "README.md"
    text = path.read_text()
    for what, table in TABLES.items():
        found = _block(text, what)
        assert found is not None, f"README.md has no generated table of {what}"
        text = text[: found.start(1)] + table() + "\n" + text[found.end(1) :]
    path.write_text(text)
