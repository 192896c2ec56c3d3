"""Text templates: how catalog rows and histories become the words a model reads."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import pyarrow as pa

_EMPTY_SEGMENTS = re.compile(r"(?:\s*\.\s*){2,}")
_SPACES = re.compile(r"\s+")


def template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def render_items(catalog: pa.Table, template: str) -> list[str]:
    """One text per catalog row; a missing field renders empty and leaves no dangling dots."""
    fields = template_fields(template)
    unknown = [f for f in fields if f not in catalog.column_names]
    if unknown:
        raise ValueError(
            f"data.item_template={template!r} names {unknown}, which the catalog lacks; "
            f"catalog columns are {catalog.column_names}"
        )
    columns = {f: catalog[f].to_pylist() for f in fields}
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


def history_context(item_texts: Sequence[str], separator: str) -> str:
    """A recommendation context: item texts, newest first (callers pass them in that order)."""
    return separator.join(item_texts)
