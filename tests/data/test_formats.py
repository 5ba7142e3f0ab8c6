"""Every data format and reading option on small files written by each test: Parquet, Arrow, JSON, save_to_disk
folders (all splits, one named split), delimited lines of both shapes (Latin-1 with an invalid byte, CRLF), CSV
with another delimiter; then the splits' overlaps, dedupe and where each split came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmflow_hpo.config.study import DataConfig
from llmflow_hpo.data.read import TextExample, TokenExample, read_file, read_lines
from llmflow_hpo.data.splits import load_splits
from llmflow_hpo.errors import DataError
from llmflow_hpo.tasks import get_task

NER = get_task("token-classification")
TEXT = get_task("text-classification")
SENTENCES = [
    (["EU", "rejects", "German", "call"], ["B-ORG", "O", "B-MISC", "O"]),
    (["Peter", "Blackburn"], ["B-PER", "I-PER"]),
    (["BRUSSELS", "1996-08-22"], ["B-LOC", "O"]),
]
NAMES = ["O", "B-PER", "I-PER", "B-ORG", "B-LOC", "B-MISC"]


def ner_dataset(rows: list = SENTENCES, *, class_labels: bool = False):
    """A datasets.Dataset of tokens and tags: tag strings, or (as Hugging Face's CoNLL-2003) class-label ids."""
    import datasets

    tokens = [list(words) for words, _ in rows]
    if not class_labels:
        return datasets.Dataset.from_dict({"tokens": tokens, "tags": [list(tags) for _, tags in rows]})
    features = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=NAMES)),
        }
    )
    ids = [[NAMES.index(tag) for tag in tags] for _, tags in rows]
    return datasets.Dataset.from_dict({"tokens": tokens, "ner_tags": ids}, features=features)


def examples_of(rows: list = SENTENCES) -> list[TokenExample]:
    return [TokenExample(tuple(words), tuple(tags)) for words, tags in rows]


def read(path: Path, task=NER, **data: object) -> list:
    return read_file(path, task=task, data=DataConfig(train=str(path), **data))


# --------------------------------------------------------------------------------------- tables


def test_parquet_with_tag_strings_and_with_class_label_ids(tmp_path: Path) -> None:
    ner_dataset().to_parquet(str(tmp_path / "plain.parquet"))
    ner_dataset(class_labels=True).to_parquet(str(tmp_path / "ids.parquet"))

    assert read(tmp_path / "plain.parquet", format="parquet") == examples_of()
    # the ids of a ClassLabel column are read as their names
    assert read(tmp_path / "ids.parquet", format="parquet", tags_field="ner_tags") == examples_of()
    data = DataConfig(format="parquet", train="x", tags_field="ner_tags")
    first = read_file(tmp_path / "ids.parquet", task=NER, data=data, limit=1)
    assert first == examples_of()[:1]


def test_arrow_files_in_both_ipc_layouts(tmp_path: Path) -> None:
    import pyarrow as pa

    table = ner_dataset().data.table
    for name, writer in (("file.arrow", pa.ipc.new_file), ("stream.arrow", pa.ipc.new_stream)):
        with pa.OSFile(str(tmp_path / name), "wb") as sink, writer(sink, table.schema) as out:
            out.write_table(table)
        assert read(tmp_path / name, format="arrow") == examples_of()


def test_json_documents_a_list_a_field_and_lines(tmp_path: Path) -> None:
    records = [{"review": "good film", "stars": 5}, {"review": "dull", "stars": 1}]
    (tmp_path / "list.json").write_text(json.dumps(records))
    (tmp_path / "field.json").write_text(json.dumps({"version": 2, "data": records}))
    fields = {"text_column": "review", "label_column": "stars"}
    expected = [TextExample("good film", "5"), TextExample("dull", "1")]

    assert read(tmp_path / "list.json", TEXT, format="json", **fields) == expected
    assert read(tmp_path / "field.json", TEXT, format="json", json_field="data", **fields) == expected


