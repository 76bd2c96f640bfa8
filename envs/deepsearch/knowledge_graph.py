"""A deterministic, fictional knowledge graph and the passages that state its facts.

Every name is invented from syllables, so no language model can know an answer beforehand: the
only way to answer a question is to read the corpus. Every relation is functional (one object per
subject), which makes every multi-hop question have exactly one answer.
"""

from __future__ import annotations

import dataclasses
import random
import re

#: Entity types and how many of each the graph holds.
ENTITY_COUNTS: dict[str, int] = {
    "person": 360,
    "city": 110,
    "country": 24,
    "company": 80,
    "university": 36,
    "book": 140,
    "language": 14,
}


@dataclasses.dataclass(frozen=True)
class Relation:
    """A functional relation `subject_type -> object_type`, named by a noun ("the X of S")."""

    name: str
    subject_type: str
    object_type: str
    noun: str
    #: False for relations held out of training questions (the out-of-domain split).
    seen: bool = True


RELATIONS: tuple[Relation, ...] = (
    Relation("born_in", "person", "city", "birthplace"),
    Relation("employer", "person", "company", "employer"),
    Relation("alma_mater", "person", "university", "alma mater"),
    Relation("country", "city", "country", "country"),
    Relation("headquarters", "company", "city", "headquarters"),
    Relation("founder", "company", "person", "founder"),
    Relation("home_city", "university", "city", "home city"),
    Relation("author", "book", "person", "author"),
    Relation("official_language", "country", "language", "official language"),
    Relation("mentor", "person", "person", "mentor", seen=False),
    Relation("capital", "country", "city", "capital", seen=False),
    Relation("publisher", "book", "company", "publisher", seen=False),
    Relation("rector", "university", "person", "rector", seen=False),
)
RELATIONS_BY_NAME: dict[str, Relation] = {r.name: r for r in RELATIONS}

# Two phrasings per fact so that passages are not all one template; both name the relation's
# noun, which is what a searcher (and BM25) keys on.
_FACT_TEMPLATES: tuple[str, ...] = (
    "The {noun} of {subject} is {object}.",
    "{object} is the {noun} of {subject}.",
)
# A second sentence without entity names: passages differ in length and wording like real ones.
_FILLERS: tuple[str, ...] = (
    "This is recorded in the archives of {year}.",
    "The registry entry was last revised in {year}.",
    "A chronicle from {year} mentions this as well.",
    "Scholars have cited this since {year}.",
    "It was first noted in a gazette printed in {year}.",
)

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gl", "kr", "pl", "st", "tr", "th", "sh", "qu", "vr")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou", "ia", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "m", "x", "nd", "rk")
_SUFFIXES = {
    "company": ("Works", "Foundry", "Trading", "Mills", "Holdings", "Guild"),
    "university": ("Academy", "Institute", "College", "University", "Lyceum"),
}


@dataclasses.dataclass(frozen=True)
class Passage:
    pid: str
    #: The subject's name, as an encyclopedia article's title.
    title: str
    text: str
    #: (subject, relation name, object) of the fact the passage states.
    fact: tuple[str, str, str]


@dataclasses.dataclass
class KnowledgeGraph:
    """Entities by type, the facts `(subject, relation) -> object`, and one passage per fact."""

    entities: dict[str, list[str]]
    facts: dict[tuple[str, str], str]
    passages: list[Passage]

    def passage_of(self, subject: str, relation: str) -> Passage:
        return self.passages[self._passage_index[(subject, relation)]]

    def __post_init__(self) -> None:
        self._passage_index = {(p.fact[0], p.fact[1]): i for i, p in enumerate(self.passages)}


