"""Readers that turn evaluation sets into validated records: our tests.jsonl, the MC-LLaVA release layout
(github.com/arctanxarc/MC-LLaVA) and the Yo'LLaVA layout (github.com/thaoshibe/YoLLaVA).

Every reader returns a list of record dicts (see `records.validate_record`) with absolute image paths, and
raises ValueError naming the file (and line) of anything malformed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .records import concepts_in, recognition_question, validate_record

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_OPTION = re.compile(r"^\s*\(?([A-Z])[.):]\s*(.+?)\s*$")


def _natural(p: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name))


def _images(folder: Path) -> list[Path]:
    """Test images of a folder (masks and Set-of-Mark renderings excluded), in natural order."""
    return sorted(
        (
            p
            for p in folder.iterdir()
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not re.search(r"_(mask|som|bbox)$", p.stem)
        ),
        key=_natural,
    )


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:  # a number too long to convert, nesting too deep
        raise ValueError(f"{path}: invalid JSON: {exc}") from None


def _resolve(name: str, where: str, folder: Path, *roots: Path) -> str:
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


# ----------------------------------------------------------------------------- MC-LLaVA


def _inline_options(text: str) -> tuple[str, dict[str, str]]:
    """Options written on one line: "Q? A. x B. y", "Q? Options: A: x, B: y", "Q? (A) x (B) y"; letters in order."""
    for sep in (r"\.", ":", r"\)"):
        marks, pos = [], 0
        for letter in "ABCDEFGH":
            opener = r"\(" if sep == r"\)" else r"\(?"
            m = re.compile(rf"(?:^|(?<=[\s,;]))({opener}{letter}{sep})\s*").search(text, pos)
            if not m:
                break
            marks.append(m)
            pos = m.end()
        if len(marks) >= 2:
            options = {}
            for i, m in enumerate(marks):
                end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
                options["ABCDEFGH"[i]] = text[m.end() : end].strip().rstrip(",;").strip()
            question = re.sub(r"\s*(?:Options|Choices)\s*:?\s*$", "", text[: marks[0].start()].strip(), flags=re.I)
            if all(options.values()):
                return question.strip(), options
    return text.strip(), {}


def split_options(text: str) -> tuple[str, dict[str, str]]:
    """Split "question\nA. x\nB. y" (or the options on one line) into the question and its options ({} when it
    lists none)."""
    lines = text.rstrip().split("\n")
    options: dict[str, str] = {}
    while lines:
        m = _OPTION.match(lines[-1])
        if not m or m.group(1) in options:
            break
        options[m.group(1)] = m.group(2)
        lines.pop()
    if len(options) >= 2:
        return "\n".join(lines).strip(), dict(sorted(options.items()))
    return _inline_options(text)


def choice_answer(answer: str, options: dict[str, str]) -> str | None:
    """The letter a release's answer field names: "B", "B.", "(B)", "B. a scarf", "B: a scarf" or an option's
    exact text; None when it is none of these (a reply such as "A book" is not read as "A")."""
    a = answer.strip()
    m = re.fullmatch(r"\(?([A-Z])\)?[.:)]?", a) or re.fullmatch(r"\(?([A-Z])[.:)]\s*(.+)", a)
    if (
        m
        and m.group(1) in options
        and (m.lastindex == 1 or m.group(2).strip().rstrip(".") == options[m.group(1)].rstrip("."))
    ):
        return m.group(1)
    by_text = [k for k, v in options.items() if v.strip().rstrip(".").lower() == a.rstrip(".").lower()]
    return by_text[0] if len(by_text) == 1 else None


def _choice_fields(question: str, answer: str, where: str) -> tuple[str, dict[str, str], str]:
    q, options = split_options(question)
    if not options:
        raise ValueError(
            f"{where}: cannot read the options of choice question {question!r} "
            "(expected 'A. x' lines, 'A. x B. y' or 'Options: A: x, B: y')"
        )
    letter = choice_answer(answer, options)
    if letter is None:
        raise ValueError(f"{where}: answer {answer!r} names none of the options {', '.join(options)}")
    return q, options, letter


def _case_roots(root: Path) -> list[Path]:
    """Folders holding concept/test and/or multi: root itself or its children (two_concept/, three_concept/)."""

    def is_case(p: Path) -> bool:
        return (p / "concept" / "test").is_dir() or (p / "multi").is_dir()

    if is_case(root):
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and is_case(p))


def _entries(data: Any, path: Path) -> list[tuple[str, dict]]:
    """(image, {"Human", "AI"}) pairs of a choice/vqa file: {image: qa} or {image: [qa, ...]}."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object mapping image paths to questions, got {type(data).__name__}")
    out = []
    for image, qas in data.items():
        for j, qa in enumerate(qas if isinstance(qas, list) else [qas]):
            if not (isinstance(qa, dict) and isinstance(qa.get("Human"), str) and isinstance(qa.get("AI"), str)):
                raise ValueError(f"{path}: entry {image!r}[{j}] must have text 'Human' and 'AI', got {qa!r}")
            out.append((image, qa))
    return out


