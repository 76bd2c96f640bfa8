"""A small local stand-in for WebShop's web server, serving the generated shop as HTML.

It answers the real server's URL layout (web_agent_site/app.py), so that `WebShopServerEnv` can
be tested without the real server and its data:

    GET|POST /<session>                     search page; POST search_query=... searches
    /search_results/<session>/<keywords>/<page>
    /item_page/<session>/<asin>/<keywords>/<page>/<options>
    /item_sub_page/<session>/<asin>/<keywords>/<page>/<sub_page>/<options>
    /done/<session>/<asin>/<options>        buys; shows "Your score (min 0.0, max 1.0)"

`keywords` is a Python list literal such as "['red', 'shoes']" (or plain words) and `options` a
dict literal, URL-quoted, as the real server writes them. A session id containing "fixed_<n>"
plays goal n, numbered like WebShop's goals: 0-499 are eval_unseen tasks 0-499, 500-1499 are
eval_seen tasks 0-999, 1500 on are train tasks; any other session id gets a train goal drawn
from the id. The HTML mirrors the real templates' structure (buttons in forms, product links,
radio options with labels and data-url, a hidden block on the done page), rendered from the
same page model as `WebShopEnv`, so a client sees the same texts as the env shows.

Binds 127.0.0.1 only. Run by hand with `python -m empg_envs.webshop.standin_server --port 3000`.
"""

from __future__ import annotations

import argparse
import ast
import html
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote

from empg_envs.webshop.catalog import (
    DEFAULT_NUM_PRODUCTS,
    DEFAULT_SEED,
    SPLIT_SIZES,
    build_catalog,
    make_goal,
)
from empg_envs.webshop.env import (
    BACK_TO_SEARCH,
    BUY_NOW,
    NEXT_PAGE,
    PREV_PAGE,
    SUB_PAGES,
    Segment,
    ShopSession,
)
from empg_envs.webshop.search import get_index

#: WebShop goal numbering -> (split, first goal number of the split).
GOAL_RANGES: tuple[tuple[str, int], ...] = (("eval_unseen", 0), ("eval_seen", 500), ("train", 1500))


def goal_split(goal_index: int) -> tuple[str, int]:
    """(split, task index) of WebShop goal number `goal_index`."""
    for split, start in reversed(GOAL_RANGES):
        if start <= goal_index < start + SPLIT_SIZES[split]:
            return split, goal_index - start
    raise KeyError(goal_index)


def _q(value: object) -> str:
    return quote(str(value), safe="")


class _Shop:
    """Goals per session and the HTML of each URL."""

    def __init__(self, catalog_seed: int, num_products: int) -> None:
        self.catalog = build_catalog(catalog_seed, num_products)
        self.index = get_index(catalog_seed, num_products)
        self.goals: dict[str, tuple[str, int]] = {}
        self.lock = threading.Lock()

    def session(self, session_id: str) -> ShopSession:
        with self.lock:
            if session_id not in self.goals:
                fixed = re.search(r"fixed_(\d+)$", session_id)
                if fixed:
                    self.goals[session_id] = goal_split(int(fixed.group(1)))
                else:
                    pick = random.Random(session_id).randrange(SPLIT_SIZES["train"])
                    self.goals[session_id] = ("train", pick)
            split, index = self.goals[session_id]
        return ShopSession(self.catalog, self.index, make_goal(self.catalog, split, index))

    def render(self, path: str) -> str:
        parts = [unquote(p) for p in path.split("?")[0].strip("/").split("/")]
        route, args = (parts[0], parts[1:]) if len(parts) > 1 else ("index", parts)
        shop = self.session(args[0])
        if route == "index":
            return _html(shop, args[0])
        if route == "search_results":
            shop.search(" ".join(_keywords(args[1])), int(args[2]))
        elif route in ("item_page", "item_sub_page"):
            shop.keywords, shop.page_num = " ".join(_keywords(args[2])), int(args[3])
            if args[1] not in self.catalog.by_asin:
                raise KeyError(args[1])
            shop.open_item(args[1], ast.literal_eval(args[-1]))
            if route == "item_sub_page":
                shop.page, shop.sub_page = "item_sub", args[4]
        elif route == "done":
            shop.open_item(args[1], ast.literal_eval(args[2]))
            shop.buy()
        else:
            raise KeyError(route)
        return _html(shop, args[0])


def _keywords(text: str) -> list[str]:
    """The real server's reading of <keywords>: a list literal, else one keyword."""
    return ast.literal_eval(text) if text.startswith("[") else [text]


