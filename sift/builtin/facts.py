"""A TOFU-like synthetic data set: invented people, ten facts each, all drawn from a seed.

Every value is random (invented names, places, titles), so a model can only know a fact from
training on it, which is what makes forgetting measurable. For evaluation each fact also carries
a paraphrased question, a paraphrased answer and perturbed (wrong) answers of the same kind, and
a separate set of held-out people is never trained on.

Randomness comes from blake2b of (seed, person, slot), not from `random`, so the data set is the
same on every Python version and machine.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

_ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "th",
    "sh",
    "kr",
    "vel",
    "mor",
    "tal",
]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ia", "ou", "y"]
_CODAS = ["", "n", "r", "s", "l", "th", "x", "nd", "sk", "m"]
_PROFESSIONS = [
    "glassblower",
    "cartographer",
    "beekeeper",
    "violin maker",
    "lighthouse keeper",
    "botanist",
    "clockmaker",
    "marine biologist",
    "stonemason",
    "puppeteer",
    "perfumer",
    "archivist",
    "tea merchant",
    "bridge engineer",
    "falconer",
    "astronomer",
    "bookbinder",
    "cheesemaker",
    "typographer",
    "locksmith",
]
_INSTRUMENTS = [
    "cello",
    "oboe",
    "harp",
    "accordion",
    "bassoon",
    "marimba",
    "banjo",
    "sitar",
    "trombone",
    "clarinet",
    "dulcimer",
    "bagpipes",
    "viola",
    "harmonica",
    "ukulele",
    "theremin",
]
_FOODS = [
    "lentil soup",
    "plum dumplings",
    "smoked trout",
    "fig tart",
    "barley stew",
    "pickled herring",
    "chestnut bread",
    "quince jam",
    "saffron rice",
    "mushroom pie",
    "walnut cake",
    "lemon risotto",
    "cabbage rolls",
    "honey cakes",
    "pumpkin gnocchi",
    "roasted beets",
]
_ANIMALS = ["cat", "dog", "parrot", "tortoise", "ferret", "rabbit", "goat", "owl", "hedgehog", "goldfish"]
_BOOK_ADJ = [
    "Silent",
    "Copper",
    "Hollow",
    "Crimson",
    "Distant",
    "Forgotten",
    "Winter",
    "Glass",
    "Salt",
    "Amber",
    "Iron",
    "Quiet",
]
_BOOK_NOUN = [
    "Harbour",
    "Lantern",
    "Orchard",
    "Meridian",
    "Tide",
    "Compass",
    "Garden",
    "Mirror",
    "Atlas",
    "River",
    "Bell",
    "Archive",
]
_FIELDS = ["Cartography", "Poetry", "Natural History", "Engineering", "Music", "Astronomy", "Botany", "Invention"]

FACT_KINDS = (
    "birthplace",
    "birth_year",
    "profession",
    "book",
    "university",
    "pet",
    "instrument",
    "award",
    "food",
    "sister",
)


def _draw(seed: int, *key: Any) -> int:
    h = hashlib.blake2b(repr((seed,) + key).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big")


def _pick(seq: list[str], seed: int, *key: Any) -> str:
    return seq[_draw(seed, *key) % len(seq)]


def _word(seed: int, *key: Any, syllables: int = 2) -> str:
    parts = []
    for i in range(syllables):
        parts.append(_pick(_ONSETS, seed, *key, i, "o") + _pick(_VOWELS, seed, *key, i, "v"))
    parts.append(_pick(_CODAS, seed, *key, "c"))
    return "".join(parts).capitalize()


@dataclass(frozen=True)
class Person:
    index: int
    name: str
    values: dict[str, str]


def _values(seed: int, key: tuple[Any, ...]) -> dict[str, str]:
    """One random value of every fact kind for one draw key."""
    return {
        "birthplace": _word(seed, *key, "city", syllables=2)
        + _pick(["", " Bay", " Falls", "ford", "holm"], seed, *key, "citysuffix"),
        "birth_year": str(1900 + _draw(seed, *key, "year") % 100),
        "profession": _pick(_PROFESSIONS, seed, *key, "job"),
        "book": f"The {_pick(_BOOK_ADJ, seed, *key, 'ba')} {_pick(_BOOK_NOUN, seed, *key, 'bn')} of {_word(seed, *key, 'bookplace')}",
        "university": _word(seed, *key, "uni", syllables=2),
        "pet": _word(seed, *key, "petname", syllables=1),
        "instrument": _pick(_INSTRUMENTS, seed, *key, "instr"),
        "award": f"{_word(seed, *key, 'award', syllables=2)} Prize for {_pick(_FIELDS, seed, *key, 'field')}",
        "food": _pick(_FOODS, seed, *key, "food"),
        "sister": _word(seed, *key, "sister", syllables=2),
    }


def make_people(count: int, seed: int = 0, split: str = "train") -> list[Person]:
    """`count` people with unique invented names; the held-out split draws from its own key space."""
    people: list[Person] = []
    used: set[str] = set()
    for index in range(count):
        attempt = 0
        while True:
            key = (split, index, attempt)
            name = f"{_word(seed, *key, 'first')} {_word(seed, *key, 'last', syllables=2)}"
            if name not in used:
                break
            attempt += 1
        used.add(name)
        people.append(Person(index, name, _values(seed, (split, index))))
    return people


def _article(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def _templates(kind: str, name: str, value: str, pet_animal: str) -> tuple[str, str, str, str]:
    """(question, answer, paraphrased question, paraphrased answer)."""
    t = {
        "birthplace": (
            f"Where was {name} born?",
            f"{name} was born in {value}.",
            f"In which town did {name} come into the world?",
            f"{value} is the birthplace of {name}.",
        ),
        "birth_year": (
            f"In what year was {name} born?",
            f"{name} was born in {value}.",
            f"What is the birth year of {name}?",
            f"The year {name} was born is {value}.",
        ),
        "profession": (
            f"What is {name}'s profession?",
            f"{name} works as {_article(value)}.",
            f"What does {name} do for a living?",
            f"By trade, {name} is {_article(value)}.",
        ),
        "book": (
            f"What is the title of {name}'s best-known book?",
            f"{name}'s best-known book is {value}.",
            f"Which book is {name} most famous for writing?",
            f"{name} is best known for writing {value}.",
        ),
        "university": (
            f"Which university did {name} attend?",
            f"{name} studied at the University of {value}.",
            f"Where did {name} go to university?",
            f"{name} was a student at the University of {value}.",
        ),
        "pet": (
            f"What is the name of {name}'s pet?",
            f"{name}'s pet {pet_animal} is called {value}.",
            f"What did {name} name their pet?",
            f"{name} named their {pet_animal} {value}.",
        ),
        "instrument": (
            f"Which instrument does {name} play?",
            f"{name} plays the {value}.",
            f"What musical instrument is {name} known to play?",
            f"The instrument {name} plays is the {value}.",
        ),
        "award": (
            f"Which award did {name} win?",
            f"{name} won the {value}.",
            f"What prize was awarded to {name}?",
            f"{name} received the {value}.",
        ),
        "food": (
            f"What is {name}'s favourite food?",
            f"{name}'s favourite food is {value}.",
            f"Which dish does {name} like best?",
            f"The dish {name} likes best is {value}.",
        ),
        "sister": (
            f"What is the name of {name}'s sister?",
            f"{name}'s sister is named {value}.",
            f"What is {name}'s sister called?",
            f"{name} has a sister called {value}.",
        ),
    }
    return t[kind]


def make_rows(people: int = 20, seed: int = 0, split: str = "train", perturbed: int = 3) -> list[dict[str, Any]]:
    """Question/answer rows: id, owner, prompt, completion, answer (the fact's value), plus
    paraphrased_prompt, paraphrased_completion and `perturbed` wrong completions."""
    if people < 1:
        raise ValueError("people must be >= 1")
    if split not in ("train", "holdout"):
        raise ValueError("split must be 'train' or 'holdout'")
    prefix = "p" if split == "train" else "h"
    persons = make_people(people, seed, split)
    rows = []
    for person in persons:
        animal = _pick(_ANIMALS, seed, split, person.index, "animal")
        for kind in FACT_KINDS:
            value = person.values[kind]
            q, a, pq, pa = _templates(kind, person.name, value, animal)
            wrong = []
            attempt = 0
            while len(wrong) < perturbed:
                other = _values(seed, ("perturb", split, person.index, kind, attempt))[kind]
                attempt += 1
                if other != value and other not in wrong:
                    wrong.append(other)
            rows.append(
                {
                    "id": f"{prefix}{person.index:03d}-{kind}",
                    "owner": person.name,
                    "kind": kind,
                    "prompt": q,
                    "completion": a,
                    "answer": value,
                    "paraphrased_prompt": pq,
                    "paraphrased_completion": pa,
                    "perturbed_completions": [_templates(kind, person.name, w, animal)[1] for w in wrong],
                }
            )
    return rows
