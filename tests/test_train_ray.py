"""Integration: 2 Ray Train workers, real DeepSpeed ZeRO-3, LoRA, a tiny random BERT."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shop_overrides
from shoprank.config import load_config
from shoprank.data.tokenize import tokenize
from shoprank.evaluation.sampled import group_metrics
from shoprank.evaluation.scorers import CrossEncoderScorer, collect_scores
from shoprank.models.ranker import ranker_logits
from shoprank.run import Run, output_dir
from shoprank.train.export import METADATA, export_model, load_checkpoint_model
from shoprank.train.loop import MODEL_DIR, best_checkpoint, fit, run_history, saved_state

pytestmark = pytest.mark.slow


def _config(tmp_path, shop, model_dir, stage, name, max_steps):
    return load_config(
        None,
        [
            *shop_overrides(shop),
            f"run.storage={tmp_path / 'runs'}",
            f"run.name={name}",
            f"model.name={model_dir}",
            "model.max_length=64",
            "model.attn_implementation=null",
            f"train.zero_stage={stage}",
            "train.bf16=false",
            "train.num_workers=2",
            "train.batch_size=8",
            "train.lr=3e-3",
            "train.loss=bce",  # the loss checks below start from ln 2
            "train.epochs=50",
            f"train.max_steps={max_steps}",
            "train.eval_every_steps=4",
            "train.log_every_steps=2",
            "train.warmup_ratio=0",
            "train.early_stopping_patience=null",
            "train.keep_checkpoints=2",
            "data.val_users=16",
            "data.eval_candidates=20",
            "data.max_train_positives=256",
        ],
    )


def _data(cfg, out):
    """(train tokens, valid tokens, the valid groups' texts: what batch inference scores)."""
    examples = Run(cfg, out).examples
    train = tokenize(examples["train"], cfg.model.name, cfg.model.max_length).materialize()
    valid = tokenize(examples["valid"], cfg.model.name, cfg.model.max_length).materialize()
    return train, valid, examples["valid"].materialize()


# ZeRO-3 only: LoRA under ZeRO-2 with 2 workers is the default config that tests/test_jobs.py
# trains and evaluates, the sweep test runs three times, and tests/test_faults.py resumes after
# each fault.
@pytest.mark.parametrize("stage", [3])
def test_lora_zero_trains_and_checkpoints(ray_local, tmp_path, tiny_shop, tiny_model_dir, stage):
    cfg = _config(tmp_path, tiny_shop, tiny_model_dir, stage, f"zero{stage}", max_steps=8)
    out = output_dir(cfg)
    train, valid, valid_texts = _data(cfg, out)
    result = fit(cfg, "ranker", {"train": train, "valid": valid}, train.count())
    history = run_history(result)
    assert [h["step"] for h in history] == [4, 8]

    # Loss goes down: the last training window's loss is below the first batch's (ln 2 at init).
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # Every logged step is kept (what the report's training curve plots), with its throughput
    # and the share of time spent waiting for data.
    steps = saved_state(result.checkpoint).steps
    assert [s["step"] for s in steps] == [2, 4, 6, 8]
    assert all(s["pairs_per_s"] > 0 and 0 <= s["data_wait"] < 1 for s in steps)

    # The checkpoint holds the LoRA weights (ZeRO-3 gathers them before saving).
    checkpoint, best = best_checkpoint(result, cfg)
    with checkpoint.as_directory() as d:
        adapter = os.path.join(d, MODEL_DIR, "adapter_model.safetensors")
        assert os.path.getsize(adapter) > 10_000
        from safetensors.torch import load_file

        weights = load_file(adapter)
        lora = [k for k in weights if "lora_" in k]
        heads = [k for k in weights if "classifier" in k]
        assert lora and heads
        assert all(weights[k].numel() > 0 for k in lora + heads)
        assert any(weights[k].abs().sum() > 0 for k in lora if "lora_B" in k)

        # Loads back to the same logits: merged (exported) and unmerged agree.
        unmerged = load_checkpoint_model(d, cfg, merge=False)
        export = export_model(d, cfg, str(tmp_path / f"export{stage}"), {"metrics": best})
    batch = next(iter(valid.iter_torch_batches(batch_size=4)))
    with torch.no_grad():
        a = ranker_logits(unmerged, batch)
        from transformers import AutoModelForSequenceClassification

        merged = AutoModelForSequenceClassification.from_pretrained(export).eval()
        b = ranker_logits(merged, batch)
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    meta = json.loads(Path(export, METADATA).read_text())
    assert meta["kind"] == "ranker"

    # The exported model reproduces the validation metric the worker reported. The tiny random
    # model's scores are nearly tied, so float noise between the sharded and the plain forward
    # pass can flip a pair or two (seen: 0.50977 vs 0.50966); the logits above are the strict check.
    scores, labels, _ = collect_scores(
        valid_texts, CrossEncoderScorer, {"model_dir": export, "precision": "fp32"}
    )
    again = group_metrics(scores, labels, probabilistic=True)
    assert again["auc"] == pytest.approx(best["val_auc"], abs=1e-3)
    # Small evaluations are scored in the calling process (eval.score_in_process_below): the
    # same scorer gives the same scores there.
    here, here_labels, _ = collect_scores(
        valid_texts,
        CrossEncoderScorer,
        {"model_dir": export, "precision": "fp32"},
        in_process_below=10**6,
    )
    assert np.allclose(np.sort(here.ravel()), np.sort(scores.ravel()), atol=1e-5)
    assert group_metrics(here, here_labels, probabilistic=True) == pytest.approx(again)


def test_own_batches_repeat_whatever_the_blocks(ray_local):
    """Each rank's micro-batches depend on the rows' order and the seed only: the same rows cut
    into other blocks give the same batches, the ranks' batches are disjoint, and a short last
    batch is dropped on every rank alike."""
    import ray.data

    from shoprank.train.loop import own_batches

    rows = [{"row": i, "labels": [float(i % 3), 0.0]} for i in range(203)]

    def batches(blocks: int, rank: int, seed: int = 7) -> list[list[int]]:
        ds = ray.data.from_items(rows, override_num_blocks=blocks).materialize()
        got = own_batches(ds.iterator(), 4, rank, 2, seed=seed, device="cpu")
        return [b["row"].tolist() for b in got]

    first = batches(1, 0)
    assert batches(7, 0) == first  # other blocks, the same batches
    second = batches(5, 1)
    assert len(first) == len(second) == 203 // 8
    assert all(len(b) == 4 for b in first + second)
    seen = [r for b in first + second for r in b]
    assert len(seen) == len(set(seen))  # no row twice in one epoch, on either rank
    assert batches(1, 0, seed=8) != first  # another epoch's seed, another order


def test_group_by_length_batches_rows_of_like_length(ray_local):
    """`train.group_by_length`: every row still comes once per epoch, on one rank, the same
    batches in every run; a batch's rows (both ranks' slices) now share their length's
    32-token step, so trimming to the longest row pads far less."""
    import ray.data

    from shoprank.train.loop import own_batches

    lengths = np.random.default_rng(0).integers(1, 129, 256)
    rows = [
        {"row": i, "attention_mask": (np.arange(128) < n).astype(np.int64), "labels": [1.0]}
        for i, n in enumerate(lengths)
    ]
    ds = ray.data.from_items(rows, override_num_blocks=3).materialize()

    def epoch(grouped: bool, rank: int) -> list[list[int]]:
        got = own_batches(ds.iterator(), 4, rank, 2, 7, "cpu", group_by_length=grouped)
        return [b["row"].tolist() for b in got]

    def padded(batches: list[list[int]]) -> int:  # tokens computed, trimmed to 32-token steps
        return sum(len(b) * -(-int(lengths[b].max()) // 32) * 32 for b in batches)

    plain = [a + b for a, b in zip(epoch(False, 0), epoch(False, 1), strict=True)]
    grouped = [a + b for a, b in zip(epoch(True, 0), epoch(True, 1), strict=True)]
    assert sorted(r for b in grouped for r in b) == list(range(256))
    assert epoch(True, 0) == [b[:4] for b in grouped]  # repeatable
    assert padded(grouped) < 0.75 * padded(plain)
    one_step = [np.ptp(-(-lengths[b] // 32)) == 0 for b in grouped]
    assert sum(one_step) >= 0.75 * len(grouped)
    firsts = [min(lengths[b]) for b in grouped]
    assert firsts != sorted(firsts)  # the batches' order is shuffled, not by length