LABELS = ("official", "positions")


def read_mcllava(root: str | Path, labels: str = "official") -> list[dict[str, Any]]:
    """Read the MC-LLaVA release layout into records, each naming its ``scenario`` (case/group).

    From ``concept/test/<c>/``: recognition (Yes for c, No for the other concepts of its scenario) and a
    caption record per image, visual choice (choice.json), VQA (vqa.json) and text-only choice (qa.json).
    From ``multi/<a_b>/``: recognition per concept and for all of them, captions (the concepts position.json
    does not mark null, as the official code counts them), grounding (where position.json holds boxes), choice,
    VQA (the first two questions of a photo ask about one concept, the rest about several, as the official
    splits go), the lettered position test (vqa_position.json) and text choice.

    `labels`: "official" labels every concept of a group photo present for recognition, as the official code
    does; "positions" says No where position.json marks a concept null (truer where the release's positions are
    right: the concept is not in that photo), which also moves a photo showing one concept to the single split.
    """
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {', '.join(LABELS)}, got {labels!r}")
    root = Path(root)
    cases = _case_roots(root) if root.is_dir() else []
    if not cases:
        raise ValueError(f"{root}: not an MC-LLaVA layout (no concept/test/ or multi/ folder)")
    out: list[dict[str, Any]] = []
    for case in cases:
        test = case / "concept" / "test"
        names = sorted(p.name for p in test.iterdir() if p.is_dir()) if test.is_dir() else []
        groups = sorted(p.name for p in (case / "multi").iterdir() if p.is_dir()) if (case / "multi").is_dir() else []
        members = {g: g.split("_") for g in groups}
        for g, m in members.items():
            unknown = [c for c in m if names and c not in names]
            if unknown:
                raise ValueError(f"{case / 'multi' / g}: names {unknown} have no concept/test/ folder")
        known = set(names) | {c for m in members.values() for c in m}
        prefix = "" if case == root else f"{case.name}/"

        def group_of(c: str) -> str:
            return next((g for g, m in members.items() if c in m), c)

        def mates(c: str) -> list[str]:
            ms = sorted({o for m in members.values() if c in m for o in m if o != c})
            return ms or [o for o in names if o != c]

        def add(rec: dict, where: str, scenario: str) -> None:
            out.append(validate_record({**rec, "scenario": prefix + scenario}, where))

        for c in names:
            folder, scenario = test / c, group_of(c)
            for img in _images(folder):
                where, p, present = str(img), str(img.resolve()), [c]
                add(
                    {
                        "image": p,
                        "task": "recognition",
                        "question": recognition_question([c]),
                        "answer": "Yes",
                        "concepts": [c],
                        "present": present,
                        "boxes": {},
                    },
                    where,
                    scenario,
                )
                for o in mates(c):
                    add(
                        {
                            "image": p,
                            "task": "recognition",
                            "question": recognition_question([o]),
                            "answer": "No",
                            "concepts": [o],
                            "present": present,
                            "boxes": {},
                        },
                        where,
                        scenario,
                    )
                add(
                    {
                        "image": p,
                        "task": "caption",
                        "question": "Describe this photo.",
                        "answer": f"<{c}>",
                        "concepts": present,
                        "present": present,
                        "boxes": {},
                    },
                    where,
                    scenario,
                )
            out += [dict(r, scenario=prefix + scenario) for r in _visual_and_text(folder, case, known, {}, default=[c])]

        for g, m in members.items():
            folder = case / "multi" / g
            pos_file = folder / "position.json"
            positions = _load_json(pos_file) if pos_file.is_file() else {}
            if not isinstance(positions, dict):
                raise ValueError(f"{pos_file}: expected an object mapping images to {{name: position}}")
            presence: dict[str, tuple[list[str], dict[str, list]]] = {}
            for img in _images(folder):
                pos = (
                    positions.get(img.name)
                    or positions.get(str(img))
                    or next((v for k, v in positions.items() if Path(k).name == img.name), None)
                )
                if pos is not None and not isinstance(pos, dict):
                    raise ValueError(f"{pos_file}: entry of {img.name!r} must map names to positions")
                shown = [c for c in m if pos is None or pos.get(c) is not None]
                present = list(m) if labels == "official" else shown
                boxes = {c: pos[c] for c in shown if pos and isinstance(pos.get(c), list) and len(pos[c]) == 4}
                presence[img.name] = (present, boxes)
                p, where = str(img.resolve()), str(img)
                for c in m:
                    ans = "Yes" if c in present else "No"
                    add(
                        {
                            "image": p,
                            "task": "recognition",
                            "question": recognition_question([c]),
                            "answer": ans,
                            "concepts": [c],
                            "present": present,
                            "boxes": boxes,
                        },
                        where,
                        g,
                    )
                add(
                    {
                        "image": p,
                        "task": "recognition",
                        "question": recognition_question(m),
                        "answer": "Yes" if len(present) == len(m) else "No",
                        "concepts": list(m),
                        "present": present,
                        "boxes": boxes,
                    },
                    where,
                    g,
                )
                if shown:
                    add(
                        {
                            "image": p,
                            "task": "caption",
                            "question": "Describe this photo.",
                            "answer": " and ".join(f"<{c}>" for c in shown),
                            "concepts": shown,
                            "present": shown,
                            "boxes": boxes,
                        },
                        where,
                        g,
                    )
                for c, b in boxes.items():
                    add(
                        {
                            "image": p,
                            "task": "grounding",
                            "question": f"Where is <{c}>?",
                            "answer": f"<{c}>",
                            "concepts": [c],
                            "present": present,
                            "boxes": {c: b},
                        },
                        where,
                        g,
                    )
            out += [
                dict(r, scenario=prefix + g) for r in _visual_and_text(folder, case, known, presence, default=list(m))
            ]
    return out


