"""The package keeps the shape of issue 14: one place per concept, measured by benchmarks/structure.py."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "llmflow_hpo"

_spec = importlib.util.spec_from_file_location("structure", REPO / "benchmarks" / "structure.py")
structure = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(structure)
MODULES = structure.modules(PACKAGE)

# The recipe modules that run torch and may import it at import time; everything else imports it inside the
# function that trains or predicts, so that --help, validate, reporting and the Ray driver stay light.
TORCH_AT_IMPORT = {f"llmflow_hpo.recipe.{m}" for m in ("train", "runtime", "batches", "optim", "loss", "evaluation")}


def test_no_code_outside_the_task_modules_asks_which_task_it_runs():
    comparisons, mentions, where = structure.task_comparisons(MODULES, "llmflow_hpo")
    assert (comparisons, mentions) == (0, 0), where


def test_no_function_is_over_80_lines():
    long = [(n, where) for n, where in structure.function_lengths(MODULES) if n > structure.LIMIT]
    assert long == []


def test_the_package_has_no_import_cycle():
    assert structure.import_cycles(MODULES, "llmflow_hpo") == []


def test_trial_attributes_are_spelled_in_one_module():
    spelled, listing = structure.trial_attr_places(MODULES)
    assert set(spelled) | set(listing) <= {"llmflow_hpo.study.records"}


def test_only_the_recipe_imports_torch_at_import_time():
    light = sorted(m for m in MODULES if m not in TORCH_AT_IMPORT and ".ray" not in m and not m.endswith("__main__"))
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\nprint(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code, *light], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"one of these imports torch or transformers: {light}"


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if m.count(".") == 1 and (PACKAGE / m.split(".")[1]).is_dir())
)
def test_every_stage_folder_says_what_it_holds(module):
    doc = ast_docstring(PACKAGE / module.split(".")[1] / "__init__.py")
    assert doc and len(doc.splitlines()) <= 8


def ast_docstring(path: Path) -> str | None:
    import ast

    return ast.get_docstring(ast.parse(path.read_text()))


def test_the_readme_layout_lists_every_module_of_each_stage():
    readme = (REPO / "README.md").read_text().split("## Layout", 1)[1]
    for folder in sorted(p for p in PACKAGE.iterdir() if (p / "__init__.py").exists()):
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{folder.name}/` |"))
        listed = set(re.findall(r"`([a-z_]+)/?`", row.split("|")[2]))
        present = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
        present |= {p.name for p in folder.iterdir() if (p / "__init__.py").exists()}
        assert present <= listed, f"README Layout, {folder.name}/: {sorted(present - listed)} missing"
