"""Bad input that ``validate`` used to pass and ``search`` refused late (or never): each is refused by both.

Every case runs the real CLI (tests/refusals.py): exit 1, no traceback, no hang, one final
``llmflow-hpo: error:`` line naming the file and the field, and no file created or changed: ``search`` is
refused before it opens or creates a study, so no ``*.db`` appears. A GPU setting on a machine with no GPU
driver is refused by both without torch. The cases that only torch can find (a model transformers cannot
build; a device torch does not see though a driver is there) are refused by ``search`` and ``worker``
before any study exists or any trial is claimed; ``validate`` imports no torch and cannot see them. Those runs import torch and
transformers first (``search`` does anyway): 5 s is too short for that on a loaded 2-core machine, so
they get a longer limit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import NER_SPACE, SAMPLE_NER, TINY_MODEL, deep_update
from refusals import refused

from llmflow_hpo.config.study import DataConfig, load_study_config
from llmflow_hpo.data.splits import load_splits
from llmflow_hpo.errors import DataError
from llmflow_hpo.search.preflight import check_model_config

TORCH_IMPORT_TIMEOUT = 60.0  # search's own start-up: torch and transformers are imported before the refusal


def _ner_file(folder: Path, name: str, tags: list[str]) -> str:
    lines = [f"word{i} {tag}" for i, tag in enumerate(tags)]
    sentences = "\n\n".join("\n".join(lines[i : i + 3]) for i in range(0, len(lines), 3))
    path = folder / name
    path.write_text(sentences + "\n", encoding="utf-8")
    return str(path)


def _tsv(folder: Path, labels: list[str]) -> str:
    path = folder / "train.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"a film number {i}\t{lab}\n" for i, lab in enumerate(labels)))
    return str(path)


def _empty_model(folder: Path) -> str:
    (folder / "empty-model").mkdir()
    return str(folder / "empty-model")


def _broken_model(folder: Path) -> str:
    (folder / "broken-model").mkdir()
    (folder / "broken-model" / "config.json").write_text("{not json")
    return str(folder / "broken-model")


def _one_label_text(folder: Path) -> dict[str, Any]:
    data = {"format": "tsv", "train": _tsv(folder, ["1"] * 40), "dev": None, "test": None}
    data |= {"text_column": "sentence", "label_column": "label", "limit_train": None}
    return {"task": "text-classification", "data": data}


def _all_o_ner(folder: Path) -> dict[str, Any]:
    return {"data": {"train": _ner_file(folder, "train-o.txt", ["O"] * 30)}}


def _one_tag_ner(folder: Path) -> dict[str, Any]:
    return {"data": {"train": _ner_file(folder, "train-per.txt", ["B-PER"] * 30)}}


# (id, config changes (or a function of the study's folder giving them), search space or None, the words the
# error line must hold). Each is refused by validate and by search, before anything is written.
CASES: list[tuple[str, Any, dict[str, Any] | None, tuple[str, ...]]] = [
    ("seed-negative", {"seed": -1}, None, ("seed: got -1; must be in 0..4294967295",)),
    ("seed-too-big", {"seed": 2**32}, None, ("seed: got 4294967296",)),
    ("seed-huge", {"seed": 10**30}, None, ("seed: got",)),
    ("warmup-negative", {"pruner": {"name": "median", "options": {"n_warmup_steps": -5}}}, None, ("n_warmup_steps",)),
    ("percentile-150", {"pruner": {"name": "percentile", "options": {"percentile": 150}}}, None, ("[0, 100]",)),
    ("percentile-string", {"pruner": {"name": "percentile", "options": {"percentile": "high"}}}, None, ("a number",)),
    ("interval-zero", {"pruner": {"name": "median", "options": {"interval_steps": 0}}}, None, ("interval_steps",)),
    ("min-trials-zero", {"pruner": {"name": "median", "options": {"n_min_trials": 0}}}, None, ("n_min_trials",)),
    (
        "pruner-startup-text",
        {"pruner": {"name": "median", "options": {"n_startup_trials": "five"}}},
        None,
        ("expected an integer",),
    ),
    ("hyperband-factor-1", {"pruner": {"name": "hyperband", "options": {"reduction_factor": 1}}}, None, (">= 2",)),
    (
        "halving-min-resource",
        {"pruner": {"name": "successive-halving", "options": {"min_resource": "soon"}}},
        None,
        ("min_resource: must be >= 1 or 'auto'",),
    ),
    ("startup-negative", {"sampler": {"name": "tpe", "options": {"n_startup_trials": -3}}}, None, ("must be >= 0",)),
    ("startup-five", {"sampler": {"name": "tpe", "options": {"n_startup_trials": "five"}}}, None, ("an integer",)),
    ("startup-float", {"sampler": {"name": "tpe", "options": {"n_startup_trials": 2.5}}}, None, ("an integer",)),
    ("ei-candidates-zero", {"sampler": {"name": "tpe", "options": {"n_ei_candidates": 0}}}, None, ("must be >= 1",)),
    ("prior-weight-negative", {"sampler": {"name": "tpe", "options": {"prior_weight": -1}}}, None, ("> 0",)),
    ("multivariate-yes", {"sampler": {"name": "tpe", "options": {"multivariate": "yes"}}}, None, ("true or false",)),
    ("gamma-number", {"sampler": {"name": "tpe", "options": {"gamma": 0.25}}}, None, ("takes a Python object",)),
    ("qmc-type", {"sampler": {"name": "qmc", "options": {"qmc_type": "nonsense"}}}, None, ("QMCSampler refused",)),
    ("encoding-unknown", {"data": {"encoding": "utf9"}}, None, ("data.encoding: unknown text encoding 'utf9'",)),
    ("encoding-typo", {"data": {"encoding": "cp-1252"}}, None, ("did you mean 'cp1252'",)),
    ("encoding-binary", {"data": {"encoding": "base64"}}, None, ("not a text encoding",)),
    (
        "override-typo",
        {"model": {"config_overrides": {"num_hiden_layers": 1}}},
        None,
        ("model.config_overrides.num_hiden_layers", "did you mean 'num_hidden_layers'"),
    ),
    ("override-unknown", {"model": {"config_overrides": {"flux_capacitor": 1}}}, None, ("not a field of the bert",)),
    (
        "hidden-size-7",
        {"model": {"config_overrides": {"hidden_size": 7}}},
        None,
        ("hidden_size 7 is not a multiple of num_attention_heads 2",),
    ),
    ("heads-3", {"model": {"config_overrides": {"num_attention_heads": 3}}}, None, ("not a multiple",)),
    ("layers-negative", {"model": {"config_overrides": {"num_hidden_layers": -1}}}, None, ("must be >= 1, got -1",)),
    ("layers-zero", {"model": {"config_overrides": {"num_hidden_layers": 0}}}, None, ("num_hidden_layers: must be",)),
    ("heads-zero", {"model": {"config_overrides": {"num_attention_heads": 0}}}, None, ("num_attention_heads",)),
    ("intermediate-zero", {"model": {"config_overrides": {"intermediate_size": 0}}}, None, ("intermediate_size",)),
    ("hidden-size-float", {"model": {"config_overrides": {"hidden_size": 3.5}}}, None, ("expected an integer",)),
    ("hidden-size-bool", {"model": {"config_overrides": {"hidden_size": True}}}, None, ("expected an integer",)),
    ("empty-model-folder", lambda d: {"model": {"name_or_path": _empty_model(d)}}, None, ("has no config.json",)),
    ("broken-config-json", lambda d: {"model": {"name_or_path": _broken_model(d)}}, None, ("as JSON",)),
    ("hub-id-not-cached", {"model": {"name_or_path": "nobody/no-such-model"}}, None, ("local Hugging Face cache",)),
    ("max-length-100000", {"data": {"max_length": 100000}}, None, ("data.max_length: 100000", "at most 512")),
    (
        "max-length-over-override",
        {"model": {"config_overrides": {"max_position_embeddings": 32}}},
        None,
        ("data.max_length: 48", "at most 32"),
    ),
    ("maximize-loss", {"objective": {"metric": "loss", "direction": "maximize"}}, None, ("objective.direction",)),
    ("minimize-f1", {"objective": {"metric": "f1", "direction": "minimize"}}, None, ("worst model; use maximize",)),
    ("minimize-default-metric", {"objective": {"direction": "minimize"}}, None, ("minimize of dev f1",)),
    (
        "one-label-text",
        _one_label_text,
        None,
        ("train.tsv: the train split has one label only ('1'", "data.label_column"),
    ),
    ("ner-all-o", _all_o_ner, None, ("no entities (all 30 tags are O)", "data.tag_column")),
    ("ner-one-tag", _one_tag_ner, None, ("one label only ('B-PER'",)),
    (
        "step-float",
        {},
        {"weight_decay": {"type": "float", "low": 0.0, "high": 0.1, "step": 0.03}},
        ("weight_decay.step", "set high to 0.09 or 0.12"),
    ),
    (
        "step-int",
        {},
        {"epochs": {"type": "int", "low": 1, "high": 10, "step": 2}},
        ("epochs.step", "set high to 9 or 11"),
    ),
    (
        "choices-repeat-once-read",
        {},
        {"learning_rate": {"type": "categorical", "choices": ["1e-5", 1.0e-5]}},
        ("learning_rate.choices: repeated values",),
    ),
    (
        "options-for-a-pruner-that-takes-none",
        {"pruner": {"name": "none", "options": {"n_startup_trials": 2}}},
        None,
        ("pruner.options.n_startup_trials", "NopPruner; it takes none; remove pruner.options"),
    ),
    # A GPU setting where there is no GPU driver at all: told without torch (validate); skipped on a GPU machine.
    ("device-cuda", {"train": {"device": "cuda"}}, None, ("train.device: cuda asked for", "use auto or cpu")),
    (
        "qlora-on-cpu",
        {"train": {"adapter": "lora", "quantization": "4bit"}},
        None,
        ("train.quantization: 4bit (QLoRA) needs a CUDA GPU", "use none on CPU"),
    ),
    ("qlora-without-adapter", {"train": {"quantization": "4bit"}}, None, ("train.quantization", "train.adapter: lora")),
    ("lora-targets-blank", {"train": {"lora_targets": "q_proj,,v_proj"}}, None, ("train.lora_targets", "module names")),
    ("lora-rank-zero", {"train": {"lora_r": 0}}, None, ("train.lora_r", ">= 1")),
    ("gguf-missing", {"model": {"gguf_file": "nope.gguf"}}, None, ("model.gguf_file", "nope.gguf does not exist")),
    ("gguf-random", {"model": {"gguf_file": "nope.gguf", "random_init": True}}, None, ("model.random_init",)),
    ("device-cuda-1", {"train": {"device": "cuda:1"}}, None, ("train.device: cuda:1",)),
    ("fp16-on-cpu-by-auto", {"train": {"precision": "fp16"}}, None, ("train.precision: fp16 needs a GPU",)),
    (  # transformers' constant schedule ignores the warmup steps: the trial would run without warmup
        "constant-schedule-with-warmup",
        {"train": {"scheduler": "constant", "warmup_ratio": 0.1}},
        None,
        ("train.scheduler: 'constant' takes no warmup", "train.warmup_ratio: 0.1", "constant_with_warmup"),
    ),
    (
        "constant-schedule-searched-with-warmup",
        {},
        {
            **NER_SPACE,
            "scheduler": {"type": "categorical", "choices": ["linear", "constant"]},
            "warmup_ratio": {"type": "float", "low": 0.0, "high": 0.2},
        },
        ("search_space scheduler: 'constant' takes no warmup", "constant_with_warmup"),
    ),
]


def _write(folder: Path, changes: Any, space: dict[str, Any] | None) -> Path:
    from conftest import NER_CONFIG

    changes = changes(folder) if callable(changes) else changes
    raw = deep_update(NER_CONFIG, changes)
    raw["cache_dir"] = str(folder / "cache")
    (folder / raw["search_space"]).write_text(yaml.safe_dump(space or NER_SPACE))
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _assert_names(line: str, path: Path, words: tuple[str, ...]) -> None:
    """The line names the file (the study config, or its search space) and holds ``words`` (field and fix)."""
    assert f"{path}: " in line or f"{path.parent / 'space.yaml'}: " in line, line
    for word in words:
        assert word in line, line


NEED_NO_GPU = {"device-cuda", "device-cuda-1", "fp16-on-cpu-by-auto", "qlora-on-cpu"}


@pytest.mark.parametrize(("name", "changes", "space", "words"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("command", ["validate", "search"])
def test_refused_by_validate_and_by_search_before_any_study(
    tmp_path: Path, command: str, name: str, changes: Any, space: dict[str, Any] | None, words: tuple[str, ...]
) -> None:
    from llmflow_hpo.search.preflight import GPU_DRIVER_FILES

    if name in NEED_NO_GPU and any(Path(p).exists() for p in GPU_DRIVER_FILES):
        pytest.skip("this machine has a GPU driver: only torch can tell whether it sees the device")
    path = _write(tmp_path, changes, space)
    line = refused([command, str(path)], cwd=tmp_path, watch=[SAMPLE_NER])
    _assert_names(line, path, words)
    assert not list(tmp_path.rglob("*.db"))


def test_refused_through_set_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, {}, None)
    line = refused(["validate", str(path), "--set", "seed=-7", "--set", "data.encoding=utf9"], cwd=tmp_path)
    assert "seed: got -7" in line and "data.encoding" in line


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    changes = {"seed": -1, "data": {"encoding": "utf9"}, "objective": {"metric": "loss", "direction": "maximize"}}
    line = refused(["validate", str(_write(tmp_path, changes, None))], cwd=tmp_path)
    assert "seed:" in line and "data.encoding:" in line and "objective.direction:" in line


# ----------------------------------------------------------------------------------------------------
# Found only where torch runs: search refuses them before it opens or creates the study.

SEARCH_ONLY = [
    ("unknown-activation", {"model": {"config_overrides": {"hidden_act": "nope"}}}, ("cannot build a BertConfig",)),
    (  # torch's nn.Embedding asserts it: an AssertionError, which went out as a traceback
        "pad-token-outside-the-vocabulary",
        {"model": {"config_overrides": {"pad_token_id": 100000}}},
        ("cannot build a BertConfig", "Padding_idx must be within num_embeddings"),
    ),
]


@pytest.mark.parametrize(("changes", "words"), [c[1:] for c in SEARCH_ONLY], ids=[c[0] for c in SEARCH_ONLY])
def test_refused_by_search_before_any_study(tmp_path: Path, changes: dict[str, Any], words: tuple[str, ...]) -> None:
    import torch

    if torch.cuda.is_available() and "device" in str(changes) + str(changes.get("train", {}).get("precision")):
        pytest.skip("this machine has a GPU")
    path = _write(tmp_path, changes, None)
    line = refused(["search", str(path)], cwd=tmp_path, watch=[SAMPLE_NER], timeout=TORCH_IMPORT_TIMEOUT)
    _assert_names(line, path, words)
    assert not list(tmp_path.rglob("*.db"))


# ----------------------------------------------------------------------------------------------------
# The functions behind them.


def test_model_config_check_keeps_valid_overrides_and_imports_no_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = _write(tmp_path, {"model": {"config_overrides": {"classifier_dropout": 0.2, "layer_norm_eps": 1e-7}}}, None)
    assert check_model_config(load_study_config(path), "study.yaml") == []
    probe = (
        "import sys; from llmflow_hpo.config.study import load_study_config; from llmflow_hpo.search.preflight import "
        f"check_model_config; print(check_model_config(load_study_config({str(path)!r}), 's'), "
        "'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[] False False", out.stderr


def test_model_config_check_without_the_model_class_refuses_only_near_misses(tmp_path: Path) -> None:
    folder = tmp_path / "odd-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-type", **TINY_MODEL["config_overrides"]}))
    keep = _write(tmp_path, {"model": {"name_or_path": str(folder), "config_overrides": {"other_field": 1}}}, None)
    assert check_model_config(load_study_config(keep), "s") == []
    typo = _write(tmp_path, {"model": {"name_or_path": str(folder), "config_overrides": {"hiden_size": 8}}}, None)
    (problem,) = check_model_config(load_study_config(typo), "s")
    assert "did you mean 'hidden_size'" in problem


@pytest.mark.parametrize(
    ("tags", "expected"), [(["O"] * 6, "no entities"), (["B-LOC"] * 6, "one label only"), (["O", "B-LOC"] * 3, None)]
)
def test_load_splits_refuses_ner_training_data_without_anything_to_learn(
    tmp_path: Path, tags: list[str], expected: str | None
) -> None:
    train = Path(_ner_file(tmp_path, "train.txt", tags))
    dev = SAMPLE_NER / "dev.txt"
    data = DataConfig(format="conll", train=str(train), dev=str(dev), test=str(dev))
    if expected is None:
        assert "B-LOC" in load_splits(data, task="token-classification").labels
        return
    with pytest.raises(DataError, match=expected) as info:
        load_splits(data, task="token-classification")
    assert str(train) in str(info.value)


def test_load_splits_warns_when_dev_has_no_entities(tmp_path: Path) -> None:
    train = Path(_ner_file(tmp_path, "train.txt", ["O", "B-LOC"] * 3))
    dev = Path(_ner_file(tmp_path, "dev.txt", ["O"] * 3))
    data = DataConfig(format="conll", train=str(train), dev=str(dev), test=str(train))
    splits = load_splits(data, task="token-classification")
    assert any(line.startswith("warning: dev has no entities") for line in splits.report)


def _stored_study(folder: Path) -> str:
    """A study as search makes it (config and search space in its user attributes), with no trial yet."""
    from llmflow_hpo.search.spaces import load_search_space
    from llmflow_hpo.search.strategy import build_pruner, build_sampler
    from llmflow_hpo.study.storage import open_study

    cfg = load_study_config(_write(folder, {}, None))
    space, space_raw = load_search_space(cfg.search_space)
    open_study(cfg, space_raw, sampler=build_sampler(cfg, space), pruner=build_pruner(cfg), data_report=[])
    assert cfg.storage is not None
    return cfg.storage


def test_worker_refuses_a_device_that_is_not_there_before_it_claims_a_trial(tmp_path: Path) -> None:
    import optuna
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    storage = _stored_study(tmp_path)
    args = ["worker", "--study", "tiny-ner", "--storage", storage, "--set", "train.device=cuda"]
    # Reading the study's config opens its SQLite database (optuna's WAL files): the study's own files.
    own = ["tiny-ner.db", "tiny-ner.db-shm", "tiny-ner.db-wal"]
    from llmflow_hpo.search.preflight import GPU_DRIVER_FILES

    # No GPU driver at all: refused before torch is imported; else torch is asked (and imported first).
    driver = any(Path(p).exists() for p in GPU_DRIVER_FILES)
    timeout = TORCH_IMPORT_TIMEOUT if driver else 5.0
    line = refused(args, cwd=tmp_path, watch=[SAMPLE_NER], may_create=own, timeout=timeout)
    assert "train.device: cuda asked for" in line and "study 'tiny-ner' (stored config)" in line, line
    assert optuna.load_study(study_name="tiny-ner", storage=storage).get_trials() == []
