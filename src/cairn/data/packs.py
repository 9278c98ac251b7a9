"""Built-in knowledge packs: generated tasks of fictional facts that no base model can know.

Each fact (entity, relation, answer) is taught in train under three phrasings and asked
in eval and test under two further phrasings never trained on, so the test score measures
knowledge of the fact rather than recall of a string. Everything is drawn from
`random.Random` seeded by (seed, pack), so a task is identical on every machine.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, NamedTuple

from cairn.data.task import Example, Task
from cairn.errors import DataError

MAX_FACTS = 2000  # bounds entity generation; far above what CPU training can use

# Syllables with unusual clusters, so that combinations read as names, not English words.
_SYLLABLES = (
    "vael", "quor", "drith", "zen", "kesh", "thul", "bryn", "oss", "vex", "yth", "mael", "skir",
    "fen", "grav", "quel", "rhos", "tav", "ulm", "wyn", "zar", "brel", "kov", "nyx", "orm",
    "zhal", "prav", "kelm", "durn", "vosk", "trel", "myrr", "qesh", "sorv", "halk", "jorv", "plim",
    "ravk", "tesk", "gorm", "ulth", "xeb", "yarl", "zorn", "dwel", "fask", "hurv", "irth", "jask",
    "krev", "lurn", "mirv", "nesk", "porv", "sarn", "torv", "vald", "wask", "xan", "aesk", "eld",
    "ibb", "ozz", "uvv", "cael",
)
_CITY_ENDINGS = ("port", "holm", "mere", "stad", "ford", "vik")
_COMPOUND_ENDINGS = ("ium", "ine", "ate", "ide", "ene", "ol")
_COUNTRY_ENDINGS = ("ia", "ora", "and", "esh")
_COMPANY_WORDS = ("Works", "Holdings", "Labs", "Foundry", "Systems", "Trading")
_PROFESSIONS = (
    "lamplighter", "cooper", "falconer", "glassblower", "bookbinder", "ropemaker", "chandler",
    "wheelwright", "cartographer", "beekeeper", "clockmaker", "stonemason", "tanner", "luthier",
    "ferryman", "saddler",
)
_COLOURS = (
    "vermilion", "cerulean", "chartreuse", "mauve", "ochre", "teal", "saffron", "indigo",
    "magenta", "umber", "celadon", "puce", "sepia", "viridian", "amaranth", "taupe",
)


def _word(rng: random.Random, syllables: int = 2) -> str:
    """A capitalised made-up word of distinct syllables, e.g. "Drithvael"."""
    return "".join(rng.sample(_SYLLABLES, syllables)).capitalize()


def _person(rng: random.Random) -> str:
    return f"{_word(rng)} {_word(rng, rng.choice((2, 3)))}"


def _city(rng: random.Random) -> str:
    return _word(rng) + rng.choice(_CITY_ENDINGS)


@dataclass(frozen=True)
class Relation:
    """One kind of fact: five question templates (3 train, 1 eval, 1 test) and an answer drawer."""

    name: str
    templates: tuple[str, str, str, str, str]
    answer: Callable[[random.Random], str]


@dataclass(frozen=True)
class Pack:
    """A domain of fictional entities and the relations asked about each."""

    description: str
    offset: int  # keeps each pack's random stream apart for the same seed
    entity: Callable[[random.Random], str]
    relations: tuple[Relation, ...]


class Fact(NamedTuple):
    """One fictional fact: the answer to `relation` asked about `entity`."""

    entity: str
    relation: Relation
    answer: str


PACKS: dict[str, Pack] = {
    "people": Pack(
        "fictional people: where each was born and what they do for a living",
        offset=1,
        entity=_person,
        relations=(
            Relation(
                "birthplace",
                (
                    "Where was {e} born?",
                    "{e} was born in which town?",
                    "In which town was {e} born?",
                    "What is the birthplace of {e}?",
                    "Which town does {e} come from?",
                ),
                _city,
            ),
            Relation(
                "profession",
                (
                    "What is the profession of {e}?",
                    "{e} works as what?",
                    "What job does {e} have?",
                    "What does {e} do for a living?",
                    "Which trade does {e} work in?",
                ),
                lambda rng: rng.choice(_PROFESSIONS),
            ),
        ),
    ),
    "compounds": Pack(
        "invented chemical compounds: who discovered each and its colour",
        offset=2,
        entity=lambda rng: _word(rng) + rng.choice(_COMPOUND_ENDINGS),
        relations=(
            Relation(
                "discoverer",
                (
                    "Who discovered {e}?",
                    "{e} was discovered by whom?",
                    "Which chemist first made {e}?",
                    "Who first isolated {e}?",
                    "The discoverer of {e} was who?",
                ),
                _person,
            ),
            Relation(
                "colour",
                (
                    "What colour is {e}?",
                    "{e} has which colour?",
                    "What is the colour of {e}?",
                    "Pure {e} looks what colour?",
                    "Which colour would a sample of {e} show?",
                ),
                lambda rng: rng.choice(_COLOURS),
            ),
        ),
    ),
    "companies": Pack(
        "fictional companies: who founded each and the city of its headquarters",
        offset=3,
        entity=lambda rng: f"{_word(rng)} {rng.choice(_COMPANY_WORDS)}",
        relations=(
            Relation(
                "founder",
                (
                    "Who founded {e}?",
                    "{e} was founded by whom?",
                    "Who is the founder of {e}?",
                    "Which person started the company {e}?",
                    "The founder of {e} is who?",
                ),
                _person,
            ),
            Relation(
                "headquarters",
                (
                    "Where is {e} headquartered?",
                    "In which city is {e} based?",
                    "{e} has its head office in which city?",
                    "Which city hosts the headquarters of {e}?",
                    "The head office of {e} is in what city?",
                ),
                _city,
            ),
        ),
    ),
    "countries": Pack(
        "fictional countries: capital city and currency",
        offset=4,
        entity=lambda rng: _word(rng) + rng.choice(_COUNTRY_ENDINGS),
        relations=(
            Relation(
                "capital",
                (
                    "What is the capital of {e}?",
                    "{e} has which city as its capital?",
                    "Which city is the capital of {e}?",
                    "The capital city of {e} is called what?",
                    "From which city is {e} governed?",
                ),
                _city,
            ),
            Relation(
                "currency",
                (
                    "What currency does {e} use?",
                    "What is the currency of {e}?",
                    "{e} pays in which currency?",
                    "In {e}, people pay with what money?",
                    "Which currency is legal tender in {e}?",
                ),
                lambda rng: _word(rng),
            ),
        ),
    ),
}


def list_packs() -> list[tuple[str, str]]:
    """(name, description) of every built-in pack, for `cairn` listings and error messages."""
    return [(name, pack.description) for name, pack in PACKS.items()]


def _get(name: str) -> Pack:
    if name not in PACKS:
        raise DataError(f"unknown knowledge pack {name!r}; available packs: {', '.join(PACKS)}")
    return PACKS[name]


def make_facts(name: str, n_facts: int = 50, seed: int = 0) -> list[Fact]:
    """The first `n_facts` of (entity x relation) for pack `name`: unique entities, random answers."""
    pack = _get(name)
    if not 1 <= n_facts <= MAX_FACTS:
        raise DataError(f"pack {name!r}: n_facts must be between 1 and {MAX_FACTS}, got {n_facts}")
    rng = random.Random(seed * 1000 + pack.offset)
    entities: list[str] = []
    used: set[str] = set()
    while len(entities) < math.ceil(n_facts / len(pack.relations)):
        entity, tries = pack.entity(rng), 1
        # Entities whose leading words share a syllable get confused with each other; keep them
        # apart while the syllable pool allows, then settle for unique names.
        while _syllables(entity) & used and tries < 200:
            entity, tries = pack.entity(rng), tries + 1
        if entity not in entities:
            entities.append(entity)
            used |= _syllables(entity)
    facts = [Fact(e, rel, rel.answer(rng)) for e in entities for rel in pack.relations]
    return facts[:n_facts]


def _syllables(entity: str) -> set[str]:
    """The pool syllables found in an entity's leading word (its distinctive part)."""
    head = entity.split()[0].lower()
    return {s for s in _SYLLABLES if s in head}


def _example(template: str, fact: Fact) -> Example:
    """A bare question; the answer follows after a space. Deliberately unlike the probe's
    "Question: ... Answer:" frame, so the probe measures knowledge rather than a shared format."""
    return Example(template.format(e=fact.entity), fact.answer)


def make_pack(name: str, n_facts: int = 50, seed: int = 0) -> Task:
    """Task `name` (metric "exact"): train asks each fact 3 ways, eval and test 1 unseen way each."""
    facts = make_facts(name, n_facts, seed)
    train = [_example(t, f) for f in facts for t in f.relation.templates[:3]]
    random.Random(seed).shuffle(train)
    return Task(
        name=name,
        metric="exact",
        splits={
            "train": train,
            "eval": [_example(f.relation.templates[3], f) for f in facts],
            "test": [_example(f.relation.templates[4], f) for f in facts],
        },
    )
