"""The label rules of a study's data (part, regex, map, drop, fixed order) and NER tag schemes, through
load_splits on small files written by each test: what each rule changes, what it reports, what it refuses."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from llmflow_hpo.config.study import DataConfig
from llmflow_hpo.data.splits import load_splits
from llmflow_hpo.errors import DataError

# TREC-like coarse:fine labels, 6 examples of each coarse class (so dev and test can be carved stratified)
TREC = [
    ("DESC:manner", "how"),
    ("DESC:def", "what is"),
    ("HUM:ind", "who"),
    ("LOC:city", "where"),
    ("NUM:date", "when"),
]


def trec_file(tmp_path: Path) -> Path:
    lines = [f"{label} {question} {i} ?" for i in range(6) for label, question in TREC]
    path = tmp_path / "trec.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def trec(tmp_path: Path, **data: object):
    settings = {"separator": " ", "label_position": "start", "dev_split": 5, "test_split": 5, **data}
    return load_splits(
        DataConfig(format="lines", train=str(trec_file(tmp_path)), **settings), task="text-classification"
    )


def all_labels(splits) -> Counter:
    return Counter(e.label for name in ("train", "dev", "test") for e in getattr(splits, name))


def test_the_coarse_class_by_separator_or_by_regex(tmp_path: Path) -> None:
    by_part = trec(tmp_path, label_separator=":", label_part=0)
    by_regex = trec(tmp_path, label_regex=r"^([A-Z]+):")

    assert all_labels(by_part) == {"DESC": 12, "HUM": 6, "LOC": 6, "NUM": 6}
    assert by_part.labels == ["DESC", "HUM", "LOC", "NUM"]
    assert all_labels(by_regex) == all_labels(by_part)
    assert any("trec.txt: label rules changed 30 label(s): DESC:def -> DESC (6)" in line for line in by_part.report)
    assert trec(tmp_path, label_separator=":", label_part=-1).labels == ["city", "date", "def", "ind", "manner"]


def test_map_merges_drop_removes_and_the_order_is_fixed(tmp_path: Path) -> None:
    splits = trec(
        tmp_path,
        label_separator=":",
        label_map={"LOC": "PLACE", "NUM": "PLACE"},
        drop_labels=["HUM"],
        labels=["PLACE", "DESC"],
    )

    assert all_labels(splits) == {"DESC": 12, "PLACE": 12}
    assert splits.labels == ["PLACE", "DESC"]  # as given, not sorted
    assert "trec.txt: dropped 6 examples of data.drop_labels: HUM:ind (6)" in splits.report


def test_a_label_outside_the_fixed_order_or_the_rules_is_refused_with_counts(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"trec\.txt: unknown label\(s\) 'HUM' \(6x\), 'NUM' \(6x\): not in data.labels"
    ):
        trec(tmp_path, label_separator=":", labels=["DESC", "LOC"])
    with pytest.raises(DataError, match=r"trec\.txt: example 1: label 'DESC:manner' does not match data.label_regex"):
        trec(tmp_path, label_regex=r"^[a-z]+$")
    with pytest.raises(DataError, match=r"has 2 part\(s\) split by ':'; data.label_part 2 is not one of them"):
        trec(tmp_path, label_separator=":", label_part=2)


def conll(tmp_path: Path, name: str, sentences: list[str]) -> str:
    path = tmp_path / name
    path.write_text("\n\n".join("\n".join(s.split(";")) for s in sentences) + "\n")
    return str(path)


def test_bioes_files_train_as_iob2_with_their_faults_reported(tmp_path: Path) -> None:
    train = conll(tmp_path, "train.txt", ["Peter B-PER;Blackburn E-PER;said O", "EU S-ORG;I O;London E-LOC"] * 3)
    dev = conll(tmp_path, "dev.txt", ["Paris S-LOC"])

    data = DataConfig(format="conll", train=train, dev=dev, test=dev, tag_scheme="BIOES")
    splits = load_splits(data, task="token-classification")

    assert splits.train[0].tags == ("B-PER", "I-PER", "O")
    assert splits.train[1].tags == ("B-ORG", "O", "B-LOC")
    assert splits.labels == ["O", "B-LOC", "B-ORG", "B-PER", "I-PER"]
    assert "train.txt: tags converted from BIOES to IOB2" in splits.report
    faults = next(line for line in splits.report if "does not allow" in line)
    assert faults.startswith("train.txt: 3 tag sequence(s) that BIOES does not allow")
    assert "sentence 2 word 3: E-LOC without its B-LOC" in faults
    with pytest.raises(
        DataError, match=r"train\.txt: sentence 1: tag 'E-PER' is not a IOB2 tag .*set data.tag_scheme: BIOES"
    ):
        load_splits(DataConfig(format="conll", train=train, dev=dev, test=dev), task="token-classification")


def test_ner_rules_work_on_entity_types(tmp_path: Path) -> None:
    train = conll(tmp_path, "train.txt", ["Peter B-PER;Smith I-PER;in O;Paris B-LOC;for O;Reuters B-ORG"] * 2)

    data = DataConfig(
        format="conll",
        train=train,
        dev=train,
        test=train,
        label_map={"ORG": "O", "LOC": "PLACE"},
        labels=["PLACE", "PER"],
    )
    splits = load_splits(data, task="token-classification")

    assert splits.train[0].tags == ("B-PER", "I-PER", "O", "B-PLACE", "O", "O")
    assert splits.labels == ["O", "B-PLACE", "I-PLACE", "B-PER", "I-PER"]  # fixed: every tag of each type
    assert "train.txt: dropped 2 entities of data.drop_labels or mapped to O: ORG (2)" in splits.report
    assert "train.txt: label rules changed 2 label(s): LOC -> PLACE (2)" in splits.report
