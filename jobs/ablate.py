"""What fine-tuning and each stage-one signal buy: an ablation, chosen on valid, reported on test.

    python jobs/ablate.py --config configs/amazon-retriever.yaml --retriever DIR [--ranker DIR]
        [data.val_users=null data.test_users=null] [eval.blend_trials=30]

For the fine-tuned retriever and for the zero-shot encoder, the procedure jobs/blend.py runs
(blend weights searched on the valid users, the fusion model fitted on them) scored on the test
users, with every signal and without each in turn, and the set with the best valid figure marked
(eval.signal_selection: what jobs/blend.py ships); for the fine-tuned retriever also a fusion
without its candidate-to-history features (eval.fusion_pairs); with --ranker, the shipped fine-tuned
system's top eval.rerank_top reranked by the cross-encoder at the eval.rerank_mix chosen on
valid, and by a LambdaMART model over both scores fitted on valid (rounds cross-fitted).
Writes <run>/ablation/ablation.md with a plot, and ablation.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from shoprank import run as runs
from shoprank.console import log
from shoprank.evaluation import ablation, metrics, report
from shoprank.evaluation.full_catalog import mixed_ranks, ranker_block
from shoprank.models.retriever import EncoderSpec
from shoprank.retrieval.embed import embed_catalog, embed_contexts, ensure_index
from shoprank.retrieval.index import INDEX_DIR, read_embeddings


def main() -> None:
    parser = runs.parser(__doc__)
    parser.add_argument("--retriever", required=True, help="exported (fine-tuned) retriever")
    parser.add_argument("--ranker", help="exported ranker for stage two")
    args = parser.parse_intermixed_args()

    # 1. Config, data and both encoders' catalog vectors.
    run = runs.start(args, with_ray=False)
    runs.init_ray()
    cfg, catalog, baselines = run.cfg, run.data.catalog, run.baselines
    ids = catalog["item_id"].to_pylist()
    ensure_index(args.retriever, catalog, cfg)
    encoders = {
        "fine-tuned": (
            EncoderSpec.from_export(args.retriever),
            read_embeddings(Path(args.retriever) / INDEX_DIR)[1],
        ),
        "zero-shot": (EncoderSpec.zero_shot(cfg), None),
    }

    # 2. Each system fitted on valid, scored on test.
    systems: dict[str, ablation.System] = {}
    fine: dict[str, ablation.Signals] = {}
    shipped = {name: f"{name} encoder" for name in encoders}
    for name, (spec, items) in encoders.items():
        if items is None:
            items, _ = embed_catalog(catalog, spec, cfg)
        splits = {}
        for split in ("valid", "test"):
            contexts = embed_contexts(run.examples[split], spec, cfg, ids)
            splits[split] = ablation.split_signals(
                contexts, items, ids, baselines, cfg.eval.history_decay
            )
        signals = list(splits["valid"].signals)
        selecting = cfg.eval.signal_selection and len(signals) > 2
        variants = [None, *signals] if name == "fine-tuned" or selecting else [None]
        for dropped in variants:
            label = f"{name} encoder" + (f", without {dropped}" if dropped else "")
            keep = [s for s in signals if s != dropped]
            systems[label] = ablation.fit_system(cfg, splits["valid"], splits["test"], keep)
            log(f"{label}: test {systems[label].test}")
        if selecting:  # what jobs/blend.py ships: the signal set with the best valid figure
            tried = [f"{name} encoder" + (f", without {d}" if d else "") for d in variants]
            best = max(tried, key=lambda label: ablation.valid_value(systems[label], cfg))
            shipped[name] = best
            log(f"{name} encoder: {best!r} chosen on valid")
        if name == "fine-tuned" and cfg.eval.fusion_top and cfg.eval.fusion_pairs:
            label = f"{name} encoder, fusion without candidate-to-history features"
            weights = systems[f"{name} encoder"].weights  # same signals: same search
            systems[label] = ablation.fit_system(
                cfg, splits["valid"], splits["test"], signals, weights, pairs=False
            )
            log(f"{label}: test {systems[label].test}")
        if name == "fine-tuned":
            fine = splits

    # 3. The ranker on the fine-tuned system: mix chosen on valid, applied to test.
    rows = {f"{label}: {stage}": m for label, s in systems.items() for stage, m in s.test.items()}
    for name, label in shipped.items():
        stage = "fused" if "fused" in systems[label].test else "blend"
        rows[f"{name} encoder, signals chosen on valid ({label}): {stage}"] = systems[label].test[
            stage
        ]
    chosen = stage_two = None
    ranker_valid: dict[str, dict[str, float]] = {}
    if args.ranker:
        full = systems[shipped["fine-tuned"]]
        blocks, stage_one = {}, {}
        for split, data in fine.items():
            # On valid, each user's stage one from the fusion that did not see them: the mix
            # and stage two are chosen on stage-one scores as unseen users will get them.
            if split == "valid":
                scores = ablation.cross_fitted_scores(cfg, full, data)
            else:
                scores = ablation.final_scores(full, data)
            candidates = metrics.top_n(scores, cfg.eval.retrieve_top)
            stage_one[split] = metrics.target_ranks(scores, data.contexts.target)
            blocks[split] = ranker_block(
                cfg,
                args.ranker,
                data.contexts,
                candidates,
                np.take_along_axis(scores, candidates, axis=1),
                stage_one[split],
                catalog,
            )

        mixed = {split: mixed_ranks(cfg, blocks[split], stage_one[split]) for split in blocks}
        on_valid = {
            mix: metrics.ranking_metrics(ranks, cfg.eval.ks)[cfg.train.metric]
            for mix, ranks in mixed["valid"].items()
        }
        log(f"ranker mixes on valid ({cfg.train.metric}): {on_valid}")
        chosen = max(on_valid, key=lambda w: (on_valid[w], -w))
        rows[f"fine-tuned encoder: fused + ranker (mix {chosen:g})"] = metrics.ranking_metrics(
            mixed["test"][chosen], cfg.eval.ks
        )
        ranker_valid[f"fine-tuned encoder: fused + ranker (mix {chosen:g})"] = (
            metrics.ranking_metrics(mixed["valid"][chosen], cfg.eval.ks)
        )
        # Stage two as a LambdaMART model over both scores, fitted on valid.
        if len(blocks["valid"].users) < 2 * cfg.eval.fusion_folds:
            log(f"too few valid users with their item in the top {cfg.eval.rerank_top} to fit")
        else:
            valid_ranks, test_ranks, stage_two = ablation.fit_rerank_fusion(
                cfg, blocks["valid"], stage_one["valid"], blocks["test"], stage_one["test"]
            )
            label = f"fine-tuned encoder: fused + ranker, LambdaMART ({stage_two} rounds)"
            rows[label] = metrics.ranking_metrics(test_ranks, cfg.eval.ks)
            ranker_valid[label] = metrics.ranking_metrics(valid_ranks, cfg.eval.ks)

    # 4. Report.
    folder = run.out / "ablation"
    folder.mkdir(parents=True, exist_ok=True)
    columns = [f"{m}@{k}" for k in cfg.eval.ks for m in ("recall", "ndcg")]
    valid_rows = {f"{lb}: {st}": m for lb, s in systems.items() for st, m in s.valid.items()}
    valid_rows |= ranker_valid
    record = {
        "test": rows,
        "valid": valid_rows,
        "weights": {label: s.weights for label, s in systems.items()},
        "fusion": {label: s.notes for label, s in systems.items()},
        "ranker_mix": chosen,
        "stage_two_rounds": stage_two,
        "users": {s: len(d.contexts.target) for s, d in fine.items()},
    }
    (folder / "ablation.json").write_text(json.dumps(record, indent=2))
    users = record["users"]
    protocol = (
        f"Every choice (blend weights: {cfg.eval.blend_trials} Optuna trials; fusion rounds: "
        f"{cfg.eval.fusion_folds}-fold cross-fitting) made on {users['valid']} valid users; "
        f"figures on {users['test']} test users, each held-out item ranked among all "
        f"{catalog.num_rows} items (history not removed, ties against the model). Valid "
        "figures: the blend on the users its weights were chosen on, the fusion cross-fitted."
    )
    path = report.write_report(
        folder,
        f"shoprank ablation: {cfg.run.name}",
        [
            ("Test", report.metrics_table(rows, columns)),
            ("Valid", report.metrics_table(valid_rows, columns)),
            ("Protocol", protocol),
            ("Blend weights", "\n".join(f"- {k}: {s.weights}" for k, s in systems.items())),
        ],
        {"Test, by system": report.bar_chart(rows, columns[:2], folder / "ablation.png")},
    )
    report.print_table(rows, columns)
    log(f"report: {path}")


if __name__ == "__main__":
    main()
