"""Training and gate data for the proving-ground base, generated in memory from the procedural world.

Three streams, all drawn from one identity half ("base" for training, "personal" for the gate's unseen
characters):
- `scene_pool`: rendered scenes with per-slot trait labels (vision tower pretraining) and, per patch, the
  character that owns it (projector alignment).
- `lm_sample`: one (image, question, answer, kind) for the language-model stage: short generic captions,
  colour / category / position questions, and recognition with in-context word definitions of made-up
  names ("<dax> is a red striped cat with round ears. Is <dax> in this photo?"), balanced Yes/No, with a
  curriculum knob (number of definitions, share of look-alike negatives) and a text-only twin of the same
  task (the photo written out as descriptions), which small models learn first and transfer to images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..datasets.records import recognition_question
from ..world.corpus import nonce_name
from ..world.questions import join_words
from ..world.scenes import SETTING_PHRASES, RenderedScene, sample_visible_scene
from ..world.traits import VALUES, Identity, describe, make_lookalike, noun_phrase, random_identity

PURPOSES = {"scenes": 101, "lm": 102, "named": 103}


def rng_for(seed: int, purpose: str, index: int) -> np.random.Generator:
    """An independent generator per (seed, purpose, index), apart from the world's own streams."""
    return np.random.default_rng([seed, PURPOSES[purpose], index])


# Per-slot label heads of the vision pretraining: (trait, number of classes); category has an "empty" class.
SLOT_TRAITS = ("category", "color", "pattern", "ears", "head", "eyes", "build", "accessory", "accessory_color")
N_SLOTS = 6  # (left, centre, right) x (near, far)


def slot_classes() -> list[int]:
    return [len(VALUES[t]) + (1 if t in ("category", "accessory_color") else 0) for t in SLOT_TRAITS]


def _slot(scene: RenderedScene, k: int) -> int:
    a = scene.spec.actors[k]
    col = min(2, max(0, int(a.x / (scene.spec.size / 3))))
    return col * 2 + (0 if a.depth == "near" else 1)


def _identities(rng: np.random.Generator, k: int, half: str) -> list[Identity]:
    out: list[Identity] = []
    while len(out) < k:
        ident = random_identity(rng, half)
        if ident not in out:
            out.append(ident)
    return out


