"""The webshop env: catalog, BM25 search, reward, pages and actions, expert, splits, and the
HTTP client against the local stand-in server."""

from __future__ import annotations

import dataclasses
import random
import re
import time

import pytest

import empg_envs
from empg_envs.core import EnvConfigError, EnvCrashed
from empg_envs.webshop.catalog import (
    CATEGORIES,
    PRODUCT_TYPES,
    SPLIT_SIZES,
    build_catalog,
    make_goal,
)
from empg_envs.webshop.env import WebShopEnv
from empg_envs.webshop.reward import get_reward
from empg_envs.webshop.search import SearchIndex, get_index
from empg_envs.webshop.standin_server import StandinServer

SPLITS = ("train", "eval_seen", "eval_unseen")
TYPES = {t.name: t for t in PRODUCT_TYPES}


@pytest.fixture(scope="module")
def catalog():
    return build_catalog()


@pytest.fixture(scope="module")
def server():
    with StandinServer() as srv:
        yield srv


def _goal_and_target(catalog, split="train", index=0):
    goal = make_goal(catalog, split, index)
    target = catalog.by_asin[goal.asin]
    selected = {g: v for g, v in goal.options.items()}
    return goal, target, selected


def _play_expert(env, task):
    obs, info = env.reset(options={"task": task})
    done, steps = False, []
    while not done:
        action = empg_envs.expert_action(env)
        obs, reward, terminated, truncated, info = env.step(action)
        assert not info["invalid_action"], (action, obs)
        steps.append((action, obs, reward, terminated, truncated, info["admissible_actions"]))
        done = terminated or truncated
    return info, steps


# ---- catalog and search ----------------------------------------------------------------------
def test_catalog_is_large_deterministic_and_fast_to_build():
    start = time.perf_counter()
    fresh = build_catalog(seed=123)
    index = get_index(123, len(fresh.products))
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"catalog + BM25 index took {elapsed:.1f}s"
    assert len(fresh.products) >= 5000
    assert len({p.asin for p in fresh.products}) == len(fresh.products)
    assert build_catalog(seed=123) is fresh and get_index(123, len(fresh.products)) is index
    # The same seed rebuilt from scratch gives the same products; another seed does not.
    again = build_catalog.__wrapped__(seed=123)
    assert [(p.asin, p.title, p.price, p.options) for p in again.products] == [
        (p.asin, p.title, p.price, p.options) for p in fresh.products
    ]
    assert [p.asin for p in build_catalog(seed=0).products[:50]] != [
        p.asin for p in fresh.products[:50]
    ]
    assert {p.category for p in fresh.products} == set(CATEGORIES)


def test_product_text_never_mentions_an_attribute_it_lacks(catalog):
    for p in catalog.products:
        lacking = [a for a in TYPES[p.query].attributes if a not in p.attributes]
        for attr in lacking:
            assert not re.search(rf"(?<![a-z0-9]){re.escape(attr)}(?![a-z0-9])", p.text), (
                p.asin, attr
            )
        values = [v for vs in p.options.values() for v in vs]
        assert len(values) == len(set(values)), p.asin  # option values are click labels


def test_bm25_finds_a_product_by_its_title(catalog):
    index = get_index(catalog.seed, len(catalog.products))
    rng = random.Random(7)
    for product in rng.sample(catalog.products, 60):
        hits = [catalog.products[i].asin for i in index.search(product.title)]
        assert product.asin in hits[:5], product.title
    assert index.search("the and of") == []


def test_bm25_ranks_matching_products_first(catalog):
    index = SearchIndex(catalog)
    hits = [catalog.products[i] for i in index.search("gluten free hot sauce")]
    assert len(hits) == 50
    assert all(p.query == "hot sauce" for p in hits[:10])
    assert "gluten free" in hits[0].attributes


# ---- goals and splits ------------------------------------------------------------------------
def test_split_goals_respect_held_out_pairs(catalog):
    targets = {}
    for split in SPLITS:
        targets[split] = set()
        for index in range(0, SPLIT_SIZES[split], 7):
            goal = make_goal(catalog, split, index)
            held = catalog.held_out[goal.query]
            unseen = [a for a in goal.attributes if a in held]
            if split == "eval_unseen":
                assert unseen, goal.instruction
            else:
                assert not unseen, goal.instruction
            target = catalog.by_asin[goal.asin]
            assert set(goal.attributes) <= set(target.attributes)
            assert goal.price_upper > target.price
            assert all(v in target.options[g] for g, v in goal.options.items())
            assert goal.query in goal.instruction and f"{goal.price_upper:.2f}" in goal.instruction
            targets[split].add(goal.asin)
    assert not targets["train"] & targets["eval_seen"]
    assert make_goal(catalog, "train", 5).instruction == make_goal(catalog, "train", 5).instruction


