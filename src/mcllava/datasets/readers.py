"""Our tests.jsonl reader and `read_any`, which picks the reader of an evaluation set: tests.jsonl, the MC-LLaVA
release layout (`mcllava.py`) or the Yo'LLaVA layout (`yollava.py`).

Every reader returns a list of record dicts (see `records.validate_record`) with absolute image paths, and
raises ValueError naming the file (and line) of anything malformed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .mcllava import case_roots, choice_answer, read_mcllava, split_options  # noqa: F401  (importable here too)
from .records import validate_record
from .yollava import read_yollava

# ----------------------------------------------------------------------------- tests.jsonl


def read_tests_jsonl(path: str | Path, check_images: bool = True) -> list[dict[str, Any]]:
    """Read our tests.jsonl: one record per line; image paths become absolute (relative to the file's folder)."""
    path = Path(path)
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read: {exc}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: invalid JSON: {exc.msg}") from None
        except (ValueError, RecursionError) as exc:  # a number too long to convert, nesting too deep
            raise ValueError(f"{where}: invalid JSON: {exc}") from None
        rec = validate_record(raw, where)
        if rec["image"] is not None:
            img = Path(rec["image"])
            img = img if img.is_absolute() else (path.parent / img)
            if check_images and not img.is_file():
                raise ValueError(f"{where}: image {rec['image']!r} not found at {img}")
            rec["image"] = str(img.resolve())
        out.append(rec)
    return out


# ----------------------------------------------------------------------------- dispatch


def read_any(path: str | Path, labels: str = "official") -> list[dict[str, Any]]:
    """Pick the reader: a .jsonl file or a folder with tests.jsonl; an MC-LLaVA layout; a Yo'LLaVA layout."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".jsonl":
            return read_tests_jsonl(path)
        raise ValueError(f"{path}: unknown evaluation file (expected a .jsonl of records or a dataset folder)")
    if not path.is_dir():
        raise ValueError(f"{path}: no such file or folder")
    if (path / "tests.jsonl").is_file():
        return read_tests_jsonl(path / "tests.jsonl")
    if case_roots(path):
        return read_mcllava(path, labels)
    if (path / "test").is_dir() or (path / "yollava-data" / "test").is_dir():
        return read_yollava(path)
    if (path / "mcllava").is_dir():
        return read_mcllava(path / "mcllava", labels)
    raise ValueError(f"{path}: not a tests.jsonl, MC-LLaVA or Yo'LLaVA evaluation set")
