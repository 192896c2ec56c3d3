"""shoprank.json: what an exported model is, how it reads its inputs, and where it came from.

Every reader (evaluation, batch inference, the registry, the Serve app) goes through
`read_export`, so all of them agree on the settings the model was trained with: its item
template, its history length and separator, its token lengths, its pooling.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from shoprank.config import Config, DataConfig

# Written beside every exported model.
METADATA = "shoprank.json"


class ExportMeta(BaseModel):
    # Provenance beyond these fields (data snapshot, code version, sweep trial, registry
    # bookkeeping) is kept as it is: readers that need it ask for it by name.
    model_config = ConfigDict(extra="allow")

    kind: Literal["ranker", "retriever"]
    base_model: str
    max_length: int  # a ranker's pair length; a retriever's item length
    config: Config  # the resolved training config
    # A retriever's towers.
    pooling: Literal["mean", "cls"] | None = None
    temperature: float | None = None
    context_max_length: int | None = None
    item_max_length: int | None = None
    # The best validation's metrics, every validation report and every logged step.
    metrics: dict[str, float] = {}
    history: list[dict] = []
    steps: list[dict] = []

    @model_validator(mode="after")
    def _retriever_towers(self) -> ExportMeta:
        if self.kind == "retriever":
            missing = [
                k
                for k in ("pooling", "context_max_length", "item_max_length")
                if not getattr(self, k)
            ]
            if missing:
                raise ValueError(f"a retriever export needs {missing}")
        return self

    @property
    def data(self) -> DataConfig:
        """How the model reads items and histories: its template, history length, separator."""
        return self.config.data


class ExportError(ValueError):
    pass


def parse_export(meta: dict, where: str) -> ExportMeta:
    """A shoprank.json already read (e.g. a registry version's metadata)."""
    try:
        return ExportMeta.model_validate(meta)
    except ValidationError as err:
        fields = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()[:5]
        )
        raise ExportError(
            f"{where}: {METADATA} does not describe a shoprank export ({fields}); "
            "export the model again with jobs/train.py"
        ) from None


def read_export(directory: str | Path, kind: str | None = None) -> ExportMeta:
    """The typed shoprank.json of an exported model folder; `kind` checks what it holds."""
    path = Path(directory) / METADATA
    if not path.exists():
        raise ExportError(
            f"{directory} is not a shoprank export (no {METADATA}); run jobs/train.py first"
        )
    meta = parse_export(json.loads(path.read_text()), str(directory))
    if kind is not None and meta.kind != kind:
        raise ExportError(
            f"{directory} holds a {meta.kind} export; a {kind} is needed here "
            f"(jobs/train.py with model.kind={kind})"
        )
    return meta
