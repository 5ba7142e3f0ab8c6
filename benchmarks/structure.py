"""Structure counts of the llmflow_hpo package (issue 14): what a reader meets when following the data flow.

    python benchmarks/structure.py [--package llmflow_hpo] [--json]

Counts, each over the package's own source (tests and benchmarks excluded):
- task-name comparisons outside ``tasks/``: ``==``/``!=``/``in`` tests against a task name literal or a
  variable/attribute named ``task``, and the task name literals themselves (mentions);
- the longest function and the functions over 80 lines (def line to last line, decorators excluded);
- modules that import torch at import time (each module is imported in a fresh interpreter);
- import cycles between the package's modules (function-level imports included, since they still tie
  the two modules together);
- places that spell trial user attributes as string literals: ``set_user_attr("x")``,
  ``user_attrs["x"]`` / ``user_attrs.get("x")``, and tuples of three or more such names.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

TASK_NAMES = {"token-classification", "text-classification", "causal-lm"}
LIMIT = 80


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _in_tasks(name: str, package: str) -> bool:
    return name.startswith(f"{package}.tasks")


def task_comparisons(mods: dict[str, Path], package: str) -> tuple[int, int, list[str]]:
    comparisons, mentions, where = 0, 0, []

    def is_task(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant) and node.value in TASK_NAMES:
            return True
        if isinstance(node, ast.Name) and node.id == "task":
            return True
        return isinstance(node, ast.Attribute) and node.attr == "task"

    for name, path in mods.items():
        if _in_tasks(name, package):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(is_task(n) for n in [node.left, *node.comparators]):
                comparisons += 1
                where.append(f"{path}:{node.lineno}")
            if isinstance(node, ast.Constant) and node.value in TASK_NAMES:
                mentions += 1
    return comparisons, mentions, where


def function_lengths(mods: dict[str, Path]) -> list[tuple[int, str]]:
    lengths = []
    for path in mods.values():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths.append((node.end_lineno - node.lineno + 1, f"{path}:{node.lineno} {node.name}"))
    return sorted(lengths, reverse=True)


def torch_at_import(mods: dict[str, Path]) -> list[str]:
    code = (
        "import importlib, sys\n"
        "for m in sys.argv[1:]:\n"
        "    before = set(sys.modules)\n"
        "    importlib.import_module(m)\n"
        "    print(m, 'torch' in sys.modules)\n"
    )
    heavy = []
    for name in mods:  # one interpreter per module: another module's imports must not count
        out = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.split()[-1] == "True":
            heavy.append(name)
    return heavy


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_cycles(mods: dict[str, Path], package: str) -> list[list[str]]:
    known = set(mods)
    # a package's __init__ re-exporting its submodules is not a cycle of the flow: leave parent packages out
    graph = {
        n: {t for t in _imports(n, p, known) if not n.startswith(t + ".") and not t.startswith(n + ".")}
        for n, p in mods.items()
    }
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            strong(v)
    return cycles


def trial_attr_places(mods: dict[str, Path]) -> tuple[list[str], list[str]]:
    """Modules that spell attribute names as literals, and modules with literal lists of them."""
    spelled, listing = set(), set()
    names: set[str] = set()
    trees = {n: ast.parse(p.read_text()) for n, p in mods.items()}
    for name, tree in trees.items():
        for node in ast.walk(tree):
            key = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr == "set_user_attr" and node.args and isinstance(node.args[0], ast.Constant):
                    key = node.args[0].value
                if (
                    node.func.attr == "get"
                    and isinstance(node.func.value, ast.Attribute)
                    and node.func.value.attr == "user_attrs"
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                ):
                    key = node.args[0].value
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute):
                if node.value.attr == "user_attrs" and isinstance(node.slice, ast.Constant):
                    key = node.slice.value
            if isinstance(key, str):
                spelled.add(name)
                names.add(key)
    names |= {"best_step", "best_epoch", "fail_reason", "pruned_at_step", "train_time_s", "evaluations"}
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                hits = [
                    e
                    for e in node.elts
                    if isinstance(e, ast.Constant)
                    and isinstance(e.value, str)
                    and any(part.strip() in names for part in e.value.split(","))
                ]
                if len(hits) >= 3:
                    listing.add(name)
                nested = [
                    e
                    for e in node.elts
                    if isinstance(e, ast.Tuple)
                    and e.elts
                    and isinstance(e.elts[0], ast.Constant)
                    and isinstance(e.elts[0].value, str)
                    and any(part.strip() in names for part in e.elts[0].value.split(","))
                ]
                if len(nested) >= 3:
                    listing.add(name)
    return sorted(spelled), sorted(listing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", default="llmflow_hpo")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-import", action="store_true", help="skip the torch-at-import count (slow)")
    args = parser.parse_args()
    root = Path(args.package)
    mods = modules(root)
    comparisons, mentions, where = task_comparisons(mods, args.package)
    lengths = function_lengths(mods)
    long = [f"{n} lines  {w}" for n, w in lengths if n > LIMIT]
    heavy = [] if args.no_import else torch_at_import(mods)
    cycles = import_cycles(mods, args.package)
    spelled, listing = trial_attr_places(mods)
    result = {
        "modules": len(mods),
        "task_name_comparisons_outside_tasks": comparisons,
        "task_name_mentions_outside_tasks": mentions,
        "task_comparisons_at": where,
        "longest_function": f"{lengths[0][0]} lines  {lengths[0][1]}",
        f"functions_over_{LIMIT}_lines": long,
        "modules_importing_torch_at_import": heavy,
        "import_cycles": cycles,
        "modules_spelling_trial_attrs": spelled,
        "modules_listing_trial_attrs": listing,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        if isinstance(value, list):
            print(f"{key}: {len(value)}")
            for item in value:
                print(f"    {item}")
        else:
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
