"""deepsearch: splits, retrieval, scoring, expert, protocol behaviour."""

from __future__ import annotations

import re

import pytest

import empg_envs
from empg_envs.core import EnvConfigError, EnvError
from empg_envs.deepsearch.knowledge_graph import build_knowledge_graph, read_fact

SPLITS = ("train", "eval_seen", "eval_unseen")
# train: 1-2 hops; in-domain eval: 2 hops; out-of-domain: 3 hops or unseen relations.
EXPECTED_TYPES = {
    "train": {"1hop", "2hop"},
    "eval_seen": {"2hop"},
    "eval_unseen": {"1hop", "2hop", "3hop"},
}


def _questions(split: str):
    env = empg_envs.make("deepsearch", split=split).unwrapped
    return list(env._corpus.questions[env.split])


def _play_expert(env, task) -> tuple[dict, list[str]]:
    env.reset(options={"task": task})
    actions, done = [], False
    while not done:
        actions.append(empg_envs.expert_action(env))
        _, _, terminated, truncated, info = env.step(actions[-1])
        done = terminated or truncated
    return info, actions


def test_knowledge_graph_is_deterministic_and_passages_state_their_facts():
    a, b = build_knowledge_graph(), build_knowledge_graph()
    assert a.passages == b.passages and a.facts == b.facts
    for p in a.passages[::7]:
        subject, relation, obj = p.fact
        assert read_fact(p.text, subject, relation) == obj
        assert a.facts[(subject, relation)] == obj


def test_split_aliases_and_types():
    assert empg_envs.make("deepsearch", split="eval_id").unwrapped.split == "eval_seen"
    assert empg_envs.make("deepsearch", split="eval_ood").unwrapped.split == "eval_unseen"
    for split in SPLITS:
        assert {q.task_type for q in _questions(split)} == EXPECTED_TYPES[split]


def test_in_domain_uses_train_relations_and_out_of_domain_does_not():
    train = _questions("train")
    train_relations = {r for q in train for r in q.relations}
    train_texts = {q.text for q in train}
    for q in _questions("eval_seen"):
        assert set(q.relations) <= train_relations and q.text not in train_texts
    for q in _questions("eval_unseen"):
        assert q.task_type == "3hop" or not set(q.relations) <= train_relations
        assert q.text not in train_texts


def test_reset_is_deterministic_and_task_ids_round_trip():
    a, b = empg_envs.make("deepsearch"), empg_envs.make("deepsearch")
    obs_a, info_a = a.reset(seed=11)
    obs_b, info_b = b.reset(seed=11)
    assert (obs_a, info_a) == (obs_b, info_b)
    assert info_a["admissible_actions"] is None
    assert info_a["instruction"] in obs_a
    seen = {a.reset(seed=s)[1]["task_id"] for s in range(20)}
    assert len(seen) > 1  # the seed does pick the task
    # A task_id of another split plays that task.
    eval_env = empg_envs.make("deepsearch", split="eval_unseen")
    obs_c, info_c = eval_env.reset(options={"task": info_a["task_id"]})
    assert info_c["task_id"] == info_a["task_id"] and obs_c == obs_a
    assert eval_env.reset(options={"task": 3})[1]["task_id"].startswith("deepsearch/eval_unseen/")


@pytest.mark.parametrize("task", [-1, 10**6, "deepsearch/train/1hop/99999", 1.5, True])
def test_bad_task_raises(task):
    env = empg_envs.make("deepsearch")
    with pytest.raises(EnvConfigError, match="bad task"):
        env.reset(options={"task": task})


@pytest.mark.parametrize("config", [{"split": "test"}, {"top_k": 0}, {"max_turns": 0}])
def test_bad_config_raises(config):
    with pytest.raises(EnvConfigError):
        empg_envs.make("deepsearch", **config)


@pytest.mark.parametrize("split", SPLITS)
def test_question_text_retrieves_first_hop_passage(split):
    env = empg_envs.make("deepsearch", split=split).unwrapped
    questions = _questions(split)[::5]
    hits = sum(q.support[0] in {p.pid for p in env.search(q.text)} for q in questions)
    assert hits / len(questions) >= 0.99


def test_search_shows_top_k_passages_and_handles_unknown_words():
    env = empg_envs.make("deepsearch", top_k=4)
    _, info = env.reset(options={"task": 0})
    q = env.unwrapped.question
    obs, reward, terminated, truncated, info = env.step(f"search[{q.text}]")
    assert (reward, terminated, truncated, info["invalid_action"]) == (0.0, False, False, False)
    assert len(info["retrieved"]) == 4 and q.support[0] in info["retrieved"]
    assert all(f"({pid})" in obs for pid in info["retrieved"])
    obs, *_, info = env.step("search[zzqx qqvv]")
    assert info["retrieved"] == [] and "No passage" in obs


