"""WebShop's purchase reward, re-implemented for the generated catalog.

Like WebShop's `get_reward`, the score is

    r_type * (attribute matches + option matches + [price <= cap]) / (#attributes + #options + 1)

with each part reported in the returned info. Differences, all because our catalog is clean
generated text rather than scraped pages:
  * attributes match exactly (after normalisation) against the product's attribute list, or as a
    whole phrase in its title, features or description (WebShop: fuzzy match, then substring);
  * options match exactly after normalisation, one credit per goal option at most, so the score
    stays in [0, 1] (WebShop fuzzy-matches and can count a goal option twice);
  * the product-type score compares the goal's product-type words with the purchased title
    instead of spaCy nouns of the two titles; the thresholds are WebShop's.
"""

from __future__ import annotations

import re
from typing import Any

from empg_envs.webshop.catalog import PATH_SEP, Goal, Product, words


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _mentions(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![a-z0-9]){re.escape(phrase)}(?![a-z0-9])", text) is not None


def type_reward(product: Product, goal: Goal) -> dict[str, Any]:
    """Whether the purchased product is the kind of product the goal asks for."""
    query_match = product.query == goal.query
    shared_path = set(product.product_category.split(PATH_SEP)) & set(
        goal.product_category.split(PATH_SEP)
    )
    category_match = len(shared_path) >= 2
    wanted = set(words(goal.name))
    title_score = len(wanted & set(words(product.title))) / len(wanted) if wanted else 0.2
    r_type = 1.0 if (query_match or category_match or title_score > 0.2) else 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return {
        "r_type": r_type,
        "query_match": query_match,
        "category_match": category_match,
        "title_score": title_score,
    }


def attribute_matches(product: Product, goal: Goal) -> int:
    """Goal attributes the product has, listed or mentioned in its text."""
    listed = {_norm(a) for a in product.attributes}
    return sum(
        1 for a in goal.attributes if _norm(a) in listed or _mentions(product.text, _norm(a))
    )


def option_matches(goal: Goal, selected: dict[str, str]) -> int:
    """Goal option values among the selected ones (whatever group they were selected in)."""
    chosen = {_norm(v) for v in selected.values()}
    return sum(1 for v in goal.options.values() if _norm(v) in chosen)


def get_reward(
    product: Product, goal: Goal, selected: dict[str, str]
) -> tuple[float, dict[str, Any]]:
    """The score in [0, 1] of buying `product` with options `selected`, and its components."""
    n_attrs, n_opts = len(goal.attributes), len(goal.options)
    denominator = n_attrs + n_opts + 1
    r_price = product.price <= goal.price_upper
    n_attr_hit = attribute_matches(product, goal)
    n_opt_hit = option_matches(goal, selected)
    type_info = type_reward(product, goal)
    score = (n_attr_hit + n_opt_hit + r_price) / denominator * type_info["r_type"]
    info: dict[str, Any] = {
        **type_info,
        "r_att": n_attr_hit / n_attrs if n_attrs else None,
        "r_option": n_opt_hit / n_opts if n_opts else None,
        "r_price": r_price,
        "w_att": n_attrs / denominator,
        "w_option": n_opts / denominator,
        "w_price": 1 / denominator,
    }
    return score, info
