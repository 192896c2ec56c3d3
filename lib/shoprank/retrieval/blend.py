"""Stage one as a blend: the fine-tuned retriever plus what it cannot know from text alone.

The retriever knows what items ARE; co-visitation knows what people buy TOGETHER; the decayed
sum of the history's item embeddings weighs the newest items the way a single context vector
cannot; popularity breaks ties among the rest. Each signal is standardised per user over the
whole catalog (a z-score) so that one weight means the same for every user. The weights are
hyper-parameters: searched on valid with Optuna (TPE), stored beside the retriever export in
blend.json and applied unchanged to test.

Scores are exact [users, items] blocks: right for catalogs up to ~1e5 items; a larger shop would
blend the union of each signal's top N instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import optuna
import pyarrow as pa
import scipy.sparse as sp

from shoprank.console import log
from shoprank.data.text import render_items
from shoprank.evaluation import metrics
from shoprank.evaluation.baselines import CoVisitation, Popularity, TfidfHistory, history_weights
from shoprank.retrieval.fusion import Fusion, Pairs
from shoprank.retrieval.fusion import fit_for as fusion_fit

SIGNALS = ("retriever", "history", "covisit", "tfidf", "popularity")
SIGNALS_DIR = "signals"  # beside a retriever export: the collaborative signals' statistics
_USERS_PER_PRODUCT = 512  # float64 [users, items] blocks of inner_products
FILE = "blend.json"


class SignalsError(ValueError):
    pass


def catalog_digest(item_ids: Sequence[str]) -> str:
    """Which catalog, in which order: saved signals and index rows must line up with it."""
    return hashlib.sha256("\n".join(item_ids).encode()).hexdigest()[:16]


def save_signals(export_dir: str | Path, baselines: dict, decay: float, fitted_on: str) -> Path:
    """Popularity counts and the co-visitation matrix beside a retriever export."""
    out = Path(export_dir) / SIGNALS_DIR
    out.mkdir(parents=True, exist_ok=True)
    info: dict = {"decay": decay, "fitted_on": fitted_on}
    for fitted in baselines.values():
        if isinstance(fitted, Popularity):
            np.save(out / "popularity.npy", fitted.counts)
            info["item_ids_sha256"] = catalog_digest(list(fitted.item_ids))
        elif isinstance(fitted, CoVisitation):
            sp.save_npz(out / "covisit.npz", fitted.counts())
            info["covisit_window"] = fitted.window
            info["item_ids_sha256"] = catalog_digest(fitted.item_ids)
    (out / "signals.json").write_text(json.dumps(info, indent=2))
    return out


def load_signals(
    export_dir: str | Path,
    ids: list[str],
    weights: dict[str, float],
    catalog: pa.Table,
    item_template: str,
) -> tuple[dict, float]:
    """(baselines, decay) of the signals `weights` name, for the index's items `ids`: the
    saved statistics beside the export, TF-IDF refitted on the catalog's texts. Only these are
    computed, at start-up and per request."""
    folder = Path(export_dir) / SIGNALS_DIR
    if not (folder / "signals.json").exists():
        raise SignalsError(
            f"{export_dir} has blend weights but no {SIGNALS_DIR}/: choose them again with "
            f"jobs/blend.py --retriever {export_dir}, which saves the signals too"
        )
    info = json.loads((folder / "signals.json").read_text())
    if info.get("item_ids_sha256", catalog_digest(ids)) != catalog_digest(ids):
        raise SignalsError(f"{folder} was fitted on another catalog than the export's index")
    decay = info["decay"]
    baselines: dict = {}
    if "tfidf" in weights:
        served = {item: r for r, item in enumerate(catalog["item_id"].to_pylist())}
        every = render_items(catalog, item_template)  # (derived fields: all rows)
        baselines["tfidf"] = TfidfHistory(decay).fit(ids, [every[served[i]] for i in ids])
    if "popularity" in weights and (folder / "popularity.npy").exists():
        baselines["popularity"] = Popularity.from_counts(ids, np.load(folder / "popularity.npy"))
    if "covisit" in weights and (folder / "covisit.npz").exists():
        baselines["co-visitation"] = CoVisitation.from_counts(
            ids, sp.load_npz(folder / "covisit.npz"), info["covisit_window"], decay
        )
    return baselines, decay


def standardize(scores: np.ndarray) -> np.ndarray:
    """Per-row z-score (float32); a constant row becomes zeros. Moments in float64, so that a
    row's z-scores are the same bits whichever rows share the call (see `inner_products`)."""
    scores = np.asarray(scores, dtype=np.float32)
    mean = scores.mean(axis=1, keepdims=True, dtype=np.float64)
    std = scores.std(axis=1, keepdims=True, dtype=np.float64)
    return ((scores - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)


def history_vectors(
    histories: Sequence[Sequence[str]], items: np.ndarray, item_ids: list[str], decay: float
) -> np.ndarray:
    """Unit-length ``sum_i decay**i * item_embedding(history[i])``, history newest first."""
    index = {item: j for j, item in enumerate(item_ids)}
    weights = history_weights(histories, index, decay)
    out = np.asarray(weights @ items, dtype=np.float64)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def inner_products(vectors: np.ndarray, items: np.ndarray) -> np.ndarray:
    """[users, items] float32 inner products that do not depend on which other users share
    the call: BLAS sums a product in an order set by the matrix shapes, so a batch of users
    (evaluation) and one request (serving) differ in the last bits, which the fusion's trees can
    turn into other orders. Summed in float64 and rounded to float32, both sides get the same
    bits (unless a sum lies within ~1e-16 of a float32 rounding boundary)."""
    out = np.empty((len(vectors), len(items)), dtype=np.float32)
    wide = np.asarray(items, dtype=np.float64).T  # (StageOne keeps a float64 copy: no cast)
    for lo in range(0, len(vectors), _USERS_PER_PRODUCT):
        block = vectors[lo : lo + _USERS_PER_PRODUCT].astype(np.float64)
        out[lo : lo + len(block)] = block @ wide
    return out


def signals(
    contexts: np.ndarray,
    histories: Sequence[Sequence[str]],
    items: np.ndarray,
    item_ids: list[str],
    baselines: dict,
    decay: float,
) -> dict[str, np.ndarray]:
    """Standardised [users, items] scores of every signal available.

    ``contexts`` are the retriever's context vectors and ``items`` its catalog embeddings (the
    vectors its index holds), rows in ``item_ids`` order; ``baselines`` as `fit_baselines`.
    """
    out = {
        "retriever": inner_products(contexts, items),
        "history": inner_products(history_vectors(histories, items, item_ids, decay), items),
    }
    for fitted in baselines.values():
        if isinstance(fitted, CoVisitation):
            out["covisit"] = np.concatenate(list(fitted.score_catalog_chunks(histories)))
        elif isinstance(fitted, TfidfHistory):
            out["tfidf"] = np.concatenate(list(fitted.score_catalog_chunks(histories)))
        elif isinstance(fitted, Popularity):
            out["popularity"] = np.log1p(fitted.score_catalog(len(histories)))
    return {name: standardize(s) for name, s in out.items()}


def pairs(items: np.ndarray, baselines: dict) -> Pairs:
    """The fusion's candidate-to-history inputs: these item vectors and the fitted
    co-visitation counts, when the baselines have them."""
    covisit = [b for b in baselines.values() if isinstance(b, CoVisitation)]
    return Pairs(items, covisit[0].counts() if covisit else None)


def blend(signals: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """Weighted sum of the standardised signals."""
    unknown = sorted(set(weights) - set(signals))
    if unknown:
        raise ValueError(
            f"blend weights name {unknown}, but the signals here are {sorted(signals)}; "
            f"use names from {list(SIGNALS)} (baselines come from eval.baselines)"
        )
    used = [(w, signals[name]) for name, w in weights.items() if w]
    if not used:
        raise ValueError(f"blend weights {weights} are all zero")
    out = used[0][0] * used[0][1]
    for w, s in used[1:]:
        out += w * s
    return out


def search_weights(
    signals: dict[str, np.ndarray],
    target: np.ndarray,
    trials: int,
    metric: str = "ndcg@10",
    seed: int = 0,
) -> tuple[dict[str, float], list[dict]]:
    """Weights that maximise `metric` on these users (Optuna TPE, seeded).

    The retriever's weight (the first signal's, without one) is fixed at 1 (only ratios
    matter); the others range over [0, 2]. The first trial is that signal alone, so the search
    never returns less than it.
    """
    present = [name for name in SIGNALS if name in signals]
    anchor = "retriever" if "retriever" in present else present[0]
    free = [name for name in present if name != anchor]
    k = int(metric.split("@")[1])

    def objective(trial: optuna.Trial) -> float:
        weights = {anchor: 1.0} | {n: trial.suggest_float(n, 0.0, 2.0) for n in free}
        ranks = metrics.target_ranks(blend(signals, weights), target)
        values = metrics.ranking_metrics(ranks, [k])
        for name, value in values.items():
            trial.set_user_attr(name, value)
        return values[metric]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.enqueue_trial(dict.fromkeys(free, 0.0))
    study.optimize(objective, n_trials=trials, show_progress_bar=True)
    best = {anchor: 1.0} | {n: round(study.best_params[n], 4) for n in free}
    table = [{"trial": t.number, **t.params, **t.user_attrs} for t in study.trials]
    return best, table


def save(export_dir: str | Path, weights: dict[str, float], details: dict) -> Path:
    path = Path(export_dir) / FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"weights": weights, **details}, indent=2))
    tmp.replace(path)
    return path


