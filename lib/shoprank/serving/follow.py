"""The models behind the endpoints, loaded from the registry and swapped when it changes.

`Following` keeps one loaded model per registry alias (normally `production`). `refresh()` reads
the alias; when it names a new version, the version is loaded (downloaded first from an object
store) while the old one keeps serving, then one assignment swaps them. A request holds on to
the model it started with, so nothing in flight fails during a swap.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

from shoprank.console import log
from shoprank.models.export_meta import read_export
from shoprank.models.retriever import EncoderSpec
from shoprank.registry import Registry, Version
from shoprank.retrieval.index import INDEX_DIR, ItemIndex

T = TypeVar("T")


class Following(Generic[T]):
    """The model a registry alias points at, kept current by `refresh()`."""

    def __init__(
        self,
        root: str,
        name: str,
        loader: Callable[[str, Version], T],
        alias: str = "production",
        cache_dir: str | None = None,
    ):
        self.registry, self.name, self.alias, self.loader = Registry(root), name, alias, loader
        self.cache = Path(cache_dir or tempfile.mkdtemp(prefix="shoprank-models-"))
        self._lock = threading.Lock()
        # (model, version) in one attribute: one assignment swaps both, so a reader can never
        # pair the new model with the old version number.
        self._current: tuple[T, Version] | None = None
        self.loaded_at = 0.0
        self.refresh()
        if self._current is None:
            raise RuntimeError(f"{name}: the registry at {root} has no {alias!r} version")

    def refresh(self) -> bool:
        """Loads the alias's version if it changed; True when a new model was swapped in."""
        with self._lock:  # one load at a time; readers never wait on it
            version = self.registry.get(self.name, self.alias)
            if self._current is not None and version.version == self._current[1].version:
                return False
            folder = version.uri
            if not self.registry.local:
                folder = str(self.cache / f"v{version.version:04d}")
                if not Path(folder).exists():
                    self.registry.download(self.name, version.version, folder)
            self._current = (self.loader(folder, version), version)
            self.loaded_at = time.time()
            return True

    def current(self) -> tuple[T, int]:
        """The model and its version number, read together (a swap cannot split them)."""
        model, version = self._current
        return model, version.version

    def follow(self, every_s: float) -> None:
        """Polls the registry in a background thread (a failed poll keeps the current model)."""

        def loop() -> None:
            while True:
                time.sleep(every_s)
                try:
                    if self.refresh():
                        log(f"{self.name}: now serving v{self.current()[1]}")
                except Exception as err:  # noqa: BLE001 - logged; serving goes on with the old one
                    log(f"{self.name}: refresh failed, keeping the current: {err}")

        threading.Thread(target=loop, daemon=True).start()


class RetrieverModel:
    """An exported retriever: its context tower (the one `Encoder`) and the catalog's ANN index."""

    def __init__(self, directory: str, bf16: bool = True):
        self.meta = read_export(directory, kind="retriever")
        self.encoder = EncoderSpec.from_export(directory).load(bf16)
        self.index = ItemIndex.load(Path(directory) / INDEX_DIR)

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.encoder.embed(texts, "context")

    def search(self, texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [B, k], index rows [B, k]) of the nearest items to each context."""
        return self.index.search(self.embed(texts), k)
