"""Request and response bodies of the HTTP API, with their limits (422 names the field)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_K = 100
MAX_HISTORY = 50
MAX_SCORE_ITEMS = 200
MAX_TEXT = 1000
MAX_BODY_BYTES = 65_536
MAX_ID = 256  # an item id in /feedback
# The request_id an answer carries: a UUID (serving/impressions.py makes version 7 ones).
REQUEST_ID = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecommendRequest(_Body):
    user_id: str | None = Field(None, min_length=1, max_length=128)
    # An explicit history (newest first) instead of the feature store's.
    history: list[str] | None = Field(None, min_length=1, max_length=MAX_HISTORY)
    k: int = Field(10, ge=1, le=MAX_K)
    # Extra context words (device, page...) appended to the history text.
    context: str | None = Field(None, max_length=MAX_TEXT)
    explain: bool = False
    # false: the models' own order, no business rules (what offline evaluation measures; the
    # replay job and parity checks ask for it).
    rules: bool = True

    @model_validator(mode="after")
    def _who(self) -> RecommendRequest:
        if self.user_id is None and self.history is None:
            raise ValueError("give user_id or history (item ids, newest first)")
        return self


class SearchFilters(_Body):
    category: str | None = Field(None, description="keep items whose category starts with this")
    brand: str | None = None
    max_price: float | None = Field(None, ge=0)
    in_stock: bool | None = None


class SearchRequest(_Body):
    query: str = Field(min_length=1, max_length=MAX_TEXT)
    # Who searched: not used to rank, only logged with the impressions (impressions_dir) so
    # that the search joins the user's other events.
    user_id: str | None = Field(None, min_length=1, max_length=128)
    k: int = Field(10, ge=1, le=MAX_K)
    filters: SearchFilters = SearchFilters()
    explain: bool = False
    # false: the models' own order (request filters still apply), no business rules: what the
    # offline search evaluation measures.
    rules: bool = True

    @field_validator("query")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("query is blank: give the words to search for")
        return v


class ScoreRequest(_Body):
    context: str = Field(min_length=1, max_length=MAX_TEXT)
    item_ids: list[str] = Field(min_length=1, max_length=MAX_SCORE_ITEMS)


class Item(BaseModel):
    item_id: str
    # The model's score standardised among the request's candidates scored by the same model
    # (the ranker's head, the retriever's rest), plus any boosts.
    score: float
    title: str | None = None
    why: list[str] | None = None  # explain=true: the rules that moved it
    # explain=true: the models' score before any rule: for the reranked head the mix
    # (1 - w) z(stage one) + w z(ranker) of rerank.json, for the rest the stage-one score. What
    # offline evaluation ranks by.
    model_score: float | None = None


class RankedResponse(BaseModel):
    items: list[Item]
    fallback: str | None = None  # e.g. "popular": the user was unknown
    removed: dict[str, int] | None = None  # explain=true: items each filter dropped
    version: dict[str, int | None]
    # Which stage one answered: "blend" (the export's blended signals) or "retriever" (the
    # retriever alone: search, or an export without blend weights); None for a fallback.
    stage_one: str | None = None
    # This answer's id: send it back with POST /feedback; the impressions logged carry it.
    request_id: str
    # True: an exploration answer (the app's explore_share): the items shown in a random order.
    explored: bool = False


class FeedbackRequest(_Body):
    """What came of one item of one answer (the answer's request_id, the item shown)."""

    request_id: str = Field(pattern=REQUEST_ID, description="the request_id of the answer")
    item_id: str = Field(min_length=1, max_length=MAX_ID, description="an item of that answer")
    event: Literal["click", "add_to_cart", "purchase"]


class FeedbackResponse(BaseModel):
    # true: written as an outcome row by whichever replica took it; whether it belongs to an
    # answer (its request_id served, the item shown, not late, not a duplicate) is decided
    # where training data is built (data/outcomes.py), which counts the rest. false: `reason`
    # is "dropped" (the log's buffer was full; counted in /version).
    logged: bool
    reason: str | None = None


class ScoreResponse(BaseModel):
    scores: list[float | None]  # None for an item id the catalog does not have
    unknown_items: list[str]
    version: dict[str, int | None]


class AppArgs(_Body):
    """The app's `args:` in serve/config.yaml (also what the benchmark's plain baseline takes)."""

    registry: str = "registry"  # a local folder or a pyarrow filesystem URI
    retriever: str  # registered model names
    ranker: str | None = None  # None: stage one's order goes straight to the rules
    alias: str = "production"
    catalog: str  # the catalog Parquet the models were trained on
    events: str  # recent events (Parquet): the feature store's snapshot
    rules: str = "serve/rules.yaml"
    # API keys: SHOPRANK_API_KEYS in the replicas' environment and/or this secret file.
    api_keys_file: str | None = None
    # /docs, /redoc and /openapi.json: off unless asked for (they map the API for anyone).
    docs: bool = False
    poll_s: float = Field(10.0, gt=0)  # how often the models look for a new version
    refresh_s: float = Field(300.0, gt=0)  # how often the feature store re-reads its snapshot
    retrieve_top: int = Field(100, ge=1)  # stage one's candidates
    # How many of them the ranker rescores. None: as the retriever's registry version records
    # (rerank.json: the count and mix chosen on valid, only if the ranker improved stage one
    # there; else none). A number forces the ranker's order on that many: not what was evaluated.
    rerank_top: int | None = Field(None, ge=1)
    # The ranker's backend (models/ranker.py): auto (bf16 where the CPU or GPU computes it
    # natively, else ONNX Runtime fp32 on a CPU: lib/shoprank/precision.py, the rule
    # evaluation resolves by), torch
    # fp32, bf16 or dynamic int8; ONNX Runtime fp32 or int8 (ONNX fp32 matches torch fp32).
    ranker_precision: Literal["auto", "fp32", "bf16", "int8", "onnx", "onnx-int8"] = "auto"
    # The ranker's pair length in tokens; None: as trained (its export's). Shorter is cheaper;
    # evaluate the same choice first (eval.ranker_max_length) to see what it costs.
    ranker_max_length: int | None = Field(None, ge=8)
    # The retriever's context tower: auto (bf16 where native, else fp32), bf16 or fp32;
    # evaluation embeds with train.precision, resolved by the same rule.
    retriever_precision: Literal["auto", "fp32", "bf16"] = "auto"
    # torch threads per Models replica; None: the CPUs Ray gives the replica, rounded up.
    torch_threads: int | None = Field(None, ge=1)
    # "split": the routes (Ingress) and the models (Models) in deployments of their own, each
    # scaled apart; "one": the routes inside the model replica (deployment `Server`, 2 CPUs),
    # which saves a process and two handle calls a request. Measured on 2 cores: "one" serves
    # more and answers a lone /recommend faster (RESULTS.md, "BLAS threads"); serve/config.yaml
    # uses it and lists `Server`; for "split" list `Models` and `Ingress`.
    layout: Literal["split", "one"] = "split"
    # The model replica's batching (None: serve/config.yaml's user_config decides);
    # 1 = no batching.
    max_batch_size: int | None = Field(None, ge=1)
    batch_wait_timeout_s: float | None = Field(None, ge=0)
    # Served-events log (serving/impressions.py): every answer's impressions as events Parquet
    # under <impressions_dir>/dt=YYYY-MM-DD/, /feedback's outcome rows under
    # <impressions_dir>/_outcomes/dt=YYYY-MM-DD/ (joined to the impressions by request_id where
    # training data is built). None: off (and /feedback answers 404). A local folder or a
    # pyarrow filesystem URI.
    impressions_dir: str | None = None
    # The user column: "raw" (the id the caller sent: the shop's own) or "pseudonym"
    # (auth.hash_user under SHOPRANK_USER_HASH_KEY, which the app then requires; the shop's
    # other events must be pseudonymized with the same secret to join).
    log_user_ids: Literal["raw", "pseudonym"] = "raw"
    impressions_flush_s: float = Field(10.0, gt=0)  # write the buffer this often...
    impressions_flush_rows: int = Field(5_000, ge=1)  # ... or once it holds this many rows
    # Rows held at most while storage is slow or failing; more are dropped (and counted).
    impressions_buffer_rows: int = Field(100_000, ge=1)
    # Exploration: this share of answers (not explain=true, not rules=false: those ask for the
    # models' own order) shows k items drawn at random from the ranked list's first
    # `explore_top` (None: its first k), in a random order, flagged `explored` in the log.
    # Their clicks owe nothing to the serving model's order, so a retraining can judge
    # candidate and production on them alike (data.explored_only).
    explore_share: float = Field(0.0, ge=0.0, le=1.0)
    explore_top: int | None = Field(None, ge=1, le=1000)

    @model_validator(mode="after")
    def _buffer_holds_a_flush(self) -> AppArgs:
        if self.impressions_flush_rows > self.impressions_buffer_rows:
            raise ValueError(
                f"impressions_flush_rows={self.impressions_flush_rows} is over "
                f"impressions_buffer_rows={self.impressions_buffer_rows}: the buffer would drop "
                "rows before it is ever written; lower the first or raise the second"
            )
        if self.explore_share and not self.impressions_dir:
            raise ValueError(
                f"explore_share={self.explore_share} needs impressions_dir: exploration is for "
                "the log that retraining is judged on; set impressions_dir or explore_share: 0"
            )
        return self
