"""Embed the catalog with an exported retriever and build its ANN index (Ray Data + faiss).

    python jobs/embed.py --config configs/amazon-retriever.yaml [--model DIR] [--force]
        [index.kind=hnsw] [index.embed_batch_size=256] [index.embed_actors=2] ...

Writes <model>/index/ (embeddings Parquet, faiss index, index.json with the parameters and
the catalog snapshot it covers). An unchanged catalog and model are not embedded again; new
index parameters alone rebuild the index from the stored embeddings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shoprank import pipeline
from shoprank.config import load_config
from shoprank.data.load import counts_table, load_catalog
from shoprank.retrieval import ensure_index
from shoprank.runtime import init_ray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (default: the built-in synthetic shop)")
    parser.add_argument("--model", help="exported retriever folder (default: the run's export)")
    parser.add_argument("--force", action="store_true", help="embed even if nothing changed")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_intermixed_args()  # options may come between overrides

    # 1. Config and the model to embed with.
    cfg = load_config(args.config, args.overrides)
    out = pipeline.start(cfg)
    export_dir = Path(args.model or out / "export")
    init_ray()

    # 2. The validated catalog (bad rows quarantined and counted, never embedded).
    pipeline.ensure_data(cfg)
    catalog, counts = load_catalog(cfg.data, str(out / "quarantine"))
    print("[shoprank] data quality:\n" + counts_table({"catalog": counts}))

    # 3. Embed (Ray Data actor pool) and index (faiss), unless nothing changed.
    index, status = ensure_index(str(export_dir), catalog, cfg, force=args.force)
    info = {k: v for k, v in index.info.items() if k != "fingerprint"}
    print(f"[shoprank] index {status}: {export_dir / 'index'}\n{json.dumps(info, indent=2)}")


if __name__ == "__main__":
    main()
