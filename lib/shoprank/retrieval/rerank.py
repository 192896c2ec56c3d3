"""Whether the ranker reranks stage one, and how: decided on valid, recorded with the retriever.

Evaluating two stages on valid (jobs/evaluate.py --ranker ... eval.split=valid) tries every
`eval.rerank_mix` w, the order (1 - w) z(stage one) + w z(ranker) over the top `eval.rerank_top`,
and writes `rerank.json` beside the retriever export: the best w, its metric against stage one
alone, and the digest of the ranker's weights. The Serve app reranks when, and only when, that
record says the ranker improves the metric and the ranker it serves has those weights; otherwise
stage one's order goes straight to the rules (rerank_top 0), and /version says why.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from pydantic import BaseModel

FILE = "rerank.json"


class RerankDecision(BaseModel):
    ranker_weights: str  # sha256 of the ranker export's weights
    rerank_top: int
    mix: float  # w in (1 - w) z(stage one) + w z(ranker)
    metric: str
    stage_one: float  # the metric on valid without the ranker
    two_stage: float  # ... and with it, at `mix`
    chosen_on: str

    @property
    def improves(self) -> bool:
        return self.two_stage > self.stage_one

    def summary(self) -> str:
        change = f"{self.metric} {self.stage_one:.4f} -> {self.two_stage:.4f} on {self.chosen_on}"
        if self.improves:
            return f"rerank the top {self.rerank_top}, mix {self.mix:g}: {change}"
        return f"no rerank: the ranker does not improve stage one ({change})"


def weights_digest(directory: str | Path) -> str:
    """Which weights an export holds, wherever it was copied (e.g. into the registry)."""
    digest = hashlib.sha256()
    for weights in sorted(Path(directory).glob("*.safetensors")):
        with open(weights, "rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def mixed(stage_one: np.ndarray, ranker: np.ndarray, mix: float) -> np.ndarray:
    """The reranked order's scores: both standardised within the block (the last axis)."""
    from shoprank.retrieval.blend import standardize

    s1, s2 = np.atleast_2d(stage_one), np.atleast_2d(ranker)
    out = (1 - mix) * standardize(s1) + mix * standardize(s2)
    return out.reshape(np.shape(stage_one))


def save(retriever_dir: str | Path, decision: RerankDecision) -> Path:
    path = Path(retriever_dir) / FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(decision.model_dump(), indent=2))
    tmp.replace(path)
    return path


def load(retriever_dir: str | Path) -> RerankDecision | None:
    path = Path(retriever_dir) / FILE
    return RerankDecision.model_validate_json(path.read_text()) if path.exists() else None
