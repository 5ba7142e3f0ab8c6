"""Readers, cleaning, splitting and load_splits on small files written by each test."""

from __future__ import annotations

import dataclasses
import runpy
from collections import Counter
from pathlib import Path

import pytest

from llmflow_hpo.config.study import DataConfig
from llmflow_hpo.data.clean import clean_examples
from llmflow_hpo.data.read import TextExample, TokenExample, read_conll, read_delimited, read_jsonl
from llmflow_hpo.data.splits import DataSplits, load_splits, split_examples, stratify_problem
from llmflow_hpo.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
QUICKSTART = REPO / "studies" / "data" / "quickstart-ner"

CONLL = """\
-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

-DOCSTART- -X- -X- O

BRUSSELS NNP B-NP B-LOC
1996-08-22 CD I-NP O
"""


def write(tmp_path: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def tok(words: str, tags: str) -> TokenExample:
    return TokenExample(tuple(words.split()), tuple(tags.split()))


def splits_of(task: str, fmt: str, train: Path, dev: Path | None = None, test: Path | None = None, seed: int = 0,
              **data: object) -> DataSplits:  # fmt: skip
    """load_splits of a DataConfig with these files and settings."""
    files = {"train": str(train), "dev": dev and str(dev), "test": test and str(test)}
    return load_splits(DataConfig(format=fmt, **files, **data), task=task, seed=seed)


def text_examples(counts: dict[str, int]) -> list[TextExample]:
    return [TextExample(f"{label} text {i}", label) for label, n in counts.items() for i in range(n)]


# --------------------------------------------------------------------------------------- CoNLL


def test_conll_skips_docstart_and_splits_on_blank_lines(tmp_path: Path) -> None:
    examples = read_conll(write(tmp_path, "train.txt", CONLL))

    assert examples == [
        tok("EU rejects German call", "B-ORG O B-MISC O"),
        tok("Peter Blackburn", "B-PER I-PER"),
        tok("BRUSSELS 1996-08-22", "B-LOC O"),  # last sentence has no blank line after it
    ]


def test_conll_column_choice(tmp_path: Path) -> None:
    path = write(tmp_path, "train.txt", CONLL)

    examples = read_conll(path, token_column=1, tag_column=2)

    assert examples[0] == tok("NNP VBZ JJ NN", "B-NP B-VP B-NP I-NP")
    assert read_conll(path, tag_column=-2)[1] == tok("Peter Blackburn", "B-NP I-NP")


def test_conll_reads_tabs_and_keeps_no_break_space_inside_a_word(tmp_path: Path) -> None:
    path = write(tmp_path, "t.txt", "New\u00a0York\tB-LOC\nis\tO\n")

    assert read_conll(path) == [TokenExample(("New\u00a0York", "is"), ("B-LOC", "O"))]


def test_conll_limit_keeps_first_sentences(tmp_path: Path) -> None:
    path = write(tmp_path, "train.txt", CONLL)

    assert read_conll(path, limit=2) == read_conll(path)[:2]
    assert read_conll(path, limit=0) == []


def test_conll_short_line_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.txt", "EU B-ORG\nrejects\n")

    with pytest.raises(DataError, match=r"bad\.txt: line 2: 1 column"):
        read_conll(path)


def test_conll_column_out_of_range_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.txt", "\nEU NNP B-ORG\n")

    with pytest.raises(DataError, match="line 2"):
        read_conll(path, tag_column=5)


def test_conll_line_with_another_column_count_is_refused_at_its_line(tmp_path: Path) -> None:
    # "in O X" was read with tag X (tag column -1) and nothing said; a lost tag shifts columns the same way.
    path = write(tmp_path, "bad.txt", "EU NNP B-ORG\nrejects VBZ O\n\nin O X Y\n")

    with pytest.raises(DataError, match=r"bad\.txt: line 4: 4 column\(s\).*but line 1 has 3"):
        read_conll(path)


def test_conll_docstart_lines_do_not_set_the_column_count(tmp_path: Path) -> None:
    path = write(tmp_path, "ok.txt", "-DOCSTART- -X- O\n\nEU B-ORG\nrejects O\n")

    assert read_conll(path) == [TokenExample(("EU", "rejects"), ("B-ORG", "O"))]


def test_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.txt: no such file"):
        read_conll(tmp_path / "nope.txt")


# --------------------------------------------------------------------------------------- CSV / TSV

SST2_LIKE = 'sentence\tlabel\n"a quoted" start , and an odd " quote \t1\nthe film \'s "best" moment \t0\n'


def test_tsv_by_header_name_keeps_quotes_as_text(tmp_path: Path) -> None:
    path = write(tmp_path, "train.tsv", SST2_LIKE)

    examples = read_delimited(path, delimiter="\t", text_column="sentence", label_column="label")

    assert examples == [
        TextExample('"a quoted" start , and an odd " quote ', "1"),
        TextExample('the film \'s "best" moment ', "0"),
    ]


def test_csv_field_longer_than_csvs_default_limit_is_read_whole(tmp_path: Path) -> None:
    # csv refuses fields over 131,072 characters ("field larger than field limit", no line); the README
    # promises that long examples are truncated to data.max_length, which the tokenizer does.
    text = "word " * 40_000
    path = write(tmp_path, "train.csv", f"text,label\n{text},1\nshort,0\n")

    examples = read_delimited(path, delimiter=",", text_column="text", label_column="label")

    assert [len(e.text) for e in examples] == [200_000, 5]
    import csv

    assert csv.field_size_limit() == 131_072  # the process-wide limit is restored


@pytest.mark.parametrize(
    ("content", "line"),
    [('text,label\n"never closed,1\nnext,0\n', 3), ('text,label\nok,1\n"quoted" then text,0\n', 3)],
)
def test_csv_broken_quoting_names_its_line(tmp_path: Path, content: str, line: int) -> None:
    # Unstrict csv let an unclosed quote swallow every later row into one field, silently.
    path = write(tmp_path, "train.csv", content)

    with pytest.raises(DataError, match=rf"train\.csv: line {line}: not valid delimited text"):
        read_delimited(path, delimiter=",", text_column="text", label_column="label")


def test_csv_with_quoted_commas(tmp_path: Path) -> None:
    path = write(tmp_path, "train.csv", 'label,text\npositive,"good, really good"\nnegative,bad\n')

    examples = read_delimited(path, delimiter=",", text_column="text", label_column="label")

    assert examples == [TextExample("good, really good", "positive"), TextExample("bad", "negative")]


def test_csv_by_index_without_header(tmp_path: Path) -> None:
    path = write(tmp_path, "train.csv", "1,first\n\n0,second\n2,third\n")

    examples = read_delimited(path, delimiter=",", text_column=1, label_column=0, header=False, limit=2)

    assert examples == [TextExample("first", "1"), TextExample("second", "0")]  # blank row skipped


def test_missing_column_lists_columns_found(tmp_path: Path) -> None:
    path = write(tmp_path, "train.tsv", SST2_LIKE)

    with pytest.raises(DataError, match=r"no column 'text': columns found: 0='sentence', 1='label'"):
        read_delimited(path, delimiter="\t", text_column="text", label_column="label")


def test_unlabelled_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "test.tsv", "index\tsentence\n0\tsome text\n")

    with pytest.raises(DataError, match=r"no labels.*columns found: index, sentence"):
        read_delimited(path, delimiter="\t", text_column="sentence", label_column=None)
    with pytest.raises(DataError, match=r"no column 'label'.*unlabelled"):
        read_delimited(path, delimiter="\t", text_column="sentence", label_column="label")


