"""The proving-ground world: determinism, exact masks and ground truth, look-alikes, identity halves, layouts."""

from __future__ import annotations

import copy
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mcllava.datasets import read_mcllava, read_tests_jsonl
from mcllava.datasets.records import recognition_question
from mcllava.world import (
    Identity,
    SceneSpec,
    corpus_samples,
    describe,
    is_personal_half,
    make_lookalike,
    make_world,
    random_identity,
    render_scene,
    sample_scene,
    trait_diff,
)
from mcllava.world.traits import TRAITS, VALUES

SMALL = dict(concepts=4, train_images=2, test_scenes=24, negatives=3, size=128, progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    make_world(out, seed=3, layout="mcllava", **SMALL)
    return out


@pytest.fixture(scope="module")
def truth(world) -> dict:
    return json.loads((world / "world.json").read_text())


def _digest(root: Path) -> dict[str, str]:
    """Hashes of every file; the release layout's image keys are absolute, so its JSON is hashed root-relative."""

    def content(p: Path) -> bytes:
        data = p.read_bytes()
        return data.replace(str(root.resolve()).encode(), b"ROOT") if p.suffix == ".json" else data

    return {
        str(p.relative_to(root)): hashlib.sha256(content(p)).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_same_bytes(world, tmp_path):
    again = tmp_path / "again"
    make_world(again, seed=3, layout="mcllava", **SMALL)
    assert _digest(again) == _digest(world)
    other = tmp_path / "other"
    make_world(other, seed=4, **SMALL)
    assert _digest(other)["tests.jsonl"] != _digest(world)["tests.jsonl"]


def test_layout_of_world(world, truth):
    ids = [c["id"] for c in truth["concepts"]]
    assert len(set(ids)) == len(ids) and all(c.isalnum() and c.islower() for c in ids)
    for c in ids:
        assert (world / "concepts" / c / "concept.yaml").is_file()
        assert sorted(p.name for p in (world / "concepts" / c / "train").iterdir()) == [
            "0.png",
            "0_mask.png",
            "1.png",
            "1_mask.png",
        ]
    assert len(list((world / "negatives").glob("*.png"))) == 3
    assert any((world / "concepts" / "_multi").iterdir())
    assert len(list((world / "scenes").glob("*.png"))) == 24


def test_concept_folder_loads(world):
    from mcllava.concepts import ConceptSet

    cs = ConceptSet.load(world / "concepts")
    assert len(cs) == 4 and cs.multi
    c = next(iter(cs))
    assert c.facts and c.description and c.category


def test_mask_is_exactly_the_character():
    rng = np.random.default_rng(0)
    for k in range(6):
        spec = sample_scene(rng, [random_identity(rng)], size=128, held_p=0.0)
        spec.shadows, spec.occluders = False, []
        alone = render_scene(spec)
        empty = copy.deepcopy(spec)
        empty.actors = []
        bg = render_scene(empty)
        changed = (np.asarray(alone.image) != np.asarray(bg.image)).any(axis=2)
        assert changed.sum() > 100
        assert np.array_equal(changed, alone.mask(0)), f"scene {k}"


def test_occlusion_and_held_objects_respected():
    rng = np.random.default_rng(1)
    for _ in range(8):
        spec = sample_scene(rng, [random_identity(rng) for _ in range(4)], size=128, held_p=1.0)
        scene = render_scene(spec)
        pixels = np.asarray(scene.image)
        for k in range(len(spec.actors)):
            solo = copy.deepcopy(spec)
            solo.actors = [spec.actors[k]]
            solo.occluders = []
            alone = render_scene(solo)
            visible, full = scene.mask(k), alone.mask(0)
            assert not (visible & ~full).any()  # occlusion only removes pixels
            # where the character shows, it looks the same as when drawn alone
            same = (pixels[visible] == np.asarray(alone.image)[visible]).all(axis=1)
            assert same.mean() > 0.98  # (shadows of others may darken a few edge pixels)
            held = alone.labels == 254
            assert held.any() and not (held & visible).any()


def test_ground_truth_matches_what_was_drawn(world, truth):
    records = read_tests_jsonl(world / "tests.jsonl")
    by_image: dict[str, list[dict]] = {}
    for r in records:
        if r["image"]:
            by_image.setdefault(Path(r["image"]).name, []).append(r)
    for s in truth["scenes"][:10]:
        spec = SceneSpec.from_dict(s["spec"])
        scene = render_scene(spec)
        saved = np.asarray(Image.open(world / s["image"]).convert("RGB"))
        assert np.array_equal(np.asarray(scene.image), saved)
        present = sorted(o["ref"] for o in s["objects"] if o["role"] == "concept")
        for k, o in enumerate(s["objects"]):
            m = scene.mask(k)
            x0, y0, x1, y1 = o["box"]
            assert m.sum() > 0 and m[y0:y1, x0:x1].sum() == m.sum()
            assert m[y0].any() and m[y1 - 1].any() and m[:, x0].any() and m[:, x1 - 1].any()
        for r in by_image.get(Path(s["image"]).name, []):
            assert sorted(r["present"]) == present
            for c, b in r["boxes"].items():
                assert b == next(o["box"] for o in s["objects"] if o["ref"] == c and o["role"] == "concept")
            if r["task"] == "recognition":
                assert r["answer"] == ("Yes" if set(r["concepts"]) <= set(present) else "No")


def test_train_masks_match_world(world, truth):
    for t in truth["train"][:4]:
        scene = render_scene(SceneSpec.from_dict(t["spec"]))
        k = next(o["index"] for o in t["objects"] if o["role"] == "concept")
        mask = np.asarray(Image.open(world / t["image"].replace(".png", "_mask.png"))) > 127
        assert np.array_equal(mask, scene.mask(k))


def test_distractors_differ_in_exactly_the_claimed_traits(truth):
    for c in truth["concepts"]:
        ident = Identity.from_dict(c["identity"])
        assert len(c["distractors"]) == 2
        for d in c["distractors"]:
            other = Identity.from_dict(d["identity"])
            assert trait_diff(ident, other) == d["differs"]
            assert 1 <= len(d["differs"]) <= 2


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([None, 1, 2]))
def test_lookalike_property(seed, n):
    rng = np.random.default_rng(seed)
    ident = random_identity(rng)
    look, diff = make_lookalike(ident, rng, n_changes=n, half=None)
    assert look != ident and trait_diff(ident, look) == diff
    assert len(diff) == (n or len(diff)) and 1 <= len(diff) <= 2


def test_descriptions_name_every_trait_and_tell_identities_apart():
    rng = np.random.default_rng(5)
    seen: dict[str, Identity] = {}
    for _ in range(300):
        i = random_identity(rng)
        text = describe(i)
        assert i.color in text and i.head in text and i.eyes in text and i.build in text
        if i.accessory != "none":
            assert i.accessory in text and str(i.accessory_color) in text
        assert seen.setdefault(text, i) == i
    assert (
        describe(Identity("cat", "red", "striped", "round", "round", "wide-set", "slim", "hat", "blue"), "short")
        == "a red striped cat with round ears and a blue hat"
    )


def test_identity_halves_are_disjoint_and_respected(world, truth):
    rng = np.random.default_rng(0)
    sample = [random_identity(rng) for _ in range(2000)]
    share = np.mean([is_personal_half(i) for i in sample])
    assert 0.45 < share < 0.55
    assert all(is_personal_half(random_identity(rng, "personal")) for _ in range(50))
    assert not any(is_personal_half(random_identity(rng, "base")) for _ in range(50))
    for group in ("train", "multi_train", "negatives", "scenes"):
        for s in truth[group]:
            for o in s["objects"]:
                assert is_personal_half(Identity.from_dict(o["identity"])), (group, o)
    for c in truth["concepts"]:
        assert c["personal_half"] and all(d["personal_half"] for d in c["distractors"])
    for s in corpus_samples(seed=1, n=25, size=96):
        for o in s["objects"]:
            assert not is_personal_half(Identity.from_dict(o["identity"]))


def test_corpus_samples():
    samples = list(corpus_samples(seed=2, n=80, size=96))
    assert all(isinstance(s["image"], Image.Image) and s["image"].size == (96, 96) for s in samples)
    rec = [s for s in samples if s["task"] == "recognition"]
    assert rec and all(s["definitions"] and s["answer"] in ("Yes", "No") for s in rec)
    assert all(f"<{n}> is " in s["question"] for s in rec for n in s["definitions"])
    yes = sum(s["answer"] == "Yes" for s in rec) / len(rec)
    assert 0.3 < yes < 0.7
    assert {s["kind"] for s in samples} == {"caption", "vqa", "defined_recognition", "defined_caption"}
    first = next(corpus_samples(seed=2, n=1, size=96))
    assert first["question"] == samples[0]["question"]
    assert first["image"].tobytes() == samples[0]["image"].tobytes()


def test_tests_jsonl_is_valid_and_balanced(world):
    records = read_tests_jsonl(world / "tests.jsonl")
    tasks = Counter(r["task"] for r in records)
    assert set(tasks) == {"recognition", "choice", "vqa", "caption", "grounding", "text"}
    splits = Counter()
    for r in records:
        if r["task"] == "recognition":
            split = "all" if len(r["concepts"]) >= 2 else ("multi" if len(r["present"]) >= 2 else "single")
            splits[(split, r["answer"])] += 1
        if r["task"] == "caption":
            assert all(f"<{c}>" in r["answer"] for c in r["present"])
        if r["task"] in ("recognition", "grounding", "vqa"):
            assert all(f"<{c}>" in r["question"] for c in r["concepts"])
    for split in ("single", "multi", "all"):
        assert splits[(split, "Yes")] == splits[(split, "No")] > 0, splits
    assert any(r["task"] == "choice" and r["image"] is None for r in records)
    assert any(r["task"] == "text" and r["image"] is None for r in records)
    assert recognition_question(["bo", "ana"]) == "Are <bo> and <ana> both in this photo?"


def test_lookalike_negatives_present(world, truth):
    records = read_tests_jsonl(world / "tests.jsonl")
    look = {s["image"]: s["lookalike_of"] for s in truth["scenes"] if s.get("lookalike_of")}
    hard = [
        r
        for r in records
        if r["task"] == "recognition"
        and r["answer"] == "No"
        and look.get("scenes/" + Path(r["image"]).name) in r["concepts"]
    ]
    assert hard
    # exactly those records say so, for the report's "look-alikes rejected" figure
    assert [r for r in records if r.get("lookalike")] == hard


def test_mcllava_layout_round_trips(world):
    """The layout's questions come back through our reader; its text questions are the world's."""
    original = read_tests_jsonl(world / "tests.jsonl")
    layout = read_mcllava(world / "mcllava")

    def key(r):
        return (r["question"], r["answer"], json.dumps(r.get("options"), sort_keys=True), tuple(sorted(r["concepts"])))

    assert Counter(key(r) for r in layout if r["image"] is None) == Counter(
        key(r) for r in original if r["image"] is None and r["task"] == "choice"
    )
    positions = {
        Path(k).resolve(): v
        for p in (world / "mcllava").rglob("position.json")
        for k, v in json.loads(p.read_text()).items()
    }
    n = 0
    for r in layout:
        if r["task"] == "grounding":
            assert r["boxes"] == {c: positions[Path(r["image"])][c] for c in r["concepts"]}
            n += 1
    assert n >= 10


def test_world_cli(tmp_path):
    from typer.testing import CliRunner

    from mcllava.world.cli import world_app

    res = CliRunner().invoke(
        world_app,
        [
            "make",
            str(tmp_path / "w"),
            "--seed",
            "1",
            "--concepts",
            "2",
            "--train-images",
            "1",
            "--test-scenes",
            "6",
            "--size",
            "96",
            "--negatives",
            "1",
            "--layout",
            "mcllava",
        ],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "w" / "tests.jsonl").is_file() and (tmp_path / "w" / "mcllava" / "concept_type.json").is_file()
    res = CliRunner().invoke(world_app, ["corpus", str(tmp_path / "c"), "--n", "5", "--size", "96"])
    assert res.exit_code == 0, res.output
    lines = (tmp_path / "c" / "corpus.jsonl").read_text().splitlines()
    assert len(lines) == 5 and all((tmp_path / "c" / json.loads(x)["image"]).is_file() for x in lines)
    res = CliRunner().invoke(world_app, ["make", str(tmp_path / "x"), "--layout", "nope"])
    assert res.exit_code != 0


def test_identity_rejects_unknown_traits():
    with pytest.raises(ValueError, match="unknown color"):
        Identity("cat", "mauve", "plain", "round", "round", "wide-set", "slim")
    with pytest.raises(ValueError):
        Identity("cat", "red", "plain", "round", "round", "wide-set", "slim", "none", "red")
    assert len(TRAITS) == len(VALUES) and len(VALUES["category"]) >= 6 and len(VALUES["color"]) >= 8