def load(export_dir: str | Path) -> dict[str, float] | None:
    """The weights stored beside a retriever export, or None when it has none."""
    path = Path(export_dir) / FILE
    return json.loads(path.read_text())["weights"] if path.exists() else None


def signals_for(
    cfg, catalog, contexts, baselines: dict, retriever_dir: str
) -> dict[str, np.ndarray]:
    """Every blend signal for these users, over the catalog vectors the retriever's index holds."""
    from shoprank.retrieval.index import INDEX_DIR, read_embeddings

    ids, items = read_embeddings(Path(retriever_dir) / INDEX_DIR)
    if ids != catalog["item_id"].to_pylist():
        raise ValueError(f"{retriever_dir}/{INDEX_DIR} does not cover this catalog; re-embed it")
    return signals(
        contexts.embedding, contexts.history_ids, items, ids, baselines, cfg.eval.history_decay
    )


def fit(run, retriever_dir: str) -> dict:
    """Search the blend weights on the valid users (every one unless `data.val_users` caps
    them), fit the fusion on them, and store both beside the retriever; prints the valid
    tables. With `eval.signal_selection` the blend without each signal in turn is tried too,
    and the signal set with the best valid figure (the fusion's cross-fitted one) is kept."""
    from shoprank.evaluation.report import print_table
    from shoprank.models.retriever import EncoderSpec
    from shoprank.retrieval.embed import embed_contexts, ensure_index
    from shoprank.retrieval.index import INDEX_DIR, read_embeddings

    cfg, catalog, valid, baselines = run.cfg, run.data.catalog, run.examples["valid"], run.baselines
    ensure_index(retriever_dir, catalog, cfg)
    ids = catalog["item_id"].to_pylist()
    contexts = embed_contexts(valid, EncoderSpec.from_export(retriever_dir), cfg, ids)
    signals = signals_for(cfg, catalog, contexts, baselines, retriever_dir)
    alone = {
        name: metrics.ranking_metrics(metrics.target_ranks(s, contexts.target), cfg.eval.ks)
        for name, s in signals.items()
    }
    candidate_pairs = pairs(read_embeddings(Path(retriever_dir) / INDEX_DIR)[1], baselines)
    sets = [list(signals)]
    if cfg.eval.signal_selection and len(signals) > 2:
        sets += [[n for n in signals if n != dropped] for dropped in signals]
    tried = [_fit_set(cfg, signals, keep, contexts, ids, candidate_pairs) for keep in sets]
    chosen = max(tried, key=lambda t: t["value"])  # the first (every signal) wins ties
    if len(tried) > 1:
        log(f"signal sets tried on valid ({cfg.train.metric}, fusion cross-fitted):")
        for t in tried:
            mark = "  <- kept" if t is chosen else ""
            log(f"  {', '.join(t['signals'])}: {t['value']:.4f}{mark}")
    weights = chosen["weights"]
    best = metrics.target_ranks(blend({k: signals[k] for k in weights}, weights), contexts.target)
    details = {
        "chosen_on": f"valid, {len(contexts.target)} users, {cfg.eval.blend_trials} Optuna trials",
        "metric": cfg.train.metric,
        "valid": {"blend": metrics.ranking_metrics(best, cfg.eval.ks), **alone},
        "trials": chosen["trials"],
        "signal_sets": [{k: t[k] for k in ("signals", "value")} for t in tried],
    }
    save(retriever_dir, weights, details)
    fitted_on = f"the training groups of {cfg.data.events} (run {cfg.run.name})"
    save_signals(retriever_dir, baselines, cfg.eval.history_decay, fitted_on)
    log(f"blend weights (chosen on {details['chosen_on']}): {weights}")
    print_table(details["valid"], [f"{m}@{k}" for k in cfg.eval.ks for m in ("recall", "ndcg")])
    Fusion.remove(retriever_dir)
    if chosen["fusion"] is not None:
        model, fused = chosen["fusion"]
        model.save(retriever_dir, fused)
        log(f"fusion: {fused['rounds']} rounds, chosen on {fused['chosen_on']}:")
        columns = [f"{m}@{k}" for k in cfg.eval.ks for m in ("recall", "ndcg")]
        print_table(fused["cross_fitted"], columns)
        details["fusion"] = fused
    elif "skipped" in chosen:
        details["fusion"] = {"skipped": chosen["skipped"]}
    return {"weights": weights, **details}


