"""LoRA under bf16 autocast: shoprank turns off peft's cast of each adapter's input to fp32
(`encoder.cast_adapter_inputs`), a copy that autocast undoes; the numbers must not change."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from shoprank.config import LoraConfig, ModelConfig
from shoprank.models.encoder import apply_lora, cast_adapter_inputs, load_sequence_scorer


def _logits_and_grads(model, ids, mask) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def test_adapters_see_autocast_inputs_with_the_same_numbers(tiny_model_dir) -> None:
    torch.manual_seed(0)
    model = load_sequence_scorer(tiny_model_dir, ModelConfig(dropout=0.0))
    model = apply_lora(model, LoraConfig(target_modules=["query", "key", "value", "dense"]))
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert len(layers) >= 12 and not any(m.cast_input_dtype_enabled for m in layers)
    for name, param in model.named_parameters():  # B starts at zero: give the adapters a say
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    ids = torch.randint(1000, 5000, (6, 24))
    mask = torch.ones_like(ids)
    mask[3:, 17:] = 0

    ours, our_grads = _logits_and_grads(model, ids, mask)
    cast_adapter_inputs(model, True)  # peft's own default
    assert all(m.cast_input_dtype_enabled for m in layers)
    theirs, their_grads = _logits_and_grads(model, ids, mask)

    assert torch.equal(ours, theirs)
    assert our_grads.keys() == their_grads.keys() and any("lora_A" in n for n in our_grads)
    for name, grad in our_grads.items():
        assert torch.equal(grad, their_grads[name]), name
