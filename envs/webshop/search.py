"""BM25 search over the catalog (bm25s), built once per process and catalog.

A product's document is its title, product-type path, features, description and option values,
the text a shopper could search for. Results are the top `SEARCH_RETURN_N` products with a
positive score, ties broken by catalog order so that a query always gives the same list.
"""

from __future__ import annotations

import functools

import bm25s
import numpy as np

from empg_envs.webshop.catalog import Catalog, build_catalog, words

#: WebShop returns the top 50 hits of a search, 10 per page.
SEARCH_RETURN_N = 50

_STOPWORDS = frozenset(
    "a an and are as at be by for from has have i in is it its me my need of on or "
    "our that the their this to want we which with would like looking am find buy".split()
)


def tokenize(text: str) -> list[str]:
    """Search tokens of `text`: `catalog.words` without stop words."""
    return [w for w in words(text) if w not in _STOPWORDS]


class SearchIndex:
    """BM25 over one catalog's products."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        corpus = [
            tokenize(
                " ".join(
                    (
                        p.title,
                        p.product_category,
                        *p.bullet_points,
                        p.description,
                        *(v for values in p.options.values() for v in values),
                    )
                )
            )
            for p in catalog.products
        ]
        self._bm25 = bm25s.BM25()
        self._bm25.index(corpus, show_progress=False)

    def search(self, query: str, k: int = SEARCH_RETURN_N) -> list[int]:
        """Indices into `catalog.products` of the best `k` matches of `query`, best first."""
        tokens = tokenize(query)
        if not tokens:
            return []
        scores = self._bm25.get_scores(tokens)
        # A stable sort on the negated scores keeps catalog order among equal scores.
        order = np.argsort(-scores, kind="stable")[:k]
        return [int(i) for i in order if scores[i] > 0]


@functools.lru_cache(maxsize=4)
def get_index(seed: int, num_products: int) -> SearchIndex:
    """The search index of `build_catalog(seed, num_products)`, built on first use."""
    return SearchIndex(build_catalog(seed, num_products))
