"""`world make`: concept folders, negatives, multi-concept training images, test scenes and tests.jsonl.

Everything comes from the personal half of identity space and is deterministic for a seed: each image has
its own generator seeded by (seed, purpose, index), so the output does not depend on the order of work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image
from tqdm.auto import tqdm

from .mcllava_layout import scene_renderer, write_mcllava_layout
from .questions import (
    SceneFacts,
    caption_and_grounding,
    fact_records,
    make_facts,
    older_records,
    recognition_question,
    record,
    visual_records,
)
from .scenes import RenderedScene, sample_visible_scene
from .traits import Identity, describe, is_personal_half, make_lookalike, random_identity

NAMES = [
    "bo",
    "ana",
    "kiki",
    "mo",
    "lulu",
    "pip",
    "tam",
    "zed",
    "nia",
    "rex",
    "ivy",
    "oto",
    "suki",
    "fen",
    "gus",
    "jojo",
    "kai",
    "lea",
    "momo",
    "noor",
    "pax",
    "remy",
    "sol",
    "tia",
    "uma",
    "vik",
    "wen",
    "yuki",
    "zia",
    "dot",
]
PURPOSES = {
    "concepts": 1,
    "train": 2,
    "multi": 3,
    "negatives": 4,
    "scenes": 5,
    "questions": 6,
    "corpus": 7,
    "mcllava-single": 8,
    "mcllava-multi": 9,
}
SCENE_KINDS = ("single", "multi", "distractor", "none")


@dataclass
class Concept:
    """A personal concept of the world: id, identity, profile and its look-alike distractors."""

    id: str
    identity: Identity
    facts: list[dict[str, str]]
    distractors: list[tuple[Identity, list[str]]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.id.capitalize()

    @property
    def description(self) -> str:
        return describe(self.identity)

    def profile(self) -> dict[str, Any]:
        """The concept.yaml mapping (keys the concept-folder loader accepts)."""
        return {
            "name": self.name,
            "category": self.identity.category,
            "description": self.description,
            "facts": self.facts,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "identity": self.identity.to_dict(),
            "description": self.description,
            "personal_half": is_personal_half(self.identity),
            "facts": self.facts,
            "distractors": [
                {
                    "identity": d.to_dict(),
                    "description": describe(d),
                    "differs": diff,
                    "personal_half": is_personal_half(d),
                }
                for d, diff in self.distractors
            ],
        }


def rng_for(seed: int, purpose: str, *index: int) -> np.random.Generator:
    """An independent generator per (seed, purpose, index...)."""
    return np.random.default_rng([seed, PURPOSES[purpose], *index])


def concept_ids(n: int, rng: np.random.Generator) -> list[str]:
    """n unique short lowercase ids (a shuffled pool, then pool names with digits)."""
    pool = list(NAMES)
    rng.shuffle(pool)
    ids = pool[:n]
    k = 2
    while len(ids) < n:
        ids += [f"{p}{k}" for p in pool][: n - len(ids)]
        k += 1
    return ids


def plan_concepts(seed: int, n: int, n_distractors: int = 2) -> list[Concept]:
    """Draw n personal-half concepts; about half share category and colour with another (fine-grained)."""
    rng = rng_for(seed, "concepts")
    ids = concept_ids(n, rng)
    idents: list[Identity] = []
    while len(idents) < n:
        if idents and len(idents) % 2 == 1 and rng.random() < 0.7:
            prev = idents[-1]
            new = random_identity(rng, "personal", category=prev.category, color=prev.color)
        else:
            new = random_identity(rng, "personal")
        if new not in idents:
            idents.append(new)
    ages = rng.choice(np.arange(2, 13), size=n, replace=n > 11)
    concepts = [
        Concept(cid, ident, make_facts(rng, cid, f"{int(age)} years old")) for cid, ident, age in zip(ids, idents, ages)
    ]
    taken = set(idents)
    for c in concepts:
        for _ in range(n_distractors):
            d, diff = make_lookalike(c.identity, rng, half="personal", avoid=taken)
            taken.add(d)
            c.distractors.append((d, diff))
    return concepts


def groups_of(ids: list[str]) -> list[list[str]]:
    """Split concepts into scenarios of 2-3 (MC-LLaVA's multi-concept groups); one concept is its own group."""
    if len(ids) <= 3:
        return [list(ids)]
    out, rest = [], list(ids)
    while rest:
        k = 3 if len(rest) in (3, 5) else 2
        out.append(rest[:k])
        rest = rest[k:]
    return out


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", compress_level=6)


def _bystanders(rng: np.random.Generator, k: int, avoid: set[Identity]) -> list[tuple[Identity, str, None]]:
    out = []
    while len(out) < k:
        ident = random_identity(rng, "personal")
        if ident not in avoid:
            out.append((ident, "other", None))
    return out


def _scene_entry(path: str, kind: str, scene: RenderedScene) -> dict[str, Any]:
    return {
        "image": path,
        "kind": kind,
        "setting": scene.spec.setting,
        "objects": scene.objects(),
        "spec": scene.spec.to_dict(),
    }


def make_world(
    out: str | Path,
    seed: int = 0,
    concepts: int = 4,
    train_images: int = 10,
    test_scenes: int | None = None,
    distractors: int = 2,
    layout: str | None = None,
    size: int = 192,
    negatives: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write a whole world to `out` (see docs/world.md) and return a summary (counts, paths)."""
    if concepts < 1:
        raise ValueError("a world needs at least one concept")
    if layout not in (None, "mcllava"):
        raise ValueError(f"unknown layout {layout!r}; the only extra layout is 'mcllava'")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cs = plan_concepts(seed, concepts, distractors)
    ids = [c.id for c in cs]
    by_id = {c.id: c for c in cs}
    groups = groups_of(ids)
    group_of = {c: g for g in groups for c in g}
    special = {c.identity for c in cs} | {d for c in cs for d, _ in c.distractors}
    n_test = test_scenes if test_scenes is not None else max(30, 15 * concepts)
    n_neg = negatives if negatives is not None else max(10, 5 * concepts)
    pairs = [(g[i], g[j]) for g in groups for i in range(len(g)) for j in range(i + 1, len(g))]
    total = concepts * train_images + n_neg + 2 * len(pairs) + n_test
    bar = tqdm(total=total, desc="world make", unit="img", disable=not progress)
    world: dict[str, Any] = {
        "format": 1,
        "seed": seed,
        "size": size,
        "concepts": [c.to_dict() for c in cs],
        "groups": groups,
        "train": [],
        "multi_train": [],
        "negatives": [],
        "scenes": [],
    }

    # concept folders: train images with exact masks, concept.yaml
    for ci, c in enumerate(cs):
        folder = out / "concepts" / c.id
        (folder / "train").mkdir(parents=True, exist_ok=True)
        (folder / "concept.yaml").write_text(yaml.safe_dump(c.profile(), sort_keys=False, allow_unicode=True))
        for k in range(train_images):
            rng = rng_for(seed, "train", ci, k)
            actors = [(c.identity, "concept", c.id)] + _bystanders(rng, int(rng.random() < 0.2), special)
            scene = sample_visible_scene(rng, actors, size)
            idx = next(j for j, a in enumerate(scene.spec.actors) if a.ref == c.id)
            _save(scene.image, folder / "train" / f"{k}.png")
            _save(Image.fromarray((scene.mask(idx) * 255).astype(np.uint8), "L"), folder / "train" / f"{k}_mask.png")
            world["train"].append(_scene_entry(f"concepts/{c.id}/train/{k}.png", "train", scene))
            bar.update()

    # multi-concept training images: concepts/_multi/<a>+<b>/<i>.png
    for pi, (a, b) in enumerate(pairs):
        for k in range(2):
            rng = rng_for(seed, "multi", pi, k)
            scene = sample_visible_scene(
                rng, [(by_id[a].identity, "concept", a), (by_id[b].identity, "concept", b)], size
            )
            rel = f"concepts/_multi/{a}+{b}/{k}.png"
            _save(scene.image, out / rel)
            world["multi_train"].append(_scene_entry(rel, "multi_train", scene))
            bar.update()

    # negatives: generic scenes without any concept or distractor
    for k in range(n_neg):
        rng = rng_for(seed, "negatives", k)
        scene = sample_visible_scene(rng, _bystanders(rng, int(rng.integers(1, 4)), special), size)
        rel = f"negatives/{k}.png"
        _save(scene.image, out / rel)
        world["negatives"].append(_scene_entry(rel, "negative", scene))
        bar.update()

    # test scenes and their questions
    candidates: dict[tuple[str, bool], list[tuple[int, dict]]] = {}
    others: list[dict] = []
    qrng = rng_for(seed, "questions")
    kinds_p = np.array([0.35, 0.3, 0.2, 0.15]) if concepts >= 2 else np.array([0.55, 0.0, 0.3, 0.15])
    for k in range(n_test):
        rng = rng_for(seed, "scenes", k)
        kind = SCENE_KINDS[rng.choice(4, p=kinds_p / kinds_p.sum())]
        actors, lookalike_of = _test_actors(rng, kind, cs, groups, special)
        scene = sample_visible_scene(rng, actors, size)
        rel = f"scenes/{k}.png"
        _save(scene.image, out / rel)
        entry = _scene_entry(rel, kind, scene)
        entry["lookalike_of"] = lookalike_of
        world["scenes"].append(entry)
        facts = SceneFacts(scene, ids)
        for rec in _recognition(rng, rel, facts, ids, group_of, lookalike_of):
            split = (
                "multi_all" if len(rec["concepts"]) >= 2 else ("multi_one" if len(rec["present"]) >= 2 else "single")
            )
            priority = 0 if lookalike_of and rec["answer"] == "No" and lookalike_of in rec["concepts"] else 1
            candidates.setdefault((split, rec["answer"] == "Yes"), []).append((priority, rec))
        others += visual_records(qrng, rel, facts) + caption_and_grounding(rel, facts)
        bar.update()
    bar.close()

    records = _balance(qrng, candidates) + others
    for c in cs:
        records += fact_records(qrng, c.id, c.facts)
    for g in groups:
        records += older_records(qrng, {c.id: c.facts for c in cs}, g)
    with open(out / "tests.jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    (out / "world.json").write_text(json.dumps(world, indent=1))
    summary = {
        "out": str(out),
        "concepts": ids,
        "groups": groups,
        "train_images": concepts * train_images,
        "multi_images": 2 * len(pairs),
        "negatives": n_neg,
        "test_scenes": n_test,
        "records": len(records),
    }
    if layout == "mcllava":
        render = scene_renderer(
            seed, size, {c.id: c.identity for c in cs}, lambda rng, k: _bystanders(rng, k, special), rng_for
        )
        summary["mcllava"] = write_mcllava_layout(out, records, world, render)
    return summary


def _test_actors(rng, kind: str, cs: list[Concept], groups: list[list[str]], special: set[Identity]):
    """The characters of a test scene of `kind`, and the concept whose look-alike appears (or None)."""
    by_id = {c.id: c for c in cs}
    n_other = int(rng.choice([0, 1, 2], p=[0.5, 0.35, 0.15]))
    lookalike_of = None
    if kind == "single":
        c = cs[rng.integers(len(cs))]
        actors = [(c.identity, "concept", c.id)]
    elif kind == "multi":
        multi_groups = [g for g in groups if len(g) >= 2]
        g = multi_groups[rng.integers(len(multi_groups))]
        k = int(rng.integers(2, len(g) + 1))
        chosen = [g[j] for j in rng.choice(len(g), size=k, replace=False)]
        actors = [(by_id[c].identity, "concept", c) for c in chosen]
        n_other = min(n_other, 4 - len(actors), 1)
    elif kind == "distractor":
        c = cs[rng.integers(len(cs))]
        d, _ = c.distractors[rng.integers(len(c.distractors))] if c.distractors else (None, None)
        lookalike_of = c.id if d is not None else None
        actors = [(d, "distractor", c.id)] if d is not None else []
        mates = [o for o in group_of_list(groups, c.id) if o != c.id]
        n_mates = int(rng.integers(0, min(2, len(mates)) + 1))
        for m in [mates[j] for j in rng.choice(len(mates), size=n_mates, replace=False)] if n_mates else []:
            actors.append((by_id[m].identity, "concept", m))
        n_other = min(n_other, 4 - len(actors))
        if not actors:
            n_other = max(1, n_other)
    else:
        actors = []
        n_other = max(1, n_other)
    return actors + _bystanders(rng, n_other, special), lookalike_of


def group_of_list(groups: list[list[str]], cid: str) -> list[str]:
    return next(g for g in groups if cid in g)


def _recognition(
    rng, image: str, facts: SceneFacts, ids: list[str], group_of: dict[str, list[str]], lookalike_of: str | None
) -> list[dict]:
    """Yes/no candidates: each present concept, absent ones (the look-alike's concept first), and 'all' forms."""
    present, boxes = facts.present, facts.boxes
    absent = [c for c in ids if c not in present]
    out = []
    for c in present:
        out.append(record(image, "recognition", recognition_question([c]), "Yes", [c], present, boxes))
    asked = [lookalike_of] if lookalike_of else []
    rest = [c for c in absent if c not in asked]
    if rest:
        asked += [rest[j] for j in rng.choice(len(rest), size=min(len(rest), 1), replace=False)]
    for c in asked:
        out.append(record(image, "recognition", recognition_question([c]), "No", [c], present, boxes))
        if c == lookalike_of:  # the photo shows a look-alike of the concept asked about
            out[-1]["lookalike"] = True
    if len(present) >= 2:
        out.append(record(image, "recognition", recognition_question(present), "Yes", present, present, boxes))
        if absent:
            miss = absent[rng.integers(len(absent))]
            pair = [present[rng.integers(len(present))], miss]
            rng.shuffle(pair)
            out.append(record(image, "recognition", recognition_question(pair), "No", pair, present, boxes))
    return out


def _balance(rng: np.random.Generator, candidates: dict[tuple[str, bool], list[tuple[int, dict]]]) -> list[dict]:
    """Keep as many positives as negatives in each split (look-alike negatives kept first)."""
    out = []
    for split in ("single", "multi_one", "multi_all"):
        pos, neg = candidates.get((split, True), []), candidates.get((split, False), [])
        n = min(len(pos), len(neg))
        for group in (pos, neg):
            order = sorted(range(len(group)), key=lambda j: (group[j][0], rng.random()))
            keep = sorted(order[:n])
            out += [group[j][1] for j in keep]
    return out
