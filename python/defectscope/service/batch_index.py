"""The run's index: one row per input, as ``index.parquet`` and its twin ``index.csv``.

Rows are sorted and keyed by the path relative to the input root (``key``); both files
are written atomically, so a reader sees the previous index or the new one.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from defectscope.io.files import atomic_write_bytes, atomic_write_text
from defectscope.service.batch_records import INDEX_COLUMNS

_NUMBERS = {
    "height": "int64",
    "width": "int64",
    "n_windows": "int64",
    "n_regions": "int64",
    "n_unknown_windows": "int64",
    "pixel_size": "float64",
    "unknown_share": "float64",
    "out_of_distribution": "bool_",
    "scale_factor": "float64",
    "scale_applied": "bool_",
    "top_roi_score": "float64",
    "top_roi_center_y": "float64",
    "top_roi_center_x": "float64",
    "map_ms": "float64",
    "total_ms": "float64",
}


def index_schema():
    """The Parquet schema: numbers and flags typed, everything else a string."""
    import pyarrow as pa

    return pa.schema([(c, getattr(pa, _NUMBERS.get(c, "string"))()) for c in INDEX_COLUMNS])


def _sort_key(row: dict) -> tuple[str, str]:
    return (str(row.get("key") or ""), str(row.get("file") or ""))


def write_index(out: str | Path, rows: Sequence[dict]) -> Path:
    """Write ``index.parquet`` and ``index.csv`` atomically; returns the Parquet path.

    Columns are :data:`~defectscope.service.batch_records.INDEX_COLUMNS`; other keys
    of a row (a record's ``outputs``) are left out.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    rows = sorted(rows, key=_sort_key)
    table = pa.Table.from_pylist(
        [{c: r.get(c) for c in INDEX_COLUMNS} for r in rows], schema=index_schema()
    )
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    atomic_write_bytes(out / "index.parquet", buffer.getvalue().to_pybytes())
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=INDEX_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "index.csv", text.getvalue())
    return out / "index.parquet"
