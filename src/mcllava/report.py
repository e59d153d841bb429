"""A static HTML page of an evaluation report: headline metrics, then every question with its image,
the answer, the reference and whether it was right. No JavaScript; all text escaped."""

from __future__ import annotations

import hashlib
import html
import json
import os
import tempfile
from pathlib import Path

from PIL import Image

from mcllava.evaluate import WHY_LENIENT, fmt, headline

from .files import permissions_of_new_files

THUMB = 320  # longest side of the copied images, in pixels

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.right { background: #e6f6e6; } tr.wrong { background: #fbe3e3; } tr.scored { background: #f4f4f4; }
img { max-width: 320px; max-height: 320px; }
pre { margin: 0; white-space: pre-wrap; font-family: inherit; }
"""


def _text(value: object) -> str:
    if isinstance(value, str):
        s = value
    elif isinstance(value, dict):
        s = "\n".join(f"{k}: {v}" for k, v in value.items())
    else:
        s = json.dumps(value)
    return f"<pre>{html.escape(s)}</pre>"


def _save_thumb(image: Image.Image, path: Path) -> None:
    im = image.convert("RGB")
    im.thumbnail((THUMB, THUMB))
    im.save(path, quality=88)


def _reference(row: dict) -> object:
    if row.get("kind") == "grounding":
        return row.get("boxes") or {}
    if row.get("kind") == "caption":
        return {"present": row.get("present") or []}
    return row.get("answer", "")


def _question(row: dict) -> str:
    q = str(row.get("question", ""))
    if row.get("options"):
        q += "\n" + "\n".join(f"{k}. {v}" for k, v in row["options"].items())
    return q


def write_html(
    report: dict,
    out_dir: str | os.PathLike,
    images_root: str | os.PathLike | None = None,
    marked_images: dict[int, Image.Image] | None = None,
) -> Path:
    """Write `out_dir/index.html` and thumbnails under `out_dir/img/`; returns the page's path.

    Relative image paths in the rows are resolved against `images_root`; `marked_images` (row index ->
    image, e.g. with Set-of-Mark marks drawn) replaces a row's plain image.
    """
    out = Path(out_dir)
    (out / "img").mkdir(parents=True, exist_ok=True)
    marked_images = marked_images or {}
    copied: dict[str, str] = {}

    def image_src(row: dict) -> str | None:
        idx = row.get("index")
        if idx in marked_images:
            name = f"img/marked_{idx}.jpg"
            _save_thumb(marked_images[idx], out / name)
            return name
        if not row.get("image"):
            return None
        src = Path(row["image"])
        if images_root is not None and not src.is_absolute():
            src = Path(images_root) / src
        key = str(src)
        if key not in copied:
            name = f"img/{hashlib.sha1(key.encode()).hexdigest()[:16]}.jpg"
            try:
                with Image.open(src) as im:
                    _save_thumb(im, out / name)
            except OSError:
                name = ""  # missing or unreadable: the row still shows, without its image
            copied[key] = name
        return copied[key] or None

    parts = [
        "<!doctype html>\n<html><head><meta charset='utf-8'><title>mcllava evaluation</title>",
        f"<style>{_CSS}</style></head><body>\n<h1>mcllava evaluation</h1>",
        "<table><tr><th>task</th><th>split</th><th>metric</th><th>official</th><th>lenient</th><th>n</th></tr>",
    ]
    for task, split, metric, off, lenient, n in headline(report):
        parts.append(
            f"<tr><td>{html.escape(task)}</td><td>{html.escape(split)}</td><td>{html.escape(metric)}</td>"
            f"<td class='num'>{fmt(off, metric)}</td><td class='num'>{fmt(lenient, metric)}</td>"
            f"<td class='num'>{n}</td></tr>"
        )
    parts.append("</table>")
    parts.append(f"<p>{html.escape(WHY_LENIENT)}</p>")
    for name, sub in (report.get("scenarios") or {}).items():
        parts.append(
            f"<h2>scenario {html.escape(name)}</h2><table><tr><th>task</th><th>split</th><th>metric</th>"
            "<th>official</th><th>lenient</th><th>n</th></tr>"
        )
        parts += [
            f"<tr><td>{html.escape(t)}</td><td>{html.escape(s)}</td><td>{html.escape(m)}</td>"
            f"<td class='num'>{fmt(o, m)}</td><td class='num'>{fmt(v, m)}</td><td class='num'>{n}</td></tr>"
            for t, s, m, o, v, n in headline(sub)
        ]
        parts.append("</table>")
    if t := report.get("timing"):
        parts.append(f"<p>{t['n']} questions in {t['total_s']:.1f} s.</p>")

    rows = report.get("rows") or []
    if rows:
        parts.append(
            "<table><tr><th>#</th><th>image</th><th>task</th><th>question</th>"
            "<th>answer</th><th>reference</th><th>result</th></tr>"
        )
    for i, row in enumerate(rows):
        row = dict(row, index=row.get("index", i))
        correct, score = row.get("correct"), row.get("score")
        cls = "right" if correct is True else "wrong" if correct is False else "scored"
        result = {True: "right", False: "wrong", None: ""}[correct]
        if isinstance(row.get("official"), bool):
            result += f" (official: {'right' if row['official'] else 'wrong'})"
        if score is not None and row.get("kind") in ("vqa", "caption", "grounding"):
            result = f"{result} {score:.3f}".strip()
        src = image_src(row)
        img = f"<img src='{html.escape(src)}' alt='image {row['index']}'>" if src else "(no image)"
        task = row.get("task", "") + (f" / {row['split']}" if row.get("split") else "")
        parts.append(
            f"<tr class='{cls}'><td class='num'>{row['index']}</td><td>{img}</td><td>{html.escape(task)}</td>"
            f"<td>{_text(_question(row))}</td><td>{_text(row.get('prediction', ''))}</td>"
            f"<td>{_text(_reference(row))}</td><td>{html.escape(result)}</td></tr>"
        )
    if rows:
        parts.append("</table>")
    parts.append("</body></html>\n")

    page = out / "index.html"
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".index.", suffix=".html.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(parts))
        permissions_of_new_files(Path(tmp))  # a report is for a web server to read too
        os.replace(tmp, page)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return page
