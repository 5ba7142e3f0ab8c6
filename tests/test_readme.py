"""The README stays true: every config field is documented, and CI runs the README's test command."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from llmflow_hpo.config.study import HYPERPARAMETERS, StudyConfig

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _fields(cls: type, prefix: str = "") -> list[str]:
    names = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            names += _fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            names.append(f"{prefix}{f.name}")
    return names


@pytest.mark.parametrize("name", _fields(StudyConfig))
def test_every_config_field_is_in_the_reference(name):
    assert f"| `{name}` |" in README


@pytest.mark.parametrize("name", HYPERPARAMETERS)
def test_every_searchable_name_is_listed(name):
    section = README.split("## Search-space reference", 1)[1].split("##", 1)[0]
    assert f"`{name}`" in section


def test_ci_runs_the_readme_test_command():
    block = README.split("## Run the tests", 1)[1]
    command = re.search(r"```bash\n(.+?)\n```", block, re.S).group(1)
    test_command = command.split("&&")[-1].strip()
    assert test_command in (REPO / ".ci" / "run").read_text()


def test_every_cli_command_is_documented():
    from llmflow_hpo.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        assert f"`llmflow-hpo {name}" in README, name
