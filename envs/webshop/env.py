"""`WebShopEnv`: WebShop's text shopping task on the generated catalog.

Observations use WebShop's simple text mode: the visible texts of the page joined by " [SEP] ",
e.g. "WebShop [SEP] Instruction: [SEP] i need ... [SEP] Search" on the search page and
"Instruction: [SEP] ... [SEP] Back to Search [SEP] Page 1 (Total results: 50) [SEP] Next > [SEP]
B0... [SEP] <title> [SEP] $12.99 [SEP] ..." on a results page. On a product page every option
already selected is announced first ("You have clicked 8 fl oz. [SEP] ..."), as WebShop's rich
text mode does, since the simple layout cannot show a selection.

Actions follow WebShop's grammar, case-insensitive:
  * `search[<query>]`, only on the search page (the only page with a search bar);
  * `click[<clickable>]` with a clickable of the current page: "back to search", "next >",
    "< prev", a product id from the results ("b0abcdefgh"), an option value ("8 fl oz"),
    "description", "features", "reviews", "buy now".
Anything else is invalid: the observation says why, then repeats the current page (WebShop
stays on the same page), `info["invalid_action"]` is True and the episode goes on.

`info["admissible_actions"]` lists the current page's actions the way WebShop agents usually
see them: `click[<clickable>]` for each clickable (lower case, as WebShop matches them) and, on
the search page, the single placeholder "search[<your query>]" meaning any free-text query.
The placeholder itself, sent verbatim, is an invalid action. With `query_choices: true` the
search page offers two concrete queries instead: the instruction's key words and the whole
instruction. Then every action is one of a list, as constrained decoding needs, for a model
too small to write its own query.

"Buy now" ends the episode with WebShop's score (see `reward.py`) as the reward; `won` means a
score of 1.0. The default turn limit is 15.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from empg_envs.core import EnvConfigError, EnvError, TextEnv
from empg_envs.webshop.catalog import (
    CATEGORIES,
    DEFAULT_NUM_PRODUCTS,
    DEFAULT_SEED,
    SPLIT_SIZES,
    Catalog,
    Goal,
    Product,
    build_catalog,
    make_goal,
)
from empg_envs.webshop.reward import get_reward
from empg_envs.webshop.search import SearchIndex, get_index

BACK_TO_SEARCH = "Back to Search"
NEXT_PAGE = "Next >"
PREV_PAGE = "< Prev"
BUY_NOW = "Buy Now"
SUB_PAGES = ("Description", "Features", "Reviews")
RESULTS_PER_PAGE = 10
SEARCH_PLACEHOLDER = "search[<your query>]"
SCORE_LABEL = "Your score (min 0.0, max 1.0)"
SEP = " [SEP] "
#: A score at least this high is a win (scores are fractions, compared with rounding slack).
WIN_SCORE = 1.0 - 1e-9

_ACTION = re.compile(r"\s*(search|click)\[(.*)\]\s*", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class Segment:
    """One visible text of a page; `kind` says whether and how it can be clicked."""

    text: str
    kind: str = "text"  # text | button | product | option | search_bar
    group: str = ""  # the option group of an "option" segment


@dataclass
class ShopSession:
    """The state of one shopper on the site, and the pages it sees.

    Shared by `WebShopEnv` (text pages) and the stand-in HTTP server (HTML pages), so that both
    show the same texts in the same order.
    """

    catalog: Catalog
    index: SearchIndex
    goal: Goal
    page: str = "search"  # search | results | item | item_sub | done
    keywords: str = ""
    page_num: int = 1
    results: list[int] = field(default_factory=list)
    asin: str = ""
    options: dict[str, str] = field(default_factory=dict)
    sub_page: str = ""
    score: float = 0.0
    reward_info: dict[str, Any] = field(default_factory=dict)
    searches: list[str] = field(default_factory=list)
    # Concrete queries the search page offers instead of the free-text placeholder (query_choices).
    queries: tuple[str, ...] = ()

    @property
    def product(self) -> Product:
        return self.catalog.by_asin[self.asin]

    # ---- transitions ----------------------------------------------------------------------
    def search(self, query: str, page_num: int = 1) -> None:
        self.keywords = query.lower()
        self.searches.append(self.keywords)
        self.results = self.index.search(self.keywords)
        self.page, self.page_num, self.asin, self.options = "results", page_num, "", {}

    def open_item(self, asin: str, options: dict[str, str] | None = None) -> None:
        self.page, self.asin, self.options = "item", asin, dict(options or {})

    def buy(self) -> None:
        self.score, self.reward_info = get_reward(self.product, self.goal, self.options)
        self.page = "done"

    def click(self, label: str) -> str | None:
        """Click `label` (case-insensitive); the reason it is invalid, or None if done."""
        target = self.clickables().get(label.strip().lower())
        if target is None:
            return f"'{label}' is not a clickable on this page."
        if target.kind == "product":
            self.open_item(target.text)
        elif target.kind == "option":
            self.options[target.group] = target.text
        elif target.text == BACK_TO_SEARCH:
            self.page, self.keywords, self.asin, self.options = "search", "", "", {}
        elif target.text == NEXT_PAGE:
            self.page_num += 1
        elif target.text == PREV_PAGE:
            if self.page == "results":
                self.page_num -= 1
            elif self.page == "item":
                self.page, self.asin, self.options = "results", "", {}
            else:
                self.page = "item"
        elif target.text in SUB_PAGES:
            self.page, self.sub_page = "item_sub", target.text
        elif target.text == BUY_NOW:
            self.buy()
        return None

    # ---- rendering ------------------------------------------------------------------------
    def page_results(self) -> list[Product]:
        start = (self.page_num - 1) * RESULTS_PER_PAGE
        return [self.catalog.products[i] for i in self.results[start:start + RESULTS_PER_PAGE]]

    def segments(self) -> list[Segment]:
        """The visible texts of the current page, in WebShop's order."""
        if self.page == "done":
            return [Segment("Thank you for shopping with us!"), Segment(SCORE_LABEL),
                    Segment(format_score(self.score))]
        if self.page == "search":
            return [Segment("WebShop"), Segment("Instruction:"), Segment(self.goal.instruction),
                    Segment("Search", "search_bar")]
        head = [Segment("Instruction:"), Segment(self.goal.instruction),
                Segment(BACK_TO_SEARCH, "button")]
        if self.page == "results":
            head.append(Segment(f"Page {self.page_num} (Total results: {len(self.results)})"))
            if self.page_num > 1:
                head.append(Segment(PREV_PAGE, "button"))
            if self.page_num * RESULTS_PER_PAGE < len(self.results):
                head.append(Segment(NEXT_PAGE, "button"))
            for p in self.page_results():
                head += [Segment(p.asin, "product"), Segment(p.title), Segment(f"${p.price:.2f}")]
            return head
        head.append(Segment(PREV_PAGE, "button"))
        product = self.product
        if self.page == "item":
            for group, values in product.options.items():
                head.append(Segment(group))
                head += [Segment(v, "option", group) for v in values]
            return head + [
                Segment(product.title), Segment(f"Price: ${product.price:.2f}"),
                Segment(f"Rating: {product.rating}"),
                *(Segment(name, "button") for name in SUB_PAGES), Segment(BUY_NOW, "button"),
            ]
        if self.sub_page == "Description":
            return head + [Segment(product.description)]
        if self.sub_page == "Features":
            return head + [Segment(b) for b in product.bullet_points]
        if not product.reviews:
            return head + [Segment("No reviews found")]
        for title, stars, body in product.reviews:
            head += [Segment(f'"{title}"'), Segment(str(stars)), Segment(body)]
        return head

    def clickables(self) -> dict[str, Segment]:
        """Lower-cased label -> segment, for the clickable segments of the page."""
        return {
            s.text.lower(): s for s in self.segments() if s.kind in ("button", "product", "option")
        }

    def observation(self) -> str:
        return page_text(self.segments(), self.options if self.page == "item" else {})

    def admissible_actions(self) -> list[str]:
        searches = [f"search[{q}]" for q in self.queries] if self.queries else [SEARCH_PLACEHOLDER]
        actions = searches if self.page == "search" else []
        return actions + [f"click[{label}]" for label in self.clickables()]


