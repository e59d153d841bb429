"""Write a world's test set in the MC-LLaVA release layout (github.com/arctanxarc/MC-LLaVA), so that
`mcllava.datasets.read_mcllava` is exercised on the real shape of that dataset.

    mcllava/scenarios.json                     ["bo_ana", ...]: the multi-concept groups
    mcllava/concept/train/<c>/<k>.png, <k>_mask.png, and concept/train/train.json {c: [file, ...]}
    mcllava/concept/test/<c>/<scene>.png       images showing exactly concept c (and no other concept)
    mcllava/concept/test/<c>/choice.json       {image: {"Human": question + options, "AI": letter}} (list if several)
    mcllava/concept/test/<c>/vqa.json          {image: {"Human": question, "AI": answer}} (list if several)
    mcllava/concept/test/<c>/qa.json           [{"question": question + options, "answer": letter}]: text-only
    mcllava/multi/<a_b>/<scene>.png            images showing several concepts of group a_b (and no others)
    mcllava/multi/<a_b>/{choice,vqa,qa}.json   as above, lists per image
    mcllava/multi/<a_b>/position.json          {image: {c: [x0, y0, x1, y1] or null}} for every concept of the group

Recognition and caption questions are not stored: as in the release, they follow from which folder an image
is in and from position.json. Scenes that fit no folder (look-alikes only, concepts of several groups) are
left out.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

OPTION_LINE = "{letter}. {text}"


def with_options(question: str, options: dict[str, str]) -> str:
    """The question with its options on their own lines ("A. a ball"), as MC-LLaVA's choice files carry them."""
    return question + "".join("\n" + OPTION_LINE.format(letter=k, text=v) for k, v in options.items())


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _qa(rec: dict) -> dict[str, str]:
    q = with_options(rec["question"], rec["options"]) if rec.get("options") else rec["question"]
    return {"Human": q, "AI": rec["answer"]}


def _dump(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def write_mcllava_layout(out: Path, records: list[dict], world: dict[str, Any]) -> dict[str, Any]:
    """Write `out/mcllava/` from a world's records and ground truth; returns counts."""
    root = out / "mcllava"
    if root.exists():
        shutil.rmtree(root)
    groups: list[list[str]] = world["groups"]
    folder_of: dict[str, Path] = {}  # scene image (relative to out) -> its folder in the layout
    present_of: dict[str, list[str]] = {}
    for s in world["scenes"]:
        present = [o["ref"] for o in s["objects"] if o["role"] == "concept"]
        present_of[s["image"]] = present
        if len(present) == 1:
            folder_of[s["image"]] = root / "concept" / "test" / present[0]
        elif len(present) >= 2:
            g = next((g for g in groups if set(present) <= set(g)), None)
            if g is not None:
                folder_of[s["image"]] = root / "multi" / "_".join(g)
    # every concept and group has a folder, even when empty
    for c in world["concepts"]:
        (root / "concept" / "test" / c["id"]).mkdir(parents=True, exist_ok=True)
    for g in groups:
        if len(g) >= 2:
            (root / "multi" / "_".join(g)).mkdir(parents=True, exist_ok=True)

    files: dict[Path, dict[str, list[dict]]] = {}
    text: dict[Path, list[dict]] = {}
    n_visual = 0
    for rec in records:
        if rec.get("image") is None:
            if rec["task"] != "choice":
                continue
            cs = rec["concepts"]
            if len(cs) == 1:
                folder = root / "concept" / "test" / cs[0]
            else:
                g = next((g for g in groups if set(cs) <= set(g)), None)
                if g is None:
                    continue
                folder = root / "multi" / "_".join(g)
            text.setdefault(folder, []).append({"question": with_options(rec["question"], rec["options"]),
                                                "answer": rec["answer"]})
            continue
        if rec["task"] not in ("choice", "vqa") or rec["image"] not in folder_of:
            continue
        folder = folder_of[rec["image"]]
        name = Path(rec["image"]).name
        files.setdefault(folder / f"{rec['task']}.json", {}).setdefault(name, []).append(_qa(rec))
        n_visual += 1

    for image, folder in folder_of.items():
        _link(out / image, folder / Path(image).name)
    for path, by_image in files.items():
        single = path.parent.parent.name == "test"
        _dump(path, {k: (v[0] if single and len(v) == 1 else v) for k, v in by_image.items()})
    for folder, items in text.items():
        _dump(folder / "qa.json", items)
    for g in groups:
        if len(g) < 2:
            continue
        folder = root / "multi" / "_".join(g)
        positions = {}
        for s in world["scenes"]:
            if folder_of.get(s["image"]) == folder:
                boxes = {o["ref"]: o["box"] for o in s["objects"] if o["role"] == "concept"}
                positions[Path(s["image"]).name] = {c: boxes.get(c) for c in g}
        _dump(folder / "position.json", positions)

    train_json: dict[str, list[str]] = {}
    for t in world["train"]:
        cid = Path(t["image"]).parts[1]
        src = out / t["image"]
        dst = root / "concept" / "train" / cid / src.name
        _link(src, dst)
        _link(src.with_name(src.stem + "_mask.png"), dst.with_name(src.stem + "_mask.png"))
        train_json.setdefault(cid, []).append(src.name)
    _dump(root / "concept" / "train" / "train.json", train_json)
    _dump(root / "scenarios.json", ["_".join(g) for g in groups])
    return {"root": str(root), "images": len(folder_of), "visual_questions": n_visual,
            "text_questions": sum(len(v) for v in text.values())}