def test_a_table_without_the_field_names_the_row_and_the_fields_found(tmp_path: Path) -> None:
    ner_dataset().to_parquet(str(tmp_path / "train.parquet"))

    with pytest.raises(DataError, match=r"train\.parquet: row 1: no field 'ner_tags' \(fields found: tags, tokens\)"):
        read(tmp_path / "train.parquet", format="parquet", tags_field="ner_tags")


def test_a_file_that_is_not_parquet_is_refused_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "train.parquet").write_text("not parquet at all\n")

    with pytest.raises(DataError, match=r"train\.parquet: cannot be read as parquet: "):
        read(tmp_path / "train.parquet", format="parquet")


def test_reading_a_table_writes_nothing_beside_it_or_in_the_home_cache(tmp_path: Path, monkeypatch) -> None:
    import datasets

    home = tmp_path / "home"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")  # where datasets writes by default
    data = tmp_path / "data"
    data.mkdir()
    ner_dataset().to_parquet(str(data / "train.parquet"))

    assert len(read(data / "train.parquet", format="parquet")) == 3
    assert [p.name for p in data.iterdir()] == ["train.parquet"]
    assert not home.exists() or not any(p.is_file() for p in home.rglob("*"))


# --------------------------------------------------------------------------------------- save_to_disk folders


def hf_folder(tmp_path: Path, splits: dict[str, list]) -> Path:
    import datasets

    folder = tmp_path / "conll_hf"
    datasets.DatasetDict({name: ner_dataset(rows, class_labels=True) for name, rows in splits.items()}).save_to_disk(
        str(folder)
    )
    return folder


def test_a_folder_gives_all_its_splits_with_validation_as_dev(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path, {"train": SENTENCES * 4, "validation": SENTENCES[:2], "test": SENTENCES[2:]})

    splits = load_splits(DataConfig(format="hf-disk", train=str(folder), tags_field="ner_tags"), task=NER.name)

    assert (len(splits.train), len(splits.dev), len(splits.test)) == (12, 2, 1)
    assert splits.test == examples_of(SENTENCES[2:])
    assert f"dev: 2 from split 'validation' of {folder}" in splits.report
    assert splits.labels == ["O", "B-LOC", "B-MISC", "B-ORG", "B-PER", "I-PER"]


def test_one_named_split_of_a_folder_and_the_rest_carved(tmp_path: Path) -> None:
    rows = [([f"w{i}", "Smith"], ["O", "B-PER"]) for i in range(20)]
    folder = hf_folder(tmp_path, {"train": rows, "test": SENTENCES})

    data = DataConfig(format="hf-disk", train=str(folder), tags_field="ner_tags", splits={"train": "train"})
    splits = load_splits(data, task=NER.name, seed=3)

    assert (len(splits.train), len(splits.dev), len(splits.test)) == (16, 2, 2)  # test carved, not the folder's
    assert any(line.startswith("test: 2 carved from train (10%, seed 3)") for line in splits.report)


def test_a_folder_of_one_dataset_and_a_missing_split_named(tmp_path: Path) -> None:
    ner_dataset(SENTENCES * 4).save_to_disk(str(tmp_path / "one"))
    folder = hf_folder(tmp_path, {"train": SENTENCES})

    one = load_splits(
        DataConfig(format="hf-disk", train=str(tmp_path / "one"), dev_split=2, test_split=2),
        task="token-classification",
    )
    assert len(one.train) == 8
    with pytest.raises(DataError, match=r"conll_hf: no split 'dev' for dev \(the folder has train\); fix data.splits"):
        load_splits(
            DataConfig(format="hf-disk", train=str(folder), splits={"train": "train", "dev": "dev"}), task=NER.name
        )
    with pytest.raises(DataError, match=r"not a folder written by datasets' save_to_disk"):
        load_splits(DataConfig(format="hf-disk", train=str(tmp_path)), task=NER.name)


# --------------------------------------------------------------------------------------- delimited lines


