"""Training and gate data for the proving-ground base, generated in memory from the procedural world.

Three streams, all drawn from one identity half ("base" for training, "personal" for the gate's unseen
characters):
- `scene_pool`: rendered scenes with per-character trait labels and, per patch, the character that owns it
  (vision tower pretraining: every patch names its owner's traits; projector alignment).
- the language-model stage's first six kinds (`tasks.lm_sample` mixes them with the evaluation's tasks): short
  generic captions, colour / category / position questions, and recognition with in-context word definitions of
  made-up names ("<dax> is a red striped cat with round ears. Is <dax> in this photo?"), balanced Yes/No, with a
  curriculum knob (number of definitions, share of look-alike negatives) and a text-only twin of the same
  task (the photo written out as descriptions), which small models learn first and transfer to images.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

from ..datasets.records import recognition_question
from ..errors import McLlavaError
from ..world.corpus import nonce_name, nonce_names
from ..world.questions import join_words
from ..world.render import ACTIONS, HELD_OBJECTS
from ..world.scenes import PROP, SETTING_PHRASES, SETTINGS, RenderedScene, sample_visible_scene
from ..world.traits import VALUES, Identity, describe, make_lookalike, noun_phrase, random_identity

PURPOSES = {"scenes": 101, "lm": 102, "named": 103}


def rng_for(seed: int, purpose: str, index: int) -> np.random.Generator:
    """An independent generator per (seed, purpose, index), apart from the world's own streams."""
    return np.random.default_rng([seed, PURPOSES[purpose], index])


# Per-patch label heads of the vision pretraining: every patch token names the traits of the character that
# owns it (category has an extra "background" class). Local supervision like this generalises; a linear read-out
# of the flattened grid (per scene slot) only memorised the training scenes.
PATCH_TRAITS = ("category", "color", "pattern", "ears", "head", "eyes", "build", "accessory", "accessory_color")
N_SLOTS = 6  # (left, centre, right) x (near, far): positions named in generic questions
MAX_ACTORS = 4


# What a character is doing, read from its patches like its traits by the version-3 tower (`VisionStage.v3`)
ACT_TRAITS = ("action", "held")
LABEL_TRAITS = PATCH_TRAITS + ACT_TRAITS  # the columns of a pool's labels joined with its `acts`
LABEL_VALUES: dict[str, tuple[str, ...]] = {**VALUES, "action": ACTIONS, "held": HELD_OBJECTS}
OPTIONAL_TRAITS = ("accessory_color", "held")  # a missing value (no accessory, empty hands) is its own last class


def trait_classes(traits: tuple[str, ...] = PATCH_TRAITS) -> list[int]:
    """Classes per trait: its values, + "background" for category, + "none" for an optional trait."""
    return [len(LABEL_VALUES[t]) + (1 if t == "category" or t in OPTIONAL_TRAITS else 0) for t in traits]


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


