"""Questions and reference answers about rendered scenes, read off the exact ground truth.

Concepts appear as ``<id>`` in questions and answers. Records follow DESIGN.md's ``tests.jsonl`` format:
``{"image", "task", "question", "answer", "options"?, "concepts", "present", "boxes"}``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..datasets.records import recognition_question  # noqa: F401  (one template for all)
from .render import ACTIONS, HELD_OBJECTS, HELD_WORDS
from .scenes import SETTING_PHRASES, RenderedScene, horizontal_word
from .traits import ACCESSORY_COLORS, COLORS, noun_phrase

LETTERS = "ABC"
NOTHING = "nothing"


def tok(cid: str) -> str:
    return f"<{cid}>"


def join_words(words: list[str], conj: str = "and") -> str:
    """ "a", "a and b", "a, b and c"."""
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + f" {conj} " + words[-1]


def record(
    image: str | None,
    task: str,
    question: str,
    answer: str,
    concepts: list[str],
    present: list[str],
    boxes: dict[str, list[int]] | None = None,
    options: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One tests.jsonl record (options only for choice questions)."""
    rec: dict[str, Any] = {"image": image, "task": task, "question": question, "answer": answer}
    if options is not None:
        rec["options"] = options
    rec.update({"concepts": list(concepts), "present": list(present), "boxes": dict(boxes or {})})
    return rec


def make_choice(rng: np.random.Generator, correct: str, pool: list[str], n: int = 3) -> tuple[dict[str, str], str]:
    """Options A.. with `correct` and n-1 other values from `pool`, shuffled; returns (options, letter)."""
    others = [p for p in dict.fromkeys(pool) if p != correct]
    picks = [others[j] for j in rng.choice(len(others), size=min(n - 1, len(others)), replace=False)]
    values = picks + [correct]
    rng.shuffle(values)
    options = {LETTERS[k]: v for k, v in enumerate(values)}
    return options, LETTERS[values.index(correct)]


def position_phrase(scene: RenderedScene, index: int) -> str:
    """ "on the left, near the camera" from the visible box and the depth of actor `index`."""
    box = scene.box(index)
    if box is None:
        return "hidden"
    where = {"left": "on the left", "centre": "in the centre", "right": "on the right"}[
        horizontal_word(box, scene.spec.size)
    ]
    depth = "near the camera" if scene.spec.actors[index].depth == "near" else "in the background"
    return f"{where}, {depth}"


def _doing(action: str, held: str | None) -> str:
    return action + (f" and holding {HELD_WORDS[held]}" if held else "")


class SceneFacts:
    """Who is where in a rendered scene, keyed by concept id (concepts only; others listed apart)."""

    def __init__(self, scene: RenderedScene, concept_order: list[str]):
        self.scene = scene
        actors = scene.spec.actors
        self.index = {a.ref: k for k, a in enumerate(actors) if a.role == "concept" and a.ref}
        self.present = [c for c in concept_order if c in self.index]
        self.boxes = {c: scene.box(self.index[c]) for c in self.present}
        self.others = [k for k, a in enumerate(actors) if a.role != "concept"]

    def actor(self, cid: str):
        return self.scene.spec.actors[self.index[cid]]


def visual_records(
    rng: np.random.Generator, image: str, facts: SceneFacts, n_choice: int = 1, n_vqa: int = 2
) -> list[dict]:
    """Visual choice and VQA questions (attributes, actions, held objects, positions) about present concepts."""
    out: list[dict] = []
    present, boxes = facts.present, facts.boxes
    if not present:
        return out
    for _ in range(n_choice):
        c = present[rng.integers(len(present))]
        a = facts.actor(c)
        kinds = ["action", "held", "color"] + (["accessory"] if a.identity.accessory != "none" else [])
        kind = kinds[rng.integers(len(kinds))]
        if kind == "action":
            q, correct, pool = f"What is {tok(c)} doing?", a.action, list(ACTIONS)
        elif kind == "held":
            q = f"What is {tok(c)} holding?"
            correct = HELD_WORDS[a.held] if a.held else NOTHING
            pool = [HELD_WORDS[h] for h in HELD_OBJECTS] + [NOTHING]
        elif kind == "color":
            q, correct, pool = f"What colour is {tok(c)}?", a.identity.color, list(COLORS)
        else:
            q = f"What colour is {tok(c)}'s {a.identity.accessory}?"
            correct, pool = str(a.identity.accessory_color), list(ACCESSORY_COLORS)
        options, letter = make_choice(rng, correct, pool)
        out.append(record(image, "choice", q, letter, [c], present, boxes, options))
    for _ in range(n_vqa):
        c = present[rng.integers(len(present))]
        a, t = facts.actor(c), tok(c)
        kinds = ["action", "held", "position", "setting", "category"]
        if len(present) >= 2:
            kinds += ["relative", "relative"]
        kind = kinds[rng.integers(len(kinds))]
        if kind == "action":
            q, ans = f"What is {t} doing?", f"{t} is {a.action}."
        elif kind == "held":
            q = f"What is {t} holding?"
            ans = f"{t} is holding {HELD_WORDS[a.held]}." if a.held else f"{t} is not holding anything."
        elif kind == "position":
            q, ans = f"Which part of the photo is {t} in?", f"{t} is {position_phrase(facts.scene, facts.index[c])}."
        elif kind == "setting":
            q, ans = f"Where is {t} in this photo?", f"{t} is {SETTING_PHRASES[facts.scene.spec.setting]}."
        elif kind == "category":
            q, ans = f"What kind of character is {t}?", f"{t} is {noun_phrase(a.identity)}."
        else:
            others = [o for o in present if o != c]
            o = others[rng.integers(len(others))]
            dx = (boxes[c][0] + boxes[c][2]) / 2 - (boxes[o][0] + boxes[o][2]) / 2
            if abs(dx) < 6:
                continue
            q = f"Is {t} to the left or to the right of {tok(o)}?"
            ans = f"{t} is to the {'left' if dx < 0 else 'right'} of {tok(o)}."
            out.append(record(image, "vqa", q, ans, [c, o], present, boxes))
            continue
        out.append(record(image, "vqa", q, ans, [c], present, boxes))
    return out


