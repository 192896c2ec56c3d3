#!/usr/bin/env bash
# From the main job to a running endpoint on the built-in defaults (synthetic shop, MiniLM):
#   1. the main job's ranker (jobs/train.py), trained first if runs/ has none;
#   2. the retriever (configs/synthetic-retriever.yaml): trained, its blend chosen on valid;
#   3. two stages evaluated on valid: whether and how the ranker reranks (rerank.json);
#   4. both registered and promoted through the gate; 5. `serve run serve/synthetic.yaml`.
# Prints the API key it sets (SHOPRANK_API_KEYS, unless already set) for the curl examples.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -f runs/synthetic-ranker/export/shoprank.json ] || "$PY" jobs/train.py
"$PY" jobs/train.py --config configs/synthetic-retriever.yaml registry.publish=false
"$PY" jobs/evaluate.py --config configs/synthetic-retriever.yaml \
    --ranker runs/synthetic-ranker/export eval.split=valid eval.zero_shot=false \
    eval.rerank_top=20 "eval.rerank_mix=[0.25,0.5,1.0]"
"$PY" jobs/registry.py register synthetic-retriever runs/synthetic-retriever/export --alias candidate
"$PY" jobs/registry.py promote synthetic-retriever candidate --metric val_ndcg@10 || true
# The main job registers its ranker; an export from before it did is registered here.
"$PY" jobs/registry.py show synthetic-ranker production > /dev/null 2>&1 || {
    "$PY" jobs/registry.py register synthetic-ranker runs/synthetic-ranker/export --alias candidate
    "$PY" jobs/registry.py promote synthetic-ranker candidate --metric val_ndcg@10
}
if [ -z "${SHOPRANK_API_KEYS:-}" ]; then
    SHOPRANK_API_KEYS=$("$PY" -c "import secrets; print(secrets.token_urlsafe(24))")
    export SHOPRANK_API_KEYS
    echo "[shoprank] API key for this app: $SHOPRANK_API_KEYS"
fi
exec .venv/bin/serve run serve/synthetic.yaml
