"""Write the quick-start NER sample: small CoNLL files of invented newswire sentences.

    python studies/data/make_quickstart_ner.py            # writes studies/data/quickstart-ner/
    python studies/data/make_quickstart_ner.py --out DIR  # somewhere else

What it makes: ``train.txt`` (400 sentences), ``dev.txt`` (120) and ``test.txt`` (120) in the
CoNLL-2003 layout ``token POS chunk tag``, with ``X`` placeholders for POS and chunk and IOB2 tags
for PER, ORG, LOC and MISC. Each file begins with ``-DOCSTART- -X- -X- O`` and a blank line.

How: sentences are filled from templates (company news, politics, sport results, datelines) with
names invented here. Every name list is split once, by the seed, into names that train may use
and names kept for dev and test, so dev and test hold names never seen in training; four
templates also appear only in dev and test. Some names change type with context, as in real
newswire: a city is LOC in "arrived in Brackenford" but ORG as a football club in "Brackenford
beat Caldris 2-1"; a surname is PER alone and part of an ORG in "Halvorsen Shipping"; a
nationality is MISC alone and part of an ORG in "Valdorian Rail". Many entities span several
words. The output depends only on the seed (stdlib ``random``), so rerunning gives the same bytes.

Everything here is made up for this project; no text comes from any data set.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SIZES = {"train": 400, "dev": 120, "test": 120}
SEED = 13
HELD_OUT_SHARE = 0.3  # share of every name list kept out of train
DOCSTART = "-DOCSTART- -X- -X- O"

FIRST_NAMES = [
    "Alaric", "Brenna", "Corvin", "Dalia", "Edric", "Fenna", "Galen", "Hester", "Ilona", "Joss",
    "Kasimir", "Liesel", "Maren", "Niall", "Orla", "Petra", "Quentin", "Rosalind", "Soren", "Tamsin",
    "Ulric", "Vesna", "Wendell", "Yara", "Zoltan", "Zélie", "Anouk", "Bastian", "Cosima", "Dorian",
]  # fmt: skip
LAST_NAMES = [
    "Ashgrove", "Brannock", "Delacourt", "Everholt", "Fairweather", "Grimsditch", "Halvorsen",
    "Ingleby", "Jessop", "Kettleworth", "Lindqvist", "Marchetti", "Northcott", "Oakhurst",
    "Pemberton", "Quenby", "Ravensworth", "Stallard", "Thornbury", "Underhill", "van der Molen",
    "Whitlock", "Okonkwo-Reyes", "Brückner", "Castellane", "Duarte", "Ferreira Lobo", "Tolvanen",
]  # fmt: skip
CITIES = [
    "Aldermoor", "Brackenford", "Caldris", "Dunhallow", "Eastmere", "Farrowgate", "Glenmoor",
    "Harrowick", "Istrand", "Kelvaro", "Lornwick", "Merrowdale", "Norhaven", "Port Aldern",
    "Quarrington", "Redwater Falls", "Saltmere", "San Teodoro", "Velmont", "Wyndholm", "Ostberg",
    "New Caldris", "Sankt Irmen",
]  # fmt: skip
COUNTRIES = {  # country -> nationality adjective
    "Valdoria": "Valdorian", "Norvania": "Norvanian", "Ardenmark": "Ardish", "Sulmara": "Sulmaran",
    "Tyrrhos": "Tyrrhian", "Belvane": "Belvanese", "Kestrel Isles": "Kestrelian", "Ombria": "Ombrian",
    "Lusenia": "Lusenian", "Great Harrow": "Harrovian", "Moravel": "Moravelan", "Zandria": "Zandrian",
}  # fmt: skip
COMPANY_HEADS = ["Brightwater", "Copperline", "Meridian", "Stonebridge", "Orrin", "Tallis", "Bluefen", "Kestrel"]
COMPANY_TAILS = ["Holdings", "Energy", "Telecom", "Mining", "Textiles", "Airways", "Foods", "Bank", "Shipping"]
INSTITUTIONS = [
    "Council of Northern Ports", "United Farmers Union", "Green Coast Party", "Liberal Union",
    "Continental Trade Office", "Harbour Authority", "National Statistics Bureau",
    "Federation of Grain Exporters", "Central Mining Board", "Coastal Rescue Service",
    "Sulmara Football Federation", "League of River Towns", "Bank of Ardenmark",
]  # fmt: skip
CLUB_SUFFIXES = ["", "", "Rovers", "United", "Athletic", "Wanderers"]
EVENTS = [
    "Harbour Cup", "Northern Games", "Silver Regatta", "Winter Trade Fair", "Continental Shield",
    "Grand Coastal Rally", "Autumn Marathon", "Festival of Lanterns", "Midsummer Derby",
]  # fmt: skip
EVENT_IN_CITY = ["Open", "Marathon", "Book Fair", "Grand Prix"]  # "Aldermoor Open" is MISC
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October"]

# Templates: plain words are O; {SLOT}s are filled by FILLERS below. Words are space-separated.
TEMPLATES = [
    "{PER} , chief executive of {COMPANY} , said on {DAY} that profits rose {PCT} percent .",
    "{COMPANY} shares fell {NUM} cents to {NUM} in early trading in {CITY} .",
    "{CLUB} beat {CLUB} {SCORE} in the {EVENT} on {DAY} .",
    "{CLUB} {NUM} {CLUB} {NUM}",
    "The {NAT} government said {PER} would visit {COUNTRY} next week .",
    "{PER} arrived in {CITY} on {DAY} for talks with {NAT} officials .",
    "Police in {CITY} said {NUM} people were injured in a fire on {DAY} .",
    "{LAST} , who joined {CLUB} in {YEAR} , scored twice .",
    "{COUNTRY} and {COUNTRY} signed a trade agreement in {CITY} on {DAY} .",
    "{PER} won the {EVENT} for the second time .",
    "The {INSTITUTION} said it would meet in {CITY} in {MONTH} .",
    "{NAT} midfielder {PER} was named man of the match .",
    "{COMPANY} agreed to buy {COMPANY} for {NUM} million dollars .",
    "A spokesman for the {INSTITUTION} declined to comment .",
    "{LAST} told reporters in {CITY} that the {EVENT} would go ahead .",
    "Prime minister {PER} of {COUNTRY} resigned on {DAY} .",
    "The {EVENT} will be held in {CITY} , {COUNTRY} , in {MONTH} .",
    "{PER} ( {COUNTRY} ) {TIME}",
    "{DATELINE} {DATE}",
    "{NAT} exports to {COUNTRY} rose {PCT} percent in {MONTH} , the {INSTITUTION} said .",
    "{PER} , a {NAT} citizen , was arrested at {CITY} airport .",
    "{COMPANY} , based in {CITY} , employs {NUM} people .",
    "{LAST} 's goal gave {CLUB} a {SCORE} win over {CLUB} .",
    "Shares in {COMPANY} rose after {PER} joined the board .",
    "The {INSTITUTION} elected {PER} as its new chairman .",
    "{CITY} residents protested against plans by {COMPANY} to close the plant .",
    "{PER} and {PER} will meet in the final of the {EVENT} .",
    "Officials from {COUNTRY} and the {INSTITUTION} met in {CITY} .",
    '{LAST} said : " We are very happy with the result . "',
    "{NAT} troops left {COUNTRY} on {DAY} , the {INSTITUTION} said .",
    "{CLUB} manager {PER} was fined {NUM} dollars by the {INSTITUTION} .",
    "{PER} finished third at the {CITY_EVENT} behind {LAST} and {LAST} .",
    "Markets were closed on {DAY} for a public holiday .",
    "The central bank left interest rates unchanged at {PCT} percent .",
    "Rain delayed play for {NUM} hours on {DAY} .",
]
HELD_OUT_TEMPLATES = [  # dev and test only
    "In {CITY} , {LAST} of {COMPANY} announced {NUM} new jobs .",
    "{PER} , the {NAT} champion , defends the title in {CITY} in {MONTH} .",
    "According to the {INSTITUTION} , {COUNTRY} will host the {CITY_EVENT} .",
    "{COMPANY} ( {CITY} ) reported a loss of {NUM} million .",
]


@dataclass(frozen=True)
class Names:
    """The name lists one split may draw from."""

    first: list[str]
    last: list[str]
    cities: list[str]
    countries: list[str]
    companies: list[str]
    institutions: list[str]
    events: list[str]


Words = list[tuple[str, str]]  # (word, IOB2 tag)


def entity(text: str, kind: str) -> Words:
    """The words of one entity, tagged B- then I-."""
    words = text.split()
    return [(word, ("B-" if i == 0 else "I-") + kind) for i, word in enumerate(words)]


def outside(text: str) -> Words:
    return [(word, "O") for word in text.split()]


def fillers(names: Names, rng: random.Random) -> dict[str, Callable[[], Words]]:
    """One function per template slot, drawing from ``names``."""
    return {
        "PER": lambda: entity(f"{rng.choice(names.first)} {rng.choice(names.last)}", "PER"),
        "LAST": lambda: entity(rng.choice(names.last), "PER"),
        "COMPANY": lambda: entity(rng.choice(names.companies), "ORG"),
        "INSTITUTION": lambda: entity(rng.choice(names.institutions), "ORG"),
        "CLUB": lambda: entity(f"{rng.choice(names.cities)} {rng.choice(CLUB_SUFFIXES)}", "ORG"),
        "CITY": lambda: entity(rng.choice(names.cities), "LOC"),
        "DATELINE": lambda: entity(rng.choice(names.cities).upper(), "LOC"),
        "COUNTRY": lambda: entity(rng.choice(names.countries), "LOC"),
        "NAT": lambda: entity(COUNTRIES[rng.choice(names.countries)], "MISC"),
        "EVENT": lambda: entity(rng.choice(names.events), "MISC"),
        "CITY_EVENT": lambda: entity(f"{rng.choice(names.cities)} {rng.choice(EVENT_IN_CITY)}", "MISC"),
        "DAY": lambda: outside(rng.choice(DAYS)),
        "MONTH": lambda: outside(rng.choice(MONTHS)),
        "NUM": lambda: outside(str(rng.randint(2, 950))),
        "PCT": lambda: outside(f"{rng.randint(1, 19)}.{rng.randint(0, 9)}"),
        "SCORE": lambda: outside(f"{rng.randint(1, 5)}-{rng.randint(0, 3)}"),
        "YEAR": lambda: outside(str(rng.randint(1988, 2023))),
        "TIME": lambda: outside(f"{rng.randint(2, 3)}:{rng.randint(0, 59):02d}.{rng.randint(0, 99):02d}"),
        "DATE": lambda: outside(f"{rng.randint(1995, 2023)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"),
    }


def fill(template: str, slots: dict[str, Callable[[], Words]]) -> Words:
    """One sentence: each ``{SLOT}`` replaced by freshly drawn words."""
    words: Words = []
    for piece in template.split():
        if piece.startswith("{") and piece.endswith("}"):
            words.extend(slots[piece[1:-1]]())
        else:
            words.append((piece, "O"))
    return words


def companies() -> list[str]:
    """Company names: invented heads and tails, plus surnames and nationalities inside ORGs."""
    made = [f"{head} {tail}" for head in COMPANY_HEADS for tail in COMPANY_TAILS[::2]]
    made += [f"{last} {tail}" for last, tail in zip(LAST_NAMES[::4], COMPANY_TAILS, strict=False)]
    made += [f"{nat} Rail" for nat in list(COUNTRIES.values())[::3]]
    return made


def split_names(rng: random.Random) -> tuple[Names, Names]:
    """Names train may use, and all names (dev and test: a mix of seen and unseen)."""
    pools = {
        "first": FIRST_NAMES,
        "last": LAST_NAMES,
        "cities": CITIES,
        "countries": list(COUNTRIES),
        "companies": companies(),
        "institutions": INSTITUTIONS,
        "events": EVENTS,
    }
    seen = {}
    for key, pool in pools.items():
        shuffled = sorted(pool)
        rng.shuffle(shuffled)
        seen[key] = sorted(shuffled[round(len(shuffled) * HELD_OUT_SHARE) :])
    return Names(**seen), Names(**{key: sorted(pool) for key, pool in pools.items()})


def sentences(count: int, templates: list[str], names: Names, rng: random.Random) -> list[Words]:
    slots = fillers(names, rng)
    return [fill(rng.choice(templates), slots) for _ in range(count)]


def conll_text(sentences: list[Words]) -> str:
    blocks = [DOCSTART] + ["\n".join(f"{word} X X {tag}" for word, tag in words) for words in sentences]
    return "\n\n".join(blocks) + "\n"


def write_all(out: Path, seed: int = SEED) -> dict[str, Path]:
    """Write train, dev and test to ``out``; returns the paths written."""
    rng = random.Random(seed)
    train_names, all_names = split_names(rng)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, count in SIZES.items():
        names, templates = (train_names, TEMPLATES) if split == "train" else (all_names, TEMPLATES + HELD_OUT_TEMPLATES)
        path = out / f"{split}.txt"
        path.write_text(conll_text(sentences(count, templates, names, rng)), encoding="utf-8", newline="\n")
        written[split] = path
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "quickstart-ner")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    for split, path in write_all(args.out, args.seed).items():
        print(f"{split}: {SIZES[split]} sentences -> {path}")


if __name__ == "__main__":
    main()