def patch_coverage(mask: np.ndarray, grid: int) -> np.ndarray:
    """Share of each patch of a `grid` x `grid` patching that a bool mask covers ([grid*grid])."""
    size = mask.shape[0]
    return mask.reshape(grid, size // grid, grid, size // grid).mean(axis=(1, 3)).reshape(-1)


HELD_WEIGHT = 3.0  # with `held`, a held object's pixels count this much towards its holder's patch coverage


def held_masks(scene: RenderedScene) -> list[np.ndarray]:
    """Per actor, a bool mask of the object it holds (empty when it holds nothing): each connected piece of the
    scene's held-object pixels goes to the holder whose visible body is nearest on average."""
    out = [np.zeros(scene.labels.shape, bool) for _ in scene.spec.actors]
    holders = [k for k, a in enumerate(scene.spec.actors) if a.held is not None]
    pieces, n = ndimage.label(scene.labels == PROP)
    if not holders or n == 0:
        return out
    dist = np.stack([ndimage.distance_transform_edt(~scene.mask(k)) for k in holders])
    for c in range(1, n + 1):
        m = pieces == c
        out[holders[int(dist[:, m].mean(1).argmin())]] |= m
    return out


def scene_labels(scene: RenderedScene, grid: int, held: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-actor trait labels [MAX_ACTORS, len(PATCH_TRAITS)] (-100 = no actor) and per-patch owner [grid*grid].

    With `held`, what a character holds counts towards the patches it owns (`HELD_WEIGHT` per pixel: the objects
    are small, and most of their pixels fall in patches the body does not own), so that the patches of a
    character show its held object too.
    """
    labels = np.full((MAX_ACTORS, len(PATCH_TRAITS)), -100, dtype=np.int64)
    cover = np.zeros((len(scene.spec.actors) + 1, grid * grid), dtype=np.float32)
    cover[0] = 0.35  # background wins unless a character covers more than 35% of the patch
    objects = held_masks(scene) if held else None
    for k, a in enumerate(scene.spec.actors):
        labels[k] = trait_labels(a.identity)
        cover[k + 1] = patch_coverage(scene.mask(k), grid)
        if objects is not None:
            cover[k + 1] += HELD_WEIGHT * patch_coverage(objects[k], grid)
    return labels, cover.argmax(0) - 1


HELD_PATCH_MIN = 0.06  # a patch shows a held object when the object covers at least this share of it


def held_patch_labels(scene: RenderedScene, owner: np.ndarray, grid: int) -> np.ndarray:
    """Per patch [grid*grid]: the index in HELD_OBJECTS of the object that covers most of it (at least
    `HELD_PATCH_MIN`), "none" (the last class) for a patch a character owns with no object pixel in it, and -100
    elsewhere (background, or an object's edge). The version-3 tower learns from these where objects are: a held
    object is a few pixels, and read from its holder's pooled patches alone it was not learned at all."""
    out = np.where(owner >= 0, len(HELD_OBJECTS), -100).astype(np.int64)
    best = np.zeros(grid * grid, dtype=np.float32)
    for k, mask in enumerate(held_masks(scene)):
        held = scene.spec.actors[k].held
        if held is None or not mask.any():
            continue
        cover = patch_coverage(mask, grid)
        out[(cover > 0) & (out == len(HELD_OBJECTS))] = -100  # an edge of the object: neither it nor none
        shown = (cover >= HELD_PATCH_MIN) & (cover > best)
        out[shown], best[shown] = HELD_OBJECTS.index(held), cover[shown]
    return out


def trait_labels(identity: Identity) -> np.ndarray:
    """[len(PATCH_TRAITS)] class index of each trait (a missing accessory colour is its own last class)."""
    return np.array(
        [
            len(VALUES[t]) if getattr(identity, t) is None else VALUES[t].index(getattr(identity, t))
            for t in PATCH_TRAITS
        ],
        dtype=np.int64,
    )


def act_labels(scene: RenderedScene) -> np.ndarray:
    """Per-actor [MAX_ACTORS, len(ACT_TRAITS)]: action index and held-object index (empty hands: the last class);
    -100 = no actor."""
    out = np.full((MAX_ACTORS, len(ACT_TRAITS)), -100, dtype=np.int64)
    for k, a in enumerate(scene.spec.actors):
        held = len(HELD_OBJECTS) if a.held is None else HELD_OBJECTS.index(a.held)
        out[k] = (ACTIONS.index(a.action), held)
    return out


def slot_labels(scene: RenderedScene) -> np.ndarray:
    """Trait labels per scene position [N_SLOTS, len(PATCH_TRAITS)] (-100 = nobody there).

    A scene places each character at a distinct (column, depth) slot (`_slot`: left / centre / right x near / far),
    so "what stands where" is a fixed-size table: the `"slots"` token layout shows it one row per slot.
    """
    out = np.full((N_SLOTS, len(PATCH_TRAITS)), -100, dtype=np.int64)
    for k, a in enumerate(scene.spec.actors):
        out[_slot(scene, k)] = trait_labels(a.identity)
    return out


MIRROR_SLOTS = [(2 - s // 2) * 2 + s % 2 for s in range(N_SLOTS)]  # slot of each slot in the mirrored scene


def patch_labels(labels: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """Per-patch trait labels [B, P, T] from per-actor labels [B, A, T] and owners [B, P] (-1 = background)."""
    out = torch.gather(labels, 1, owner.clamp_min(0).unsqueeze(-1).expand(-1, -1, labels.shape[-1]))
    bg = owner < 0
    out[bg] = -100
    out[..., 0][bg] = len(VALUES["category"])  # the background class
    return out


@dataclass
class ScenePool:
    pixels: torch.Tensor  # [n, H, W, 3] uint8
    labels: torch.Tensor  # [n, MAX_ACTORS, len(PATCH_TRAITS)]
    owner: torch.Tensor  # [n, grid*grid] actor index or -1
    descs: list[list[str]]  # per scene, per actor: short description (the projector alignment target)
    slots: torch.Tensor | None = None  # [n, N_SLOTS, len(PATCH_TRAITS)]: who stands where (`slot_labels`)
    acts: torch.Tensor | None = None  # [n, MAX_ACTORS, len(ACT_TRAITS)]: what each character does (`act_labels`)
    setting: torch.Tensor | None = None  # [n]: index of the scene's setting in SETTINGS
    held_patch: torch.Tensor | None = None  # [n, grid*grid]: the held object each patch shows (`held_patch_labels`)


def full_labels(pool: dict) -> torch.Tensor:
    """A pool's per-actor labels with the LABEL_TRAITS columns ([n, MAX_ACTORS, 11]), or only PATCH_TRAITS' for
    a pool rendered before `acts` existed."""
    acts = pool.get("acts")
    return pool["labels"] if acts is None else torch.cat([pool["labels"], acts], -1)


def _render_chunk(args: tuple[int, int, int, int, int, str, bool]) -> tuple:
    seed, start, stop, size, grid, half, held = args
    n = stop - start
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    labels = np.zeros((n, MAX_ACTORS, len(PATCH_TRAITS)), dtype=np.int64)
    owner = np.zeros((n, grid * grid), dtype=np.int64)
    slots = np.zeros((n, N_SLOTS, len(PATCH_TRAITS)), dtype=np.int64)
    acts = np.zeros((n, MAX_ACTORS, len(ACT_TRAITS)), dtype=np.int64)
    setting = np.zeros(n, dtype=np.int64)
    held_patch = np.full((n, grid * grid), -100, dtype=np.int64)
    descs = []
    for j, i in enumerate(range(start, stop)):
        rng = rng_for(seed, "scenes", i)
        scene = sample_visible_scene(rng, _identities(rng, int(rng.integers(1, MAX_ACTORS + 1)), half), size)
        pixels[j] = np.asarray(scene.image.convert("RGB"))
        labels[j], owner[j] = scene_labels(scene, grid, held)
        slots[j], acts[j] = slot_labels(scene), act_labels(scene)
        setting[j] = SETTINGS.index(scene.spec.setting)
        if held:
            held_patch[j] = held_patch_labels(scene, owner[j], grid)
        descs.append([describe(a.identity, "short") for a in scene.spec.actors])
    return pixels, labels, owner, descs, slots, acts, setting, held_patch


def scene_pool(
    seed: int,
    n: int,
    size: int = 192,
    grid: int = 6,
    half: str = "base",
    progress: bool = False,
    workers: int = 2,
    held: bool = False,
) -> ScenePool:
    """`n` rendered scenes of 1-4 characters from `half`, with labels for vision pretraining and alignment
    (`held`: held objects count towards their holders' patches, `scene_labels`, and each patch is labelled with
    the object it shows, `held_patch_labels`).

    Scene i depends only on (seed, i), so the pool is the same however many processes render it.
    """

    step = 500
    jobs = [(seed, a, min(a + step, n), size, grid, half, held) for a in range(0, n, step)]
    bar = tqdm(total=n, desc="render scenes", disable=not progress, mininterval=5)
    parts = []
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as ex:
            for part in ex.map(_render_chunk, jobs):
                parts.append(part)
                bar.update(len(part[0]))
    else:
        for job in jobs:
            parts.append(_render_chunk(job))
            bar.update(len(parts[-1][0]))
    bar.close()
    return ScenePool(
        torch.from_numpy(np.concatenate([p[0] for p in parts])),
        torch.from_numpy(np.concatenate([p[1] for p in parts])),
        torch.from_numpy(np.concatenate([p[2] for p in parts])),
        [d for p in parts for d in p[3]],
        *(torch.from_numpy(np.concatenate([p[j] for p in parts])) for j in (4, 5, 6)),
        torch.from_numpy(np.concatenate([p[7] for p in parts])) if held else None,
    )


# ------------------------------------------------------------------------------------------------ LM samples
KINDS = ("caption", "vqa", "text_compare", "defined", "visual_defined", "visual_caption")
# the tasks of the MC-LLaVA evaluation (`tasks.py`), weighed by `Curriculum.tasks` next to the six kinds of `mix`
TASK_KINDS = ("choice", "open", "where", "named_caption", "facts")


@dataclass
class Curriculum:
    """What the samples look like at one point of training.

    `mix` weighs the kinds of `KINDS`: short captions; colour/category/position/exists questions; recognition
    with word definitions written out against the photo written out (text only); recognition with word
    definitions; recognition with *visual* definitions (`<x> is` followed by k projected visual tokens of
    another photo of x: exactly the form a personal concept's soft tokens take later); and captions that name
    the visually defined characters present.
    """

    max_definitions: int = 1  # 1 .. 2 made-up names defined per sample
    lookalike: float = 0.0  # share of negatives where a look-alike of the target stands in for it
    mix: tuple[float, ...] = (0.15, 0.2, 0.1, 0.25, 0.2, 0.1)
    questions: tuple[float, ...] = (1, 1, 1, 1)  # weights of the generic questions' kinds: QUESTION_KINDS
    # share of recognition samples (word or visual definitions) that define two names and ask "are <x> and <y>
    # both in this photo?": Yes when both are there, No when only one is (the other absent, or its look-alike)
    both: float = 0.0
    # weights of `TASK_KINDS` beside `mix` (missing: 0): multiple choice answered with a letter, short open answers,
    # "Where is <x>?", captions naming the defined characters, text-only facts (`tasks.py`)
    tasks: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - set(TASK_KINDS))
        if unknown:
            raise McLlavaError(f"Curriculum.tasks: unknown kind(s) {unknown}; the kinds are {', '.join(TASK_KINDS)}")


# How the quality gate draws recognition with definitions (1-2 names defined, half of the negatives look-alikes);
# the build's held-out pool is drawn the same way
GATE_DEFINITIONS = Curriculum(max_definitions=2, lookalike=0.5)

QUESTION_KINDS = ("exists", "colour", "category", "position")


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def short_caption(scene: RenderedScene) -> str:
    """ "A red striped cat and a person in a blue shirt in the park." (every category named)."""
    names = join_words([noun_phrase(a.identity) for a in scene.spec.actors])
    return f"{_cap(names)} {SETTING_PHRASES[scene.spec.setting]}."


def generic_question(
    rng: np.random.Generator, scene: RenderedScene, weights: tuple[float, ...] = (1, 1, 1, 1)
) -> tuple[str, str, str]:
    """(question, answer, kind) about presence, colour, category or position (kinds weighted by `weights`)."""
    actors = scene.spec.actors
    cats = [a.identity.category for a in actors]
    unique = [k for k, c in enumerate(cats) if cats.count(c) == 1]
    kind = QUESTION_KINDS[rng.choice(len(QUESTION_KINDS), p=np.asarray(weights, float) / sum(weights))]
    if kind == "exists" or not unique:
        c = (
            VALUES["category"][rng.integers(len(VALUES["category"]))]
            if rng.random() < 0.5
            else cats[rng.integers(len(cats))]
        )
        art = "an" if c[0] in "aeiou" else "a"
        return f"Is there {art} {c} in this photo?", ("Yes" if c in cats else "No"), "exists"
    k = unique[rng.integers(len(unique))]
    a = actors[k]
    where = {0: "on the left", 1: "in the centre", 2: "on the right"}[_slot(scene, k) // 2]
    if kind == "colour":
        return (
            f"What colour is the {a.identity.category}?",
            f"The {a.identity.category} is {a.identity.color}.",
            "colour",
        )
    if kind == "position":
        return f"Where is the {a.identity.category}?", f"The {a.identity.category} is {where}.", "position"
    same_col = [j for j in range(len(actors)) if _slot(scene, j) // 2 == _slot(scene, k) // 2]
    if len(same_col) > 1:
        return f"Where is the {a.identity.category}?", f"The {a.identity.category} is {where}.", "position"
    return f"What is {where}?", f"{_cap(noun_phrase(a.identity))}.", "category"


@dataclass
class RecognitionCase:
    """Made-up names and the characters they define, which one is asked about, and who is in the photo."""

    names: list[str]
    defined: list[Identity]
    target: int
    positive: bool
    actors: list[Any]  # (identity, role, name) in render order
    changed: tuple[str, ...] = ()  # a look-alike negative: the traits it changes (what the model had to see); else ()
    both: bool = False  # the question asks about both defined names (two), not the target alone

    @property
    def asked(self) -> list[str]:
        """The names the question asks about."""
        return list(self.names) if self.both else [self.names[self.target]]


def recognition_case(
    rng: np.random.Generator, cur: Curriculum, half: str = "base", positive: bool | None = None
) -> RecognitionCase:
    """Balanced Yes/No: the target is present, or absent (replaced by a look-alike with `cur.lookalike`).

    With `cur.both`, a share of the cases define two names and ask about both: the other one is always shown, so
    a No means "one of them, not both" (what a model that answers "either" gets wrong)."""
    both = positive is None and cur.both > 0 and rng.random() < cur.both
    n_def = 2 if both else int(rng.integers(1, cur.max_definitions + 1))
    defined = _identities(rng, n_def, half)
    names = nonce_names(rng, n_def)
    target = int(rng.integers(n_def))
    positive = bool(rng.random() < 0.5) if positive is None else positive
    actors: list[Any] = []
    changed: tuple[str, ...] = ()
    for j, (nm, ident) in enumerate(zip(names, defined)):
        if (j == target and positive) or (j != target and (both or rng.random() < 0.5)):
            actors.append((ident, "concept", nm))
    if not positive and rng.random() < cur.lookalike:
        look, diff = make_lookalike(defined[target], rng, half=half, avoid=set(defined))
        actors.append((look, "distractor", names[target]))
        changed = tuple(diff)
    while len(actors) < 1 or (len(actors) < 3 and rng.random() < 0.3):
        other = _identities(rng, 1, half)[0]
        if other not in defined:
            actors.append((other, "other", None))
    perm = rng.permutation(len(actors))
    return RecognitionCase(names, defined, target, positive, [actors[j] for j in perm], changed, both)


def defined_recognition(
    rng: np.random.Generator, size: int, cur: Curriculum, half: str = "base", text_only: bool = False
) -> dict[str, Any]:
    """Recognition with in-context word definitions; balanced Yes/No; look-alikes as hard negatives."""
    c = recognition_case(rng, cur, half)
    intro = " ".join(f"<{nm}> is {describe(ident)}." for nm, ident in zip(c.names, c.defined))
    question = f"{intro} {recognition_question(c.asked)}"
    answer = "Yes" if c.positive else "No"
    if text_only:
        shown = join_words([describe(a[0]) for a in c.actors])
        return {
            "image": None,
            "question": f"{question} The photo shows {shown}.",
            "answer": answer,
            "kind": "text_compare",
            "changed": c.changed,
        }
    scene = sample_visible_scene(rng, c.actors, size)
    return {
        "image": scene.image,
        "question": question,
        "answer": answer,
        "kind": "defined",
        "changed": c.changed,
        "slots": slot_labels(scene),
    }


DEFINITION_SLOT = "<image>"  # one slot per definition in the system text; the build fills it with k visual rows


def reference_photo(rng: np.random.Generator, ident: Identity, name: str, size: int, half: str):
    """Another photo of a defined character (alone, or with one stranger) and its bool mask."""
    actors: list[Any] = [(ident, "concept", name)]
    if rng.random() < 0.3:
        other = _identities(rng, 1, half)[0]
        if other != ident:
            actors.append((other, "other", None))
    scene = sample_visible_scene(rng, actors, size)
    k = next(i for i, a in enumerate(scene.spec.actors) if a.identity == ident)
    return scene.image, scene.mask(k)


def visual_defined(
    rng: np.random.Generator, size: int, cur: Curriculum, half: str = "base", caption: bool = False
) -> dict[str, Any]:
    """Recognition (or a caption naming them) with each made-up name defined by another photo of its character.

    The system text is "<x> is <slot>." per name, the form "<c> is <c_1>...<c_k>." takes in personalisation;
    the build writes k-means rows of the reference photo's projected visual tokens into each slot.
    """
    c = recognition_case(rng, cur, half, positive=True if caption else None)
    refs = [reference_photo(rng, ident, nm, size, half) for nm, ident in zip(c.names, c.defined)]
    system = " ".join(f"<{nm}> is {DEFINITION_SLOT}." for nm in c.names)
    scene = sample_visible_scene(rng, c.actors, size)
    out = {"image": scene.image, "system": system, "refs": refs, "changed": c.changed, "slots": slot_labels(scene)}
    if caption:
        named = [f"<{a.ref}>" if a.role == "concept" else noun_phrase(a.identity) for a in scene.spec.actors]
        return {
            **out,
            "question": "Describe this photo.",
            "kind": "visual_caption",
            "answer": f"{_cap(join_words(named))} {SETTING_PHRASES[scene.spec.setting]}.",
            "present": [f"<{a.ref}>" for a in scene.spec.actors if a.role == "concept"],
        }
    return {
        **out,
        "question": recognition_question(c.asked),
        "answer": "Yes" if c.positive else "No",
        "kind": "visual_defined",
    }


def named_recognition(seed: int, index: int, size: int = 192, half: str = "personal") -> dict[str, Any]:
    """A named character WITHOUT a definition (what a base without a concept bank faces): should be chance."""
    rng = rng_for(seed, "named", index)
    ident = _identities(rng, 1, half)[0]
    name = nonce_name(rng)
    positive = rng.random() < 0.5
    actors: list[Any] = [(ident, "concept", name)] if positive else []
    if not positive:
        look, diff = make_lookalike(ident, rng, half=half)
        actors.append((look, "distractor", name))
    scene = sample_visible_scene(rng, actors, size)
    return {
        "image": scene.image,
        "question": recognition_question([name]),
        "answer": "Yes" if positive else "No",
        "kind": "named",
        "changed": () if positive else tuple(diff),
    }


def to_pixels(image: Image.Image | None, size: int) -> np.ndarray:
    if image is None:
        return np.zeros((size, size, 3), dtype=np.uint8)
    return np.asarray(image.convert("RGB").resize((size, size)))