def _fit_set(cfg, signals, keep: list[str], contexts, ids: list[str], candidate_pairs) -> dict:
    """Blend weights and fusion over the signals in `keep`, and their valid figure."""
    sub = {k: signals[k] for k in keep}
    weights, trials = search_weights(
        sub, contexts.target, cfg.eval.blend_trials, cfg.train.metric, cfg.run.seed
    )
    k = int(cfg.train.metric.split("@")[1])
    ranks = metrics.target_ranks(blend(sub, weights), contexts.target)
    out = {
        "signals": keep,
        "weights": weights,
        "trials": trials,
        "fusion": None,
        "value": metrics.ranking_metrics(ranks, [k])[cfg.train.metric],
    }
    if not cfg.eval.fusion_top:
        return out
    model, details = _fusion(cfg, sub, weights, contexts, ids, candidate_pairs)
    if model is None:
        return out | details
    fused = details["cross_fitted"][f"fusion, {details['rounds']} rounds"][cfg.train.metric]
    return out | {"fusion": (model, details), "value": fused}


def _fusion(cfg, signals, weights, contexts, ids, candidate_pairs) -> tuple[Fusion | None, dict]:
    """The fusion model over the blend of `signals`, fitted on these users, and its record."""
    row = {item: j for j, item in enumerate(ids)}
    rows = [[row[i] for i in h if i in row] for h in contexts.history_ids]
    blended = blend(signals, weights)
    retrieved = np.mean(metrics.target_ranks(blended, contexts.target) < cfg.eval.fusion_top)
    if not retrieved:
        log(f"fusion skipped: no valid user's item is in the blend's top {cfg.eval.fusion_top}")
        return None, {"skipped": "no held-out item among the candidates"}
    model, details = fusion_fit(cfg, signals, blended, rows, contexts.target, candidate_pairs)
    details["chosen_on"] = (
        f"valid, {len(contexts.target)} users ({retrieved:.1%} with their item in the blend's "
        f"top {cfg.eval.fusion_top}), {cfg.eval.fusion_folds}-fold cross-fitted"
    )
    return model, details


def fit_fusion(
    cfg,
    signals: dict[str, np.ndarray],
    weights: dict[str, float],
    contexts,
    ids: list[str],
    out,
    candidate_pairs: Pairs | None = None,
) -> dict:
    """Fit the fusion model for these blend weights on these users and store it beside the
    retriever (retrieval/fusion.py); returns its record."""
    model, details = _fusion(cfg, signals, weights, contexts, ids, candidate_pairs)
    if model is not None:
        model.save(out, details)
    return details