def _visual_and_text(folder: Path, case: Path, known: set[str], presence: dict, default: list[str]) -> list[dict]:
    """Records of choice.json, vqa.json, vqa_position.json (visual) and qa.json (text-only choice) in one folder."""
    out = []
    multi = len(default) > 1
    for kind in ("choice", "vqa", "vqa_position"):
        path = folder / f"{kind}.json"
        if not path.is_file():
            continue
        data = _load_json(path)
        for j, (image, qa) in enumerate(_entries(data, path)):
            where = f"{path} [{image!r} #{j}]"
            img = _resolve(image, where, folder, case, case.parent)
            named = [c for c in concepts_in(qa["Human"]) if c in known] or default
            present, boxes = presence.get(Path(img).name, (default if len(default) == 1 else named, {}))
            if kind == "vqa":
                rec = {"image": img, "task": "vqa", "question": qa["Human"].strip(), "answer": qa["AI"]}
            else:
                q, options, letter = _choice_fields(qa["Human"], qa["AI"], where)
                rec = {"image": img, "task": "choice", "question": q, "answer": letter, "options": options}
                if qa["AI"] != letter:
                    rec["official_answer"] = qa["AI"]  # the official code compares the reply with this string
                if kind == "vqa_position":
                    rec["kind"] = "position"
            rec.update({"concepts": named, "present": list(present), "boxes": dict(boxes)})
            if multi:  # the official split: a photo's first two questions ask about one concept (mi_sq)
                rec["split"] = "multi_one" if _index_in_image(data, image, qa) < 2 else "multi_all"
            out.append(validate_record(rec, where))
    path = folder / "qa.json"
    if path.is_file():
        data = _load_json(path)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of {{question, answer}}, got {type(data).__name__}")
        for j, qa in enumerate(data):
            where = f"{path} [#{j}]"
            if not (isinstance(qa, dict) and isinstance(qa.get("question"), str) and isinstance(qa.get("answer"), str)):
                raise ValueError(f"{where}: expected text 'question' and 'answer', got {qa!r}")
            q, options, letter = _choice_fields(qa["question"], qa["answer"], where)
            named = [c for c in concepts_in(qa["question"]) if c in known] or default
            rec = {
                "image": None,
                "task": "choice",
                "question": q,
                "answer": letter,
                "options": options,
                "concepts": named,
                "present": [],
                "boxes": {},
            }
            if qa["answer"] != letter:
                rec["official_answer"] = qa["answer"]
            out.append(validate_record(rec, where))
    return out


def _index_in_image(data: dict, image: str, qa: dict) -> int:
    qas = data[image]
    return next(i for i, x in enumerate(qas if isinstance(qas, list) else [qas]) if x is qa)


# ----------------------------------------------------------------------------- Yo'LLaVA


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
    images = {d: _images(test / d) for d in names}
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
        content = _load_json(path)
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
                    rec["image"] = _resolve(str(key), where, test / c, root, data, data.parent)
                    rec["present"] = [c]
                out.append(validate_record(rec, where))
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
    if _case_roots(path):
        return read_mcllava(path, labels)
    if (path / "test").is_dir() or (path / "yollava-data" / "test").is_dir():
        return read_yollava(path)
    if (path / "mcllava").is_dir():
        return read_mcllava(path / "mcllava", labels)
    raise ValueError(f"{path}: not a tests.jsonl, MC-LLaVA or Yo'LLaVA evaluation set")