# ---- reward --------------------------------------------------------------------------------
def test_reward_exact_match_is_one(catalog):
    for index in range(20):
        goal, target, selected = _goal_and_target(catalog, "eval_unseen", index)
        score, info = get_reward(target, goal, selected)
        assert score == pytest.approx(1.0)
        assert info["r_type"] == 1.0 and info["r_price"] is True


def test_reward_wrong_attribute_lowers_score(catalog):
    goal, target, selected = _goal_and_target(catalog, "train", 3)
    missing = next(a for a in TYPES[target.query].attributes if a not in target.attributes)
    wrong = dataclasses.replace(goal, attributes=(*goal.attributes[:-1], missing))
    score, info = get_reward(target, wrong, selected)
    assert score < 1.0
    assert info["r_att"] < 1.0 and info["r_option"] in (None, 1.0) and info["r_price"]


def test_reward_wrong_option_lowers_score(catalog):
    index = next(i for i in range(100) if len(make_goal(catalog, "train", i).options) >= 2)
    goal, target, selected = _goal_and_target(catalog, "train", index)
    group, value = next(iter(goal.options.items()))
    selected[group] = next(v for v in target.options[group] if v != value)
    score, info = get_reward(target, goal, selected)
    assert score < 1.0 and info["r_option"] < 1.0 and info["r_att"] == 1.0
    assert get_reward(target, goal, {})[0] < score  # selecting nothing is worse still


def test_reward_price_above_cap_lowers_score(catalog):
    goal, target, selected = _goal_and_target(catalog, "eval_seen", 4)
    capped = dataclasses.replace(goal, price_upper=target.price - 0.5)
    score, info = get_reward(target, capped, selected)
    assert score < 1.0 and info["r_price"] is False and info["r_att"] == 1.0


def test_reward_wrong_product_type_scores_zero(catalog):
    goal, target, selected = _goal_and_target(catalog, "train", 0)
    other = next(
        p for p in catalog.products if p.query != goal.query and p.category == goal.category
    )
    score, info = get_reward(other, goal, selected)
    assert info["r_type"] < 1.0 and score < 1.0


def test_reward_always_in_unit_interval(catalog):
    rng = random.Random(11)
    for _ in range(400):
        goal = make_goal(catalog, rng.choice(SPLITS), rng.randrange(500))
        product = rng.choice(catalog.products[:200] + [catalog.by_asin[goal.asin]])
        selected = {g: rng.choice(vs) for g, vs in product.options.items() if rng.random() < 0.7}
        score, _ = get_reward(product, goal, selected)
        assert 0.0 <= score <= 1.0


# ---- env protocol ----------------------------------------------------------------------------
def test_make_defaults_and_bad_config():
    env = empg_envs.make("webshop")
    assert isinstance(env.unwrapped, WebShopEnv)
    assert env.unwrapped.max_turns == 15
    assert env.unwrapped.tasks() == SPLIT_SIZES["train"]
    with pytest.raises(EnvConfigError):
        empg_envs.make("webshop", num_products=10)
    with pytest.raises(EnvConfigError):
        empg_envs.make("webshop", split="test")