def test_label_first_lines_in_latin1_with_an_invalid_byte(tmp_path: Path) -> None:
    # TREC's shape: "LABEL:sub question", the label before the first space; é is one byte in Latin-1
    body = "DESC:manner How did serfdom develop ?\nENTY:cremat What films featured the character Popeye ?\n"
    body += "HUM:ind Who was Galileo Galil\xe9e ?\n"
    path = tmp_path / "trec.txt"
    path.write_bytes(body.encode("latin-1"))

    with pytest.raises(DataError) as error:
        read_lines(path, separator=" ", label_position="start")
    message = str(error.value)
    assert message.startswith(f"{path}: line 3, byte 122 (0xe9): cannot decode as utf-8")  # 38 + 55 + 29 bytes
    assert "set data.encoding" in message and "latin-1" in message

    examples = read_lines(path, separator=" ", label_position="start", encoding="latin-1")
    assert examples[0] == TextExample("How did serfdom develop ?", "DESC:manner")
    assert examples[2] == TextExample("Who was Galileo Galilée ?", "HUM:ind")


def test_label_last_lines_split_at_the_last_separator_with_crlf(tmp_path: Path) -> None:
    path = tmp_path / "sentences.txt"
    path.write_bytes("a@b film , loved it@positive\r\nboring@negative\r\n\r\n".encode("latin-1"))

    assert read_lines(path, separator="@") == [
        TextExample("a@b film , loved it", "positive"),  # the text keeps its own @
        TextExample("boring", "negative"),
    ]
    assert read_lines(path, separator="@", split_at="first")[0] == TextExample("a", "b film , loved it@positive")
    missing = tmp_path / "missing.txt"
    missing.write_text("fine@positive\nno label here\n")
    with pytest.raises(
        DataError, match=r"missing\.txt: line 2: no '@' \(data.separator\) splits the text from the label"
    ):
        read_lines(missing, separator="@")


def test_csv_with_another_delimiter(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text('text;label\n"one; two";a\nthree;b\n')

    assert read(path, TEXT, format="csv", delimiter=";") == [TextExample("one; two", "a"), TextExample("three", "b")]


# --------------------------------------------------------------------------------------- splits


def test_overlaps_are_reported_with_counts_and_dedupe_drops_them_from_train(tmp_path: Path) -> None:
    train = [f"text {i}\t{i % 2}" for i in range(20)] + ["shared one\t0", "shared one\t0", "shared two\t1"]
    (tmp_path / "train.tsv").write_text("text\tlabel\n" + "\n".join(train) + "\n")
    (tmp_path / "dev.tsv").write_text("text\tlabel\nshared one\t1\ndev only\t0\n")
    (tmp_path / "test.tsv").write_text("text\tlabel\nshared two\t1\n  dev  only \t1\n")
    files = {name: str(tmp_path / f"{name}.tsv") for name in ("train", "dev", "test")}

    kept = load_splits(DataConfig(format="tsv", **files), task=TEXT.name)
    assert len(kept.train) == 23
    assert any(
        line.startswith("overlap: 1 input in both train and dev (2 train examples, 1 dev example;")
        for line in kept.report
    )
    assert any(
        line.startswith("overlap: 1 input in both train and test (1 train example, 1 test example")
        for line in kept.report
    )
    # "  dev  only " is "dev only" after cleaning
    assert any(line.startswith("overlap: 1 input in both dev and test") for line in kept.report)
    assert "repeats: train holds 1 example whose input an earlier one has" in kept.report

    deduped = load_splits(DataConfig(format="tsv", dedupe=True, **files), task=TEXT.name)
    assert len(deduped.train) == 20 and not {"shared one", "shared two"} & {e.text for e in deduped.train}
    assert "dedupe: dropped 3 train examples that occur in dev or test; train keeps 20" in deduped.report
    assert f"train: 20 from {files['train']}, less 3 that occur in dev or test" in deduped.report
    assert f"dev: 2 from {files['dev']}" in deduped.report