def _key_words(goal: Goal) -> str:
    """The instruction's key words: the goal's attributes, product name and option values."""
    return " ".join((*goal.attributes, goal.name, *goal.options.values())).lower()


def format_score(score: float) -> str:
    return str(round(score, 4))


def page_text(texts: list[Segment] | list[str], selected: dict[str, str]) -> str:
    """WebShop's simple text layout; announces the selected options first (rich mode does)."""
    parts = [f"You have clicked {v}." for v in selected.values()]
    parts += [t.text if isinstance(t, Segment) else t for t in texts]
    return SEP.join(parts)


def parse_action(action: str) -> tuple[str, str] | None:
    """(verb, argument) of `search[...]` / `click[...]`, or None for anything else."""
    match = _ACTION.fullmatch(action)
    return (match.group(1).lower(), match.group(2).strip()) if match else None


class WebShopEnv(TextEnv):
    """WebShop on a generated catalog of `num_products` products (seeded by `catalog_seed`)."""

    # The catalogue and search index are shared (lru_cache) but only read once built: two
    # threads building the same one at once each build a whole, equal copy. Each instance
    # keeps its own page state.
    thread_safe = True

    task_types = CATEGORIES

    def __init__(
        self,
        max_turns: int = 15,
        split: str = "train",
        catalog_seed: int = DEFAULT_SEED,
        num_products: int = DEFAULT_NUM_PRODUCTS,
        query_choices: bool = False,
    ) -> None:
        super().__init__(max_turns=max_turns, split=split)
        self.check_config(query_choices=query_choices)
        self.query_choices = query_choices
        if not isinstance(catalog_seed, int):
            raise EnvConfigError(f"catalog_seed must be an int, got {catalog_seed!r}")
        if not isinstance(num_products, int) or num_products < 1000:
            raise EnvConfigError(f"num_products must be an int >= 1000, got {num_products!r}")
        self.catalog = build_catalog(catalog_seed, num_products)
        self.index = get_index(catalog_seed, num_products)
        self._shop: ShopSession | None = None

    @classmethod
    def check_config(cls, **env_config: Any) -> None:
        super().check_config(**env_config)
        if not isinstance(env_config.get("query_choices", False), bool):
            raise EnvConfigError(f"query_choices must be true or false, got {env_config['query_choices']!r}")

    def tasks(self) -> int:
        """Number of tasks in this env's split."""
        return SPLIT_SIZES[self.split]

    def _resolve_task(self, seed: int | None, task: Any) -> tuple[str, int]:
        if task is None:
            return self.split, int(self.np_random.integers(self.tasks()))
        if isinstance(task, int) and not isinstance(task, bool):
            if 0 <= task < self.tasks():
                return self.split, task
        elif isinstance(task, str):
            match = re.fullmatch(r"webshop/(\w+)/(\d+)", task)
            if match and match.group(1) in SPLIT_SIZES:
                split, index = match.group(1), int(match.group(2))
                if index < SPLIT_SIZES[split]:
                    return split, index
        raise EnvConfigError(
            f"task {task!r}: expected an index in [0, {self.tasks()}) or a task_id like "
            "'webshop/train/00042'"
        )

    def _reset_task(self, seed: int | None, task: Any) -> tuple[str, dict[str, Any]]:
        split, index = self._resolve_task(seed, task)
        goal = make_goal(self.catalog, split, index)
        # query_choices: the search page offers the instruction's key words and the whole
        # instruction as queries, for constrained decoding by a model that cannot write a query.
        queries = (_key_words(goal), goal.instruction.lower()) if self.query_choices else ()
        self._shop = ShopSession(self.catalog, self.index, goal, queries=queries)
        info = {
            "task_id": f"webshop/{split}/{index:05d}",
            "task_type": goal.category,
            "instruction": goal.instruction,
            "admissible_actions": self._shop.admissible_actions(),
            "page": self._shop.page,
        }
        return self._shop.observation(), info

    def _step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        shop = self._shop
        parsed = parse_action(action)
        if parsed is None:
            error = "Use search[<query>] or click[<button>]."
        elif parsed[0] == "search":
            if shop.page != "search":
                error = "search is only possible on the search page (click[back to search])."
            elif not parsed[1] or action.strip().lower() == SEARCH_PLACEHOLDER:
                error = "Write your own search words inside search[...]."
            else:
                shop.search(parsed[1])
                error = None
        else:
            error = shop.click(parsed[1])
        obs = shop.observation()
        info: dict[str, Any] = {
            "invalid_action": error is not None,
            "admissible_actions": shop.admissible_actions(),
            "page": shop.page,
            "won": False,
            "score": 0.0,
        }
        if error is not None:
            return f"Invalid action: {error}{SEP}{obs}", 0.0, False, info
        if shop.page != "done":
            return obs, 0.0, False, info
        info.update(won=shop.score >= WIN_SCORE, score=shop.score, reward_info=shop.reward_info)
        return obs, shop.score, True, info

    # ---- expert ---------------------------------------------------------------------------
    def _goal_options(self, product: Product) -> dict[str, str] | None:
        """The options to select on `product` to fully satisfy the goal, or None if it can't."""
        goal = self._shop.goal
        selected = {
            group: value
            for value in goal.options.values()
            for group, values in product.options.items()
            if value in values
        }
        score, _ = get_reward(product, goal, selected)
        return selected if score >= WIN_SCORE else None

    def _expert_queries(self) -> tuple[str, str]:
        """The key-word query, then a fallback: the target's title, or, where the search page
        offers its queries (query_choices), the whole instruction."""
        shop = self._shop
        if shop.queries:
            return shop.queries[0], shop.queries[1]
        return _key_words(shop.goal), self.catalog.by_asin[shop.goal.asin].title.lower()

    def expert_action(self) -> str:
        """Search the goal's key words, open a result that satisfies the goal, select the
        goal's options, buy; fall back to searching the target's title."""
        shop = self._shop
        if shop is None or shop.page == "done" or self._done:
            raise EnvError("expert_action() needs a running episode; call reset()")
        keywords, title = self._expert_queries()
        back = f"click[{BACK_TO_SEARCH.lower()}]"
        if shop.page == "search":
            return f"search[{title if keywords in shop.searches else keywords}]"
        if shop.page == "item_sub":
            return f"click[{PREV_PAGE.lower()}]"
        if shop.page == "item":
            selected = self._goal_options(shop.product)
            if selected is None:
                return f"click[{PREV_PAGE.lower()}]"
            for group, value in selected.items():
                if shop.options.get(group) != value:
                    return f"click[{value}]"
            return f"click[{BUY_NOW.lower()}]"
        if shop.keywords not in (keywords, title):
            return back
        for product in shop.page_results():
            if self._goal_options(product) is not None:
                return f"click[{product.asin.lower()}]"
        if NEXT_PAGE.lower() in shop.clickables():
            return f"click[{NEXT_PAGE.lower()}]"
        return back
