"""LoRA training steps with and without peft's cast of each adapter's input to fp32.

    python bench/bench_lora.py [--rounds 3] [--steps 6] [--threads 1]

shoprank trains under bf16 autocast, which casts every layer's input itself; peft's default
also copies each adapted layer's bf16 input to the adapter's fp32 weights first (and the
gradient back), which `models.encoder.cast_adapter_inputs` turns off. Arms, interleaved in every
round, one process: the ranker of configs/amazon.yaml with LoRA on every Linear and on query
and value, each with peft's cast (`peft-cast`, the plain peer) and without (`shoprank`). A
step is one micro batch of the default layout's worker (8 groups of 4 pairs, 128 tokens,
fixed-shape random tokens, 1 thread as each of the 2 x 1 workers): forward, backward, AdamW.
The loss of the last step must match between the two arms of a target set, to the bit.
Writes runs/bench-lora/bench_lora.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from shoprank.config import load_config
from shoprank.console import log, quiet

TARGETS = {"every Linear": "[query,key,value,dense]", "query, value": "[query,value]"}
PAIRS, LENGTH = 32, 128


def timed_steps(model, cast: bool, steps: int) -> tuple[float, float]:
    """pairs/s over `steps` steps after one warm-up step, and the last step's loss."""
    from shoprank.models.encoder import cast_adapter_inputs
    from shoprank.models.ranker import ranker_loss

    cast_adapter_inputs(model, cast)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (PAIRS, LENGTH), generator=gen)
    labels = (torch.arange(PAIRS) % 4 == 0).float()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    loss = torch.zeros(())
    for step in range(steps + 1):
        if step == 1:
            started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            loss = ranker_loss(logits.float().view(-1, 4), labels.view(-1, 4), "bce")
        loss.backward()
        optimizer.step()  # lr 0: the weights, and so every step's loss, stay as they are
        optimizer.zero_grad()
    return steps * PAIRS / (time.perf_counter() - started), float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/bench-lora")
    args = parser.parse_args()
    quiet()  # before transformers is imported: no load report per model
    from shoprank.models.ranker import build_ranker

    torch.set_num_threads(args.threads)

    models = {}
    for name, targets in TARGETS.items():
        torch.manual_seed(0)
        cfg = load_config("configs/amazon.yaml", [f"lora.target_modules={targets}"])
        models[name] = build_ranker(cfg).train()
    rates: dict[tuple[str, str], list[float]] = {}
    losses: dict[tuple[str, str], float] = {}
    for round_ in range(args.rounds):
        for name, model in models.items():
            for arm, cast in (("peft-cast", True), ("shoprank", False)):
                rate, losses[name, arm] = timed_steps(model, cast, args.steps)
                rates.setdefault((name, arm), []).append(rate)
                log(f"round {round_ + 1}: LoRA on {name}, {arm}: {rate:.1f} pairs/s")
    for name in models:
        if losses[name, "peft-cast"] != losses[name, "shoprank"]:
            raise SystemExit(f"LoRA on {name}: the losses differ: {losses}")

    rows = []
    lines = [
        f"LoRA steps, {args.rounds} rounds x {args.steps} steps of {PAIRS} pairs x {LENGTH} "
        f"tokens, {args.threads} thread(s), bf16 autocast, arms interleaved.",
        "",
        "| LoRA targets | arm | pairs/s (median) | range | vs peft-cast (median) | range |",
        "|---|---|---:|---|---:|---|",
    ]
    for name in models:
        base = rates[name, "peft-cast"]
        for arm in ("peft-cast", "shoprank"):
            ratios = [a / b for a, b in zip(rates[name, arm], base, strict=True)]
            row = {
                "targets": name,
                "arm": arm,
                "pairs_per_s": rates[name, arm],
                "ratio": ratios,
                "loss": losses[name, arm],
            }
            rows.append(row)
            lines.append(
                f"| {name} | {arm} | {statistics.median(row['pairs_per_s']):.1f} | "
                f"{min(row['pairs_per_s']):.1f}-{max(row['pairs_per_s']):.1f} | "
                f"{statistics.median(ratios):.2f}x | {min(ratios):.2f}-{max(ratios):.2f} |"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_lora.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    (out / "bench_lora.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    log(f"wrote {out / 'bench_lora.md'} and bench_lora.json")


if __name__ == "__main__":
    main()
