"""The one inference class per model kind, the one context renderer, the one export schema:
the text path (serving) and the token path (training validation, Ray Data evaluation) agree."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_export
from shoprank.config import Config, DataConfig, ModelConfig
from shoprank.data.examples import ExampleBuilder
from shoprank.data.text import history_texts, render_context
from shoprank.data.tokenize import PairTokenizer, TowerTokenizer
from shoprank.models.export_meta import METADATA, ExportError, read_export
from shoprank.models.ranker import Ranker
from shoprank.models.retriever import EncoderSpec

TEXTS = {"a": "red mug", "b": "blue kettle with a long description of its spout", "c": "tea"}


def test_render_context_drops_unknown_items_before_taking_the_newest():
    data = DataConfig(history_len=2, history_separator=" | ")
    # "x" is not in the catalog: the context reads as if the history were [a, b, c].
    assert render_context(["x", "a", "b", "c"], TEXTS, data) == "red mug | " + TEXTS["b"]
    assert render_context(["a"], TEXTS, data, extra="mobile") == "red mug | mobile"
    assert render_context([], TEXTS, data) == ""
    # A purchase and a cart after a click (newest first: a, a, c, a): a is read once, where it
    # first came, as training examples hold it; repeat_positives="all" reads every repeat.
    assert render_context(["a", "a", "c", "a"], TEXTS, data) == "tea | red mug"
    every = DataConfig(history_len=2, repeat_positives="all")
    assert render_context(["a", "a", "c", "a"], TEXTS, every) == "red mug | red mug"


def test_history_template_shortens_contexts_not_candidates():
    """`data.history_template` renders the items of a context (training examples, evaluation and
    serving all take `history_texts`); the candidates keep `item_template`."""
    import pyarrow as pa

    catalog = pa.table(
        {
            "item_id": ["a", "b", "c"],
            "title": ["Red Mug", "Tea Tin", "Kettle"],
            "category": ["Kitchen > Mugs", "Food > Tea", "Kitchen > Kettles"],
            "brand": ["Acme", None, "Boil"],
        }
    )
    data = DataConfig(history_template="{title}. {brand}.", history_len=5)
    assert (
        render_context(["b", "a"], history_texts(catalog, data), data)
        == "Tea Tin. | Red Mug. Acme."
    )
    plain = DataConfig()
    assert history_texts(catalog, plain)["a"] == "Red Mug. Kitchen > Mugs. Acme."
    events = pa.table(
        {
            "user_id": ["u"] * 3,
            "item_id": ["a", "b", "c"],
            "event": ["click"] * 3,
            "ts": pa.array([1, 2, 3], pa.int64()),
        }
    )
    last = ExampleBuilder(
        catalog, data.model_copy(update={"negatives": 0, "eval_candidates": 1}), seed=0
    )(events)
    group = last.to_pylist()[-1]  # predicting c from [b, a]
    assert group["context"] == "Tea Tin. | Red Mug. Acme."
    assert group["item_texts"][0] == "Kettle. Kitchen > Kettles. Boil."
    with pytest.raises(ValueError, match="data.history_template=.*colour"):
        history_texts(catalog, DataConfig(history_template="{colour}"))


def test_price_band_reads_price_against_the_items_category():
    """`{price_band}`: fifths of the price within each category, in words; ties share a band,
    no price renders nothing, and a subset would band differently (so callers render all)."""
    import pyarrow as pa

    from shoprank.data.text import render_items

    catalog = pa.table(
        {
            "item_id": [f"i{k}" for k in range(9)],
            "title": ["Pencil"] * 5 + ["Microscope"] * 3 + ["Loupe"],
            "category": ["Office"] * 5 + ["Lab"] * 3 + [None],
            "price": [1.0, 2.0, 3.0, 4.0, 12.0, 12.0, 300.0, None, 5.0],
        }
    )
    texts = render_items(catalog, "{title}. {price_band}.")
    assert texts[:5] == [
        "Pencil. bargain.",
        "Pencil. budget.",
        "Pencil. mid-range.",
        "Pencil. upscale.",
        "Pencil. luxury.",  # $12 is dear for a pencil...
    ]
    assert texts[5:] == [
        "Microscope. budget.",
        "Microscope. upscale.",
        "Microscope.",
        "Loupe. mid-range.",
    ]
    assert render_items(catalog.slice(0, 2), "{price_band}") == ["budget", "upscale"]
    with pytest.raises(ValueError, match="price_band.*computed from"):
        render_items(catalog.drop_columns(["price"]), "{title}. {price_band}.")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_model_dir, tiny_shop):
    from conftest import shop_overrides
    from shoprank.config import load_config

    cfg = load_config(None, shop_overrides(tiny_shop))
    tmp = tmp_path_factory.mktemp("exports")
    return {
        kind: str(make_export(tmp / kind, kind, tiny_model_dir, cfg, seed=3))
        for kind in ("ranker", "retriever")
    }


def test_ranker_scores_texts_as_it_scores_tokens(exports):
    """Serving scores text pairs in length-sorted batches; evaluation scores token groups
    padded to max_length. Same logits, in the caller's order."""
    ranker = Ranker.from_export(exports["ranker"], "fp32", batch_size=2)
    with torch.no_grad():  # a random head scores everything alike: spread its logits apart
        ranker.model.classifier.weight.mul_(1000.0)
    contexts = ["red mug | tea", "tea", "blue kettle with a long description", "red mug"]
    items = ["tea", "red mug", "tea", TEXTS["b"]]
    served = ranker.score(contexts, items)
    tokens = PairTokenizer(exports["ranker"], ranker.max_length)(
        {
            "context": np.array(contexts, dtype=object),
            "item_texts": [[i] for i in items],
            "labels": [[0.0]] * len(items),
        }
    )
    with torch.inference_mode():
        tensors = {k: torch.from_numpy(v) for k, v in tokens.items() if v.dtype == np.int32}
        offline = ranker.score_tokens(tensors).numpy().ravel()
    np.testing.assert_allclose(served, offline, rtol=1e-5, atol=1e-4)
    assert np.ptp(served) > 1e-3  # scores apart: the check above means something
    # One group of 4 candidates in passes of 3 pairs: a pass boundary inside the group.
    ranker.batch_size = 3
    with torch.inference_mode():
        grouped = ranker.score_tokens({k: v.reshape(1, 4, -1) for k, v in tensors.items()})
    np.testing.assert_allclose(grouped.numpy().ravel(), offline, rtol=1e-5, atol=1e-4)