def test_short_row_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "train.tsv", "sentence\tlabel\nfine\t1\nbroken\n")

    with pytest.raises(DataError, match="line 3: 1 column"):
        read_delimited(path, delimiter="\t", text_column="sentence", label_column="label")


def test_name_without_header_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "train.csv", "1,first\n")

    with pytest.raises(DataError, match="no header"):
        read_delimited(path, delimiter=",", text_column="text", label_column=0, header=False)


def test_encoding_option(tmp_path: Path) -> None:
    path = write(tmp_path, "train.csv", "text,label\ncafé crème,1\n", encoding="latin-1")

    examples = read_delimited(path, delimiter=",", text_column="text", label_column="label", encoding="latin-1")

    assert examples == [TextExample("café crème", "1")]
    with pytest.raises(
        DataError, match=r"train.csv: line 2, byte 14 \(0xe9\): cannot decode as utf-8 .*set data.encoding"
    ):
        read_delimited(path, delimiter=",", text_column="text", label_column="label")


def test_byte_order_mark_is_not_part_of_the_first_column(tmp_path: Path) -> None:
    path = write(tmp_path, "train.csv", "\ufefftext,label\nhello,1\n")

    assert read_delimited(path, delimiter=",", text_column="text", label_column="label") == [TextExample("hello", "1")]


