"""Tokenization, word-to-subword label alignment, the on-disk cache and truncation reporting."""

from __future__ import annotations

from llmflow_hpo.features import IGNORE_INDEX, align_labels, prepare_features
from llmflow_hpo.models import load_tokenizer


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
    shutil.copytree(Path(__file__).resolve().parents[1] / "studies" / "data" / "quickstart-ner", copy)
    cfg, _, _ = tiny_cfg()
    moved, _, _ = tiny_cfg({"data": {s: str(copy / f"{s}.txt") for s in ("train", "dev", "test")}})
    first = prepare_features(cfg, log=lambda _: None)
    assert prepare_features(moved, log=lambda _: None).from_cache
    (copy / "train.txt").write_text((copy / "train.txt").read_text().replace(" B-PER", " B-ORG", 1))
    changed = prepare_features(moved, log=lambda _: None)
    assert not changed.from_cache and changed.cache_path != first.cache_path
