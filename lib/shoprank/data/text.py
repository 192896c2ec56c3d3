"""Text templates: how catalog rows and histories become the words a model reads."""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from shoprank.config import DataConfig

_EMPTY_SEGMENTS = re.compile(r"(?:\s*\.\s*){2,}")
_SPACES = re.compile(r"\s+")


def template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


PRICE_BANDS = ("bargain", "budget", "mid-range", "upscale", "luxury")


def price_bands(catalog: pa.Table) -> list[str | None]:
    """Each item's price against the others of its category, in words (fifths: the cheapest
    fifth "bargain" ... the dearest "luxury"); None without a price.

    A shopper's taste for cheap or dear items holds across kinds, but digits do not say it:
    $12 is dear for a pencil and cheap for a microscope. In words the model can match the
    history's band to the candidate's. Computed over the whole catalog given, so render the
    full catalog and take rows from the result, not the other way round.
    """
    frame = pd.DataFrame(
        {
            "category": pc.fill_null(catalog["category"], "").to_numpy(zero_copy_only=False),
            "price": catalog["price"].to_numpy(zero_copy_only=False).astype(np.float64),
        }
    )
    by_category = frame.groupby("category")["price"]
    # Mid-ranks (ties share one) as a fraction in (0, 1): one item alone is mid-range.
    fraction = (by_category.rank(method="average") - 0.5) / by_category.transform("count")
    band = np.minimum(fraction.to_numpy() * len(PRICE_BANDS), len(PRICE_BANDS) - 1)
    names = np.array(PRICE_BANDS, dtype=object)
    known = np.isfinite(band)
    return np.where(known, names[np.where(known, band, 0).astype(int)], None).tolist()


# Template fields computed from the catalog rather than read from one of its columns.
DERIVED_FIELDS = {"price_band": (("price", "category"), price_bands)}


def render_items(
    catalog: pa.Table, template: str, setting: str = "data.item_template"
) -> list[str]:
    """One text per catalog row; a missing field renders empty and leaves no dangling dots.
    `setting` names the template in errors. Fields are catalog columns or `DERIVED_FIELDS`,
    which read the whole table given (render the full catalog, then take rows)."""
    fields = template_fields(template)
    unknown = [
        f
        for f in fields
        if f not in catalog.column_names
        and not (f in DERIVED_FIELDS and set(DERIVED_FIELDS[f][0]) <= set(catalog.column_names))
    ]
    if unknown:
        raise ValueError(
            f"{setting}={template!r} names {unknown}, which the catalog lacks; "
            f"catalog columns are {catalog.column_names}, and {sorted(DERIVED_FIELDS)} "
            f"computed from them ({', '.join(f'{k}: {v[0]}' for k, v in DERIVED_FIELDS.items())})"
        )
    columns = {
        f: catalog[f].to_pylist() if f in catalog.column_names else DERIVED_FIELDS[f][1](catalog)
        for f in fields
    }
    texts = []
    for i in range(catalog.num_rows):
        values = {f: "" if columns[f][i] is None else str(columns[f][i]) for f in fields}
        text = template.format(**values)
        if all(values.values()):
            texts.append(text.strip())  # a full row renders verbatim
            continue
        text = _SPACES.sub(" ", _EMPTY_SEGMENTS.sub(". ", text)).strip(" .")
        texts.append(text + "." if text and template.rstrip().endswith(".") else text)
    return texts


def history_texts(
    catalog: pa.Table, data: DataConfig, item_texts: list[str] | None = None
) -> dict[str, str]:
    """Item id -> how the item reads inside a context (`data.history_template`, else its own
    text): the mapping `render_context` takes. `item_texts`: the catalog's `item_template`
    texts where the caller has them already (not rendered again)."""
    if data.history_template is not None:
        texts = render_items(catalog, data.history_template, "data.history_template")
    elif item_texts is not None:
        texts = item_texts
    else:
        texts = render_items(catalog, data.item_template)
    return dict(zip(catalog["item_id"].to_pylist(), texts, strict=True))


def render_context(
    history_ids: Sequence[str],
    texts: Mapping[str, str],
    data: DataConfig,
    extra: str | None = None,
) -> str:
    """THE context a model reads for a history (item ids, newest first): in training examples,
    evaluation and serving alike, with the model's own `data` settings; `texts` is
    `history_texts` of the catalog.

    Ids without a text (items the catalog lacks) are dropped first, then the newest
    `history_len` are kept: training never saw an unknown item, so a history that holds one
    must read like the same history without it. With `data.repeat_positives="first"` an item
    repeated in the history (a cart after its click) is read once, where it first came, as the
    training examples hold it. `extra` context words (device, page...) go
    last, after the separator.
    """
    known = [i for i in history_ids if i in texts]
    if data.repeat_positives == "first":  # as training read it: each item once, at its first
        known = list(dict.fromkeys(known[::-1]))[::-1]
    known = [texts[i] for i in known[: data.history_len]]
    text = data.history_separator.join(known)
    return f"{text}{data.history_separator}{extra}" if extra else text
