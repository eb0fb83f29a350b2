"""A frame's record: its index row, and the proof that its outputs are complete.

Each frame's outputs live in ``frames/<key>/`` (``<key>`` its path relative to the
input root). The folder is made in a staging folder beside it and swapped in whole,
with ``done.json`` written last inside it: the frame's index row plus the SHA-256 of
every output (``outputs``) and how it was read (``reading``). A rerun reuses the
folder only when the record matches the file, the model, the map options and the
reading, and every output it lists is there with its recorded hash; otherwise the
frame is mapped again (a deleted ``windows.csv`` or ``overlay.png`` is rebuilt).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from defectscope.io.files import file_hash
from defectscope.service.batch_sources import FRAMES_DIR, RECORD

INDEX_COLUMNS = (
    "file",
    "key",
    "file_hash",
    "model_hash",
    "options",
    "status",
    "error",
    "output",
    "height",
    "width",
    "pixel_size",
    "unit",
    "n_windows",
    "n_regions",
    "n_unknown_windows",
    "unknown_share",
    "out_of_distribution",
    "scale_factor",
    "scale_source",
    "scale_applied",
    "scale_warning",
    "top_roi_label",
    "top_roi_score",
    "top_roi_center_y",
    "top_roi_center_x",
    "map_ms",
    "total_ms",
    "worker",
)


def output_folder(out: str | os.PathLike, key: str) -> Path:
    """A frame's own output folder: ``out/frames/<key>`` (its relative path, unique)."""
    return Path(out) / FRAMES_DIR / key


def staging_prefixes(folder: Path) -> tuple[str, str]:
    """Name prefixes of the staging folders made beside ``folder`` (ours, and the one
    :func:`~defectscope.outputs.map_files.write_map_outputs` makes beside ours)."""
    return f".{folder.name}.staging-", f"..{folder.name}.staging-"


def new_row(path: str, key: str, model_hash: str, options_json: str) -> dict[str, Any]:
    """An index row with every column, the frame's identity filled in."""
    row = dict.fromkeys(INDEX_COLUMNS)
    row.update(
        file=str(path),
        key=key,
        model_hash=model_hash,
        options=options_json,
        worker=f"{os.uname().nodename}:{os.getpid()}",
    )
    return row


def output_hashes(folder: Path) -> dict[str, str]:
    """The SHA-256 of every file in ``folder`` but the record, by name."""
    return {
        p.name: file_hash(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != RECORD and not p.name.startswith(".")
    }


def completed(folder: Path, expected: dict[str, Any]) -> dict | None:
    """The frame's record when its outputs are complete for ``expected``, else None.

    ``expected`` holds the values the record must have (``file_hash``, ``model_hash``,
    ``options``, ``reading``). Complete means: the record says 'ok', and every output
    it lists exists with the hash it recorded.
    """
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("status") != "ok":
        return None
    if any(record.get(name) != value for name, value in expected.items()):
        return None
    outputs = record.get("outputs")
    if not isinstance(outputs, dict) or not outputs:
        return None
    for name, digest in outputs.items():
        item = folder / str(name)
        try:
            if not item.is_file() or file_hash(item) != digest:
                return None
        except OSError:
            return None
    return record