# --------------------------------------------------------------------------------------- JSON Lines


def test_jsonl_both_tasks(tmp_path: Path) -> None:
    ner = write(tmp_path, "ner.jsonl", '{"tokens": ["Peter", "ran"], "tags": ["B-PER", "O"]}\n\n')
    text = write(tmp_path, "cls.jsonl", '{"text": "good", "label": 1}\n{"text": "bad", "label": "neg"}\n')

    assert read_jsonl(ner, task="token-classification") == [tok("Peter ran", "B-PER O")]
    assert read_jsonl(text, task="text-classification") == [TextExample("good", "1"), TextExample("bad", "neg")]
    assert read_jsonl(text, task="text-classification", limit=1) == [TextExample("good", "1")]


def test_jsonl_custom_fields(tmp_path: Path) -> None:
    path = write(tmp_path, "cls.jsonl", '{"sentence": "fine", "y": "pos"}\n')

    examples = read_jsonl(path, task="text-classification", text_field="sentence", label_field="y")

    assert examples == [TextExample("fine", "pos")]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "a", "label": 1', "line 2: not valid JSON"),
        ('{"text": "a"}', "line 2: no field 'label'"),
        ('["a", 1]', "line 2: expected a JSON object"),
        ('{"text": 3, "label": 1}', "line 2: field 'text' must be a string"),
        ("[" * 100_000 + "]" * 100_000, "line 2: JSON nested too deeply"),  # was RecursionError
    ],
)
def test_jsonl_bad_line_is_named(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path, "cls.jsonl", '{"text": "ok", "label": 0}\n' + line + "\n")

    with pytest.raises(DataError, match=message):
        read_jsonl(path, task="text-classification")


def test_jsonl_token_and_tag_counts_must_match(tmp_path: Path) -> None:
    path = write(tmp_path, "ner.jsonl", '{"tokens": ["a", "b"], "tags": ["O"]}\n')

    with pytest.raises(DataError, match="line 1: 2 tokens but 1 tags"):
        read_jsonl(path, task="token-classification")


# --------------------------------------------------------------------------------------- cleaning


def test_cleaning_normalises_unicode_and_whitespace_and_reports_it() -> None:
    decomposed = "cafe\u0301"  # e + combining acute accent
    examples = [
        TextExample(f"  {decomposed}\u00a0\u00a0au   lait ", "1"),
        TextExample("already clean", "0"),
    ]

    cleaned, report = clean_examples(examples, source="train.tsv")

    assert cleaned == [TextExample("caf\u00e9 au lait", "1"), TextExample("already clean", "0")]
    assert "train.tsv: normalised Unicode to NFC in 1 example" in report
    assert "train.tsv: stripped whitespace from the ends of strings in 1 example" in report
    assert any(line.startswith("train.tsv: made runs of whitespace") and "1 example" in line for line in report)