@pytest.mark.parametrize("split", SPLITS)
def test_expert_solves_every_category(split):
    env = empg_envs.make("webshop", split=split)
    results = {c: [] for c in CATEGORIES}
    # 60 tasks spread over the split; categories cycle with the task index, so all are hit.
    for task in range(0, SPLIT_SIZES[split], SPLIT_SIZES[split] // 60)[:60]:
        info, steps = _play_expert(env, task)
        results[info["task_type"]].append(info["won"])
        if info["won"]:
            assert info["score"] == pytest.approx(1.0) and steps[-1][3]
        assert len(steps) <= 10
    for category, wins in results.items():
        assert wins and sum(wins) >= 0.99 * len(wins), (split, category, wins)


def test_same_seed_same_episode():
    a, b = empg_envs.make("webshop"), empg_envs.make("webshop")
    obs_a, info_a = a.reset(seed=42)
    obs_b, info_b = b.reset(seed=42)
    assert (obs_a, info_a) == (obs_b, info_b)
    for _ in range(4):
        action = empg_envs.expert_action(a)
        assert empg_envs.expert_action(b) == action
        step_a, step_b = a.step(action), b.step(action)
        assert step_a == step_b
    ids = {a.reset(seed=s)[1]["task_id"] for s in range(20)}
    assert len(ids) > 15


def test_task_selection_by_index_and_id():
    env = empg_envs.make("webshop", split="train")
    _, info = env.reset(options={"task": 17})
    assert info["task_id"] == "webshop/train/00017"
    obs, again = env.reset(seed=999, options={"task": info["task_id"]})
    assert again["instruction"] == info["instruction"]
    _, other = env.reset(options={"task": "webshop/eval_unseen/00003"})
    assert other["task_id"] == "webshop/eval_unseen/00003"
    assert other["instruction"] == empg_envs.make("webshop", split="eval_unseen").reset(
        options={"task": 3}
    )[1]["instruction"]
    for bad in (-1, SPLIT_SIZES["train"], "webshop/train/99999", "nope", True, 1.5):
        with pytest.raises(EnvConfigError, match="task"):
            env.reset(options={"task": bad})


def test_observation_layout_and_navigation():
    env = empg_envs.make("webshop")
    obs, info = env.reset(options={"task": 2})
    assert obs == f"WebShop [SEP] Instruction: [SEP] {info['instruction']} [SEP] Search"
    assert info["admissible_actions"] == ["search[<your query>]"]
    query = info["instruction"].split(" with ")[0]
    obs, _, _, _, info = env.step(f"search[{query}]")
    head = f"Instruction: [SEP] {info['instruction']} [SEP] Back to Search [SEP] Page 1"
    assert obs.startswith(head)
    assert "click[next >]" in info["admissible_actions"]
    assert "click[< prev]" not in info["admissible_actions"]
    first_page = obs
    obs, *_, info = env.step("click[Next >]")  # clicks are case-insensitive
    assert "Page 2" in obs and "click[< prev]" in info["admissible_actions"]
    obs, *_ = env.step("click[< prev]")
    assert obs == first_page
    asin = re.search(r"\[SEP\] (B0[A-Z0-9]{8}) \[SEP\]", obs).group(1)
    obs, *_, info = env.step(f"click[{asin.lower()}]")
    assert "click[buy now]" in info["admissible_actions"] and "Price: $" in obs
    options = [a for a in info["admissible_actions"] if a not in {
        "click[back to search]", "click[< prev]", "click[description]", "click[features]",
        "click[reviews]", "click[buy now]"}]
    if options:
        value = options[0][len("click["):-1]
        obs, *_ = env.step(options[0])
        assert obs.startswith(f"You have clicked {value}.")
    obs, *_ = env.step("click[features]")
    parts = obs.split(" [SEP] ")
    assert parts[2:4] == ["Back to Search", "< Prev"]
    assert parts[4:] == list(env.unwrapped._shop.product.bullet_points)
    obs, *_ = env.step("click[< prev]")
    assert ("You have clicked" in obs) == bool(options)  # the selection survives a sub page
    obs, *_, info = env.step("click[back to search]")
    assert info["admissible_actions"] == ["search[<your query>]"]


@pytest.mark.parametrize(
    "action", ["click[nonexistent]", "foo", "click[buy now]", "search[<your query>]", "search[ ]"]
)
def test_invalid_action_keeps_page_and_episode(action):
    env = empg_envs.make("webshop")
    obs, _ = env.reset(options={"task": 8})
    new_obs, reward, terminated, truncated, info = env.step(action)
    assert info["invalid_action"] is True
    assert new_obs.startswith("Invalid action") and new_obs.endswith(obs)
    assert (reward, terminated, truncated) == (0.0, False, False)
    _, _, _, _, info = env.step(empg_envs.expert_action(env))
    assert info["invalid_action"] is False


def test_search_is_invalid_off_the_search_page():
    env = empg_envs.make("webshop")
    env.reset(options={"task": 8})
    obs, *_ = env.step(empg_envs.expert_action(env))
    new_obs, _, _, _, info = env.step("search[shoes]")
    assert info["invalid_action"] and new_obs.endswith(obs)


def test_every_admissible_action_is_valid():
    env = empg_envs.make("webshop")
    env.reset(options={"task": 9})
    prefix = [empg_envs.expert_action(env)]
    env.step(prefix[0])
    prefix.append(empg_envs.expert_action(env))
    for depth in (1, 2):  # a results page, then a product page
        env.reset(options={"task": 9})
        for action in prefix[:depth]:
            _, _, _, _, info = env.step(action)
        for action in info["admissible_actions"]:
            env.reset(options={"task": 9})
            for step in prefix[:depth]:
                env.step(step)
            assert not env.step(action)[4]["invalid_action"], action


def test_query_choices_offer_concrete_searches_the_expert_uses():
    env = empg_envs.make("webshop", query_choices=True)
    wins = []
    for task in range(0, 60, 6):
        _, info = env.reset(options={"task": task})
        instruction = info["instruction"].lower()
        searches = info["admissible_actions"]
        assert searches[1] == f"search[{instruction}]" and "<your query>" not in searches[0]
        assert all(word in instruction for word in searches[0][7:-1].split())
        while True:
            action = empg_envs.expert_action(env)
            assert action in info["admissible_actions"], action
            _, _, terminated, truncated, info = env.step(action)
            assert not info["invalid_action"]
            if terminated or truncated:
                break
        wins.append(info["won"])
    assert sum(wins) >= 9, wins
    # The second query is valid too, and leads to results.
    env.reset(options={"task": 3})
    _, _, _, _, info = env.step(env.unwrapped._shop.admissible_actions()[1])
    assert not info["invalid_action"] and info["page"] == "results"
    with pytest.raises(EnvConfigError, match="query_choices must be true or false"):
        empg_envs.check_config("webshop", query_choices="yes")


def test_buying_a_wrong_product_scores_below_one():
    env = empg_envs.make("webshop")
    _, info = env.reset(options={"task": 12})
    other = next(t for t in PRODUCT_TYPES if t.category != info["task_type"])
    _, _, _, _, info = env.step(f"search[{other.name}]")
    product = next(a for a in info["admissible_actions"] if a.startswith("click[b0"))
    env.step(product)
    obs, reward, terminated, _, info = env.step("click[buy now]")
    assert terminated and not info["won"] and reward == info["score"] < 1.0
    assert "Your score (min 0.0, max 1.0)" in obs and "reward_info" in info


def test_truncation_at_max_turns():
    env = empg_envs.make("webshop", max_turns=3)
    env.reset(options={"task": 1})
    outcomes = [env.step("click[nothing]")[2:4] for _ in range(3)]
    assert outcomes == [(False, False), (False, False), (False, True)]
    with pytest.raises(empg_envs.EnvError):
        env.step("foo")


# ---- HTTP client against the stand-in ---------------------------------------------------------
def test_standin_binds_localhost_only(server):
    assert server.url.startswith("http://127.0.0.1:")


@pytest.mark.parametrize("split", SPLITS)
def test_client_sees_what_the_env_shows(server, split):
    local = empg_envs.make("webshop", split=split)
    remote = empg_envs.make("webshop-server", url=server.url, split=split)
    for task in (0, 1, 2):
        obs, info = local.reset(options={"task": task})
        r_obs, r_info = remote.reset(options={"task": task})
        assert r_obs == obs and r_info["instruction"] == info["instruction"]
        assert r_info["admissible_actions"] == info["admissible_actions"]
        done = False
        while not done:
            action = empg_envs.expert_action(local)
            expected, got = local.step(action), remote.step(action)
            assert got[:4] == expected[:4], action
            for key in ("won", "score", "invalid_action", "admissible_actions"):
                assert got[4][key] == expected[4][key], key
            done = expected[2] or expected[3]
        assert got[4]["won"]


def test_client_invalid_actions_and_task_ids(server):
    env = empg_envs.make("webshop-server", url=server.url, split="eval_seen")
    obs, info = env.reset(options={"task": 4})
    assert info["task_id"] == "webshop-server/504"
    for action in ("click[nonexistent]", "foo", "click[search]"):
        new_obs, reward, terminated, _, step_info = env.step(action)
        assert step_info["invalid_action"] and new_obs.endswith(obs) and not terminated
    _, again = env.reset(options={"task": "webshop-server/504"})
    assert again["instruction"] == info["instruction"]
    with pytest.raises(EnvConfigError):
        env.reset(options={"task": 5000})
    with pytest.raises(EnvConfigError):
        empg_envs.make("webshop-server", url="localhost:3000")


def test_client_heuristic_expert_scores(server):
    env = empg_envs.make("webshop-server", url=server.url, split="train")
    scores = []
    for task in range(10):
        env.reset(options={"task": task})
        done = False
        while not done:
            _, _, terminated, truncated, info = env.step(empg_envs.expert_action(env))
            assert not info["invalid_action"]
            done = terminated or truncated
        scores.append(info["score"])
    assert sum(scores) / len(scores) > 0.5


def test_client_network_errors_raise_env_crashed():
    srv = StandinServer().start()
    env = empg_envs.make("webshop-server", url=srv.url, timeout=5.0)
    env.reset(options={"task": 0})
    srv.close()
    with pytest.raises(EnvCrashed):
        env.step(empg_envs.expert_action(env))
    with pytest.raises(EnvCrashed):
        env.reset(options={"task": 0})
