"""1- to 3-hop questions over the knowledge graph, split in-domain / out-of-domain.

- train: 1-hop and 2-hop questions whose relations are all "seen".
- eval_id (protocol split eval_seen): other 2-hop questions over seen relations.
- eval_ood (protocol split eval_unseen): 3-hop questions, and 1-/2-hop questions that use a
  relation no training question uses.
"""

from __future__ import annotations

import dataclasses
import itertools
import random

from empg_envs.deepsearch.knowledge_graph import RELATIONS, KnowledgeGraph, Relation

TASK_TYPES: tuple[str, ...] = ("1hop", "2hop", "3hop")
#: Questions per split and task type (fewer where the graph offers fewer).
SPLIT_SIZES: dict[str, dict[str, int]] = {
    "train": {"1hop": 1500, "2hop": 1800},
    "eval_seen": {"2hop": 500},
    "eval_unseen": {"1hop": 100, "2hop": 200, "3hop": 200},
}


@dataclasses.dataclass(frozen=True)
class Question:
    task_id: str
    task_type: str
    text: str
    start: str
    #: Relation names, innermost (first hop) first.
    relations: tuple[str, ...]
    answer: str
    #: The passage ids stating each hop's fact, in hop order.
    support: tuple[str, ...]


def _chains(length: int) -> list[tuple[Relation, ...]]:
    """Relation sequences whose types compose (each object type is the next subject type)."""
    return [
        chain
        for chain in itertools.product(RELATIONS, repeat=length)
        if all(a.object_type == b.subject_type for a, b in zip(chain, chain[1:]))
    ]


def _text(start: str, chain: tuple[Relation, ...]) -> str:
    phrase = start
    for rel in chain:
        phrase = f"the {rel.noun} of {phrase}"
    wh = "Who" if chain[-1].object_type == "person" else "What"
    return f"{wh} is {phrase}?"


def _walk(kg: KnowledgeGraph, start: str, chain: tuple[Relation, ...]) -> list[str] | None:
    """The entities visited from `start`; None if a fact is missing or the walk revisits one."""
    path = [start]
    for rel in chain:
        nxt = kg.facts.get((path[-1], rel.name))
        # A revisit makes questions such as "the founder of the employer of X" answer X itself.
        if nxt is None or nxt in path:
            return None
        path.append(nxt)
    return path


def _candidates(kg: KnowledgeGraph, length: int, seen: bool | None) -> list[tuple[str, tuple]]:
    """(start, chain) pairs; seen=True: only seen relations, False: at least one unseen."""
    out = []
    for chain in _chains(length):
        all_seen = all(r.seen for r in chain)
        if seen is not None and all_seen != seen:
            continue
        for start in kg.entities[chain[0].subject_type]:
            if _walk(kg, start, chain) is not None:
                out.append((start, chain))
    return out


def _sample(pool: list, n: int, rng: random.Random) -> list:
    pool = list(pool)
    rng.shuffle(pool)
    return pool[:n]


def build_questions(kg: KnowledgeGraph, seed: int = 0) -> dict[str, list[Question]]:
    """The question list of every protocol split, disjoint across splits."""
    rng = random.Random(seed)
    two_hop_seen = _candidates(kg, 2, seen=True)
    rng.shuffle(two_hop_seen)
    n_id = SPLIT_SIZES["eval_seen"]["2hop"]
    # In-domain eval questions are cut off the pool first, so they never repeat a train one.
    pools = {
        ("train", "1hop"): _candidates(kg, 1, seen=True),
        ("train", "2hop"): two_hop_seen[n_id:],
        ("eval_seen", "2hop"): two_hop_seen[:n_id],
        ("eval_unseen", "1hop"): _candidates(kg, 1, seen=False),
        ("eval_unseen", "2hop"): _candidates(kg, 2, seen=False),
        ("eval_unseen", "3hop"): _candidates(kg, 3, seen=None),
    }
    splits: dict[str, list[Question]] = {}
    for split, sizes in SPLIT_SIZES.items():
        chosen = []
        for task_type, n in sizes.items():
            chosen += [(task_type, s, c) for s, c in _sample(pools[(split, task_type)], n, rng)]
        # Interleave types so that small index ranges (and seeds) cover every type.
        rng.shuffle(chosen)
        splits[split] = [
            _question(kg, f"deepsearch/{split}/{task_type}/{i:05d}", task_type, start, chain)
            for i, (task_type, start, chain) in enumerate(chosen)
        ]
    return splits


def _question(kg: KnowledgeGraph, task_id: str, task_type: str, start: str, chain) -> Question:
    path = _walk(kg, start, chain)
    assert path is not None  # candidates are filtered by _walk
    support = tuple(kg.passage_of(s, r.name).pid for s, r in zip(path, chain))
    return Question(
        task_id=task_id,
        task_type=task_type,
        text=_text(start, chain),
        start=start,
        relations=tuple(r.name for r in chain),
        answer=path[-1],
        support=support,
    )
