"""Simple baselines that every report shows beside the language models.

A fine-tuned model is only interesting if it beats these: item popularity, and TF-IDF text
similarity between the user's (decayed) history and each item. Both score the full catalog
(the sequential-recommendation protocol) and sampled candidate lists.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer

# TfidfVectorizer settings that reproduce the Amazon reference rows (docs/DESIGN.md).
DEFAULT_TFIDF: dict[str, object] = {"sublinear_tf": True}

# Users scored per block in TfidfHistory: 1024 x 4385 float32 is ~18 MB.
_USER_CHUNK = 1024


def history_weights(
    histories: Sequence[Sequence[str]], index: dict[str, int], decay: float
) -> sp.csr_matrix:
    """[users, items] sparse ``decay**i`` at each history item (newest first, i = 0, 1, ...);
    an item bought twice sums. The one user representation TF-IDF, co-visitation and the
    blend share."""
    rows, cols, vals = [], [], []
    for u, hist in enumerate(histories):
        try:
            cols.extend(index[i] for i in hist)
        except KeyError as e:
            raise KeyError(f"item id {e.args[0]!r} is not in the fitted catalog") from None
        rows.extend([u] * len(hist))
        vals.append(np.power(float(decay), np.arange(len(hist), dtype=np.float64)))
    return sp.csr_matrix(
        (np.concatenate(vals) if vals else np.array([]), (rows, cols)),
        shape=(len(histories), len(index)),
    )


class Popularity:
    """Score = number of times the item occurs in the training interactions."""

    def __init__(self) -> None:
        self.item_ids: np.ndarray = np.array([], dtype=object)
        self.counts: np.ndarray = np.array([], dtype=np.float64)
        self._index: dict[str, int] = {}

    def fit(self, item_ids: Sequence[str], catalog: Sequence[str] | None = None) -> Popularity:
        """Count train item ids; ``catalog`` fixes the column order of `score_catalog`.

        Without a catalog the columns are the distinct train items, sorted. Catalog items never
        seen in train score 0.
        """
        uniq, counts = np.unique(np.asarray(item_ids, dtype=object), return_counts=True)
        if catalog is None:
            self.item_ids, self.counts = uniq, counts.astype(np.float64)
        else:
            self.item_ids = np.asarray(catalog, dtype=object)
            lookup = dict(zip(uniq.tolist(), counts.tolist(), strict=True))
            self.counts = np.array([lookup.get(i, 0) for i in self.item_ids], dtype=np.float64)
        self._index = {item: j for j, item in enumerate(self.item_ids.tolist())}
        return self

    @classmethod
    def from_counts(cls, item_ids: Sequence[str], counts: np.ndarray) -> Popularity:
        """Counts saved with a model (`counts` in `item_ids` order)."""
        out = cls()
        out.item_ids = np.asarray(item_ids, dtype=object)
        out.counts = np.asarray(counts, dtype=np.float64)
        out._index = {item: j for j, item in enumerate(out.item_ids.tolist())}
        return out

    def score(self, item_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Train count of each given item (0 when unseen); works for any candidate list."""
        return np.array(
            [self.counts[j] if (j := self._index.get(i)) is not None else 0.0 for i in item_ids],
            dtype=np.float64,
        )

    def score_catalog(self, n_users: int) -> np.ndarray:
        """[n_users, n_items] read-only broadcast view of the count row (no memory per user)."""
        return np.broadcast_to(self.counts, (n_users, len(self.counts)))