def test_cleaning_can_leave_unicode_alone() -> None:
    cleaned, report = clean_examples([TextExample("cafe\u0301", "1")], source="x", normalize_unicode=None)

    assert cleaned == [TextExample("cafe\u0301", "1")]
    assert report == ["x: 1 example, nothing to clean"]
    assert clean_examples([TextExample("cafe\u0301", "1")], source="x", normalize_unicode="none")[0] == cleaned


def test_cleaning_drops_empty_examples_and_says_so() -> None:
    examples = [TextExample("keep", "1"), TextExample(" \u00a0 ", "0"), TextExample("", "1"), TextExample("x", " ")]

    cleaned, report = clean_examples(examples, source="train.csv")

    assert cleaned == [TextExample("keep", "1")]
    assert "train.csv: dropped 2 empty examples" in report
    assert "train.csv: dropped 1 example with an empty label" in report
    assert "train.csv: kept 1 of 4 examples after cleaning" in report


def test_cleaning_ner_drops_empty_words_with_their_tags() -> None:
    examples = [
        TokenExample(("Peter", "\u00a0", "ran"), ("B-PER", "O", "O")),
        TokenExample(("\u200a",), ("O",)),  # hair space only: nothing left
    ]

    cleaned, report = clean_examples(examples, source="train.txt")

    assert cleaned == [tok("Peter ran", "B-PER O")]
    assert "train.txt: dropped 2 words (with their tags) that were empty after cleaning" in report
    assert "train.txt: dropped 1 empty example" in report


def test_cleaning_ner_length_mismatch_is_an_error() -> None:
    with pytest.raises(DataError, match=r"train\.txt: example 1: 2 tokens but 1 tags"):
        clean_examples([TokenExample(("a", "b"), ("O",))], source="train.txt")


def test_cleaning_asks_the_example_of_any_task_to_clean_itself() -> None:
    """A new task's example class needs only its ``cleaned`` method: clean_examples knows no example type."""

    @dataclasses.dataclass(frozen=True)
    class PromptExample:
        prompt: str
        completion: str

        def cleaned(self, clean, source, number):
            prompt, completion = clean(self.prompt), clean(self.completion)
            if not completion:
                clean.count("empty")
                return None
            return PromptExample(prompt, completion)

    examples = [PromptExample(" Say  hi ", "hi\u00a0there"), PromptExample("q", " ")]

    cleaned, report = clean_examples(examples, source="sft.jsonl")

    assert cleaned == [PromptExample("Say hi", "hi there")]
    assert "sft.jsonl: dropped 1 empty example" in report
    assert any("whitespace" in line for line in report), report


# --------------------------------------------------------------------------------------- splitting


def test_split_is_deterministic_for_a_seed_and_keeps_order() -> None:
    examples = text_examples({"a": 30, "b": 30})

    first = split_examples(examples, fraction_or_count=0.2, seed=7, stratify=False)
    again = split_examples(examples, fraction_or_count=0.2, seed=7, stratify=False)
    other = split_examples(examples, fraction_or_count=0.2, seed=8, stratify=False)

    assert first == again
    assert first[1] != other[1]
    rest, held = first
    assert sorted(rest + held, key=examples.index) == examples
    assert rest == sorted(rest, key=examples.index)  # original order kept in each part


def test_split_count_versus_fraction() -> None:
    examples = text_examples({"a": 50})

    assert [len(part) for part in split_examples(examples, fraction_or_count=7, seed=0, stratify=False)] == [43, 7]
    assert [len(part) for part in split_examples(examples, fraction_or_count=0.1, seed=0, stratify=False)] == [45, 5]
    assert [len(part) for part in split_examples(examples, fraction_or_count=0.11, seed=0, stratify=False)] == [44, 6]


@pytest.mark.parametrize("bad", [0, 0.0, 1.0, -0.5, 100, True])
def test_split_rejects_bad_amounts(bad: float) -> None:
    with pytest.raises(ValueError):
        split_examples(text_examples({"a": 100}), fraction_or_count=bad, seed=0, stratify=False)


