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


# One contender of each kind (the other llmflow-hpo contenders differ only in their study overrides).
POLICY_SMOKE = ("llmflow-hpo", "hf-optuna", "plain")


@pytest.mark.slow
def test_policy_smoke_records_each_run_once_retrains_the_winners_and_summarizes(tmp_path: Path) -> None:
    results = tmp_path / "results"
    args = ("--smoke", "--contenders", ",".join(POLICY_SMOKE), "--budget", "6", "--workdir", str(tmp_path / "work"),
            "--results", str(results))  # fmt: skip
    result = run("policy.py", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    paths = sorted((results / "policy" / "records").glob("*.json"))
    assert [p.name for p in paths] == sorted(f"smoke__{name}__seed0__6s.json" for name in POLICY_SMOKE)
    records = {r["contender"]: r for r in (json.loads(p.read_text()) for p in paths)}
    for name, r in records.items():
        search, retrain = r["search"], r["retrain"]
        assert all(0 < t["finished_s"] <= search["wall_s"] + 0.01 for t in search["trials"]), name
        bests = [b for _, b in search["curve"]]
        assert bests == sorted(bests) and bests[-1] == search["best"], name  # best so far only grows
        assert search["best"] == max(t["value"] for t in search["trials"] if t["state"] == "COMPLETE"), name
        assert sum(search["counts"].values()) == len(search["trials"]) >= 1, name
        assert retrain["test"] == retrain["test_metrics"]["f1"] and 0 <= retrain["test"] <= 1, name
        # The winner retrained is the search's best, and it scores on dev what its trial did.
        assert retrain["trial_dev_value"] == search["best"], name
        assert retrain["dev_metrics"]["f1"] == pytest.approx(search["best"], abs=1e-9), name
    assert records["llmflow-hpo"]["retrain"]["reproduced"] is True
    assert records["hf-optuna"]["search"]["counts"]["COMPLETE"] >= 2  # trials until the budget, not one
    summary = json.loads((results / "policy.json").read_text())["smoke"]
    assert list(summary["contenders"]) == list(POLICY_SMOKE)
    ours = summary["contenders"]["llmflow-hpo"]
    assert ours["test"]["mean"] == records["llmflow-hpo"]["retrain"]["test"]
    assert ours["beats_plain"] == (records["llmflow-hpo"]["retrain"]["test"] > records["plain"]["retrain"]["test"])
    table = (results / "policy.md").read_text()
    assert result.stdout == table + "\n" and table.count("\n| ") == 1 + len(POLICY_SMOKE)  # header, one row each
    assert (results / "policy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second invocation runs nothing that has its record: it only summarizes again.
    stamps = [p.stat().st_mtime_ns for p in paths]
    again = run("policy.py", *args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("recorded already") == len(POLICY_SMOKE)
    assert [p.stat().st_mtime_ns for p in paths] == stamps and again.stdout == result.stdout


def test_policy_contenders_are_settings_this_version_has_and_their_studies_validate(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import policy

    from llmflow_hpo.config.study import config_from_dict

    data = {
        split: str(REPO / "studies" / "data" / "quickstart-ner" / f"{split}.txt") for split in ("train", "dev", "test")
    }
    for name, contender in policy.CONTENDERS.items():
        if contender["kind"] != "llmflow":
            continue
        assert policy.missing_settings(contender["study"]) == [], name
        study = policy.study_dict(policy.TASKS["conll-tiny"], data, 3, 100.0, 1, tmp_path, name)
        cfg = config_from_dict(policy.deep_update(study, contender["study"]), source=name)
        assert (cfg.seed, cfg.budget_s, cfg.n_trials, cfg.train.num_threads, cfg.train.epochs) == (3, 100.0, None, 1, 3)
    # The headline contender states llmflow-hpo's defaults: its overrides change nothing.
    study = policy.study_dict(policy.TASKS["conll-tiny"], data, 3, 100.0, 1, tmp_path, "x")
    ours = policy.deep_update(study, policy.CONTENDERS[policy.OURS]["study"])
    assert config_from_dict(ours, source="x") == config_from_dict(study, source="x")
    assert policy.missing_settings({"sampler": {"no_such_knob": 1}, "nor_this": 2}) == [
        "sampler.no_such_knob",
        "nor_this",
    ]


def test_policy_goals_test_the_mean_difference_and_say_what_a_third_of_the_peers_time_holds() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import policy
    from scipy import stats

    grid = [0.0, 10.0, 20.0, 30.0, 40.0]

    def entry(tests: list[float], complete_at: list[list[float]], curve: list[float], wall: float) -> dict:
        return {"tests": tests, "complete_at_s": complete_at, "curve_mean": curve, "wall_s": wall,
                "test": {"mean": sum(tests) / len(tests)}, "best_dev": {"mean": curve[-1]}, "beats_plain": None}  # fmt: skip

    nan = float("nan")
    ours = entry([0.70, 0.74, 0.72], [[12.0, 31.0], [15.0], [19.0, 25.0]], [nan, nan, 0.6, 0.8, 0.8], 40.0)
    peer = entry([0.75, 0.77, 0.76], [[30.0]], [nan, nan, nan, 0.7, 0.7], 60.0)  # a third: 20 s
    goals = policy.goals({"grid_s": grid, "contenders": {policy.OURS: ours, policy.PEER: peer}})
    expected = stats.ttest_ind(ours["tests"], peer["tests"], equal_var=False)
    assert goals["ours_minus_peer_p"] == pytest.approx(expected.pvalue)
    assert goals["ours_minus_peer_ci95"] == pytest.approx(list(expected.confidence_interval(0.95)))
    low, high = goals["ours_minus_peer_ci95"]
    assert goals["ours_test_minus_peer"] == pytest.approx(-0.04) and not goals["ours_matches_peer_test"]
    assert low < -0.04 < high
    assert goals["ours_complete_by_third"] == [1, 1, 1] and goals["ours_best_at_third"] == 0.6
    assert goals["ours_reach_fraction"] == pytest.approx(30.0 / 60.0)  # 0.8 >= 0.7 first at 30 s
    # Before every seed has a complete trial the mean best is unknown, not the mean of the seeds that have one.
    goals = policy.goals({"grid_s": grid, "contenders": {policy.OURS: {**ours, "curve_mean": [nan] * 3 + [0.8] * 2},
                                                         policy.PEER: peer}})  # fmt: skip
    assert goals["ours_best_at_third"] is None


def test_policy_runs_at_a_shorter_budget_are_checked_against_the_peers_final_mean_within_a_third_of_its_time() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import policy

    def record(contender: str, seed: int, budget: float, wall: float, best: float | None, test: float) -> dict:
        return {"task": "t", "contender": contender, "seed": seed, "budget_s": budget, "metric": "f1", "machine": "m",
                "search": {"wall_s": wall, "best": best, "curve": [] if best is None else [[wall, best]],
                           "counts": {"COMPLETE": 1, "PRUNED": 0, "FAIL": 0}, "trials": []},
                "retrain": {"test": test, "wall_s": 1.0}}  # fmt: skip

    long = [record(policy.PEER, s, 90.0, 120.0, 0.30 + s / 100, 0.3 + s / 100) for s in range(2)]
    long += [record(policy.OURS, s, 90.0, 95.0, 0.40, 0.4 + s / 100) for s in range(2)]
    short = [record(policy.OURS, 0, 30.0, 41.0, 0.33, 0.35), record(policy.OURS, 1, 30.0, 39.0, 0.31, 0.33)]
    summary = policy.aggregate(long + short)
    assert sorted(summary) == ["t", "t @ 30 s"]  # the equal-time comparison keeps the task's name
    (got,) = summary["t"]["goals"]["ours_short_budgets"]
    assert (got["seeds"], got["wall_max_s"], got["best_dev"]["mean"]) == (2, 41.0, pytest.approx(0.32))
    assert got["test"]["mean"] == pytest.approx(0.34)
    assert got["reaches_peer_dev"] and not got["within_a_third"]  # 0.32 >= 0.305, but 41 s > 120 s / 3
    short[0]["search"]["wall_s"] = short[1]["search"]["wall_s"] = 40.0
    (got,) = policy.aggregate(long + short)["t"]["goals"]["ours_short_budgets"]
    assert got["within_a_third"] and got["reaches_peer_dev"]
    short[1]["search"]["best"] = None  # a run without a complete trial fails, though the others' mean reaches
    (got,) = policy.aggregate(long + short)["t"]["goals"]["ours_short_budgets"]
    assert got["without_a_trial"] == 1 and not got["reaches_peer_dev"]
    assert "with a budget of 30 s" in policy.markdown(policy.aggregate(long + short), long + short)
    # A later round of ours alone at a longer budget gets its own section: the comparison stays at the peer's.
    longer = [record(policy.OURS, s, 300.0, 305.0, 0.45, 0.5) for s in range(2)]
    summary = policy.aggregate(long + short + longer)
    assert sorted(summary) == ["t", "t @ 30 s", "t @ 300 s"] and summary["t"]["budget_s"] == 90.0
    assert [b["budget_s"] for b in summary["t"]["goals"]["ours_short_budgets"]] == [30.0]
    # A search with two workers has twice the cores: its own section, never a short-budget run or the main budget.
    two = [
        {**record(policy.OURS, s, b, 20.0, 0.5, 0.5), "definition": {"workers": 2}} for s in range(2) for b in (30, 900)
    ]
    summary = policy.aggregate(long + short + two)
    assert sorted(summary) == ["t", "t @ 30 s", "t @ 30 s, 2 workers", "t @ 900 s, 2 workers"]
    assert summary["t"]["budget_s"] == 90.0 and summary["t @ 30 s"]["contenders"][policy.OURS]["seeds"] == [0, 1]
    assert [b["seeds"] for b in summary["t"]["goals"]["ours_short_budgets"]] == [2]


@pytest.mark.parametrize("protocol", ["smollm2", "minilm-ner"])
def test_lora_smoke_measures_every_contender(tmp_path: Path, protocol: str) -> None:
    out = tmp_path / "lora.json"
    result = run("lora.py", protocol, "--smoke", "--results", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads(out.read_text())
    expected = {"smollm2": {"zero-shot", "full", "lora-r8"}, "minilm-ner": {"full", "lora-r8"}}[protocol]
    assert {r["contender"] for r in records} == expected and all(r["smoke"] for r in records)
    trained = {r["contender"]: r for r in records if r["contender"] != "zero-shot"}
    assert 0 < trained["lora-r8"]["n_trainable"] < trained["full"]["n_trainable"] == trained["full"]["n_params"]
    assert trained["lora-r8"]["best_bytes"] < trained["full"]["best_bytes"]  # the adapter (and head) only
    assert all(r["peak_memory_mb"] > 0 and r["seconds_per_example"] > 0 for r in trained.values())


@pytest.mark.slow
def test_deploy_load_smoke_runs_the_pipeline_baseline_and_tabulates(text_model: Path, tmp_path: Path) -> None:
    """The load test's loop and table against the baseline server (llmflow-hpo serve itself: test_serve.py)."""
    out = tmp_path / "load.json"
    result = run(
        "deploy.py", "load", "--models", str(text_model), "--variants", "pipeline",
        "--clients", "1", "4", "--requests", "12", "--seconds", "20", "--out", str(out),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    cells = json.loads(out.read_text())["cells"]
    assert [(c["variant"], c["clients"]) for c in cells] == [("pipeline", 1), ("pipeline", 4)]
    for c in cells:
        assert c["requests"] == 12 and c["errors"] == 0 and c["throughput"] > 0
        assert 0 < c["p50_ms"] <= c["p95_ms"] <= c["p99_ms"]
    assert [c.get("exit_code") for c in cells if "exit_code" in c] == [0]  # the server stopped cleanly
    assert "| model | server | clients |" in result.stdout


@pytest.mark.skipif(not (REPO.parent / "shared" / "data").is_dir(), reason="no shared data beside the repository")
def test_data_formats_smoke_finds_the_parquet_copies_equal_to_the_originals(tmp_path: Path) -> None:
    out = tmp_path / "formats.json"
    result = run("data_formats.py", "--smoke", "--workdir", str(tmp_path / "copies"), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["all_equal"] is True
    assert found["conll2003"]["dev"]["examples"] == 200 and found["sst2"]["train"]["examples"] == 180
    assert found["conll2003"]["labels"][0] == "O" and found["sst2"]["labels"] == ["0", "1"]
    assert {"input_ids", "labels", "word_labels", "label_words"} <= set(found["conll2003"]["train"]["feature_columns"])
