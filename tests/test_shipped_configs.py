"""Every shipped study and search space validates, and every shipped YAML file says how to use it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llmflow_hpo.config.hyperparameters import HYPERPARAMETERS
from llmflow_hpo.config.study import load_study_config
from llmflow_hpo.search.spaces import load_search_space
from llmflow_hpo.search.strategy import build_pruner, build_sampler, check_strategy

REPO = Path(__file__).resolve().parents[1]
STUDIES = sorted((REPO / "studies").glob("*.yaml"))
SPACES = sorted((REPO / "search_spaces").glob("*.yaml"))


def header(path: Path) -> list[str]:
    """The comment lines at the top of a file, without their '#'."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return lines


def test_the_shipped_files_are_found() -> None:
    assert {p.stem for p in STUDIES} >= {"quickstart", "conll2003", "sst2"}
    assert {p.stem for p in SPACES} >= {"quickstart", "ner", "sst2", "full"}


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_study_validates(path: Path) -> None:
    cfg = load_study_config(path)
    assert cfg.study_name == path.stem
    assert cfg.storage == f"sqlite:///{(path.parent / f'{path.stem}.db').resolve()}"
    assert Path(cfg.search_space).is_relative_to(REPO / "search_spaces")
    space, raw = load_search_space(cfg.search_space)
    assert space and set(space) == set(raw)
    check_strategy(cfg, space, str(path))
    build_sampler(cfg, space)
    build_pruner(cfg)


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_search_space_parses(path: Path) -> None:
    space, raw = load_search_space(path)
    assert list(space) == list(raw)
    assert set(space) <= set(HYPERPARAMETERS)


def test_full_space_declares_every_searchable_hyperparameter() -> None:
    space, _ = load_search_space(REPO / "search_spaces" / "full.yaml")
    assert set(space) == set(HYPERPARAMETERS)


def test_quickstart_data_is_shipped() -> None:
    cfg = load_study_config(REPO / "studies" / "quickstart.yaml")
    for split in (cfg.data.train, cfg.data.dev, cfg.data.test):
        assert split is not None and Path(split).is_file(), split


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_study_header_says_how_to_run_it(path: Path) -> None:
    lines = header(path)
    assert lines, f"{path.name} has no comment header"
    text = "\n".join(lines)
    study_name = yaml.safe_load(path.read_text(encoding="utf-8"))["study_name"]
    assert f"llmflow-hpo search studies/{path.name}" in text
    assert f"llmflow-hpo retrain-best --study {study_name}" in text


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_search_space_header_says_what_it_is_for(path: Path) -> None:
    text = "\n".join(header(path))
    assert text, f"{path.name} has no comment header"
    assert "llmflow-hpo" in text or "Search space" in text


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_the_space_a_study_uses_names_that_study_in_its_header(path: Path) -> None:
    space_path = Path(load_study_config(path).search_space)
    assert f"studies/{path.name}" in "\n".join(header(space_path))