def test_stratified_split_keeps_label_proportions() -> None:
    examples = text_examples({"pos": 80, "neg": 20})

    rest, held = split_examples(examples, fraction_or_count=0.25, seed=3, stratify=True)

    assert Counter(example.label for example in held) == {"pos": 20, "neg": 5}
    assert Counter(example.label for example in rest) == {"pos": 60, "neg": 15}


def test_stratify_falls_back_when_a_class_is_too_small() -> None:
    examples = [*text_examples({"a": 20, "b": 20}), TextExample("lonely", "c")]

    assert "'c' have fewer than 2 examples" in stratify_problem([e.label for e in examples], 0.2)
    assert stratify_problem([e.label for e in examples[:40]], 0.2) is None
    rest, held = split_examples(examples, fraction_or_count=0.2, seed=0, stratify=True)
    assert len(held) == 9
    assert len(rest) == 32


def test_stratify_needs_text_examples() -> None:
    with pytest.raises(ValueError, match="text classification"):
        split_examples([tok("a", "O"), tok("b", "O")], fraction_or_count=1, seed=0, stratify=True)


# --------------------------------------------------------------------------------------- load_splits


def ner_file(tmp_path: Path, name: str, count: int, tag: str = "B-PER") -> Path:
    body = "\n\n".join(f"Name{i} X X {tag}\nsaid X X O" for i in range(count))
    return write(tmp_path, name, f"-DOCSTART- -X- -X- O\n\n{body}\n")


def test_load_splits_carves_dev_and_test_from_train(tmp_path: Path) -> None:
    train = ner_file(tmp_path, "train.txt", 100)

    splits = splits_of("token-classification", "conll", train, seed=1)

    assert isinstance(splits, DataSplits)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (80, 10, 10)
    assert set(splits.train).isdisjoint(splits.dev) and set(splits.dev).isdisjoint(splits.test)
    assert any(
        line.startswith("test: no file given, carved 10 examples (10% of the 100 read)") for line in splits.report
    )
    assert any(line.startswith("dev: no file given, carved 10 examples") for line in splits.report)
    assert "splits: train 80, dev 10, test 10" in splits.report
    again = splits_of("token-classification", "conll", train, seed=1)
    assert again.dev == splits.dev


def test_load_splits_ner_labels_o_first_then_sorted(tmp_path: Path) -> None:
    train = ner_file(tmp_path, "train.txt", 20, tag="B-PER\nSmith X X I-PER")
    dev = ner_file(tmp_path, "dev.txt", 5, tag="B-LOC")
    test = ner_file(tmp_path, "test.txt", 5, tag="B-MISC")

    splits = splits_of("token-classification", "conll", train, dev, test, limit_dev=2)

    assert splits.labels == ["O", "B-LOC", "B-MISC", "B-PER", "I-PER"]
    assert len(splits.dev) == 2
    assert "dev.txt: read 2 sentences from " + str(dev) + " (limit 2)" in splits.report
    assert "warning: dev has label(s) never seen in train: B-LOC" in splits.report


def test_load_splits_classification_is_stratified_with_sorted_labels(tmp_path: Path) -> None:
    rows = "".join(f"text {i} \t{'1' if i % 4 else '0'}\n" for i in range(200))
    train = write(tmp_path, "train.tsv", "sentence\tlabel\n" + rows)

    splits = splits_of("text-classification", "tsv", train, text_column="sentence", dev_split=40, test_split=0.2)

    assert splits.labels == ["0", "1"]
    assert Counter(e.label for e in splits.dev) == {"1": 30, "0": 10}
    assert Counter(e.label for e in splits.test) == {"1": 30, "0": 10}
    assert any("stratified by label" in line for line in splits.report)
    assert "train.tsv: stripped whitespace from the ends of strings in 200 examples" in splits.report


