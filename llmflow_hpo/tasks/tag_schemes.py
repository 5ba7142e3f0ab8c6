"""NER tag schemes: a sentence's tags in IOB1, IOB2, BIOES or BILOU, converted to IOB2 with its faults named.

IOB2 (what the models train on and seqeval scores): ``B-X`` begins an entity of type X, ``I-X`` continues it.
IOB1 (CoNLL-2003 as Reuters shipped it): ``I-X`` begins and continues; ``B-X`` only begins an entity that
directly follows another of type X. BIOES: ``B-X`` begins, ``I-X`` continues, ``E-X`` ends, ``S-X`` is a
one-word entity. BILOU is BIOES with ``L-`` (last) for ``E-`` and ``U-`` (unit) for ``S-``.

A sequence the scheme does not allow (an ``I-X`` without its ``B-X``, an ``E-X`` with no entity to end, a
``B-X`` never ended in BIOES) is read as conlleval reads it (an entity starts or ends there) and reported as
a ``Fault``. A tag without a prefix the scheme has (``E-PER`` in IOB2, ``PER`` anywhere) is an error: the
message says which scheme the tags look like.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["SCHEMES", "Fault", "guess_scheme", "split_tag", "to_iob2"]

SCHEMES: tuple[str, ...] = ("IOB1", "IOB2", "BIOES", "BILOU")

# Each scheme's prefixes as (begin, inside, end, single); IOB has no end or single prefix.
_PREFIXES: dict[str, tuple[str, str, str | None, str | None]] = {
    "IOB1": ("B", "I", None, None),
    "IOB2": ("B", "I", None, None),
    "BIOES": ("B", "I", "E", "S"),
    "BILOU": ("B", "I", "L", "U"),
}


@dataclass(frozen=True)
class Fault:
    """A tag sequence the scheme does not allow: the 0-based word and what is wrong there."""

    word: int
    problem: str


def split_tag(tag: str) -> tuple[str, str]:
    """``("B", "PER")`` of ``B-PER``, ``("O", "")`` of ``O``; ``("", tag)`` for a tag without a prefix."""
    if tag == "O":
        return "O", ""
    prefix, dash, kind = tag.partition("-")
    if not dash or len(prefix) != 1 or not kind:
        return "", tag
    return prefix, kind


def guess_scheme(tags: Iterable[str]) -> str | None:
    """The scheme a set of tags' prefixes point to (BIOES, BILOU), or None when they fit IOB."""
    prefixes = {split_tag(tag)[0] for tag in tags}
    if prefixes & {"E", "S"}:
        return "BIOES"
    if prefixes & {"L", "U"}:
        return "BILOU"
    return None


def to_iob2(tags: Sequence[str], scheme: str) -> tuple[tuple[str, ...], list[Fault]]:
    """A sentence's tags in IOB2, and the faults of the sequence as given. Raises ValueError for a tag that
    is not one of the scheme's (its message names the tag and the scheme it looks like)."""
    begin, inside, end, single = _PREFIXES[scheme]
    allowed = {p for p in (begin, inside, end, single) if p}
    out: list[str] = []
    faults: list[Fault] = []
    open_kind = ""  # the type of the entity the previous word is part of and may continue ("": none)
    for word, tag in enumerate(tags):
        prefix, kind = split_tag(tag)
        if prefix == "O":
            if end and open_kind and out and out[-1] != "O":
                faults.append(Fault(word - 1, f"{tags[word - 1]} is not ended by {end}-{open_kind}"))
            out.append("O")
            open_kind = ""
            continue
        if prefix not in allowed:
            raise ValueError(_not_in_scheme(tag, scheme, tags))
        continues = open_kind == kind
        if scheme == "IOB1":
            starts = prefix == begin or not continues
            if prefix == begin and not continues:
                faults.append(Fault(word, f"{tag} does not follow an entity of type {kind} (IOB1 uses B- only there)"))
        else:
            starts = prefix in (begin, single) or not continues
            if prefix in (inside, end) and not continues:
                faults.append(Fault(word, f"{tag} without its {begin}-{kind}"))
        if end and starts and open_kind and out and out[-1] != "O":
            faults.append(Fault(word - 1, f"{tags[word - 1]} is not ended by {end}-{open_kind}"))
        out.append(f"B-{kind}" if starts else f"I-{kind}")
        open_kind = "" if end and prefix in (end, single) else kind
    if end and open_kind:
        faults.append(Fault(len(tags) - 1, f"{tags[-1]} is not ended by {end}-{open_kind}"))
    return tuple(out), faults


def _not_in_scheme(tag: str, scheme: str, tags: Sequence[str]) -> str:
    prefix, _ = split_tag(tag)
    if not prefix:
        return (
            f"tag {tag!r} has no scheme prefix; {scheme} tags are O or a prefix and a type, such as B-{tag} or I-{tag}"
        )
    looks = guess_scheme(tags)
    hint = f"; the tags look like {looks}: set data.tag_scheme: {looks}" if looks and looks != scheme else ""
    return f"tag {tag!r} is not a {scheme} tag (prefixes {', '.join(sorted(p for p in _PREFIXES[scheme] if p))}){hint}"
