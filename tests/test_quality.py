"""Quality: the bundled MiniLM, briefly fine-tuned on the synthetic shop, orders its held-out
test pairs better than zero-shot (AUC). The tiny shop is too small for an NDCG@10 lead: that is
measured on the built-in default run (RESULTS.md), not here."""

from __future__ import annotations

import pytest

from conftest import shop_overrides
from shoprank.config import load_config
from shoprank.data.text import render_items
from shoprank.data.tokenize import tokenize
from shoprank.evaluation.sampled import group_metrics
from shoprank.evaluation.scorers import (
    CrossEncoderScorer,
    ZeroShotScorer,
    collect_scores,
    ranker_precision,
)
from shoprank.run import Run, output_dir
from shoprank.train.export import export_model
from shoprank.train.loop import best_checkpoint, fit

pytestmark = pytest.mark.slow


def test_minilm_fine_tuned_beats_zero_shot(ray_local, tmp_path, tiny_shop):
    cfg = load_config(
        "configs/synthetic.yaml",
        [
            *shop_overrides(tiny_shop),
            f"run.storage={tmp_path / 'runs'}",
            "run.name=quality",
            "model.max_length=64",
            # Full fine-tuning: on this shop a wider margin over zero-shot than LoRA's.
            "lora.enabled=false",
            "train.lr=1e-4",
            # The settings this test was sized with (the defaults before 2026-12-03): on the
            # tiny shop, shown negatives and first engagements only left too few positives for
            # full fine-tuning to beat zero-shot (0.55 vs 0.64 NDCG@10 with BCE).
            "train.loss=bce",
            "train.epochs=3",
            "data.shown_negatives=false",
            "data.repeat_positives=all",
            "data.history_len=10",
            "train.early_stopping_patience=null",
            "data.val_users=60",
            "data.test_users=null",
            "train.metric=auc",
            "data.eval_candidates=20",
            "data.max_train_positives=null",
        ],
    )
    run = Run(cfg, output_dir(cfg))
    data, examples = run.data, run.examples
    train = tokenize(examples["train"], cfg.model.name, cfg.model.max_length).materialize()
    valid = tokenize(examples["valid"], cfg.model.name, cfg.model.max_length).materialize()
    # Judged on test: the checkpoint is chosen on valid.
    test = tokenize(examples["test"], cfg.model.name, cfg.model.max_length, keep_text=True)
    test = test.materialize()
    datasets = {"train": train, "valid": valid}
    result = fit(cfg, "ranker", datasets, train.count())
    checkpoint, _ = best_checkpoint(result, cfg)
    with checkpoint.as_directory() as d:
        export = export_model(d, cfg, str(tmp_path / "export"), {})

    tuned = group_metrics(
        *collect_scores(
            test,
            CrossEncoderScorer,
            {"model_dir": export, "precision": ranker_precision(cfg)},
            in_process_below=cfg.eval.score_in_process_below,
        )[:2],
        probabilistic=True,
    )
    zero_shot = group_metrics(
        *collect_scores(
            test,
            ZeroShotScorer,
            {
                "model": cfg.model,
                "item_ids": data.catalog["item_id"].to_pylist(),
                "item_texts": render_items(data.catalog, cfg.data.item_template),
                "bf16": cfg.train.bf16,
            },
            in_process_below=cfg.eval.score_in_process_below,
        )[:2],
        probabilistic=False,
    )
    print(f"zero-shot {zero_shot}\nfine-tuned {tuned}")
    # Measured (2026-12-03, 106 test users; training repeats to the last digit): AUC 0.889
    # fine-tuned (the epoch chosen on valid AUC) against 0.880 zero-shot; NDCG@10 0.780 against
    # 0.793 (0.894 and 0.774 before each worker read its batches in a fixed order). Judged on
    # valid, where the checkpoint was chosen, it had looked ahead on NDCG@10 too (0.791 against
    # 0.769): that was the choice, not the model.
    assert tuned["auc"] > zero_shot["auc"] + 0.005
    assert tuned["ndcg@10"] > zero_shot["ndcg@10"] - 0.05