def test_invalid_actions_explain_the_format_and_continue():
    env = empg_envs.make("deepsearch")
    env.reset(options={"task": 0})
    for action in ["", "look around", "search[]", "answer[  ]", "search(foo)", "ask[foo]"]:
        obs, reward, terminated, truncated, info = env.step(action)
        assert info["invalid_action"] is True, action
        assert (reward, terminated, truncated) == (0.0, False, False)
        assert "search[query]" in obs and "answer[text]" in obs
    _, _, terminated, _, info = env.step("answer[nobody]")
    assert terminated and info["invalid_action"] is False


def test_answer_scoring_normalises_and_reports_f1():
    env = empg_envs.make("deepsearch", split="eval_seen")
    env.reset(options={"task": 0})
    gold = env.unwrapped.question.answer
    _, reward, terminated, _, info = env.step(f"ANSWER[ The {gold.upper()}. ]")
    assert (reward, terminated, info["won"], info["f1"]) == (1.0, True, True, 1.0)
    # A two-word answer with one word right: reward 0, F1 2/3.
    people = [q for q in _questions("train") if len(q.answer.split()) == 2]
    env.reset(options={"task": people[0].task_id})
    _, reward, terminated, _, info = env.step(f"answer[{people[0].answer.split()[0]}]")
    assert (reward, terminated, info["won"]) == (0.0, True, False)
    assert info["f1"] == pytest.approx(2 / 3)


def test_truncation_at_max_turns():
    env = empg_envs.make("deepsearch", max_turns=3)
    env.reset(seed=0)
    results = [env.step("search[birthplace]") for _ in range(3)]
    assert [r[3] for r in results] == [False, False, True]
    assert not any(r[2] for r in results)
    with pytest.raises(EnvError):
        env.step("search[birthplace]")


def test_expert_reads_each_hop_from_retrieved_passages():
    question = next(q for q in _questions("eval_unseen") if q.task_type == "3hop")
    env = empg_envs.make("deepsearch", split="eval_unseen")
    info, actions = _play_expert(env, question.task_id)
    assert info["won"] and len(actions) == 4
    # Each later search names the entity the previous hop's passage gave, not the question's.
    kg = env.unwrapped._corpus.kg
    entity = question.start
    for action, relation in zip(actions, question.relations):
        assert action.startswith("search[") and entity in action
        entity = kg.facts[(entity, relation)]
    assert actions[-1] == f"answer[{question.answer}]"
    # Without search results the expert never gets past the first hop.
    env.reset(options={"task": question.task_id})
    env.unwrapped.search = lambda query: []
    for _ in range(3):
        action = empg_envs.expert_action(env)
        assert re.fullmatch(rf"search\[.*{re.escape(question.start)}\]", action)
        env.step(action)


@pytest.mark.parametrize("split", SPLITS)
def test_expert_solves_every_type(split):
    env = empg_envs.make("deepsearch", split=split)
    by_type: dict[str, list[bool]] = {}
    for q in _questions(split)[:300]:
        info, _ = _play_expert(env, q.task_id)
        by_type.setdefault(q.task_type, []).append(info["won"])
    assert set(by_type) == EXPECTED_TYPES[split]
    for task_type, wins in by_type.items():
        assert sum(wins) / len(wins) >= 0.99, task_type


@pytest.mark.parametrize("split", SPLITS)
def test_action_choices_list_every_expert_action(split):
    env = empg_envs.make("deepsearch", split=split, action_choices=True)
    wins = []
    for q in _questions(split)[:40]:
        _, info = env.reset(options={"task": q.task_id})
        assert all(a.startswith("search[") and a.endswith(f" of {q.start}]") for a in info["admissible_actions"])
        while True:
            action = empg_envs.expert_action(env)
            assert action in info["admissible_actions"], (action, info["admissible_actions"])
            _, _, terminated, truncated, info = env.step(action)
            if terminated or truncated:
                break
            assert any(a.startswith("answer[") for a in info["admissible_actions"])
        wins.append(info["won"])
    assert sum(wins) >= 39
    with pytest.raises(EnvConfigError, match="action_choices must be true or false"):
        empg_envs.check_config("deepsearch", action_choices=1)