def caption(facts: SceneFacts) -> str:
    """A reference caption naming every present concept as <id> and describing the other characters."""
    scene = facts.scene
    actors = scene.spec.actors
    names = [tok(c) for c in facts.present] + [noun_phrase(actors[k].identity) for k in facts.others]
    first = join_words(names)
    first = first[0].upper() + first[1:] if not first.startswith("<") else first
    parts = [f"{first} {SETTING_PHRASES[scene.spec.setting]}."]
    for c in facts.present:
        a = facts.actor(c)
        parts.append(f"{tok(c)} is {_doing(a.action, a.held)} {position_phrase(scene, facts.index[c]).split(',')[0]}.")
    return " ".join(parts)


def caption_and_grounding(image: str, facts: SceneFacts) -> list[dict]:
    """The caption record (all present concepts) and one grounding record per present concept."""
    if not facts.present:
        return []
    out = [record(image, "caption", "Describe this photo.", caption(facts), facts.present, facts.present, facts.boxes)]
    for c in facts.present:
        where = position_phrase(facts.scene, facts.index[c])
        out.append(
            record(
                image,
                "grounding",
                f"Where is {tok(c)}?",
                f"{tok(c)} is {where}.",
                [c],
                facts.present,
                {c: facts.boxes[c]},
            )
        )
    return out


# ----------------------------------------------------------------------------- text-only (profiles)

FOODS = [
    "pizza",
    "carrots",
    "fish",
    "pancakes",
    "apples",
    "noodles",
    "cheese",
    "berries",
    "rice",
    "cookies",
    "soup",
    "bananas",
]
FRIENDS = ["Mia", "Leo", "Sara", "Tom", "Nina", "Omar", "Lucy", "Ken", "Ada", "Raj"]
HABITS = [
    "napping in the sun",
    "singing in the morning",
    "chasing leaves",
    "reading comics",
    "collecting stones",
    "dancing in the rain",
    "hiding under the bed",
    "building block towers",
    "watching birds",
    "baking bread",
]
HOMES = ["Lakeside", "Hillview", "Riverton", "Seaport", "Oakdale", "Pine Hollow", "Maplewood", "Sunnyvale"]
AGES = [f"{k} years old" for k in range(2, 13)]


def make_facts(rng: np.random.Generator, cid: str, age: str | None = None) -> list[dict[str, str]]:
    """A profile's facts as {question, answer} pairs, questions naming the concept as <id>."""
    t = tok(cid)
    pick = lambda pool: pool[int(rng.integers(len(pool)))]  # noqa: E731
    return [
        {"question": f"What is {t}'s favourite food?", "answer": pick(FOODS)},
        {"question": f"How old is {t}?", "answer": age or pick(AGES)},
        {"question": f"Who is {t}'s best friend?", "answer": pick(FRIENDS)},
        {"question": f"What does {t} like doing?", "answer": pick(HABITS)},
        {"question": f"Where does {t} live?", "answer": f"in {pick(HOMES)}"},
    ]


_FACT_POOLS = [FOODS, AGES, FRIENDS, HABITS, [f"in {h}" for h in HOMES]]


def fact_records(rng: np.random.Generator, cid: str, facts: list[dict[str, str]]) -> list[dict]:
    """Text-only records from a profile: a choice question (image null) and an open one (task "text") per fact."""
    out = []
    for k, f in enumerate(facts):
        pool = _FACT_POOLS[k] if k < len(_FACT_POOLS) else [x["answer"] for x in facts]
        options, letter = make_choice(rng, f["answer"], pool)
        out.append(record(None, "choice", f["question"], letter, [cid], [], None, options))
        out.append(record(None, "text", f["question"], f["answer"], [cid], [], None))
    return out


def older_records(rng: np.random.Generator, profiles: dict[str, list[dict[str, str]]], group: list[str]) -> list[dict]:
    """Multi-concept text choice: "Who is older, <a> or <b>?" for pairs in a group with different ages."""
    out = []
    ages = {c: int(profiles[c][1]["answer"].split()[0]) for c in group}
    for i, a in enumerate(group):
        for b in group[i + 1 :]:
            if ages[a] == ages[b]:
                continue
            pair = [a, b] if rng.random() < 0.5 else [b, a]
            options = {"A": tok(pair[0]), "B": tok(pair[1])}
            older = a if ages[a] > ages[b] else b
            q = f"Who is older, {tok(pair[0])} or {tok(pair[1])}?"
            out.append(record(None, "choice", q, "A" if pair[0] == older else "B", pair, [], None, options))
    return out
