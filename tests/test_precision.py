"""The ranker's inference precisions and backends: bf16 weights, int8 dynamic quantization and
ONNX Runtime (fp32, int8) stay close to fp32 (the Amazon quality change is measured by
jobs/evaluate.py, see RESULTS.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from shoprank.models.ranker import load_for_inference


@pytest.fixture(scope="module")
def ranker_dir(tmp_path_factory, tiny_model_dir) -> str:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    out = tmp_path_factory.mktemp("ranker")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return str(out)


def test_precisions_agree_with_fp32(ranker_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ranker_dir)
    batch = tok(
        ["cordless drill | safety goggles"] * 4,
        ["drill bits, 10 pieces", "nitrile gloves", "a beaker", "hex keys"],
        padding=True,
        return_tensors="pt",
    )
    logits = {}
    for precision in ("fp32", "bf16", "int8", "onnx", "onnx-int8"):
        model = load_for_inference(ranker_dir, precision)
        with torch.inference_mode():
            logits[precision] = model(**batch).logits.float().squeeze(-1)
    spread = float(logits["fp32"].abs().max())
    assert spread > 0
    assert torch.allclose(logits["bf16"], logits["fp32"], atol=0.05 * spread + 1e-3)
    assert torch.allclose(logits["int8"], logits["fp32"], atol=0.1 * spread + 1e-3)
    # The same network in ONNX Runtime, padded rows included (an export that froze the example's
    # attention-mask shape was off by 0.2 on rows padded differently).
    assert torch.allclose(logits["onnx"], logits["fp32"], atol=1e-4)
    assert torch.allclose(logits["onnx-int8"], logits["fp32"], atol=0.1 * spread + 1e-3)
    int8 = load_for_inference(ranker_dir, "int8")
    assert any("quantized" in type(m).__module__ for m in int8.modules())
    assert next(load_for_inference(ranker_dir, "bf16").parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        load_for_inference(ranker_dir, "fp16")


def test_auto_follows_the_capability_check(monkeypatch):
    """auto = bf16 only where bf16 is native; SHOPRANK_NATIVE_BF16 forces either answer."""
    from shoprank import precision

    monkeypatch.setenv(precision.ENV, "1")
    assert precision.native_bf16() and precision.resolve("auto") == "bf16"
    monkeypatch.setenv(precision.ENV, "0")
    assert not precision.native_bf16() and precision.resolve("auto") == "fp32"
    assert precision.resolve("fp32") == "fp32" and precision.resolve("onnx") == "onnx"
    monkeypatch.setenv(precision.ENV, "maybe")
    with pytest.raises(ValueError, match="SHOPRANK_NATIVE_BF16='maybe'"):
        precision.native_bf16()


def test_explicit_bf16_without_native_support_runs_and_says_so_once(monkeypatch, capsys):
    from shoprank import precision

    monkeypatch.setenv(precision.ENV, "0")
    monkeypatch.setattr(precision, "_warned", set())
    assert precision.resolve("bf16") == "bf16"
    assert precision.resolve("bf16") == "bf16"
    said = capsys.readouterr()
    assert (said.out + said.err).count("emulated") == 1


def test_train_precision_and_the_old_bf16_flag(monkeypatch):
    from shoprank import precision
    from shoprank.config import ConfigError, load_config

    monkeypatch.setenv(precision.ENV, "0")
    cfg = load_config(None, [])
    assert cfg.train.precision == "auto" and not cfg.train.bf16
    monkeypatch.setenv(precision.ENV, "1")
    assert cfg.train.bf16
    assert load_config(None, ["train.bf16=false"]).train.precision == "fp32"
    assert load_config(None, ["train.bf16=true"]).train.precision == "bf16"
    assert "bf16" not in load_config(None, []).model_dump()["train"]
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(None, ["train.precision=fp16"])
    with pytest.raises(ConfigError, match="train.bf16='yes please'"):
        load_config(None, ["train.bf16='yes please'"])


def test_auto_ranker_loads_at_the_resolved_precision(ranker_dir, monkeypatch):
    from shoprank import precision
    from shoprank.models.ranker import OnnxRanker

    monkeypatch.setenv(precision.ENV, "1")
    assert next(load_for_inference(ranker_dir, "auto").parameters()).dtype == torch.bfloat16
    monkeypatch.setenv(precision.ENV, "0")  # a CPU without native bf16: ONNX Runtime fp32
    assert precision.ranker_backend("auto", "cpu") == "onnx"
    assert isinstance(load_for_inference(ranker_dir, "auto"), OnnxRanker)
    assert precision.ranker_backend("fp32") == "fp32"


def test_onnx_exports_are_cached_by_their_weights(ranker_dir, tmp_path, monkeypatch):
    """A second load of the same folder (another scorer actor, a Serve replica) reads the first
    load's export; changed weights get an export of their own; old exports are pruned."""
    from shoprank.models import ranker as module

    monkeypatch.setenv(module.CACHE_ENV, str(tmp_path / "cache"))
    first = module.OnnxRanker.export(ranker_dir)

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    with monkeypatch.context() as m:
        m.setattr(module, "_export_onnx", no_export)
        again = module.OnnxRanker.export(ranker_dir)
    assert again.path == first.path

    changed = tmp_path / "changed"
    shutil.copytree(ranker_dir, changed)
    model = AutoModelForSequenceClassification.from_pretrained(changed)
    with torch.no_grad():
        model.classifier.bias.add_(1.0)
    model.save_pretrained(changed)
    other = module.OnnxRanker.export(str(changed))
    assert other.path != first.path
    tokens = {
        "input_ids": torch.tensor([[101, 2000, 102, 2001, 102]]),
        "token_type_ids": torch.tensor([[0, 0, 0, 1, 1]]),
        "attention_mask": torch.ones(1, 5, dtype=torch.long),
    }
    shift = other(**tokens).logits - first(**tokens).logits
    assert torch.allclose(shift, torch.ones_like(shift), atol=1e-5)  # its own weights
    quantized = module.OnnxRanker.export(ranker_dir, quantize=True)
    assert quantized.path not in (first.path, other.path)

    cache = module.onnx_cache()
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 3
    module._prune(cache, keep=1)
    assert [p.name for p in cache.iterdir()] == [Path(quantized.path).parent.name]
