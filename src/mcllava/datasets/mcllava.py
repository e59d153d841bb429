"""Reader of the MC-LLaVA release layout (github.com/arctanxarc/MC-LLaVA): concept/test/ and multi/ folders with
choice, VQA, position and text-choice files, into validated records."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .files import image_files, load_json, resolve_image
from .records import concepts_in, recognition_question, validate_record

_OPTION = re.compile(r"^\s*\(?([A-Z])[.):]\s*(.+?)\s*$")


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


def case_roots(root: Path) -> list[Path]:
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
    cases = case_roots(root) if root.is_dir() else []
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
            for img in image_files(folder):
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
            positions = load_json(pos_file) if pos_file.is_file() else {}
            if not isinstance(positions, dict):
                raise ValueError(f"{pos_file}: expected an object mapping images to {{name: position}}")
            presence: dict[str, tuple[list[str], dict[str, list]]] = {}
            for img in image_files(folder):
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
        data = load_json(path)
        for j, (image, qa) in enumerate(_entries(data, path)):
            where = f"{path} [{image!r} #{j}]"
            img = resolve_image(image, where, folder, case, case.parent)
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
        data = load_json(path)
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