def scene_labels(scene: RenderedScene, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-slot trait labels [N_SLOTS, len(SLOT_TRAITS)] (-100 = no label) and per-patch owner [grid*grid]."""
    labels = np.full((N_SLOTS, len(SLOT_TRAITS)), -100, dtype=np.int64)
    labels[:, 0] = len(VALUES["category"])  # empty slot
    size = scene.spec.size
    cover = np.zeros((len(scene.spec.actors) + 1, grid * grid), dtype=np.float32)
    cover[0] = 0.35  # background wins unless a character covers more than 35% of the patch
    for k, a in enumerate(scene.spec.actors):
        ident = a.identity
        s = _slot(scene, k)
        for j, t in enumerate(SLOT_TRAITS):
            v = getattr(ident, t)
            labels[s, j] = len(VALUES[t]) if v is None else VALUES[t].index(v)
        m = scene.mask(k).reshape(grid, size // grid, grid, size // grid).mean(axis=(1, 3))
        cover[k + 1] = m.reshape(-1)
    return labels, cover.argmax(0) - 1


@dataclass
class ScenePool:
    pixels: torch.Tensor  # [n, H, W, 3] uint8
    labels: torch.Tensor  # [n, N_SLOTS, len(SLOT_TRAITS)]
    owner: torch.Tensor  # [n, grid*grid] actor index or -1
    descs: list[list[str]]  # per scene, per actor: short description (the projector alignment target)


def scene_pool(seed: int, n: int, size: int = 192, grid: int = 6, half: str = "base", progress: bool = False) -> ScenePool:
    """`n` rendered scenes of 1-4 characters from `half`, with labels for vision pretraining and alignment."""
    from tqdm.auto import tqdm

    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    labels = np.zeros((n, N_SLOTS, len(SLOT_TRAITS)), dtype=np.int64)
    owner = np.zeros((n, grid * grid), dtype=np.int64)
    descs = []
    for i in tqdm(range(n), desc="render scenes", disable=not progress, mininterval=5):
        rng = rng_for(seed, "scenes", i)
        scene = sample_visible_scene(rng, _identities(rng, int(rng.integers(1, 5)), half), size)
        pixels[i] = np.asarray(scene.image.convert("RGB"))
        labels[i], owner[i] = scene_labels(scene, grid)
        descs.append([describe(a.identity, "short") for a in scene.spec.actors])
    return ScenePool(torch.from_numpy(pixels), torch.from_numpy(labels), torch.from_numpy(owner), descs)


# ------------------------------------------------------------------------------------------------ LM samples
@dataclass
class Curriculum:
    """What the recognition samples look like at one point of training."""

    max_definitions: int = 1  # 1 .. 2 made-up names defined per sample
    lookalike: float = 0.0  # share of negatives where a look-alike of the target stands in for it
    mix: tuple[float, float, float, float] = (0.15, 0.25, 0.15, 0.45)  # caption, vqa, text compare, defined recognition


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def short_caption(scene: RenderedScene) -> str:
    """"A red striped cat and a person in a blue shirt in the park." (every category named)."""
    names = join_words([noun_phrase(a.identity) for a in scene.spec.actors])
    return f"{_cap(names)} {SETTING_PHRASES[scene.spec.setting]}."


def generic_question(rng: np.random.Generator, scene: RenderedScene) -> tuple[str, str, str]:
    """(question, answer, kind) about colour, category or position; kind is what the gate checks."""
    actors = scene.spec.actors
    cats = [a.identity.category for a in actors]
    unique = [k for k, c in enumerate(cats) if cats.count(c) == 1]
    kind = ["exists", "colour", "category", "position"][rng.integers(4)]
    if kind == "exists" or not unique:
        c = VALUES["category"][rng.integers(len(VALUES["category"]))] if rng.random() < 0.5 else cats[rng.integers(len(cats))]
        art = "an" if c[0] in "aeiou" else "a"
        return f"Is there {art} {c} in this photo?", ("Yes" if c in cats else "No"), "exists"
    k = unique[rng.integers(len(unique))]
    a = actors[k]
    where = {0: "on the left", 1: "in the centre", 2: "on the right"}[_slot(scene, k) // 2]
    if kind == "colour":
        return f"What colour is the {a.identity.category}?", f"The {a.identity.category} is {a.identity.color}.", "colour"
    if kind == "position":
        return f"Where is the {a.identity.category}?", f"The {a.identity.category} is {where}.", "position"
    same_col = [j for j in range(len(actors)) if _slot(scene, j) // 2 == _slot(scene, k) // 2]
    if len(same_col) > 1:
        return f"Where is the {a.identity.category}?", f"The {a.identity.category} is {where}.", "position"
    return f"What is {where}?", f"{_cap(noun_phrase(a.identity))}.", "category"


def defined_recognition(
    rng: np.random.Generator, size: int, cur: Curriculum, half: str = "base", text_only: bool = False
) -> dict[str, Any]:
    """Recognition with in-context word definitions; balanced Yes/No; look-alikes as hard negatives."""
    n_def = int(rng.integers(1, cur.max_definitions + 1))
    defined = _identities(rng, n_def, half)
    names: list[str] = []
    while len(names) < n_def:
        nm = nonce_name(rng)
        if nm not in names:
            names.append(nm)
    target = int(rng.integers(n_def))
    positive = rng.random() < 0.5
    actors: list[Any] = []
    lookalike = False
    for j, (nm, ident) in enumerate(zip(names, defined)):
        if (j == target and positive) or (j != target and rng.random() < 0.5):
            actors.append((ident, "concept", nm))
    if not positive and rng.random() < cur.lookalike:
        look, _ = make_lookalike(defined[target], rng, half=half, avoid=set(defined))
        actors.append((look, "distractor", names[target]))
        lookalike = True
    while len(actors) < 1 or (len(actors) < 3 and rng.random() < 0.3):
        other = _identities(rng, 1, half)[0]
        if other not in defined:
            actors.append((other, "other", None))
    perm = rng.permutation(len(actors))
    actors = [actors[j] for j in perm]
    intro = " ".join(f"<{nm}> is {describe(ident)}." for nm, ident in zip(names, defined))
    question = f"{intro} {recognition_question([names[target]])}"
    answer = "Yes" if positive else "No"
    if text_only:
        shown = join_words([describe(a[0]) for a in actors])
        return {"image": None, "question": f"{question} The photo shows {shown}.", "answer": answer,
                "kind": "text_compare", "lookalike": lookalike}
    scene = sample_visible_scene(rng, actors, size)
    return {"image": scene.image, "question": question, "answer": answer, "kind": "defined", "lookalike": lookalike}


def lm_sample(seed: int, index: int, cur: Curriculum, size: int = 192, half: str = "base") -> dict[str, Any]:
    """Sample `index` of the language-model stage: image (PIL or None), question, answer, kind."""
    rng = rng_for(seed, "lm", index)
    roll = rng.choice(4, p=np.array(cur.mix) / sum(cur.mix))
    if roll >= 2:
        return defined_recognition(rng, size, cur, half, text_only=roll == 2)
    scene = sample_visible_scene(rng, _identities(rng, int(rng.integers(1, 4)), half), size)
    if roll == 0:
        return {"image": scene.image, "question": "Describe this photo.", "answer": short_caption(scene),
                "kind": "caption", "categories": sorted({a.identity.category for a in scene.spec.actors})}
    q, a, kind = generic_question(rng, scene)
    return {"image": scene.image, "question": q, "answer": a, "kind": kind}


def named_recognition(seed: int, index: int, size: int = 192, half: str = "personal") -> dict[str, Any]:
    """A named character WITHOUT a definition (what a base without a concept bank faces): should be chance."""
    rng = rng_for(seed, "named", index)
    ident = _identities(rng, 1, half)[0]
    name = nonce_name(rng)
    positive = rng.random() < 0.5
    actors: list[Any] = [(ident, "concept", name)] if positive else []
    if not positive:
        look, _ = make_lookalike(ident, rng, half=half)
        actors.append((look, "distractor", name))
    scene = sample_visible_scene(rng, actors, size)
    return {"image": scene.image, "question": recognition_question([name]), "answer": "Yes" if positive else "No",
            "kind": "named"}


def to_pixels(image: Image.Image | None, size: int) -> np.ndarray:
    if image is None:
        return np.zeros((size, size, 3), dtype=np.uint8)
    return np.asarray(image.convert("RGB").resize((size, size)))
