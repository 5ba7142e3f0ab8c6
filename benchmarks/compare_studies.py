"""Compare two stored studies trial by trial: states, values and reported steps, to 4 decimals.

    python benchmarks/compare_studies.py STORAGE_A STORAGE_B [--study NAME]

Used to show that a change of structure left the results alone (issue 14): run the quick start before and
after into two SQLite files and compare them. Prints a Markdown table and exits 1 if any trial differs.
"""

from __future__ import annotations

import argparse
import sys

import optuna


def rows(storage: str, name: str | None) -> list[tuple[int, str, str, str]]:
    names = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=name or names[0], storage=storage)
    out = []
    for t in study.get_trials(deepcopy=False):
        value = "-" if t.value is None else f"{t.value:.4f}"
        steps = sorted(t.intermediate_values)
        curve = " ".join(f"{s}:{t.intermediate_values[s]:.4f}" for s in steps)
        out.append((t.number, t.state.name, value, curve))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--study")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    a, b = rows(args.before, args.study), rows(args.after, args.study)
    print("| trial | state before | state after | value before | value after | steps:values identical |")
    print("|---|---|---|---|---|---|")
    same = len(a) == len(b)
    for ra, rb in zip(a, b, strict=False):
        ok = ra == rb
        same &= ok
        print(f"| {ra[0]} | {ra[1]} | {rb[1]} | {ra[2]} | {rb[2]} | {'yes' if ra[3] == rb[3] else 'NO'} |")
    if len(a) != len(b):
        print(f"trial counts differ: {len(a)} before, {len(b)} after")
    print("identical" if same else "DIFFERENT")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
