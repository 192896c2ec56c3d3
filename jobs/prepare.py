"""Prepare a dataset in the shoprank Parquet contract (no Ray needed).

    python jobs/prepare.py synthetic [--out data/synthetic] [--users N --items N --seed S]
    python jobs/prepare.py amazon ../shared/data/amazon-scientific [--out data/amazon-scientific]
    python jobs/prepare.py esci SRC_DIR [--out data/esci --locale us]
    python jobs/prepare.py wands SRC_DIR [--out data/wands --train-fraction 0.5]
    python jobs/prepare.py homedepot ../shared/data/home-depot [--out data/home-depot]

Writes catalog.parquet and events/dt=YYYY-MM-DD/ (plus judgments.parquet for search data) and
prints a JSON summary. Validation happens in the jobs that read the data, so that bad rows are
counted and quarantined next to each run's outputs.
"""

from __future__ import annotations

import argparse
import json

from shoprank.data.amazon import import_amazon
from shoprank.data.homedepot import import_homedepot
from shoprank.data.search_sets import import_esci, import_wands
from shoprank.data.synthetic import generate_shop


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="source", required=True)

    syn = sub.add_parser("synthetic", help="generate a synthetic shop")
    syn.add_argument("--out", default="data/synthetic")
    syn.add_argument("--users", type=int, default=2000)
    syn.add_argument("--items", type=int, default=3000)
    syn.add_argument("--days", type=int, default=14)
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument(
        "--bad-fraction",
        type=float,
        default=0.01,
        help="fraction of deliberately bad event rows to plant",
    )

    amz = sub.add_parser("amazon", help="import the Amazon Industrial & Scientific sequences")
    amz.add_argument("src", help="folder with items.parquet and interactions.parquet")
    amz.add_argument("--out", default="data/amazon-scientific")

    esci = sub.add_parser("esci", help="import the ESCI shopping-queries dataset (search)")
    esci.add_argument("src", help="folder with shopping_queries_dataset_*.parquet")
    esci.add_argument("--out", default="data/esci")
    esci.add_argument("--locale", default="us")

    wands = sub.add_parser("wands", help="import the WANDS dataset (search)")
    wands.add_argument("src", help="folder with product.csv, query.csv, label.csv")
    wands.add_argument("--out", default="data/wands")
    wands.add_argument("--train-fraction", type=float, default=0.5)

    hd = sub.add_parser("homedepot", help="import the Home Depot search relevance file (search)")
    hd.add_argument("src", help="folder with train.csv (latin-1), or the file itself")
    hd.add_argument("--out", default="data/home-depot")
    hd.add_argument(
        "--min-click-gain",
        type=float,
        default=0.0,
        help="a train-query pair becomes a training click when its gain is above this",
    )

    args = parser.parse_args(argv)
    if args.source == "synthetic":
        summary = generate_shop(
            args.out,
            n_items=args.items,
            n_users=args.users,
            days=args.days,
            seed=args.seed,
            bad_fraction=args.bad_fraction,
        )
    elif args.source == "amazon":
        summary = import_amazon(args.src, args.out)
    elif args.source == "esci":
        summary = import_esci(args.src, args.out, locale=args.locale)
    elif args.source == "wands":
        summary = import_wands(args.src, args.out, train_fraction=args.train_fraction)
    else:
        summary = import_homedepot(args.src, args.out, min_click_gain=args.min_click_gain)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
