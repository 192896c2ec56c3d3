"""Shared fixtures: a tiny random BERT, a small synthetic shop, one local Ray for the session."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s: a run's end, and each checkpoint the loop
# waits to see committed, cost up to one poll. The tiny runs here are seconds long.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# ONNX exports of rankers are cached by their weights (models/ranker.py): one cache per session,
# which every Ray worker and Serve replica of the session inherits, so that nothing exported by
# an earlier run (or another version of the code) answers for this one.
if "SHOPRANK_CACHE" not in os.environ:
    import tempfile

    os.environ["SHOPRANK_CACHE"] = tempfile.mkdtemp(prefix="shoprank-test-cache-")

SHARED = Path(__file__).resolve().parents[2] / "shared"

# Fixtures that start real services: any test using one is an integration test, marked `slow`
# whether or not its module says so, so that `pytest -m "not slow"` stays the fast tier.
INTEGRATION_FIXTURES = {"ray_local"}


def pytest_collection_modifyitems(items):
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A randomly initialised 2-layer BERT with the bundled MiniLM tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    from shoprank.models.encoder import load_tokenizer

    torch.manual_seed(0)  # the same weights in every session, whichever test asks first
    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = load_tokenizer("minilm")
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_shop(tmp_path_factory) -> Path:
    from shoprank.data.synthetic import generate_shop

    out = tmp_path_factory.mktemp("shop")
    generate_shop(out, n_items=300, n_users=150, days=5, seed=1)
    return out


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from shoprank.run import init_ray

    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()


def free_port() -> int:
    """A TCP port nobody listens on, for a Serve app under test."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shop_overrides(shop: Path) -> list[str]:
    return [
        f"data.catalog={shop / 'catalog.parquet'}",
        f"data.events={shop / 'events'}",
        f"data.judgments={shop / 'judgments.parquet'}",
        "data.generate_if_missing=null",
    ]


@dataclass
class ServingSetup:
    """A registry with v1 of a tiny retriever (with its index) and ranker in production, a
    rules file, an API-keys file, and the app args that serve them."""

    tmp: Path
    registry: object
    cfg: object
    catalog: object
    rules: Path
    args: dict


def make_export(folder: Path, kind: str, tiny_model_dir: str, cfg, seed: int) -> Path:
    """A tiny export as jobs/train.py writes one: weights, tokenizer, shoprank.json (+ index)."""
    import json

    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForSequenceClassification, BertModel

    from shoprank.data.text import render_items
    from shoprank.models.encoder import load_tokenizer
    from shoprank.models.export_meta import METADATA
    from shoprank.models.retriever import EncoderSpec
    from shoprank.retrieval.index import INDEX_DIR, ItemIndex

    torch.manual_seed(seed)
    if kind == "ranker":
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    else:
        model = BertModel.from_pretrained(tiny_model_dir)
    model.save_pretrained(folder)
    load_tokenizer(tiny_model_dir).save_pretrained(folder)
    meta = {
        "kind": kind,
        "base_model": tiny_model_dir,
        "max_length": 32,
        "pooling": "mean",
        "context_max_length": 64,
        "item_max_length": 32,
        "config": cfg.model_dump(mode="json"),
        "metrics": {"val_ndcg@10": 0.1 * seed},
    }
    (folder / METADATA).write_text(json.dumps(meta))
    if kind == "retriever":
        from shoprank.data.validate import check_catalog, split_quarantine

        catalog, _ = split_quarantine(check_catalog(pq.read_table(cfg.data.catalog)))
        encoder = EncoderSpec.from_export(str(folder)).load()
        emb = encoder.embed(render_items(catalog, cfg.data.item_template), "item")
        ids = catalog["item_id"].to_pylist()
        ItemIndex.build(ids, emb, {"kind": "flat"}, {}).save(folder / INDEX_DIR)
    return folder


def serving_setup(tmp: Path, shop: Path, tiny_model_dir: str, key: str) -> ServingSetup:
    import pyarrow.parquet as pq

    from shoprank.config import load_config
    from shoprank.registry import Registry

    cfg = load_config(None, shop_overrides(shop))
    registry = Registry(str(tmp / "registry"))
    for kind in ("retriever", "ranker"):
        export = make_export(tmp / f"{kind}-v1", kind, tiny_model_dir, cfg, seed=1)
        registry.register(kind, str(export))
        registry.promote(kind, 1, "val_ndcg@10")
    (tmp / "keys").write_text(f"{key}\n")
    rules = tmp / "rules.yaml"
    rules.write_text("filters: {out_of_stock: true, already_purchased: true}\n")
    args = {
        "registry": str(tmp / "registry"),
        "retriever": "retriever",
        "ranker": "ranker",
        "catalog": str(shop / "catalog.parquet"),
        "events": str(shop / "events"),
        "rules": str(rules),
        "api_keys_file": str(tmp / "keys"),
        "retrieve_top": 50,
        "rerank_top": 10,
    }
    catalog = pq.read_table(shop / "catalog.parquet")
    return ServingSetup(tmp, registry, cfg, catalog, rules, args)
