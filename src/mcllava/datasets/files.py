"""File helpers the evaluation-set readers share: a folder's test images, JSON with clear errors, and the image
a data file's key names."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def natural_order(p: Path) -> tuple:
    """Sort key that puts 2.png before 10.png."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name))


def image_files(folder: Path) -> list[Path]:
    """Test images of a folder (masks and Set-of-Mark renderings excluded), in natural order."""
    return sorted(
        (
            p
            for p in folder.iterdir()
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not re.search(r"_(mask|som|bbox)$", p.stem)
        ),
        key=natural_order,
    )


def load_json(path: Path) -> Any:
    """A JSON file's content; ValueError naming the file (and line) when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:  # a number too long to convert, nesting too deep
        raise ValueError(f"{path}: invalid JSON: {exc}") from None


def resolve_image(name: str, where: str, folder: Path, *roots: Path) -> str:
    """The image a data file's key names. A key that exists here is used as it is; a relative key is tried under
    the file's folder and the dataset's roots; a key written on another machine (an absolute path, or relative to
    another working folder) is matched by its tail inside the dataset, longest tail first, so that
    ``/elsewhere/two_concept/concept/test/Gloria/3.png`` is Gloria's photo. A bare file name is looked up in the
    file's own folder only: a key whose folder is another concept's never falls back to a same-named file here."""
    p = Path(name)
    if p.is_absolute() and p.is_file():
        return str(p)
    if not p.is_absolute():
        for base in (folder, *roots):
            q = (base / name).resolve()
            if q.is_file():
                return str(q)
    parts = [t for t in p.parts if t not in ("/", ".", "..")]
    for k in range(len(parts), 1, -1):
        tail = Path(*parts[-k:])
        for base in (*roots, folder):
            q = base / tail
            if q.is_file():
                return str(q.resolve())
    if parts and (len(parts) == 1 or parts[-2] == folder.name) and (folder / parts[-1]).is_file():
        return str((folder / parts[-1]).resolve())
    raise ValueError(
        f"{where}: image {name!r} not found (looked for it and its tail under "
        f"{', '.join(str(b) for b in (folder, *roots))}; a same-named file in another folder is not used)"
    )
