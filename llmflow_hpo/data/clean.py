"""Cleaning of the examples read: Unicode and whitespace normalised, empty examples dropped, every change counted.

Each task's example class cleans itself (``cleaned(clean, source, number)``, see ``tasks.base.Cleaner``);
this module hands it the cleaner and turns the counts into report lines.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

__all__ = ["UNICODE_FORMS", "clean_examples", "plural"]

UNICODE_FORMS: tuple[str, ...] = ("NFC", "NFD", "NFKC", "NFKD")
_WHITESPACE_RUN = re.compile(r"\s+")


def clean_examples(examples: list, *, source: str, normalize_unicode: str | None = "NFC") -> tuple[list, list[str]]:
    """Normalise Unicode and whitespace, drop what ends up empty, and report every change.

    Text, words, tags and labels get Unicode form ``normalize_unicode`` (None keeps them as they
    are), then runs of whitespace (a no-break space included) become one space and the ends are
    stripped. NER words that become empty are dropped with their tag; examples that become empty
    (no words, no text, or no label) are dropped. ``normalize_unicode="none"`` is the same as None. Returns the clean examples and report lines, each
    starting with ``source``.
    """
    form = _unicode_form(normalize_unicode)
    counts: Counter[str] = Counter()
    cleaned = []
    clean = _Cleaner(form, counts)
    for number, example in enumerate(examples, start=1):
        clean.changes = _Changes()
        result = example.cleaned(clean, source, number)  # each task's example class cleans itself (tasks/)
        if result is not None:
            clean.kept()
            cleaned.append(result)
    return cleaned, _cleaning_report(source, len(examples), form, counts)


def _unicode_form(normalize_unicode: str | None) -> str | None:
    """The unicodedata form to apply; None (or "none", as in a study config) applies none."""
    if normalize_unicode is None or normalize_unicode.lower() == "none":
        return None
    if normalize_unicode not in UNICODE_FORMS:
        raise ValueError(f"normalize_unicode must be one of {', '.join(UNICODE_FORMS)}, 'none' or None")
    return normalize_unicode


@dataclass
class _Changes:
    """What cleaning did to one string (or, or-ed together, to one example)."""

    unicode: bool = False
    ends: bool = False
    runs: bool = False

    def __ior__(self, other: _Changes) -> _Changes:
        self.unicode |= other.unicode
        self.ends |= other.ends
        self.runs |= other.runs
        return self


def _clean_string(value: str, form: str | None) -> tuple[str, _Changes]:
    """The string in Unicode form ``form``, stripped, with whitespace runs made one space."""
    normalised = unicodedata.normalize(form, value) if form else value
    stripped = normalised.strip()
    collapsed = _WHITESPACE_RUN.sub(" ", stripped)
    return collapsed, _Changes(normalised != value, stripped != normalised, collapsed != stripped)


class _Cleaner:
    """The ``tasks.base.Cleaner`` that ``clean_examples`` hands each example: it cleans its strings and notes
    what changed, to be counted if the example is kept."""

    def __init__(self, form: str | None, counts: Counter[str]) -> None:
        self.form = form
        self.counts = counts
        self.changes = _Changes()

    def __call__(self, value: str) -> str:
        cleaned, changes = _clean_string(value, self.form)
        self.changes |= changes
        return cleaned

    def count(self, what: str) -> None:
        self.counts[what] += 1

    def kept(self) -> None:
        """Count what cleaning did to the example just kept."""
        self.counts["unicode"] += self.changes.unicode
        self.counts["ends"] += self.changes.ends
        self.counts["runs"] += self.changes.runs


def _cleaning_report(source: str, total: int, form: str | None, counts: Counter[str]) -> list[str]:
    lines = []
    if counts["unicode"]:
        lines.append(f"{source}: normalised Unicode to {form} in {plural(counts['unicode'], 'example')}")
    if counts["ends"]:
        lines.append(f"{source}: stripped whitespace from the ends of strings in {plural(counts['ends'], 'example')}")
    if counts["runs"]:
        lines.append(
            f"{source}: made runs of whitespace (no-break spaces included) one space in {plural(counts['runs'], 'example')}"
        )
    if counts["empty_tokens"]:
        lines.append(
            f"{source}: dropped {plural(counts['empty_tokens'], 'word')} (with their tags) that were empty after cleaning"
        )
    if counts["empty"]:
        lines.append(f"{source}: dropped {plural(counts['empty'], 'empty example')}")
    if counts["no_label"]:
        lines.append(f"{source}: dropped {plural(counts['no_label'], 'example')} with an empty label")
    kept = total - counts["empty"] - counts["no_label"]
    if not lines:
        return [f"{source}: {plural(total, 'example')}, nothing to clean"]
    return [*lines, f"{source}: kept {kept} of {plural(total, 'example')} after cleaning"]


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
