"""``study.urls``: the one default-storage rule and the one reader of SQLite URLs."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from llmflow_hpo.errors import StorageError
from llmflow_hpo.study import urls


def test_sqlite_path_reads_relative_absolute_and_query_and_refuses_the_rest() -> None:
    assert urls.sqlite_path("sqlite:///studies/a.db") == Path("studies/a.db")
    assert urls.sqlite_path("sqlite:////abs/a.db?timeout=5") == Path("/abs/a.db")
    for url in ("sqlite://", "sqlite:///", "sqlite:///:memory:", "postgresql+psycopg://u@h/db", "mysql://h/db"):
        assert urls.sqlite_path(url) is None, url
    assert urls.in_memory("sqlite:///:memory:?cache=shared") and not urls.in_memory("sqlite:///a.db")


def test_one_rule_beside_the_config_and_in_studies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert urls.default_storage(tmp_path, "demo") == f"sqlite:///{(tmp_path / 'demo.db').resolve()}"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError, match=r"no --storage given and studies/demo.db does not exist"):
        urls.default_storage_for("demo")
    with pytest.raises(StorageError, match=r"studies/\*.db here: none"):
        urls.only_storage_here()
    (tmp_path / "studies").mkdir()
    optuna.create_study(study_name="demo", storage=f"sqlite:///{tmp_path / 'studies' / 'demo.db'}")
    (tmp_path / "studies" / "notes.db").write_text("not a database")  # never taken for the study's
    expected = urls.default_storage(Path("studies"), "demo")
    assert urls.default_storage_for("demo") == expected == urls.only_storage_here()
    assert urls.is_optuna_sqlite(urls.default_path(Path("studies"), "demo"))
    assert not urls.is_optuna_sqlite(Path("studies/notes.db"))
    optuna.create_study(study_name="other", storage=f"sqlite:///{tmp_path / 'studies' / 'other.db'}")
    with pytest.raises(StorageError, match=r"studies/\*.db here: 2 \(demo.db, other.db\)"):
        urls.only_storage_here()
