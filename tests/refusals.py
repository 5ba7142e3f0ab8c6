"""The bad-input harness: run the real CLI on a bad input and check that it is refused cleanly.

A clean refusal is: exit code 1 (a known error) or 2 (a usage error), no traceback, no hang (the command
ends within ``timeout`` seconds), nothing on stdout (no result), stderr's last non-empty line says what is wrong (``llmflow-hpo: error: ...``
for exit 1, argparse's ``... error: ...`` for exit 2), and no file under ``watch`` was created, changed or
removed, except for the ones in ``may_create`` (e.g. a new optuna database the user named).

Used by ``tests/test_bad_input*.py``; import it as ``from refusals import refused, snapshot``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def snapshot(roots: Iterable[Path]) -> dict[str, tuple[str, int]]:
    """Every file, folder and link under ``roots`` (each root too): path -> (sha256 of a file's content, or
    what the entry is, and its mode). A new empty folder counts as a change as much as a new file."""
    files: dict[str, tuple[str, int]] = {}
    for root in roots:
        root = Path(root)
        for p in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            try:
                mode = p.lstat().st_mode
                if p.is_symlink():
                    files[str(p)] = (f"<link to {os.readlink(p)}>", mode)
                elif p.is_dir():
                    files[str(p)] = ("<folder>", mode)
                elif p.is_file():
                    files[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), mode)
                else:  # a pipe or a device: reading it could block
                    files[str(p)] = ("<special>", mode)
            except OSError:
                files[str(p)] = ("<unreadable>", 0)
    return files


def refused(
    args: Sequence[str],
    *,
    cwd: Path,
    watch: Iterable[Path] = (),
    may_create: Iterable[str] = (),
    timeout: float = 5.0,
    codes: tuple[int, ...] = (1, 2),
    stdin: str | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Run ``llmflow-hpo ARGS`` in ``cwd``; assert it was refused cleanly; return the error line.

    The command reads no stdin, and its default cache folder ($XDG_CACHE_HOME) is ``cwd/.cache``, so that
    a refused command that still tokenized (or wrote anything else there) is caught as a change.
    """
    roots = [Path(cwd), *map(Path, watch)]
    before = snapshot(roots)
    start = time.monotonic()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "llmflow_hpo", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            input=stdin,
            stdin=subprocess.DEVNULL if stdin is None else None,
            env={**os.environ, "XDG_CACHE_HOME": str(Path(cwd) / ".cache"), **(env or {})},
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"llmflow-hpo {' '.join(args)}: still running after {timeout} s (a hang)") from None
    took = time.monotonic() - start
    shown = f"llmflow-hpo {' '.join(args)} (exit {result.returncode}, {took:.1f} s):\n{result.stderr[-3000:]}"
    assert result.returncode in codes, shown
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, shown
    assert not result.stdout.strip(), f"{shown}\nstdout (a refusal prints no result):\n{result.stdout[-1000:]}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, shown
    line = lines[-1]
    if result.returncode == 1:
        assert line.startswith("llmflow-hpo: error: "), shown
        # One line per problem: nothing else on stderr but the log lines a command prints before it fails.
        problems = [x for x in lines if x.startswith("llmflow-hpo: error: ")]
        assert problems == [x for x in lines if "error" in x.lower()], shown
        assert problems == lines[-len(problems) :], shown  # together, at the end
        line = "\n".join(problems)
    else:
        assert "error:" in line, shown
    after = snapshot(roots)
    allowed = {str(Path(cwd) / name) for name in may_create}
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p) and p not in allowed)
    assert not changed, f"{shown}\nfiles created, changed or removed: {changed}"
    return line