def test_ranker_cut_shorter_scores_the_pairs_cut_at_that_length(exports):
    """ranker_max_length (serving) / eval.ranker_max_length: the pairs are cut as a ranker
    trained at that length would read them; pairs already that short score the same."""
    full = Ranker.from_export(exports["ranker"], "fp32")
    short = Ranker.from_export(exports["ranker"], "fp32", max_length=8)
    assert (full.max_length, short.max_length) == (read_export(exports["ranker"]).max_length, 8)
    with torch.no_grad():
        for r in (full, short):
            r.model.classifier.weight.mul_(1000.0)
    long_pair = (["red mug | blue kettle with a long description of its spout"], [TEXTS["b"]])
    assert abs(full.score(*long_pair)[0] - short.score(*long_pair)[0]) > 1e-3
    np.testing.assert_allclose(
        short.score(["tea"], ["mug"]), full.score(["tea"], ["mug"]), atol=1e-4
    )


def test_encoder_embeds_texts_as_it_embeds_tokens(exports):
    encoder = EncoderSpec.from_export(exports["retriever"]).load()
    texts = ["tea", TEXTS["b"], "red mug"]
    served = encoder.embed(texts, "context")
    meta = read_export(exports["retriever"])
    tok = TowerTokenizer(exports["retriever"], meta.context_max_length, 8, ["a"])(
        {
            "context": np.array(texts, dtype=object),
            "item_texts": [["red mug"]] * 3,
            "item_ids": [["a"]] * 3,
            "labels": [[1.0]] * 3,
        }
    )
    with torch.inference_mode():
        ids, mask = (torch.from_numpy(tok[f"ctx_{k}"]) for k in ("input_ids", "attention_mask"))
        offline = encoder.embed_tokens(ids, mask).numpy()
    np.testing.assert_allclose(served, offline, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)


