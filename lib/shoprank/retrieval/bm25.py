"""BM25 over catalog titles (the `bm25s` library), configured as the search reference figures are.

The Home Depot README (shared/data/home-depot/README.md) fixes every choice, and ties move its
NDCG@10 by 0.004, so none is left to a library default:

- tokens: `[a-z0-9]+` of the lower-cased text, single characters kept (bm25s's own tokenizer
  drops them and keeps `_`): `tokenize` here, the vocabulary handed to bm25s as token ids;
- a query token counts once, however often it repeats (bm25s would add it again);
- IDF `log(1 + (N - df + 0.5) / (df + 0.5))` and term weight `tf / (tf + k1 (1 - b + b dl/avgdl))`:
  bm25s's `method="lucene"` (Lucene drops the constant (k1 + 1) factor: the same ranking, and
  the same per-query z-scores);
- k1 1.2, b 0.75, float64 scores (float32 sums can tie or split documents that float64 keeps
  apart).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import bm25s
import numpy as np

TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased alphanumeric runs, single characters included ("1/2 in." -> 1, 2, in)."""
    return TOKEN.findall(text.lower())


class BM25:
    """A BM25 index over a list of texts (catalog titles), scoring every text for a query."""

    def __init__(self, texts: Sequence[str], k1: float = 1.2, b: float = 0.75):
        if len(texts) == 0:
            raise ValueError("BM25 needs at least one text to index; the catalog is empty")
        self.vocab: dict[str, int] = {}
        docs = [[self.vocab.setdefault(t, len(self.vocab)) for t in tokenize(s)] for s in texts]
        if not self.vocab:
            raise ValueError(
                "BM25: no text has a token matching [a-z0-9]+; is this the title column?"
            )
        self.n_items = len(texts)
        self._index = bm25s.BM25(k1=k1, b=b, method="lucene", dtype="float64")
        self._index.index((docs, dict(self.vocab)), create_empty_token=False, show_progress=False)

    def token_ids(self, query: str) -> list[int]:
        """The query's distinct indexed tokens, in order: a repeat counts once, an unknown
        token scores nothing."""
        ids = [self.vocab[t] for t in tokenize(query) if t in self.vocab]
        return list(dict.fromkeys(ids))

    def score(self, query: str) -> np.ndarray:
        """[n_items] float64 BM25 scores (0 for items sharing no token with the query)."""
        ids = self.token_ids(query)
        if not ids:
            return np.zeros(self.n_items, dtype=np.float64)
        return self._index.get_scores_from_ids(ids)

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """[len(queries), n_items] float64 scores."""
        out = np.empty((len(queries), self.n_items), dtype=np.float64)
        for row, query in enumerate(queries):
            out[row] = self.score(query)
        return out
