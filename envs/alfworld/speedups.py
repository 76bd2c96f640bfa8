"""Faster versions of functions the TextWorld PDDL engine calls all the time.

* `textgen._parse_and_convert(text)`: TatSu re-parses the same grammar snippets (command
  templates, feedback rules) for every admissible command on every step; that parsing is about
  40% of a step. The cache hands out deep copies because `derive` mutates the parsed symbols.
* `logic._parse_and_convert(text, rule_name="conjunctiveQuery")`: the conditions of those
  snippets (`{text|condition}`) are parsed again by TatSu each time they are derived, about a
  fifth of a step after the cache above. The result is a list of predicates, which TextWorld
  treats as values (hashable, never changed), so the cache hands out a new list of the same ones.
* `textgen.copy_context(context)` deep-copies the context's `variables` and `mapping` for every
  symbol derived: most of what is left of a step. Derivation only adds keys to those dicts (the
  entity infos and placeholders in them are read, never changed), so copies of the dicts do.
* `fast_downward.pddl2sas(domain, problem)`: `PddlEnv.load` and `PddlEnv.reset` translate the
  same problem twice each; reusing the translation makes the first reset after a load ~5x
  cheaper and a replay of the same game cheaper still. The translated task is only read.
  The wrapper also restores `sys.argv`, which `pddl2sas` overwrites on every call.

Each returns what the original returns (a test compares game traces played with and without
them), so they change speed only. `install()` is idempotent and process-wide.
"""

from __future__ import annotations

import collections
import copy
import sys
from collections.abc import Callable
from typing import Any

import fast_downward
import textworld.envs.pddl.textgen as textgen
import textworld.logic as logic

_PARSE_CACHE_SIZE = 4096
_SAS_CACHE_SIZE = 16

_originals: dict[str, Callable[..., Any]] = {}


class _LRU(collections.OrderedDict):
    def __init__(self, maxsize: int) -> None:
        super().__init__()
        self.maxsize = maxsize

    def lookup(self, key: Any, compute: Callable[[], Any]) -> Any:
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = compute()
        self[key] = value
        if len(self) > self.maxsize:
            self.popitem(last=False)
        return value


def _cached_parse(original: Callable[..., Any]) -> Callable[..., Any]:
    cache = _LRU(_PARSE_CACHE_SIZE)

    def parse_and_convert(text: str, **kwargs: Any) -> Any:
        key = (text, tuple(sorted(kwargs.items())))
        return copy.deepcopy(cache.lookup(key, lambda: original(text, **kwargs)))

    return parse_and_convert


def _cached_query_parse(original: Callable[..., Any]) -> Callable[..., Any]:
    cache = _LRU(_PARSE_CACHE_SIZE)

    def parse_and_convert(text: str, **kwargs: Any) -> Any:
        if kwargs != {"rule_name": "conjunctiveQuery"}:
            return original(text, **kwargs)
        return list(cache.lookup(text, lambda: original(text, **kwargs)))

    return parse_and_convert


def _copy_context(context: dict[str, Any]) -> dict[str, Any]:
    return {
        "state": context["state"],
        "facts": context["facts"],
        "variables": dict(context["variables"]),
        "mapping": dict(context["mapping"]),
        "entity_infos": context["entity_infos"],
    }


def _cached_pddl2sas(original: Callable[..., Any]) -> Callable[..., Any]:
    cache = _LRU(_SAS_CACHE_SIZE)

    def pddl2sas(domain: str, problem: str, verbose: bool = False, optimize: bool = False) -> Any:
        def translate() -> Any:
            argv = sys.argv
            try:
                return original(domain, problem, verbose=verbose, optimize=optimize)
            finally:
                sys.argv = argv

        return cache.lookup((domain, problem, bool(optimize)), translate)

    return pddl2sas


def install() -> None:
    """Put the memoized functions in place (no-op if already installed)."""
    if _originals:
        return
    _originals["parse"] = textgen._parse_and_convert
    _originals["query_parse"] = logic._parse_and_convert
    _originals["pddl2sas"] = fast_downward.pddl2sas
    textgen._parse_and_convert = _cached_parse(_originals["parse"])
    logic._parse_and_convert = _cached_query_parse(_originals["query_parse"])
    _originals["copy_context"] = textgen.copy_context
    textgen.copy_context = _copy_context
    fast_downward.pddl2sas = _cached_pddl2sas(_originals["pddl2sas"])


def uninstall() -> None:
    """Restore the library's own functions (used by the equivalence test)."""
    if not _originals:
        return
    textgen._parse_and_convert = _originals.pop("parse")
    logic._parse_and_convert = _originals.pop("query_parse")
    textgen.copy_context = _originals.pop("copy_context")
    fast_downward.pddl2sas = _originals.pop("pddl2sas")
