"""The evaluation record (DESIGN.md, "Formats") and its validation, shared by every reader.

A record is one question: ``{"image", "task", "question", "answer", "options"?, "concepts", "present",
"boxes"}``; ``image`` is an absolute path after reading (None for text-only questions).
"""

from __future__ import annotations

import math
import re
from typing import Any

TASKS = ("recognition", "choice", "vqa", "caption", "grounding", "text")
IMAGE_TASKS = ("recognition", "vqa", "caption", "grounding")
KNOWN_KEYS = {
    "image",
    "task",
    "question",
    "answer",
    "options",
    "concepts",
    "present",
    "boxes",
    "scenario",
    "split",
    "kind",
    "official_answer",
    "protocol",
}
_TOKEN = re.compile(r"<([A-Za-z0-9_\-]+)>")


def concepts_in(text: str) -> list[str]:
    """The concept ids a text names as <id>, in order of first mention."""
    return list(dict.fromkeys(_TOKEN.findall(text)))


def _str_list(rec: dict, key: str, where: str) -> list[str]:
    value = rec.get(key, [])
    if value is None:
        value = []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{where}: '{key}' must be a list of concept ids (text), got {value!r}")
    return value


def validate_record(rec: Any, where: str = "record") -> dict[str, Any]:
    """Check one record and return it normalised (missing lists/dicts filled in); raise ValueError naming `where`.

    Rules: task is known; question and answer are non-empty text; image is text except for text-only
    questions ("text" has none; "choice" may have none); recognition answers are Yes/No; choice has
    options {letter: text} and its answer is one of the letters; boxes are [x0, y0, x1, y1] with
    x0 <= x1, y0 <= y1; grounding has a box for every concept it asks about.
    """
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    task = rec.get("task")
    if task not in TASKS:
        raise ValueError(f"{where}: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    for key in ("question", "answer"):
        if not isinstance(rec.get(key), str) or not rec[key].strip():
            raise ValueError(f"{where}: '{key}' must be non-empty text, got {rec.get(key)!r}")
    image = rec.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise ValueError(f"{where}: 'image' must be a path (text) or null, got {image!r}")
    if task in IMAGE_TASKS and image is None:
        raise ValueError(f"{where}: a {task} question needs an 'image'")
    if task == "text" and image is not None:
        raise ValueError(f"{where}: a text question has no image (got {image!r}); use task 'vqa' for images")
    if task == "recognition" and rec["answer"] not in ("Yes", "No"):
        raise ValueError(f"{where}: a recognition answer is 'Yes' or 'No', got {rec['answer']!r}")
    options = rec.get("options")
    if options is not None:
        if (
            not isinstance(options, dict)
            or not options
            or not all(
                isinstance(k, str) and len(k) == 1 and k.isalpha() and isinstance(v, str) and v
                for k, v in options.items()
            )
        ):
            raise ValueError(f"{where}: 'options' must map letters to non-empty text, got {options!r}")
    if task == "choice":
        if not options:
            raise ValueError(f"{where}: a choice question needs 'options'")
        if rec["answer"] not in options:
            raise ValueError(f"{where}: choice answer {rec['answer']!r} is not one of the options {', '.join(options)}")
    concepts = _str_list(rec, "concepts", where)
    present = _str_list(rec, "present", where)
    boxes = rec.get("boxes") or {}
    if not isinstance(boxes, dict):
        raise ValueError(f"{where}: 'boxes' must map concept ids to [x0, y0, x1, y1], got {boxes!r}")
    for c, b in boxes.items():
        ok = (
            isinstance(b, (list, tuple))
            and len(b) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b)
        )
        if not ok or b[0] > b[2] or b[1] > b[3]:
            raise ValueError(
                f"{where}: box of {c!r} must be [x0, y0, x1, y1] with finite x0 <= x1 and y0 <= y1, got {b!r}"
            )
    if task == "grounding":
        missing = [c for c in (concepts or present) if c not in boxes]
        if not (concepts or present) or missing:
            raise ValueError(
                f"{where}: a grounding question needs a box for each concept it asks about (missing {missing})"
            )
    out = dict(rec)
    out.update({"concepts": concepts, "present": present, "boxes": {c: list(b) for c, b in boxes.items()}})
    if options is None:
        out.pop("options", None)
    out.setdefault("image", None)
    return out


def recognition_question(cids: list[str]) -> str:
    """ "Is <bo> in this photo?", or "Are <bo> and <ana> both in this photo?" ("all" for three or more)."""
    toks = [f"<{c}>" for c in cids]
    if len(toks) == 1:
        return f"Is {toks[0]} in this photo?"
    listed = ", ".join(toks[:-1]) + " and " + toks[-1]
    return f"Are {listed} {'both' if len(toks) == 2 else 'all'} in this photo?"
