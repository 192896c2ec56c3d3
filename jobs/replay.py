"""Replay a split through the live endpoint and put its metrics beside offline evaluation's.

    SHOPRANK_API_KEY=... python jobs/replay.py --config configs/amazon-retriever.yaml \
        --url http://127.0.0.1:8000 --retriever DIR [--ranker DIR] [eval.split=test]
        [--concurrency 8] [data.test_users=null]

Every user of eval.split goes to /recommend with the history offline evaluation uses (every
item before the held-out one), rules off, k = the largest of eval.ks; Recall/NDCG@K come from
the answers. The same export (the one the app serves: its blend, and the ranker with the mix
its rerank.json records) is then evaluated offline on the same users, and both are printed
with their difference and the replay's wall time (also in <run>/replay_<split>.json).
"""

from __future__ import annotations

import json
import os
import time

from shoprank import run as runs
from shoprank.config import with_values
from shoprank.console import log
from shoprank.evaluation import full_catalog, metrics, report
from shoprank.evaluation.protocols import Models, evaluate
from shoprank.evaluation.replay import replay
from shoprank.retrieval import blend, rerank


def served_row(retriever: str, ranker: str | None) -> tuple[str, dict]:
    """The offline row that is what the app serves, and the eval settings that produce it."""
    first = full_catalog.BLEND if blend.load(retriever) else full_catalog.RETRIEVER
    decision = rerank.load(retriever)
    if not ranker or decision is None or not decision.improves:
        return first, {}
    second = full_catalog.BLEND_TWO_STAGE if first == full_catalog.BLEND else full_catalog.TWO_STAGE
    name = second if decision.mix == 1 else f"{second} (mix {decision.mix:g})"
    return name, {"eval.rerank_top": decision.rerank_top, "eval.rerank_mix": [decision.mix]}


def main() -> None:
    parser = runs.parser(__doc__)
    parser.add_argument("--url", required=True, help="the app's base URL")
    parser.add_argument("--retriever", required=True, help="the retriever export it serves")
    parser.add_argument("--ranker", help="the ranker export it serves, if any")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    args = parser.parse_intermixed_args()
    key = os.environ.get("SHOPRANK_API_KEY") or os.environ.get("SHOPRANK_API_KEYS", "")
    if not key:
        raise SystemExit("set SHOPRANK_API_KEY to one of the app's API keys")

    # 1. Config: offline settings that reproduce what the app serves.
    run = runs.start(args)
    row, settings = served_row(args.retriever, args.ranker)
    run = run.with_config(with_values(run.cfg, {**settings, "eval.zero_shot": False}))
    split, ks = run.cfg.eval.split, run.cfg.eval.ks

    # 2. The split's users: history before the held-out item, and the item.
    histories, targets = [], []
    examples = run.examples[split].select_columns(["history_ids", "item_ids"])
    for batch in examples.iter_batches(batch_format="pyarrow"):
        histories.extend(batch["history_ids"].to_pylist())
        targets.extend(ids[0] for ids in batch["item_ids"].to_pylist())
    log(f"replaying {len(targets)} {split} users through {args.url}/recommend")

    # 3. Online: what the endpoint answers.
    started = time.perf_counter()
    key = key.split(",")[0].strip()
    ranks, answered = replay(args.url, key, histories, targets, max(ks), args.concurrency)
    wall = time.perf_counter() - started
    online = metrics.ranking_metrics(ranks, ks)

    # 4. Offline: the same export on the same users.
    table, _ = evaluate(run, Models(retriever=args.retriever, ranker=args.ranker))
    offline = table[row]
    columns = list(online)
    gap = {c: abs(online[c] - offline[c]) for c in columns}
    result = {"online (replay)": online, f"offline: {row}": offline, "|difference|": gap}
    report.print_table(result, columns)
    out = run.out / f"replay_{split}.json"
    out.write_text(
        json.dumps(
            {**result, "users": len(targets), "answered_by": answered, "wall_s": round(wall, 1)},
            indent=2,
        )
    )
    log(f"{len(targets)} users in {wall:.0f} s ({len(targets) / wall:.1f} users/s); {answered}")
    log(f"largest difference {max(gap.values()):.4f}; written to {out}")


if __name__ == "__main__":
    main()