class _Namer:
    """Invents pronounceable, globally unique words."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._used: set[str] = set()

    def word(self, min_syllables: int = 2, max_syllables: int = 3) -> str:
        while True:
            n = self._rng.randint(min_syllables, max_syllables)
            w = "".join(
                self._rng.choice(_ONSETS) + self._rng.choice(_VOWELS) + self._rng.choice(_CODAS)
                for _ in range(n)
            )
            # Short words risk colliding with real (stop)words, which BM25 would drop.
            if len(w) >= 5 and w not in self._used:
                self._used.add(w)
                return w.capitalize()


def _names(namer: _Namer, rng: random.Random) -> dict[str, list[str]]:
    counts = ENTITY_COUNTS
    # People share first and last names (as real people do), so a search must use the full name.
    firsts = [namer.word(2, 2) for _ in range(60)]
    lasts = [namer.word(2, 3) for _ in range(140)]
    people: set[str] = set()
    while len(people) < counts["person"]:
        people.add(f"{rng.choice(firsts)} {rng.choice(lasts)}")
    book_heads = ("Chronicles of", "The Road to", "Letters from", "A History of", "Songs of")
    return {
        "person": sorted(people),
        "city": [namer.word() for _ in range(counts["city"])],
        "country": [namer.word() for _ in range(counts["country"])],
        "company": [f"{namer.word()} {rng.choice(_SUFFIXES['company'])}"
                    for _ in range(counts["company"])],
        "university": [f"{namer.word()} {rng.choice(_SUFFIXES['university'])}"
                       for _ in range(counts["university"])],
        "book": [f"{rng.choice(book_heads)} {namer.word()}" for _ in range(counts["book"])],
        "language": [namer.word(2, 2) + "ish" for _ in range(counts["language"])],
    }


def _facts(entities: dict[str, list[str]], rng: random.Random) -> dict[tuple[str, str], str]:
    facts: dict[tuple[str, str], str] = {}
    for rel in RELATIONS:
        if rel.name in ("capital", "mentor"):
            continue  # constrained below
        for subject in entities[rel.subject_type]:
            facts[(subject, rel.name)] = rng.choice(entities[rel.object_type])
    # A capital lies in its own country; a country without cities keeps no capital fact.
    for country in entities["country"]:
        cities = [c for c in entities["city"] if facts[(c, "country")] == country]
        if cities:
            facts[(country, "capital")] = rng.choice(cities)
    # Mentors come earlier in a fixed order, so mentor chains never loop back to the mentee.
    people = list(entities["person"])
    rng.shuffle(people)
    for i, person in enumerate(people[1:], start=1):
        facts[(person, "mentor")] = people[rng.randrange(i)]
    return facts


def _passages(facts: dict[tuple[str, str], str], rng: random.Random) -> list[Passage]:
    passages = []
    for i, ((subject, rel_name), obj) in enumerate(sorted(facts.items())):
        noun = RELATIONS_BY_NAME[rel_name].noun
        sentence = rng.choice(_FACT_TEMPLATES).format(noun=noun, subject=subject, object=obj)
        filler = rng.choice(_FILLERS).format(year=rng.randint(1650, 1990))
        text = f"{sentence} {filler}"
        passages.append(Passage(f"p{i:05d}", subject, text, (subject, rel_name, obj)))
    return passages


def build_knowledge_graph(seed: int = 0) -> KnowledgeGraph:
    """The graph for `seed`; the same seed gives the same graph in every process."""
    rng = random.Random(seed)
    entities = _names(_Namer(rng), rng)
    facts = _facts(entities, rng)
    return KnowledgeGraph(entities, facts, _passages(facts, rng))


def read_fact(text: str, subject: str, relation: str) -> str | None:
    """The object a passage `text` states for `(subject, relation)`, or None if it states none.

    The inverse of the fact templates: what a reader who knows the phrasing extracts.
    """
    noun = re.escape(RELATIONS_BY_NAME[relation].noun)
    subj = re.escape(subject)
    for pattern in (
        rf"\bThe {noun} of {subj} is (?P<obj>[^.]+)\.",
        rf"(?:^|\.\s)(?P<obj>[^.]+?) is the {noun} of {subj}\.",
    ):
        match = re.search(pattern, text)
        if match:
            return match.group("obj").strip()
    return None
