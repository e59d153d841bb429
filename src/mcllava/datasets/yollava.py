"""Reader of the Yo'LLaVA layout (github.com/thaoshibe/YoLLaVA): test/<name>/ photos and the visual and text
question files, into validated records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .files import image_files, load_json, resolve_image
from .records import recognition_question, validate_record


def _yollava_dir(root: Path) -> Path:
    for cand in (root, root / "yollava-data"):
        if (cand / "test").is_dir():
            return cand
    raise ValueError(f"{root}: not a Yo'LLaVA layout (no test/ or yollava-data/test/ folder)")


def read_yollava(root: str | Path) -> list[dict[str, Any]]:
    """Read the Yo'LLaVA layout into records.

    ``test/<name>/*.png``: recognition of every concept on every concept's test images (Yes on its own
    folder, No elsewhere), as Yo'LLaVA evaluates it. ``yollava-visual-qa.json`` ({name: {image: {question,
    options, correct_answer}}}, with "<sks>" standing for the concept): visual choice. An optional
    ``yollava-text-qa.json`` of the same shape keyed by any id instead of an image: text-only choice.
    """
    root = Path(root)
    data = _yollava_dir(root)
    test = data / "test"
    names = sorted(p.name for p in test.iterdir() if p.is_dir())
    out: list[dict[str, Any]] = []
    images = {d: image_files(test / d) for d in names}
    for d in names:
        for img in images[d]:
            p = str(img.resolve())
            for c in names:
                out.append(
                    validate_record(
                        {
                            "image": p,
                            "task": "recognition",
                            "question": recognition_question([c]),
                            "answer": "Yes" if c == d else "No",
                            "concepts": [c],
                            "present": [d],
                            "boxes": {},
                            "protocol": "yollava",
                        },
                        str(img),
                    )
                )
    for fname, visual in (("yollava-visual-qa.json", True), ("yollava-text-qa.json", False)):
        path = next((q for q in (data / fname, root / fname) if q.is_file()), None)
        if path is None:
            continue
        content = load_json(path)
        if not isinstance(content, dict):
            raise ValueError(f"{path}: expected an object keyed by concept name")
        for c, items in content.items():
            if not isinstance(items, (dict, list)):
                raise ValueError(f"{path}: questions of {c!r} must be an object or a list")
            entries = items.items() if isinstance(items, dict) else enumerate(items)
            for key, qa in entries:
                where = f"{path} [{c!r} / {key!r}]"
                if not (
                    isinstance(qa, dict)
                    and isinstance(qa.get("question"), str)
                    and isinstance(qa.get("options"), dict)
                    and isinstance(qa.get("correct_answer"), str)
                ):
                    raise ValueError(f"{where}: expected 'question', 'options' and 'correct_answer'")
                q = qa["question"].replace("<sks>", f"<{c}>")
                options = {str(k): str(v) for k, v in qa["options"].items()}
                rec = {
                    "image": None,
                    "task": "choice",
                    "question": q,
                    "answer": qa["correct_answer"].strip(),
                    "options": options,
                    "concepts": [c],
                    "present": [],
                    "boxes": {},
                }
                if visual:
                    rec["image"] = resolve_image(str(key), where, test / c, root, data, data.parent)
                    rec["present"] = [c]
                out.append(validate_record(rec, where))
    return out
