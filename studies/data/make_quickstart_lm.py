"""Write the quick-start causal-LM sample: short invented reviews as prompt/completion pairs (JSON Lines).

    python studies/data/make_quickstart_lm.py            # writes studies/data/quickstart-lm/
    python studies/data/make_quickstart_lm.py --out DIR  # somewhere else

What it makes: ``train.jsonl`` (240 examples), ``dev.jsonl`` (60) and ``test.jsonl`` (60). Each line is
``{"prompt": "Review: ...\\nIs this review positive or negative?", "completion": "positive"}`` (or negative):
generative classification, scored by the label the generated answer starts with (label_accuracy).

How: a review is filled from templates with a thing reviewed (a film, a café, a phone, ...), an opinion word
and sometimes a twist ("but", "although") whose clause carries the verdict, so word-spotting alone is not
enough. Opinion words are split once, by the seed, into words train may use and words kept for dev and test.
The output depends only on the seed (stdlib ``random``): rerunning gives the same bytes.

Everything here is made up for this project; no text comes from any data set.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SIZES = {"train": 240, "dev": 60, "test": 60}
SEED = 29
QUESTION = "Is this review positive or negative?"

THINGS = [
    "the film", "this café", "the new phone", "the hotel", "this novel", "the concert", "the museum tour",
    "this laptop", "the restaurant", "the bike shop", "the audiobook", "this board game", "the ferry ride",
    "the bakery", "this headset", "the play", "the garden centre", "this camera", "the cooking class",
]  # fmt: skip
GOOD = [
    "wonderful", "delightful", "excellent", "charming", "superb", "brilliant", "lovely", "outstanding",
    "enjoyable", "impressive", "fantastic", "pleasant", "terrific", "marvellous", "gripping", "friendly",
]  # fmt: skip
BAD = [
    "awful", "dreadful", "boring", "disappointing", "terrible", "dull", "clumsy", "miserable",
    "tedious", "poor", "shoddy", "unpleasant", "frustrating", "mediocre", "noisy", "rude",
]  # fmt: skip
PLAIN = [
    "{thing} was {word}.",
    "I found {thing} {word} from start to finish.",
    "Honestly, {thing} was {word}.",
    "We thought {thing} was {word} and would say so again.",
    "{thing}? Simply {word}.",
]
TWIST = [
    "{thing} looked {other} at first, but in the end it was {word}.",
    "Although the reviews said {other}, {thing} was {word}.",
    "I expected something {other}; {thing} turned out {word}.",
]


def _split_words(words: list[str], rng: random.Random) -> tuple[list[str], list[str]]:
    shuffled = words[:]
    rng.shuffle(shuffled)
    cut = len(shuffled) * 3 // 4
    return shuffled[:cut], shuffled[cut:]


def _review(rng: random.Random, positive: bool, good: list[str], bad: list[str]) -> str:
    word = rng.choice(good if positive else bad)
    other = rng.choice(bad if positive else good)
    template = rng.choice(TWIST if rng.random() < 0.3 else PLAIN)
    text = template.format(thing=rng.choice(THINGS), word=word, other=other)
    return text[0].upper() + text[1:]


def make(out: Path, seed: int = SEED) -> None:
    rng = random.Random(seed)
    good_train, good_held = _split_words(GOOD, rng)
    bad_train, bad_held = _split_words(BAD, rng)
    out.mkdir(parents=True, exist_ok=True)
    for split, size in SIZES.items():
        good, bad = (good_train, bad_train) if split == "train" else (good_train + good_held, bad_train + bad_held)
        lines = []
        for i in range(size):
            positive = i % 2 == 0
            review = _review(rng, positive, good, bad)
            record = {"prompt": f"Review: {review}\n{QUESTION}", "completion": "positive" if positive else "negative"}
            lines.append(json.dumps(record, ensure_ascii=False))
        rng.shuffle(lines)
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "quickstart-lm")
    make(parser.parse_args().out)


if __name__ == "__main__":
    main()
