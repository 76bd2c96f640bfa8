"""`deepsearch`: answer questions about a fictional world by searching its corpus with BM25.

Actions are free-form text: `search[query]` shows the top-k passages, `answer[text]` ends the
episode with reward 1 for an exact match after normalisation (token F1 in info["f1"]).

With `action_choices: true`, info["admissible_actions"] lists concrete actions, as constrained
decoding needs, for a model too small to write a query naming a fictional entity: a search for
"<noun> of <entity>" for each noun the question names and each entity met so far (the
question's own, then those of the passages shown), and an answer for each entity the passages
named. Free text stays valid.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
import string
from typing import Any

import bm25s

from empg_envs.core import EnvConfigError, TextEnv
from empg_envs.deepsearch.knowledge_graph import (
    RELATIONS_BY_NAME,
    KnowledgeGraph,
    Passage,
    build_knowledge_graph,
    read_fact,
)
from empg_envs.deepsearch.questions import TASK_TYPES, Question, build_questions

#: The paper's names for the eval splits, accepted as `split` too.
SPLIT_ALIASES: dict[str, str] = {"eval_id": "eval_seen", "eval_ood": "eval_unseen"}

_ACTION = re.compile(r"\s*(search|answer)\[(.*)\]\s*", re.DOTALL | re.IGNORECASE)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@dataclasses.dataclass(frozen=True)
class _Corpus:
    kg: KnowledgeGraph
    questions: dict[str, list[Question]]
    by_id: dict[str, Question]
    tokenizer: bm25s.tokenization.Tokenizer
    retriever: bm25s.BM25


@functools.lru_cache(maxsize=1)
def _corpus() -> _Corpus:
    """Graph, questions and BM25 index, built once per process (about 0.4 s)."""
    kg = build_knowledge_graph()
    questions = build_questions(kg)
    tokenizer = bm25s.tokenization.Tokenizer(stopwords="en")
    ids = tokenizer.tokenize([f"{p.title}: {p.text}" for p in kg.passages], show_progress=False)
    retriever = bm25s.BM25()
    retriever.index(ids, show_progress=False)
    by_id = {q.task_id: q for qs in questions.values() for q in qs}
    return _Corpus(kg, questions, by_id, tokenizer, retriever)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace (SQuAD-style)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def f1_score(prediction: str, gold: str) -> float:
    """Token-level F1 between normalised answers."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class DeepSearchEnv(TextEnv):
    """Multi-hop question answering over a local corpus; see the module docstring."""

    # Pure Python; the corpus and knowledge graph are shared (lru_cache) but only read.
    thread_safe = True

    task_types = TASK_TYPES

    def __init__(self, split: str = "train", max_turns: int = 10, top_k: int = 3, action_choices: bool = False) -> None:
        super().__init__(max_turns=max_turns, split=SPLIT_ALIASES.get(split, split))
        if not isinstance(top_k, int) or top_k < 1:
            raise EnvConfigError(f"top_k must be a positive int, got {top_k!r}")
        self.check_config(action_choices=action_choices)
        self.top_k = top_k
        self.action_choices = action_choices
        self._corpus = _corpus()
        self._question: Question | None = None
        # Every passage shown this episode; the expert reads its facts from these.
        self._retrieved: list[Passage] = []

    @classmethod
    def check_config(cls, **env_config: Any) -> None:
        """TextEnv's checks, with the paper's split names accepted as aliases."""
        if "split" in env_config:
            env_config = {**env_config, "split": SPLIT_ALIASES.get(env_config["split"], env_config["split"])}
        super().check_config(**env_config)
        if not isinstance(env_config.get("action_choices", False), bool):
            raise EnvConfigError(f"action_choices must be true or false, got {env_config['action_choices']!r}")

    def tasks(self) -> int:
        """Number of questions in this env's split."""
        return len(self._corpus.questions[self.split])

    @property
    def question(self) -> Question:
        """The current question, with its gold answer and supporting passage ids."""
        if self._question is None:
            raise EnvConfigError("no question yet; call reset()")
        return self._question

    def search(self, query: str) -> list[Passage]:
        """The top-k passages for `query` (fewer if fewer share a word with it)."""
        tokens = self._corpus.tokenizer.tokenize([query], update_vocab=False, show_progress=False)
        if not tokens[0]:
            return []
        docs, scores = self._corpus.retriever.retrieve(tokens, k=self.top_k, show_progress=False)
        passages = self._corpus.kg.passages
        return [passages[int(d)] for d, s in zip(docs[0], scores[0]) if s > 0]

    # ---- TextEnv ------------------------------------------------------------------------
    def _pick(self, task: Any) -> Question:
        questions = self._corpus.questions[self.split]
        if task is None:
            return questions[int(self.np_random.integers(len(questions)))]
        if isinstance(task, int) and not isinstance(task, bool) and 0 <= task < len(questions):
            return questions[task]
        if isinstance(task, str) and task in self._corpus.by_id:
            return self._corpus.by_id[task]
        raise EnvConfigError(
            f"bad task {task!r}: expected an index in [0, {len(questions)}) or a deepsearch task_id"
        )

    def _reset_task(self, seed: int | None, task: Any) -> tuple[str, dict[str, Any]]:
        q = self._question = self._pick(task)
        self._retrieved = []
        obs = (
            "Answer a question about a fictional world. Your own knowledge does not help: "
            "every fact must come from the corpus.\n"
            "Actions (one per turn):\n"
            f"  search[query]  shows the top {self.top_k} passages for the query\n"
            "  answer[text]   submits your final answer and ends the episode\n"
            f"Question: {q.text}"
        )
        info = {
            "task_id": q.task_id,
            "task_type": q.task_type,
            "instruction": q.text,
            "admissible_actions": self._admissible(),
            "relations": list(q.relations),
        }
        return obs, info

    def _admissible(self) -> list[str] | None:
        if not self.action_choices:
            return None
        q = self.question
        nouns = list(dict.fromkeys(RELATIONS_BY_NAME[r].noun for r in q.relations))
        named = list(dict.fromkeys(e for p in self._retrieved for e in (p.fact[0], p.fact[2])))
        met = list(dict.fromkeys([q.start, *named]))
        return [f"search[{noun} of {e}]" for e in met for noun in nouns] + [f"answer[{e}]" for e in named]

    def _step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        match = _ACTION.fullmatch(action)
        content = match.group(2).strip() if match else ""
        if not content:
            obs = (
                "Invalid action. Reply with exactly one of search[query] or answer[text], "
                "with a non-empty query or text."
            )
            return obs, 0.0, False, {"won": False, "score": 0.0, "invalid_action": True,
                                     "admissible_actions": self._admissible()}
        if match.group(1).lower() == "search":
            found = self.search(content)
            self._retrieved += found
            lines = [f"[{i}] ({p.pid}) {p.title}: {p.text}" for i, p in enumerate(found, start=1)]
            obs = "\n".join(lines) if lines else "No passage matches the query."
            info = {"won": False, "score": 0.0, "invalid_action": False,
                    "retrieved": [p.pid for p in found], "admissible_actions": self._admissible()}
            return obs, 0.0, False, info
        gold = self.question.answer
        em = float(normalize_answer(content) == normalize_answer(gold))
        info = {"won": em == 1.0, "score": em, "invalid_action": False,
                "f1": f1_score(content, gold), "gold_answer": gold}
        obs = "Correct." if em else "Incorrect."
        return obs, em, True, info

    def expert_action(self) -> str:
        """Follow the hops, reading each hop's answer from passages retrieved so far."""
        entity = self.question.start
        for relation in self.question.relations:
            found = (read_fact(p.text, entity, relation) for p in self._retrieved)
            obj = next((o for o in found if o is not None), None)
            if obj is None:
                return f"search[{RELATIONS_BY_NAME[relation].noun} of {entity}]"
            entity = obj
        return f"answer[{entity}]"
