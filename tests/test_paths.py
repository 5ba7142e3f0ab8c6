"""The folder checks made before a study writes anything (llmflow_hpo.paths), and the storage check built on them.

Read-only and permission-denied folders cannot be made in a test that runs as root (root writes anywhere
but on a read-only mount), so those two are simulated through os.statvfs and os.access.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from llmflow_hpo.paths import folder_problem, probe_folder, writable_problem
from llmflow_hpo.study.storage import check_storage


def test_a_writable_folder_and_one_that_can_be_made_have_no_problem(tmp_path: Path) -> None:
    assert folder_problem(tmp_path) is None
    assert folder_problem(tmp_path / "new" / "deeper") is None
    assert probe_folder(tmp_path) is None
    assert list(tmp_path.iterdir()) == []  # the probe left nothing


def test_a_file_where_a_folder_should_be(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    assert folder_problem(tmp_path / "f") == f"{tmp_path / 'f'} is a file, not a folder"
    assert (
        folder_problem(tmp_path / "f" / "sub")
        == f"{tmp_path / 'f'} is a file, so the folder {tmp_path / 'f' / 'sub'} cannot be made"
    )


@pytest.mark.parametrize("path", ["/proc/llmflow", "/proc/self/llmflow", "/sys/x/y"])
def test_kernel_file_systems(path: str) -> None:
    assert "a kernel file system" in str(folder_problem(Path(path)))


def test_read_only_file_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.statvfs

    class ReadOnly:
        def __init__(self, result: Any) -> None:
            self._result = result

        def __getattr__(self, name: str) -> Any:
            return os.ST_RDONLY if name == "f_flag" else getattr(self._result, name)

    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly(real(p)))
    assert writable_problem(tmp_path) == f"{tmp_path} is on a read-only file system"
    problem = check_storage(f"sqlite:///{tmp_path / 'study.db'}")
    assert (
        problem
        == f"{tmp_path} is on a read-only file system; SQLite needs to make its database and journal files there"
    )


def test_folder_without_write_permission(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    assert (
        folder_problem(tmp_path / "cache")
        == f"cannot make {tmp_path / 'cache'}: {tmp_path} is not writable (permission denied)"
    )
    assert "not writable (permission denied)" in str(check_storage(f"sqlite:///{tmp_path / 'study.db'}"))


def test_storage_check_passes_a_new_file_an_empty_one_and_an_optuna_database(tmp_path: Path) -> None:
    import optuna

    assert check_storage(f"sqlite:///{tmp_path / 'new.db'}", probe=True) is None
    (tmp_path / "empty.db").write_bytes(b"")
    assert check_storage(f"sqlite:///{tmp_path / 'empty.db'}") is None
    optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="s")
    assert check_storage(f"sqlite:///{tmp_path / 'optuna.db'}", probe=True) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db", "optuna.db"]


def test_storage_check_reads_another_tools_database_without_changing_it(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE a (x)")
        db.execute("CREATE TABLE b (x)")
        db.execute("CREATE TABLE c (x)")
        db.execute("CREATE TABLE d (x)")
    before = path.read_bytes()
    problem = check_storage(f"sqlite:///{path}", probe=True)
    assert problem is not None and "another tool's database (tables a, b, c, ...)" in problem
    assert path.read_bytes() == before