def test_a_context_embeds_to_the_same_bits_alone_or_in_a_batch(exports):
    """Served = evaluated on any CPU: a context's vector does not depend on the texts embedded
    with it (each is a pass of its own), nor do the stage-one products on the users beside it."""
    from shoprank.retrieval.blend import inner_products, standardize

    encoder = EncoderSpec.from_export(exports["retriever"]).load()
    words = [
        "red",
        "blue",
        "tea",
        "mug",
        "kettle",
        "drill",
        "saw",
        "hammer",
        "nail",
        "glue",
        "wood",
        "pipe",
        "lamp",
    ]
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, int(rng.integers(1, 40)))) for _ in range(24)]
    batch = encoder.embed(texts, "context")
    alone = np.concatenate([encoder.embed([t], "context") for t in texts])
    assert np.array_equal(batch, alone)
    items = rng.standard_normal((300, batch.shape[1])).astype(np.float32)
    together = standardize(inner_products(batch, items))
    one_by_one = np.concatenate([standardize(inner_products(r[None], items)) for r in batch])
    assert np.array_equal(together, one_by_one)
    assert np.abs(inner_products(batch, items) - batch @ items.T).max() < 1e-5


def test_read_export_names_what_is_wrong(tmp_path, exports):
    with pytest.raises(ExportError, match="not a shoprank export"):
        read_export(tmp_path)
    with pytest.raises(ExportError, match="holds a ranker export; a retriever is needed"):
        read_export(exports["ranker"], kind="retriever")
    meta = {
        "kind": "retriever",
        "base_model": "m",
        "max_length": 8,
        "config": Config().model_dump(),
    }
    (tmp_path / METADATA).write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="needs \\['pooling', 'context_max_length'"):
        read_export(tmp_path)
    typed = read_export(exports["retriever"], kind="retriever")
    assert typed.data.item_template == Config().data.item_template
    assert isinstance(typed.config.model, ModelConfig) and typed.pooling == "mean"


def test_stage_one_from_an_export_scores_as_the_run_that_chose_its_weights(
    tmp_path, exports, tiny_shop
):
    """Evaluation blends the run's fitted baselines; serving loads the export's saved signals.
    Both must give the same [users, catalog] scores."""
    import shutil

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from shoprank.config import load_config
    from shoprank.data.validate import check_catalog, split_quarantine
    from shoprank.evaluation.baselines import fit_baselines
    from shoprank.retrieval import blend
    from shoprank.retrieval.blend import save_signals
    from shoprank.retrieval.index import INDEX_DIR, ItemIndex
    from shoprank.retrieval.stage_one import StageOne, StageOneError

    catalog, _ = split_quarantine(check_catalog(pq.read_table(tiny_shop / "catalog.parquet")))
    ids = catalog["item_id"].to_pylist()
    export = tmp_path / "retriever"
    shutil.copytree(exports["retriever"], export)
    encoder = EncoderSpec.from_export(str(export)).load()
    cfg = load_config(None, [])
    items = encoder.embed(pc.cast(catalog["title"], "string").to_pylist(), "item")
    ItemIndex.build(ids, items, {"kind": "flat"}, {}).save(export / INDEX_DIR)

    rng = np.random.default_rng(0)
    histories = [list(rng.choice(ids, size=rng.integers(1, 6), replace=False)) for _ in range(80)]
    positives = list(rng.choice(ids, size=80))
    baselines = fit_baselines(cfg, catalog, positives, histories)
    weights = {"retriever": 1.0, "history": 0.5, "covisit": 0.7, "tfidf": 0.2, "popularity": 0.3}
    blend.save(export, weights, {})
    with pytest.raises(StageOneError, match="no signals/"):
        StageOne.from_export(export, catalog)
    save_signals(export, baselines, cfg.eval.history_decay, "test")

    served = StageOne.from_export(export, catalog)
    contexts = encoder.embed(["red mug", "tea kettle"], "context")
    users = [histories[0], [*histories[1], "not-in-the-catalog"]]
    offline = blend.blend(
        blend.signals(contexts, users[:1] + [histories[1]], items, ids, baselines, 0.5), weights
    )
    np.testing.assert_allclose(served.scores(contexts, users), offline, rtol=1e-5, atol=1e-5)
    # Another catalog than the index covers is refused, naming the fix.
    with pytest.raises(StageOneError, match="lacks .*jobs/embed.py"):
        StageOne.from_export(export, catalog.slice(1))
