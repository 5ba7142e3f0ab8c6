"""NER tag schemes: IOB1, IOB2, BIOES and BILOU read as IOB2, hand-checked; the sequences a scheme does not allow
found; a tag of another scheme refused with the scheme it looks like."""

from __future__ import annotations

import pytest

from llmflow_hpo.tasks.tag_schemes import guess_scheme, to_iob2

# One sentence in each scheme: "Peter Blackburn" PER, "EU" ORG, "German British" two MISC entities side by side.
IOB2 = "B-PER I-PER O B-ORG O B-MISC B-MISC".split()
SAME = {
    "IOB1": "I-PER I-PER O I-ORG O I-MISC B-MISC".split(),
    "IOB2": IOB2,
    "BIOES": "B-PER E-PER O S-ORG O S-MISC S-MISC".split(),
    "BILOU": "B-PER L-PER O U-ORG O U-MISC U-MISC".split(),
}


@pytest.mark.parametrize("scheme", sorted(SAME))
def test_each_scheme_reads_as_the_same_iob2_entities(scheme: str) -> None:
    tags, faults = to_iob2(SAME[scheme], scheme)
    assert list(tags) == IOB2
    assert faults == []


def test_a_three_word_bioes_entity_continues_through_its_inside_tag() -> None:
    tags, faults = to_iob2("B-LOC I-LOC E-LOC O".split(), "BIOES")
    assert list(tags) == ["B-LOC", "I-LOC", "I-LOC", "O"] and faults == []


def test_an_inside_tag_without_its_begin_is_a_fault_read_as_an_entity_start() -> None:
    tags, faults = to_iob2("O I-PER I-PER B-LOC I-ORG".split(), "IOB2")
    assert list(tags) == ["O", "B-PER", "I-PER", "B-LOC", "B-ORG"]
    assert [(f.word, f.problem) for f in faults] == [(1, "I-PER without its B-PER"), (4, "I-ORG without its B-ORG")]


def test_bioes_faults_an_end_with_nothing_to_end_and_an_entity_never_ended() -> None:
    tags, faults = to_iob2("E-PER O B-LOC O B-ORG I-ORG".split(), "BIOES")
    assert list(tags) == ["B-PER", "O", "B-LOC", "O", "B-ORG", "I-ORG"]
    assert [f.problem for f in faults] == [
        "E-PER without its B-PER",
        "B-LOC is not ended by E-LOC",
        "I-ORG is not ended by E-ORG",
    ]


def test_iob1_begin_outside_an_entity_of_its_type_is_a_fault() -> None:
    tags, faults = to_iob2("O B-PER I-PER".split(), "IOB1")
    assert list(tags) == ["O", "B-PER", "I-PER"]
    assert [f.word for f in faults] == [1]


def test_a_tag_of_another_scheme_or_without_a_prefix_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"'E-PER' is not a IOB2 tag .*the tags look like BIOES: set data.tag_scheme"):
        to_iob2(SAME["BIOES"], "IOB2")
    with pytest.raises(ValueError, match=r"tag 'PER' has no scheme prefix"):
        to_iob2(["PER", "O"], "IOB2")
    assert guess_scheme(SAME["BILOU"]) == "BILOU" and guess_scheme(SAME["IOB1"]) is None
