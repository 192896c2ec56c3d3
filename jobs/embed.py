"""Embed the catalog with an exported retriever and build its ANN index (Ray Data + faiss).

    python jobs/embed.py --config configs/amazon-retriever.yaml [--model DIR] [--force]
        [index.kind=hnsw] [index.embed_batch_size=256] [index.embed_actors=2] ...

Writes <model>/index/ (embeddings Parquet, faiss index, index.json with the parameters and
the catalog snapshot it covers). An unchanged catalog and model are not embedded again; new
index parameters alone rebuild the index from the stored embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

from shoprank import run as runs
from shoprank.console import log
from shoprank.data.load import counts_table, load_catalog
from shoprank.retrieval.embed import ensure_index


def main() -> None:
    parser = runs.parser(__doc__)
    parser.add_argument("--model", help="exported retriever folder (default: the run's export)")
    parser.add_argument("--force", action="store_true", help="embed even if nothing changed")
    args = parser.parse_intermixed_args()  # options may come between overrides

    # 1. Config and the model to embed with.
    run = runs.start(args)
    export_dir = Path(args.model or run.out / "export")

    # 2. The validated catalog (bad rows quarantined and counted, never embedded).
    runs.ensure_data(run.cfg)
    catalog, counts = load_catalog(run.cfg.data, str(run.out / "quarantine"))
    log("data quality:\n" + counts_table({"catalog": counts}))

    # 3. Embed (Ray Data actor pool) and index (faiss), unless nothing changed.
    index, status = ensure_index(str(export_dir), catalog, run.cfg, force=args.force)
    info = {k: v for k, v in index.info.items() if k != "fingerprint"}
    log(f"index {status}: {export_dir / 'index'}\n{json.dumps(info, indent=2)}")


if __name__ == "__main__":
    main()
