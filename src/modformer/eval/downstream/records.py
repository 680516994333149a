"""Reading local data files for fine-tuning: CSV, TSV (GLUE style) and JSON lines."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FILE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json"}


def read_records(path: str | Path, required_fields: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The rows of a CSV / TSV / JSON-lines file as dicts, checked to hold every field in
    ``required_fields`` with a non-empty value."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    kind = FILE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(
            f"{str(path)!r}: unknown file type {path.suffix!r}; use one of "
            f"{', '.join(FILE_FORMATS)} (CSV with a header row, TSV GLUE-style, JSON lines)"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{str(path)!r} is not UTF-8 text ({error})") from None
    if kind in ("csv", "tsv"):
        records = _read_delimited(text, path, kind)
    else:
        records = _read_json_records(text, path)
    if not records:
        raise ValueError(f"{str(path)!r} holds no records")
    _check_fields(records, required_fields, path)
    return records


def _read_delimited(text: str, path: Path, kind: str) -> list[dict[str, Any]]:
    # GLUE's TSV files contain unbalanced quote characters inside sentences: read them
    # without quoting, as GLUE's own readers do.
    options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if kind == "tsv" else {}
    # keepends: a quoted CSV field may span lines
    reader = csv.DictReader(text.splitlines(keepends=True), **options)
    records = []
    for row in reader:
        if None in row or None in row.values():
            raise ValueError(
                f"{str(path)!r} line {reader.line_num}: the number of fields differs from "
                f"the header's {len(reader.fieldnames or [])}; fix the row (a TSV file must "
                "be tab-separated, a CSV field holding commas must be quoted)"
            )
        records.append(row)
    return records


def _read_json_records(text: str, path: Path) -> list[dict[str, Any]]:
    stripped = text.lstrip()
    try:
        if path.suffix.lower() == ".json" and stripped.startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{str(path)!r} is not valid JSON lines ({error}); write one JSON object per line"
        ) from None
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise ValueError(
                f"{str(path)!r} record {number} is a {type(record).__name__}, not a JSON object"
            )
    return records


def _check_fields(records: list[dict[str, Any]], fields: Sequence[str], path: Path) -> None:
    available = list(records[0])
    missing = [name for name in fields if name not in available]
    if missing:
        raise ValueError(
            f"{str(path)!r} has no column(s) {missing}; its columns are {available}. "
            "Name the right ones with the text/label/document/summary column options"
        )
    for number, record in enumerate(records, 1):
        for name in fields:
            value = record.get(name)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise ValueError(
                    f"{str(path)!r} record {number}: column {name!r} is missing or empty"
                )
