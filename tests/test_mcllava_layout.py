"""`mcllava world make --layout mcllava` writes a folder the official MC-LLaVA loader reads unchanged.

`official_reads` restates, from reading `llava/dataset.py` of github.com/arctanxarc/MC-LLaVA, what its test
datasets do with a dataset root: which files they open, which fields they index and what they assert.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from mcllava.datasets import read_any
from mcllava.world.make import make_world

IMAGE_ENDINGS = (".png", ".jpeg", ".jpg")


def official_reads(root: Path, names: list[str]) -> dict[str, int]:
    """Every task of one scenario (`names`) as the official loader reads it; returns question counts."""
    case_of = json.loads((root / "concept_type.json").read_text())

    def single_images(c: str) -> list[str]:
        folder = os.path.join(root, case_of[c], "concept", "test", c)
        return [os.path.join(folder, x) for x in os.listdir(folder) if x.lower().endswith(IMAGE_ENDINGS)]

    def multi_folder(c: str) -> tuple[list[str], str | None]:
        multi = os.path.join(root, case_of[c], "multi")
        for d in os.listdir(multi):  # the first folder whose name contains the concept's name
            if os.path.isdir(os.path.join(multi, d)) and c in d:
                return d.split("_"), os.path.join(multi, d)
        return [c], None

    def multi_images(c: str) -> list[str]:
        folder = multi_folder(c)[1]
        return (
            [os.path.join(folder, x) for x in os.listdir(folder) if x.lower().endswith(IMAGE_ENDINGS)] if folder else []
        )

    m, counts = len(names), {}
    # recognition: single photos and group photos of every concept, then the group asked as a whole
    positives = sum(len(single_images(c)) + len(multi_images(c)) for c in names) + len(multi_images(names[-1]))
    assert positives == m * 5 + m * 5 + 5
    negatives = sum(len(single_images(o)) for c in names for o in names if o != c)
    assert negatives == m * (m - 1) * 5
    images = [p for c in names for p in single_images(c) + multi_images(c)]
    counts["recognition"] = positives + negatives
    # visual choice and VQA: one {Human, AI} per photo in each concept folder, lists in the group folder
    for kind in ("vqa", "choice"):
        keys, n = [], 0
        for c in names:
            data = json.loads(Path(root, case_of[c], "concept/test", c, f"{kind}.json").read_text())
            for image, qa in data.items():
                keys.append(image)
                n += bool(qa["Human"]) and bool(qa["AI"])
        assert n == m * 5
        group = multi_folder(names[0])[1]
        assert group is not None
        for image, qas in json.loads(Path(group, f"{kind}.json").read_text()).items():
            keys.append(image)
            for qa in qas:
                n += bool(qa["Human"]) and bool(qa["AI"])
        images += keys
        counts[kind] = n
    # captions: the group's photos matched one to one with position.json's entries (non-null names)
    group_photos = multi_images(names[0])
    positions = json.loads(Path(os.path.dirname(group_photos[0]), "position.json").read_text())
    existing = [[k for k, v in pos.items() if v is not None] for pos in positions.values()]
    assert len(existing) == len(group_photos)
    counts["caption"] = sum(len(single_images(c)) for c in names) + len(group_photos)
    # text-only choice: qa.json lists of {question, answer}
    n = 0
    for c in names:
        n += sum(
            bool(qa["question"]) and bool(qa["answer"])
            for qa in json.loads(Path(root, case_of[c], "concept/test", c, "qa.json").read_text())
        )
    n += sum(
        bool(qa["question"]) and bool(qa["answer"])
        for qa in json.loads(Path(multi_folder(names[0])[1], "qa.json").read_text())
    )
    counts["text"] = n
    # the lettered position test
    vg = json.loads(Path(multi_folder(names[0])[1], "vqa_position.json").read_text())
    counts["vg"] = sum(bool(qa["Human"]) and bool(qa["AI"]) for qas in vg.values() for qa in qas)
    images += list(vg)
    for path in set(images):  # the loader opens image keys as they are written
        with Image.open(path) as im:
            im.convert("RGB")
    return counts


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    make_world(
        out, seed=3, concepts=4, train_images=2, test_scenes=4, negatives=2, size=64, layout="mcllava", progress=False
    )
    return out


def test_official_loader_reads_every_task(layout):
    world = json.loads((layout / "world.json").read_text())
    for group in world["groups"]:
        counts = official_reads(layout / "mcllava", group)
        assert counts["recognition"] == 10 * len(group) + 5 + 5 * len(group) * (len(group) - 1)
        assert counts["vqa"] >= 10 + 5 and counts["choice"] >= 10 + 5 and counts["vg"] == 5 * len(group)


def test_our_reader_reads_it_back(layout):
    recs = read_any(layout / "mcllava")
    kinds = {r.get("kind", r["task"]) for r in recs}
    assert kinds >= {"recognition", "choice", "vqa", "caption", "grounding", "position"}
    assert any(r["image"] is None for r in recs)  # text-only questions
    rec = [r for r in recs if r["task"] == "recognition"]
    assert sum(r["answer"] == "Yes" for r in rec) == 4 * 5 + 2 * (5 * 2 + 5)
    assert {r["scenario"] for r in recs} == {
        f"two_concept/{'_'.join(g)}" for g in json.loads((layout / "world.json").read_text())["groups"]
    }
