"""Shared fixtures: a tiny random BERT, a small synthetic shop, one local Ray for the session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A randomly initialised 2-layer BERT with the bundled MiniLM tokenizer."""
    from transformers import BertConfig, BertModel

    from shoprank.models.encoder import load_tokenizer

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

    from shoprank.runtime import init_ray

    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()


def shop_overrides(shop: Path) -> list[str]:
    return [
        f"data.catalog={shop / 'catalog.parquet'}",
        f"data.events={shop / 'events'}",
        f"data.judgments={shop / 'judgments.parquet'}",
        "data.generate_if_missing=null",
    ]