def _urls(shop: ShopSession, session: str) -> dict[str, str]:
    """Where each button of the page leads (the real templates' url_for targets)."""
    kw = _q(shop.keywords.split(" "))
    item = f"/item_page/{session}/{shop.asin}/{kw}/{shop.page_num}/{_q(shop.options)}"
    urls = {
        BACK_TO_SEARCH: f"/{session}",
        BUY_NOW: f"/done/{session}/{shop.asin}/{_q(shop.options)}",
    }
    if shop.page == "results":
        urls[PREV_PAGE] = f"/search_results/{session}/{kw}/{shop.page_num - 1}"
        urls[NEXT_PAGE] = f"/search_results/{session}/{kw}/{shop.page_num + 1}"
    elif shop.page == "item":
        urls[PREV_PAGE] = f"/search_results/{session}/{kw}/{shop.page_num}"
    else:
        urls[PREV_PAGE] = item
    for name in SUB_PAGES:
        urls[name] = (
            f"/item_sub_page/{session}/{shop.asin}/{kw}/{shop.page_num}/{name}/{_q(shop.options)}"
        )
    return urls


def _element(seg: Segment, shop: ShopSession, session: str, urls: dict[str, str], n: int) -> str:
    text = html.escape(seg.text)
    if seg.kind == "button":
        return (f'<form method="post" action="{html.escape(urls[seg.text])}">'
                f'<button type="submit" class="btn btn-primary">{text}</button></form>')
    if seg.kind == "product":
        kw = _q(shop.keywords.split(" "))
        href = f"/item_page/{session}/{seg.text}/{kw}/{shop.page_num}/{_q({})}"
        return f'<h4 class="product-asin"><a class="product-link" href="{href}">{text}</a></h4>'
    if seg.kind == "option":
        options = {**shop.options, seg.group: seg.text}
        kw = _q(shop.keywords.split(" "))
        url = f"/item_page/{session}/{shop.asin}/{kw}/{shop.page_num}/{_q(options)}"
        rid = f"radio_{html.escape(seg.group)}{n}"
        return (f'<input type="radio" id="{rid}" name="{html.escape(seg.group)}" value="{text}" '
                f'data-url="{html.escape(url)}"><label for="{rid}">{text}</label>')
    if seg.kind == "search_bar":
        return (f'<form role="form" method="post" action="/{session}">'
                '<input id="search_input" type="text" name="search_query" placeholder="Search...">'
                f'<button type="submit" class="btn btn-success">{text}</button></form>')
    return f"<p>{text}</p>"


def _html(shop: ShopSession, session: str) -> str:
    urls = _urls(shop, session)
    body = [_element(s, shop, session, urls, n) for n, s in enumerate(shop.segments())]
    if shop.page == "done":
        # The real done page hides the goal in a display:none block; clients must skip it.
        body.insert(1, f'<div style="display:none"><pre>{html.escape(shop.goal.asin)}</pre></div>')
    return (
        "<!DOCTYPE html><html><head><title>WebShop</title>"
        "<script>var hidden = 'not page text';</script></head>"
        f"<body><div class=\"container\">{''.join(body)}</div></body></html>"
    )


class StandinServer:
    """The stand-in on 127.0.0.1 (port 0 = a free port), served from a background thread."""

    def __init__(
        self,
        port: int = 0,
        catalog_seed: int = DEFAULT_SEED,
        num_products: int = DEFAULT_NUM_PRODUCTS,
    ) -> None:
        shop = _Shop(catalog_seed, num_products)

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                if self.command == "POST":
                    length = int(self.headers.get("Content-Length") or 0)
                    form = parse_qs(self.rfile.read(length).decode())
                    query = form.get("search_query", [""])[0].strip()
                    session = unquote(self.path.strip("/"))
                    if query and "/" not in session:
                        self.send_response(302)
                        words = _q(query.lower().split(" "))
                        self.send_header("Location", f"/search_results/{_q(session)}/{words}/1")
                        self.end_headers()
                        return
                try:
                    page = shop.render(self.path).encode()
                except (KeyError, IndexError, TypeError, ValueError, SyntaxError):
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            do_GET = do_POST = _serve

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> StandinServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> StandinServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args()
    server = StandinServer(args.port).start()
    print(f"WebShop stand-in at {server.url}/fixed_0 (Ctrl-C stops)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.close()


if __name__ == "__main__":
    main()
