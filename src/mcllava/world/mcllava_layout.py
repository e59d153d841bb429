"""Write a world's concepts as an MC-LLaVA release folder (github.com/arctanxarc/MC-LLaVA) that the official
loader (`llava/dataset.py`) reads unchanged, and that `mcllava.datasets.read_mcllava` reads too.

    mcllava/concept_type.json                       {c: case}: the case folder of every concept
    mcllava/<case>/concept/test/<c>/<k>.png         5 photos showing c alone (the loader asserts 5 per concept)
    mcllava/<case>/concept/test/<c>/choice.json     {image: {"Human": question + "A. x" lines, "AI": letter}}, one per photo
    mcllava/<case>/concept/test/<c>/vqa.json        {image: {"Human": question, "AI": answer}}, one per photo
    mcllava/<case>/concept/test/<c>/qa.json         [{"question": question + options, "answer": letter}]: text-only
    mcllava/<case>/concept/train/<c>/<k>.png, <k>_mask.png
    mcllava/<case>/multi/<a_b>/<k>.png              5 photos showing every concept of the group
    mcllava/<case>/multi/<a_b>/{choice,vqa}.json    {image: [qa, ...]}: questions about one concept first (the
                                                    loader's first two are its one-concept split), then several
    mcllava/<case>/multi/<a_b>/vqa_position.json    {image: [{"Human": "Where is <c> ...\nA. ...", "AI": letter}]}
    mcllava/<case>/multi/<a_b>/position.json        {image: {c: [x0, y0, x1, y1]}}
    mcllava/<case>/multi/<a_b>/qa.json              text-only questions about the group

<case> is "two_concept", "three_concept", ... by group size. Image keys are absolute paths, as the loader opens
them as they are. The photos are rendered for the layout (seeded like the world), since the loader needs exactly
five per concept and per group: the world's own test scenes are mixed for the proving ground's purposes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .questions import SceneFacts, visual_records
from .scenes import sample_visible_scene

PHOTOS = 5  # the official loader asserts five test photos per concept and per group
OPTION_LINE = "{letter}. {text}"
CASES = {1: "one_concept", 2: "two_concept", 3: "three_concept", 4: "four_concept", 5: "five_concept"}


def with_options(question: str, options: dict[str, str]) -> str:
    """The question with its options on their own lines ("A. a ball"), as MC-LLaVA's choice files carry them."""
    return question + "".join("\n" + OPTION_LINE.format(letter=k, text=v) for k, v in options.items())


def case_of(group: list[str]) -> str:
    return CASES.get(len(group), f"{len(group)}_concept")


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


def position_question(cid: str, facts: SceneFacts) -> dict[str, str]:
    """The lettered grounding question: is <c> left or right of the others (of the photo's centre when alone)."""
    x0, _, x1, _ = facts.boxes[cid]
    others = [(b[0] + b[2]) / 2 for c, b in facts.boxes.items() if c != cid]
    ref = sum(others) / len(others) if others else facts.scene.image.size[0] / 2
    letter = "A" if (x0 + x1) / 2 < ref else "B"
    return {
        "Human": with_options(f"Where is <{cid}> in this photo?", {"A": "on the left", "B": "on the right"}),
        "AI": letter,
    }


def write_mcllava_layout(out: Path, records: list[dict], world: dict[str, Any], render) -> dict[str, Any]:
    """Write `out/mcllava/` for a world; `render(purpose, index, cids)` returns a seeded RenderedScene showing
    exactly the concepts `cids` (and perhaps bystanders). Returns counts."""
    root = out / "mcllava"
    if root.exists():
        shutil.rmtree(root)
    ids = [c["id"] for c in world["concepts"]]
    groups: list[list[str]] = [g for g in world["groups"]]
    group_of = {c: g for g in groups for c in g}
    case = {c: case_of(group_of.get(c, [c])) for c in ids}
    qrng = np.random.default_rng([int(world["seed"]), 25])
    n_photos = 0

    def photo(folder: Path, purpose: str, index: int, k: int, cids: list[str]) -> tuple[str, SceneFacts]:
        nonlocal n_photos
        scene = render(purpose, index * PHOTOS + k, cids)
        path = folder / f"{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        scene.image.save(path)
        n_photos += 1
        return str(path.resolve()), SceneFacts(scene, ids)

    text = [r for r in records if r.get("image") is None and r["task"] == "choice"]
    for ci, c in enumerate(ids):
        folder = root / case[c] / "concept" / "test" / c
        choice, vqa = {}, {}
        for k in range(PHOTOS):
            key, facts = photo(folder, "mcllava-single", ci, k, [c])
            qs = visual_records(qrng, key, facts, n_choice=1, n_vqa=1)
            choice[key] = _qa(next(q for q in qs if q["task"] == "choice"))
            vqa[key] = _qa(next(q for q in qs if q["task"] == "vqa"))
        _dump(folder / "choice.json", choice)
        _dump(folder / "vqa.json", vqa)
        _dump(
            folder / "qa.json",
            [
                {"question": with_options(r["question"], r["options"]), "answer": r["answer"]}
                for r in text
                if r["concepts"] == [c]
            ],
        )

    for gi, g in enumerate(x for x in groups if len(x) >= 2):
        folder = root / case_of(g) / "multi" / "_".join(g)
        files: dict[str, dict[str, list]] = {"choice": {}, "vqa": {}, "vqa_position": {}}
        positions = {}
        for k in range(PHOTOS):
            key, facts = photo(folder, "mcllava-multi", gi, k, list(g))
            qs = visual_records(qrng, key, facts, n_choice=len(g), n_vqa=len(g) + 1)
            for kind in ("choice", "vqa"):
                mine = sorted((q for q in qs if q["task"] == kind), key=lambda q: len(q["concepts"]) > 1)
                files[kind][key] = list({q["question"]: _qa(q) for q in mine}.values())  # each question once
            files["vqa_position"][key] = [position_question(c, facts) for c in g]
            positions[key] = {c: list(map(int, facts.boxes[c])) if c in facts.boxes else None for c in g}
        for kind, data in files.items():
            _dump(folder / f"{kind}.json", data)
        _dump(folder / "position.json", positions)
        _dump(
            folder / "qa.json",
            [
                {"question": with_options(r["question"], r["options"]), "answer": r["answer"]}
                for r in text
                if len(r["concepts"]) >= 2 and set(r["concepts"]) <= set(g)
            ],
        )

    for t in world["train"]:
        cid = Path(t["image"]).parts[1]
        src = out / t["image"]
        dst = root / case[cid] / "concept" / "train" / cid / src.name
        _link(src, dst)
        _link(src.with_name(src.stem + "_mask.png"), dst.with_name(src.stem + "_mask.png"))
    _dump(root / "concept_type.json", case)
    return {"root": str(root), "images": n_photos, "cases": sorted(set(case.values()))}


def scene_renderer(seed: int, size: int, identities: dict[str, Any], bystanders, rng_for):
    """The `render` callable `write_mcllava_layout` needs, from the world maker's own seeded pieces."""

    def render(purpose: str, index: int, cids: list[str]):
        rng = rng_for(seed, purpose, index)
        actors = [(identities[c], "concept", c) for c in cids] + bystanders(rng, int(rng.random() < 0.3))
        return sample_visible_scene(rng, actors, size)

    return render
