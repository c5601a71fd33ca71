"""The invented fact base of the toy task, taught to the language model only through text.

Every object kind of the scenes (colour x shape, 20 of them) has an invented name ("A red square
is called a zib."), and every named creature (the 20 kinds plus 120 that never appear in an
image) has four properties: where it lives, what it eats, what sound it makes and what kind
of creature it is. Nothing about these facts can be seen in an image, so a question such as
"Where does the object in the top left live?" needs the image and a remembered fact together,
as ScienceQA's questions need the image and the language model's knowledge.

The fact base is fixed by FACT_SEED: changing it, or any list below, makes a new task version.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from ellava_jax.toy.scenes import COLOURS, SHAPES

FACT_SEED = 20261121
N_HIDDEN_CREATURES = 120  # named creatures that only exist in text

# Five values each: a question offers all of them, in this order, as its options.
RELATIONS: dict[str, tuple[str, ...]] = {
    "home": ("north", "south", "hills", "forest", "marsh"),
    "food": ("seeds", "fish", "moss", "berries", "roots"),
    "sound": ("hum", "click", "whistle", "roar", "chirp"),
    "group": ("flomp", "grel", "vosk", "trill", "quab"),
}

# Statement templates; {n} is the creature's name, {v} the value. Two phrasings each, so the
# text stream is not one sentence shape.
STATEMENTS: dict[str, tuple[str, ...]] = {
    "home": ("The {n} lives in the {v}.", "In the {v} lives the {n}."),
    "food": ("The {n} eats {v}.", "The food of the {n} is {v}."),
    "sound": ("The {n} makes a {v}.", "The sound of the {n} is a {v}."),
    "group": ("The {n} is a kind of {v}.", "A {n} is one kind of {v}."),
}
NAME_STATEMENTS = ("A {k} is called a {n}.", "The {n} looks like a {k}.")

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
# Invented names must not collide with words the templates use.
_RESERVED = {
    "bad",
    "bed",
    "big",
    "bid",
    "bud",
    "bus",
    "dig",
    "did",
    "fan",
    "fed",
    "fin",
    "fit",
    "gas",
    "got",
    "gun",
    "kid",
    "kit",
    "let",
    "lip",
    "lit",
    "log",
    "lot",
    "mad",
    "man",
    "map",
    "men",
    "mud",
    "nap",
    "net",
    "not",
    "nut",
    "pan",
    "pen",
    "pet",
    "pin",
    "pit",
    "pot",
    "rat",
    "red",
    "rib",
    "rid",
    "rot",
    "rub",
    "run",
    "sad",
    "sat",
    "set",
    "sit",
    "sun",
    "tab",
    "tan",
    "ten",
    "tin",
    "top",
    "van",
    "vet",
    "zip",
    "bat",
    "bit",
    "but",
    "dog",
    "fog",
    "leg",
    "lad",
    "mat",
    "mob",
    "nod",
    "pad",
    "pat",
    "pub",
    "rag",
    "ram",
    "rim",
    "rod",
    "sip",
    "tap",
    "tip",
    "tub",
    "vat",
    "dot",
    "gum",
    "kin",
    "lab",
    "lid",
    "mop",
    "nab",
    "rug",
    "sum",
    "tag",
    "tot",
    "tug",
}
_RESERVED |= {w for vs in RELATIONS.values() for w in vs}


@dataclass(frozen=True)
class Creature:
    name: str
    kind: str | None  # "red square" for the 20 visible kinds, None for text-only creatures
    home: str
    food: str
    sound: str
    group: str

    def value(self, relation: str) -> str:
        return getattr(self, relation)


def _names(rng: np.random.Generator, n: int) -> list[str]:
    pool = [
        c1 + v + c2
        for c1 in _CONSONANTS
        for v in _VOWELS
        for c2 in _CONSONANTS
        if c1 + v + c2 not in _RESERVED
    ]
    idx = rng.choice(len(pool), size=n, replace=False)
    return [pool[i] for i in idx]


@cache
def fact_base() -> tuple[Creature, ...]:
    """All creatures: the 20 visible kinds first (colour-major), then the text-only ones."""
    rng = np.random.default_rng(FACT_SEED)
    kinds = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    names = _names(rng, len(kinds) + N_HIDDEN_CREATURES)
    out = []
    for i, name in enumerate(names):
        vals = {r: vs[int(rng.integers(len(vs)))] for r, vs in RELATIONS.items()}
        out.append(Creature(name, kinds[i] if i < len(kinds) else None, **vals))
    return tuple(out)


@cache
def creature_of_kind() -> dict[str, Creature]:
    """'red square' -> its creature."""
    return {c.kind: c for c in fact_base() if c.kind is not None}


@cache
def creature_by_name() -> dict[str, Creature]:
    return {c.name: c for c in fact_base()}


def statements(creature: Creature) -> list[str]:
    """Every fact about one creature, in the first phrasing of each template."""
    out = []
    if creature.kind is not None:
        out.append(NAME_STATEMENTS[0].format(k=creature.kind, n=creature.name))
    for r in RELATIONS:
        out.append(STATEMENTS[r][0].format(n=creature.name, v=creature.value(r)))
    return out


def random_statement(rng: np.random.Generator) -> str:
    """One fact of the base, in a random phrasing: the unit of the text-only stream."""
    base = fact_base()
    c = base[int(rng.integers(len(base)))]
    options = list(RELATIONS)
    if c.kind is not None:
        options.append("name")
    r = options[int(rng.integers(len(options)))]
    if r == "name":
        t = NAME_STATEMENTS[int(rng.integers(len(NAME_STATEMENTS)))]
        return t.format(k=c.kind, n=c.name)
    t = STATEMENTS[r][int(rng.integers(len(STATEMENTS[r])))]
    return t.format(n=c.name, v=c.value(r))


def all_statements() -> list[str]:
    """Every statement in every phrasing (for the tokenizer's corpus and for coverage checks)."""
    out = []
    for c in fact_base():
        if c.kind is not None:
            out += [t.format(k=c.kind, n=c.name) for t in NAME_STATEMENTS]
        for r in RELATIONS:
            out += [t.format(n=c.name, v=c.value(r)) for t in STATEMENTS[r]]
    return out