class TfidfHistory:
    """Cosine similarity between a decayed sum of history item TF-IDF vectors and each item.

    The user vector is ``sum_i decay**i * tfidf(history[i])`` with the history NEWEST FIRST,
    then L2-normalised; item vectors are the L2-normalised TF-IDF rows. ``decay=0`` keeps only
    the newest item (0**0 == 1). The vectorizer is scikit-learn's default plus
    ``sublinear_tf=True`` (1 + log tf): that setting reproduces the recall of the Amazon
    reference rows (docs/DESIGN.md) exactly (plain tf is ~0.0007 lower). Keyword arguments
    override or extend the TfidfVectorizer settings.
    """

    def __init__(self, decay: float = 0.5, **vectorizer_kwargs: object) -> None:
        if decay < 0:
            raise ValueError(f"decay must be >= 0, got {decay}")
        self.decay = decay
        self.vectorizer = TfidfVectorizer(**(DEFAULT_TFIDF | vectorizer_kwargs))
        self.item_ids: list[str] = []
        self._index: dict[str, int] = {}
        self._items: sp.csr_matrix | None = None

    def fit(self, item_ids: Sequence[str], texts: Sequence[str]) -> TfidfHistory:
        """Fit TF-IDF on the catalog texts; columns of `score_catalog` follow ``item_ids``."""
        item_ids = list(item_ids)
        if len(item_ids) != len(texts):
            raise ValueError(f"{len(item_ids)} item ids but {len(texts)} texts")
        if len(set(item_ids)) != len(item_ids):
            raise ValueError("item ids must be unique")
        self.item_ids = item_ids
        self._index = {item: j for j, item in enumerate(item_ids)}
        # TfidfVectorizer rows are already L2-normalised (norm="l2" by default).
        self._items = sp.csr_matrix(self.vectorizer.fit_transform(texts), dtype=np.float64)
        return self

    def _check_fitted(self) -> sp.csr_matrix:
        if self._items is None:
            raise RuntimeError("TfidfHistory is not fitted: call fit(item_ids, texts) first")
        return self._items

    def _columns(self, ids: Sequence[str]) -> list[int]:
        try:
            return [self._index[i] for i in ids]
        except KeyError as e:
            raise KeyError(f"item id {e.args[0]!r} is not in the fitted catalog") from None

    def user_vectors(self, histories: Sequence[Sequence[str]]) -> sp.csr_matrix:
        """L2-normalised decayed history vectors, one row per user (all zero if no history)."""
        items = self._check_fitted()
        weights = history_weights(histories, self._index, self.decay)
        users = sp.csr_matrix(weights @ items)
        norms = np.sqrt(np.asarray(users.multiply(users).sum(axis=1)).ravel())
        norms[norms == 0] = 1.0
        return sp.csr_matrix(sp.diags(1.0 / norms) @ users)

    def score_catalog_chunks(
        self, histories: Sequence[Sequence[str]], chunk: int = _USER_CHUNK
    ) -> Iterator[np.ndarray]:
        """Yield dense float32 [chunk, n_items] score blocks, for callers that rank as they go."""
        items_t = self._check_fitted().T.tocsc()
        for start in range(0, len(histories), chunk):
            users = self.user_vectors(histories[start : start + chunk])
            yield np.asarray((users @ items_t).toarray(), dtype=np.float32)

    def score_catalog(self, histories: Sequence[Sequence[str]]) -> np.ndarray:
        """Cosine scores [n_users, n_items] (float32), computed ``_USER_CHUNK`` users at a time."""
        blocks = list(self.score_catalog_chunks(histories))
        if not blocks:
            return np.zeros((0, len(self.item_ids)), dtype=np.float32)
        return np.concatenate(blocks, axis=0)

    def score_pairs(
        self,
        histories: Sequence[Sequence[str]],
        candidate_item_ids: Sequence[Sequence[str]],
        chunk: int = _USER_CHUNK,
    ) -> list[np.ndarray]:
        """Cosine score of each user's own candidates (sampled-candidate protocol).

        Returns one float32 array per user, aligned with that user's candidate list.
        """
        items = self._check_fitted()
        if len(histories) != len(candidate_item_ids):
            raise ValueError(
                f"{len(histories)} histories but {len(candidate_item_ids)} candidate lists"
            )
        out: list[np.ndarray] = []
        for start in range(0, len(histories), chunk):
            cands = candidate_item_ids[start : start + chunk]
            users = self.user_vectors(histories[start : start + chunk])
            lengths = np.array([len(c) for c in cands], dtype=np.int64)
            cols = self._columns([i for c in cands for i in c])
            user_rows = np.repeat(np.arange(len(cands)), lengths)
            # Row-wise dot products of the paired sparse rows, without a dense user x item block.
            flat = np.asarray(users[user_rows].multiply(items[cols]).sum(axis=1)).ravel()
            out.extend(np.split(flat.astype(np.float32), np.cumsum(lengths)[:-1]))
        return out

    def score_queries(self, queries: Sequence[str], item_ids: Sequence[str]) -> np.ndarray:
        """Cosine between each query's TF-IDF vector and its paired item (search baseline)."""
        items = self._check_fitted()
        if len(queries) != len(item_ids):
            raise ValueError(f"{len(queries)} queries but {len(item_ids)} items")
        q = sp.csr_matrix(self.vectorizer.transform(list(queries)), dtype=np.float64)
        rows = items[self._columns(item_ids)]
        return np.asarray(q.multiply(rows).sum(axis=1)).ravel().astype(np.float32)