def test_load_splits_jsonl_classification(tmp_path: Path) -> None:
    lines = "".join(f'{{"review": "r{i}", "stars": {i % 3}}}\n' for i in range(30))
    train = write(tmp_path, "train.jsonl", lines)

    splits = splits_of(
        "text-classification", "jsonl", train, text_column="review", label_column="stars", dev_split=3, test_split=3
    )

    assert splits.labels == ["0", "1", "2"]
    assert len(splits.train) == 24


def test_load_splits_missing_file_names_path(tmp_path: Path) -> None:
    train = ner_file(tmp_path, "train.txt", 10)

    with pytest.raises(DataError, match=r"dev\.txt: no such file"):
        splits_of("token-classification", "conll", train, tmp_path / "dev.txt")


def test_load_splits_empty_split_is_an_error(tmp_path: Path) -> None:
    train = ner_file(tmp_path, "train.txt", 10)
    empty = write(tmp_path, "test.txt", "-DOCSTART- -X- -X- O\n\n")

    with pytest.raises(DataError, match=r"test\.txt: the test split has no examples"):
        splits_of("token-classification", "conll", train, test=empty)


def test_load_splits_too_small_to_carve(tmp_path: Path) -> None:
    train = ner_file(tmp_path, "train.txt", 2)

    with pytest.raises(DataError, match=r"train\.txt: cannot carve a dev split"):
        splits_of("token-classification", "conll", train)


@pytest.mark.parametrize(("task", "fmt"), [("token-classification", "tsv"), ("text-classification", "conll")])
def test_load_splits_format_must_fit_task(tmp_path: Path, task: str, fmt: str) -> None:
    with pytest.raises(ConfigError, match="does not fit task"):
        splits_of(task, fmt, tmp_path / "x")


# --------------------------------------------------------------------------------------- shipped and real data


def test_quickstart_sample_loads() -> None:
    splits = splits_of("token-classification", "conll", *(QUICKSTART / f"{s}.txt" for s in ("train", "dev", "test")))

    assert (len(splits.train), len(splits.dev), len(splits.test)) == (400, 120, 120)
    assert splits.labels == ["O", "B-LOC", "B-MISC", "B-ORG", "B-PER", "I-LOC", "I-MISC", "I-ORG", "I-PER"]
    assert all(line.startswith("-DOCSTART- -X- -X- O\n\n") for line in _quickstart_texts().values())


def test_quickstart_sample_matches_its_generator(tmp_path: Path) -> None:
    generator = runpy.run_path(str(REPO / "studies" / "data" / "make_quickstart_ner.py"), run_name="generator")

    written = generator["write_all"](tmp_path)

    assert {split: path.read_text(encoding="utf-8") for split, path in written.items()} == _quickstart_texts()


def _quickstart_texts() -> dict[str, str]:
    return {split: (QUICKSTART / f"{split}.txt").read_text(encoding="utf-8") for split in ("train", "dev", "test")}


def test_real_conll2003_and_sst2_first_rows() -> None:
    conll = SHARED_DATA / "conll2003" / "train.txt"
    sst2 = SHARED_DATA / "sst2" / "train.tsv"
    if not (conll.is_file() and sst2.is_file()):
        pytest.skip(f"shared data not found at {SHARED_DATA} (CI keeps shared/ beside the repository)")

    sentences = read_conll(conll, limit=50)
    rows = read_delimited(sst2, delimiter="\t", text_column="sentence", label_column="label", limit=50)

    assert len(sentences) == 50
    assert sentences[0] == tok("EU rejects German call to boycott British lamb .", "B-ORG O B-MISC O O O B-MISC O O")
    assert all(len(s.tokens) == len(s.tags) for s in sentences)
    assert len(rows) == 50
    assert rows[0] == TextExample("hide new secretions from the parental units ", "0")
    assert {row.label for row in rows} == {"0", "1"}
    cleaned, report = clean_examples(rows, source="train.tsv")
    assert cleaned[0].text == "hide new secretions from the parental units"
    assert len(cleaned) == 50 and report
