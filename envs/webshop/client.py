"""`WebShopServerEnv`: the same text protocol as `WebShopEnv`, played on a real WebShop server.

Start WebShop's own server (princeton-nlp/WebShop, `./run_dev.sh`, default port 3000) and make
the env with its address:

    env = empg_envs.make("webshop-server", url="http://127.0.0.1:3000", split="eval_unseen")

The client speaks plain HTTP (urllib): it opens `<url>/<session>` and then follows the links,
form actions and option `data-url`s of each page, so it needs nothing of the server but its
HTML. Observations are WebShop's simple text mode built from the page's visible text (scripts,
`hidden` and `display:none` blocks skipped), with the same action grammar, admissible actions
and invalid-action convention as `WebShopEnv` (see env.py).

Tasks are WebShop's goal numbers, played through session ids "<nonce>_fixed_<n>": eval_unseen
is WebShop's test range 0-499, eval_seen its dev range 500-1499 and train 1500 up to
`num_goals` (12,087 human goals by default). `options={"task": i}` is the i-th goal of the
split; a task_id is "webshop-server/<n>". Network or HTTP errors raise `EnvCrashed`.

The server does not reveal the goal, so `expert_action` is a heuristic, not an oracle: search
the instruction, open the first result, click the option values the instruction names, buy.
"""

from __future__ import annotations

import http.client
import re
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any

from empg_envs.core import EnvConfigError, EnvCrashed, EnvError, TextEnv
from empg_envs.webshop.env import (
    BUY_NOW,
    PREV_PAGE,
    SCORE_LABEL,
    SEARCH_PLACEHOLDER,
    SEP,
    WIN_SCORE,
    page_text,
    parse_action,
)

WEBSHOP_GOALS = 12087
#: split -> first WebShop goal number (the split runs to the next one, or to num_goals).
SPLIT_STARTS = {"eval_unseen": 0, "eval_seen": 500, "train": 1500}
_SKIPPED_TAGS = {"head", "script", "style", "title", "meta", "noscript", "template"}
_VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
              "track", "wbr"}


@dataclass
class _Clickable:
    url: str
    method: str
    group: str = ""  # the option group, for radio options