class CoVisitation:
    """What other users bought near the items in this user's history (collaborative signal).

    A text encoder knows what an item is; it cannot know that people who buy this pipette also
    buy those tips. ``C[a, b]`` sums ``1 / d`` over every pair of training items ``a, b`` that
    one user bought ``d <= window`` positions apart (both directions); a user's score for item
    ``b`` is ``log1p(sum_i decay**i * C[history[i], b])`` with the history newest first. Fitted
    on training groups only: each positive with the ``window`` newest items before it, which
    visits every pair of a user's training sequence exactly once.
    """

    def __init__(self, window: int = 3, decay: float = 0.5) -> None:
        if window < 1 or decay < 0:
            raise ValueError(f"window must be >= 1 and decay >= 0, got {window}, {decay}")
        self.window = window
        self.decay = decay
        self.item_ids: list[str] = []
        self._index: dict[str, int] = {}
        self._counts: sp.csr_matrix | None = None

    def fit(
        self,
        item_ids: Sequence[str],
        histories: Sequence[Sequence[str]],
        positives: Sequence[str],
    ) -> CoVisitation:
        """``histories[g]`` (newest first) came before ``positives[g]``, one per training group."""
        if len(histories) != len(positives):
            raise ValueError(f"{len(histories)} histories but {len(positives)} positives")
        self.item_ids = list(item_ids)
        self._index = {item: j for j, item in enumerate(self.item_ids)}
        rows, cols, vals = [], [], []
        for hist, pos in zip(histories, positives, strict=True):
            near = self._columns(hist[: self.window])
            rows.extend(near)
            cols.extend([self._index[pos]] * len(near))
            vals.extend(1.0 / np.arange(1, len(near) + 1))
        n = len(self.item_ids)
        one_way = sp.csr_matrix((vals, (rows, cols)), shape=(n, n), dtype=np.float64)
        self._counts = sp.csr_matrix(one_way + one_way.T)  # duplicates summed
        return self

    @classmethod
    def from_counts(
        cls, item_ids: Sequence[str], counts: sp.csr_matrix, window: int, decay: float
    ) -> CoVisitation:
        """A co-visitation matrix saved with a model (rows and columns in `item_ids` order)."""
        out = cls(window, decay)
        out.item_ids = list(item_ids)
        out._index = {item: j for j, item in enumerate(out.item_ids)}
        out._counts = sp.csr_matrix(counts, dtype=np.float64)
        return out

    def _columns(self, ids: Sequence[str]) -> list[int]:
        try:
            return [self._index[i] for i in ids]
        except KeyError as e:
            raise KeyError(f"item id {e.args[0]!r} is not in the fitted catalog") from None

    def counts(self) -> sp.csr_matrix:
        if self._counts is None:
            raise RuntimeError("CoVisitation is not fitted: call fit(item_ids, histories, ...)")
        return self._counts

    def score_catalog_chunks(
        self, histories: Sequence[Sequence[str]], chunk: int = _USER_CHUNK
    ) -> Iterator[np.ndarray]:
        """Yield dense float32 [chunk, n_items] score blocks."""
        counts = self.counts()
        for start in range(0, len(histories), chunk):
            block = histories[start : start + chunk]
            weights = history_weights(block, self._index, self.decay)
            yield np.log1p((weights @ counts).toarray()).astype(np.float32)

    def score_pairs(
        self, histories: Sequence[Sequence[str]], candidate_item_ids: Sequence[Sequence[str]]
    ) -> list[np.ndarray]:
        """Score of each user's own candidates (sampled-candidate protocol)."""
        out: list[np.ndarray] = []
        for start in range(0, len(histories), _USER_CHUNK):
            cands = candidate_item_ids[start : start + _USER_CHUNK]
            block = next(self.score_catalog_chunks(histories[start : start + _USER_CHUNK]))
            out.extend(block[u, self._columns(c)] for u, c in enumerate(cands))
        return out


def train_pairs(train_groups) -> tuple[list[str], list[list[str]]]:
    """Every training group's positive and the history before it: what baselines learn from."""
    positives, histories = [], []
    columns = ["item_ids", "history_ids"]
    for batch in train_groups.select_columns(columns).iter_batches(batch_format="pyarrow"):
        positives.extend(pc.list_element(batch["item_ids"], 0).to_pylist())
        histories.extend(batch["history_ids"].to_pylist())
    return positives, histories


def fit_baselines(
    cfg, catalog: pa.Table, positives: list[str], histories: list[list[str]]
) -> dict[str, Popularity | TfidfHistory | CoVisitation]:
    """The baselines `eval.baselines` names, fitted on the training part only: each training
    group's positive item and the history before it (`train_pairs`)."""
    from shoprank.data.text import render_items

    fitted: dict = {}
    ids = catalog["item_id"].to_pylist()
    if "popularity" in cfg.eval.baselines:
        fitted["popularity"] = Popularity().fit(positives, catalog=ids)
    if "tfidf" in cfg.eval.baselines:
        fitted["tfidf"] = TfidfHistory(decay=cfg.eval.history_decay).fit(
            ids, render_items(catalog, cfg.data.item_template)
        )
    if "covisit" in cfg.eval.baselines:
        fitted["co-visitation"] = CoVisitation(cfg.eval.covisit_window, cfg.eval.history_decay).fit(
            ids, histories, positives
        )
    return fitted
