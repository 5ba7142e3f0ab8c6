"""The benchmark scripts' smoke versions (tiny model, our quick-start sample), so they do not rot.

They check that every contender runs and that the outputs are complete and consistent, not what the
figures are: those come from the real runs (benchmarks/README.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("accelerate")  # transformers.Trainer needs it: the `bench` extra
pytest.importorskip("matplotlib")


def run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_peers_smoke_runs_every_contender_and_writes_json_table_and_plot(tmp_path: Path) -> None:
    out, md, png = tmp_path / "peers.json", tmp_path / "peers.md", tmp_path / "peers.png"
    result = run(
        "peers.py", "--smoke", "--workdir", str(tmp_path / "work"), "--out", str(out), "--md", str(md), "--png", str(png),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    results = report["results"]
    assert list(results) == ["llmflow-hpo", "hf-optuna", "grid-3x3", "plain"]
    assert [len(results[n]["trials"]) for n in results] == [2, 2, 2, 1]
    for name, r in results.items():
        finished = [t["finished_s"] for t in r["trials"]]
        assert all(0 < t <= r["wall_s"] for t in finished), name  # on the contender's own clock
        bests = [b for _, b in r["curve"]]
        assert bests == sorted(bests) and bests[-1] == r["best"], name  # best so far only grows
        complete = [t["value"] for t in r["trials"] if t["state"] == "COMPLETE"]
        assert r["best"] == max(complete), name
    # The grid is the protocol's grid (smoke: 2 x 1), the plain run its one configuration.
    assert [t["params"]["learning_rate"] for t in results["grid-3x3"]["trials"]] == [1e-4, 1e-3]
    # llmflow-hpo's trials say where their time went; the summary compares with peer 1.
    ours = results["llmflow-hpo"]["trials"]
    assert all(t["train_s"] > 0 and t["eval_s"] > 0 and t["setup_s"] > 0 for t in ours)
    summary = report["summary"]
    assert summary["peer1_best"] == results["hf-optuna"]["best"]
    assert 0 < summary["fixed_cost"]["fixed_share"] < 1
    table = md.read_text()
    assert result.stdout == table + "\n"  # printed, and written to --md
    assert "| contender |" in table and table.count("\n| ") >= 5
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_padding_smoke_compares_the_three_batchings(tmp_path: Path) -> None:
    out = tmp_path / "padding.json"
    result = run("padding.py", "--smoke", "--workdir", str(tmp_path / "work"), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["pad-128", "dynamic", "dynamic+grouped"]
    assert results["pad-128"]["speedup_vs_pad_128"] == 1.0
    for r in results.values():
        assert r["examples_per_second"] > 0 and len(r["evaluations"]) == 1
    assert [r["settings"]["group_by_length"] for r in results.values()] == [False, False, True]