class _PageParser(HTMLParser):
    """Visible texts, clickables and the search form of one WebShop page."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []
        self.clickables: dict[str, _Clickable] = {}
        self.search_form: tuple[str, str, str] | None = None  # (url, method, field name)
        self._stack: list[tuple[str, dict[str, str], bool]] = []  # (tag, attrs, hidden)
        self._radios: dict[str, dict[str, str]] = {}
        self._form: tuple[str, str] | None = None

    def _hidden(self) -> bool:
        return any(hidden for _, _, hidden in self._stack)

    def _inside(self, tag: str) -> dict[str, str] | None:
        for name, attrs, _ in reversed(self._stack):
            if name == tag:
                return attrs
        return None

    def handle_starttag(self, tag: str, attrs_list: list[tuple[str, str | None]]) -> None:
        attrs = {k: v or "" for k, v in attrs_list}
        if tag == "form":
            self._form = (attrs.get("action", ""), attrs.get("method", "get").upper())
        elif tag == "input" and attrs.get("type") == "radio":
            self._radios[attrs.get("id", "")] = attrs
        elif tag == "input" and attrs.get("id") == "search_input" and self._form:
            self.search_form = (*self._form, attrs.get("name", "search_query"))
        if tag in _VOID_TAGS:
            return
        style = attrs.get("style", "").replace(" ", "").lower()
        hidden = tag in _SKIPPED_TAGS or "hidden" in attrs or "display:none" in style
        self._stack.append((tag, attrs, hidden))

    def handle_endtag(self, tag: str) -> None:
        # Pages have stray or mismatched end tags (<h4>...</h5>); close up to the matching tag.
        for depth in range(len(self._stack) - 1, -1, -1):
            if self._stack[depth][0] == tag:
                del self._stack[depth:]
                break
        if tag == "form":
            self._form = None

    def handle_data(self, data: str) -> None:
        text = data.strip()
        if not text or self._hidden():
            return
        self.texts.append(text)
        label, link = self._inside("label"), self._inside("a")
        if self._inside("button") is not None and self._form is not None:
            if self.search_form is None or self._form[0] != self.search_form[0]:
                self.clickables[text.lower()] = _Clickable(*self._form)
        elif link is not None and "product-link" in link.get("class", "").split():
            self.clickables[text.lower()] = _Clickable(link.get("href", ""), "GET")
        elif label is not None and label.get("for") in self._radios:
            radio = self._radios[label["for"]]
            value = radio.get("value", text)
            self.clickables[value.lower()] = _Clickable(
                radio.get("data-url", ""), "GET", radio.get("name", "")
            )


class WebShopServerEnv(TextEnv):
    """WebShop played over HTTP against the server at `url`."""

    # Each instance holds its own HTTP session with the server.
    thread_safe = True

    task_types = ("webshop",)

    def __init__(
        self,
        url: str = "",
        max_turns: int = 15,
        split: str = "train",
        timeout: float = 30.0,
        num_goals: int = WEBSHOP_GOALS,
    ) -> None:
        super().__init__(max_turns=max_turns, split=split)
        if not isinstance(url, str) or not re.match(r"https?://", url):
            raise EnvConfigError(f"url must be the WebShop server's http(s) address, got {url!r}")
        if not isinstance(num_goals, int) or num_goals <= SPLIT_STARTS["train"]:
            raise EnvConfigError(f"num_goals must be an int > {SPLIT_STARTS['train']}")
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self.num_goals = num_goals
        self._page: _PageParser | None = None
        self._page_url = ""
        self._selected: dict[str, str] = {}
        self._instruction = ""

    # ---- tasks ----------------------------------------------------------------------------
    def _goal_range(self, split: str) -> range:
        ends = {"eval_unseen": SPLIT_STARTS["eval_seen"], "eval_seen": SPLIT_STARTS["train"],
                "train": self.num_goals}
        return range(SPLIT_STARTS[split], ends[split])

    def tasks(self) -> int:
        """Number of WebShop goals in this env's split."""
        return len(self._goal_range(self.split))

    def _goal_index(self, task: Any) -> int:
        goals = self._goal_range(self.split)
        if task is None:
            return goals[int(self.np_random.integers(len(goals)))]
        if isinstance(task, int) and not isinstance(task, bool) and 0 <= task < len(goals):
            return goals[task]
        match = re.fullmatch(r"webshop-server/(\d+)", task) if isinstance(task, str) else None
        if match and int(match.group(1)) < self.num_goals:
            return int(match.group(1))
        raise EnvConfigError(
            f"task {task!r}: expected an index in [0, {len(goals)}) or 'webshop-server/<goal>'"
        )

    # ---- HTTP -----------------------------------------------------------------------------
    def _load(self, url: str, method: str = "GET", form: dict[str, str] | None = None) -> None:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        if method == "POST" and data is None:
            data = b""
        full_url = urllib.parse.urljoin(self.url + "/", url)
        request = urllib.request.Request(full_url, data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read().decode("utf-8", errors="replace")
                self._page_url = response.geturl()
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            raise EnvCrashed(f"WebShop server at {self.url}: {err}") from err
        self._page = _PageParser()
        self._page.feed(body)
        self._page.close()

    @property
    def _kind(self) -> str:
        path = urllib.parse.urlparse(self._page_url).path
        for kind in ("search_results", "item_sub_page", "item_page", "done"):
            if f"/{kind}/" in path:
                return kind
        return "search"

    def _observation(self) -> str:
        return page_text(self._page.texts, self._selected if self._kind == "item_page" else {})

    def _admissible(self) -> list[str]:
        actions = [SEARCH_PLACEHOLDER] if self._page.search_form else []
        return actions + [f"click[{label}]" for label in self._page.clickables]

    def _score(self) -> float | None:
        texts = self._page.texts
        for label, value in zip(texts, texts[1:]):
            if label.startswith(SCORE_LABEL):
                return float(value)
        return None

    # ---- protocol -------------------------------------------------------------------------
    def _reset_task(self, seed: int | None, task: Any) -> tuple[str, dict[str, Any]]:
        goal = self._goal_index(task)
        self._selected = {}
        self._load(f"{self.url}/{uuid.uuid4().hex[:12]}_fixed_{goal}")
        texts = self._page.texts
        after = [b for a, b in zip(texts, texts[1:]) if a.startswith("Instruction:")]
        self._instruction = after[0] if after else ""
        info = {
            "task_id": f"webshop-server/{goal}",
            "task_type": "webshop",
            "instruction": self._instruction,
            "admissible_actions": self._admissible(),
        }
        return self._observation(), info

    def _step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        parsed = parse_action(action)
        error = None
        if parsed is None:
            error = "Use search[<query>] or click[<button>]."
        elif parsed[0] == "search":
            if self._page.search_form is None:
                error = "search is only possible on the search page (click[back to search])."
            elif not parsed[1] or action.strip().lower() == SEARCH_PLACEHOLDER:
                error = "Write your own search words inside search[...]."
            else:
                url, method, field = self._page.search_form
                self._load(url, method, {field: parsed[1]})
        else:
            target = self._page.clickables.get(parsed[1].lower())
            if target is None:
                error = f"'{parsed[1]}' is not a clickable on this page."
            else:
                self._load(target.url, target.method)
                if target.group:
                    self._selected[target.group] = parsed[1].lower()
        if self._kind not in ("item_page", "item_sub_page"):
            self._selected = {}
        obs = self._observation()
        info: dict[str, Any] = {
            "invalid_action": error is not None,
            "admissible_actions": self._admissible(),
            "won": False,
            "score": 0.0,
        }
        if error is not None:
            return f"Invalid action: {error}{SEP}{obs}", 0.0, False, info
        score = self._score() if self._kind == "done" else None
        if score is None:
            return obs, 0.0, False, info
        info.update(won=score >= WIN_SCORE, score=score)
        return obs, score, True, info

    def expert_action(self) -> str:
        """A heuristic shopper (the goal is the server's secret)."""
        if self._page is None or self._done:
            raise EnvError("expert_action() needs a running episode; call reset()")
        clickables = self._page.clickables
        if self._page.search_form is not None:
            return f"search[{self._instruction.split(', and price lower than')[0]}]"
        if self._kind == "search_results":
            for label, target in clickables.items():
                if "/item_page/" in target.url:
                    return f"click[{label}]"
        if self._kind == "item_page":
            for label, target in clickables.items():
                named = f"{target.group}: {label}" in self._instruction.lower()
                if target.group and named and self._selected.get(target.group) != label:
                    return f"click[{label}]"
            return f"click[{BUY_NOW.lower()}]"
        back = PREV_PAGE.lower()
        return f"click[{back}]" if back in clickables else f"click[{next(iter(clickables))}]"
