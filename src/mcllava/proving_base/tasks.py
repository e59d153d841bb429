"""The language-model stage's samples of every task of the MC-LLaVA evaluation, and the mix of all kinds.

`lm_sample` draws one sample of a `Curriculum`: the six kinds of `data.KINDS` (captions, generic questions,
recognition with word or visual definitions) and the evaluation's tasks (`data.TASK_KINDS`):
- `choice`: a question about a defined character with three lettered options, worded as `mcllava eval` asks it
  (ours or the official form), answered with the bare letter;
- `open`: a short open answer about a defined character (action, held object, position, setting, kind, left or
  right of another), in the reference answers' wording;
- `where`: "Where is <x>?" -> "<x> is on the left, near the camera." (grounding's wording);
- `named_caption`: a caption naming the defined characters present as <x>, and nobody else;
- `facts`: text only: the system text introduces characters with their description and facts, and the question
  asks one (open, or as a lettered choice).
Every visual task defines 1-3 made-up names in the system text, by words ("<x> is a red striped cat ...") or by
visual rows ("<x> is <image>.", filled with k-means rows of another photo of x, the form a personal concept
takes); names defined but absent often leave a look-alike in the photo. The questions and answers come from the
world's own sentence functions (`world.questions`), so that training wording is test wording.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..evaluate import format_question
from ..scoring_official import PROMPTS
from ..world.corpus import nonce_names
from ..world.questions import (
    SceneFacts,
    caption,
    caption_and_grounding,
    fact_records,
    make_choice,
    make_facts,
    older_records,
    position_phrase,
    record,
    tok,
    visual_records,
)
from ..world.scenes import RenderedScene, sample_visible_scene
from ..world.traits import CATEGORIES, Identity, describe, make_lookalike, noun_phrase
from .data import (
    DEFINITION_SLOT,
    KINDS,
    TASK_KINDS,
    Curriculum,
    _identities,
    defined_recognition,
    generic_question,
    reference_photo,
    rng_for,
    short_caption,
    slot_labels,
    visual_defined,
)

VISUAL_SHARE = 0.6  # share of visual samples whose names are defined by visual rows (else by words)
PRESENT = 0.6  # chance that each defined name is in the photo (at least one is, for questions about one)
POSITIONS = [
    f"{h}, {d}"
    for h in ("on the left", "in the centre", "on the right")
    for d in ("near the camera", "in the background")
]


@dataclass
class DefinedScene:
    """A photo with 1-3 defined names (some absent, look-alikes about) and the system text that defines them."""

    names: list[str]  # ids without brackets, in the order the system text introduces them
    defined: list[Identity]
    visual: bool  # defined by visual rows (refs) rather than words
    scene: RenderedScene
    facts: SceneFacts
    system: str
    refs: list[Any]  # (image, mask) of another photo per name, when visual
    changed: tuple[str, ...]  # the traits the look-alikes in the photo change

    def sample(self, kind: str, question: str, answer: str, **extra: Any) -> dict[str, Any]:
        return {
            "image": self.scene.image,
            "system": self.system,
            "refs": self.refs,
            "question": question,
            "answer": answer,
            "kind": kind,
            "form": "visual" if self.visual else "words",
            "names": [tok(c) for c in self.names],
            "present": [tok(c) for c in self.facts.present],
            "changed": self.changed,
            "slots": slot_labels(self.scene),
            **extra,
        }


def defined_scene(rng: np.random.Generator, size: int, half: str = "base", min_present: int = 1) -> DefinedScene:
    """1-3 names defined by words or visual rows; each in the photo with chance PRESENT (at least `min_present`);
    an absent one's look-alike stands in half of the time, a present one's twin stands beside it a fifth of the
    time, and strangers fill up to four characters."""
    n_def = int(rng.integers(1, 4))
    defined, names = _identities(rng, n_def, half), nonce_names(rng, n_def)
    present = [j for j in range(n_def) if rng.random() < PRESENT]
    while len(present) < min_present:
        present.append(int(rng.choice([j for j in range(n_def) if j not in present])))
    actors: list[Any] = [(defined[j], "concept", names[j]) for j in sorted(present)]
    changed: list[str] = []
    twins = [j for j in range(n_def) if j not in present and rng.random() < 0.5]
    if present and rng.random() < 0.2:
        twins.append(present[int(rng.integers(len(present)))])
    for j in twins[: 4 - len(actors)]:
        look, diff = make_lookalike(defined[j], rng, half=half, avoid=set(defined))
        actors.append((look, "distractor", None))
        changed += [t for t in diff if t not in changed]
    while len(actors) < 1 or (len(actors) < 4 and rng.random() < 0.3):
        other = _identities(rng, 1, half)[0]
        if other not in defined:
            actors.append((other, "other", None))
    actors = [actors[j] for j in rng.permutation(len(actors))]
    scene = sample_visible_scene(rng, actors, size)
    visual = bool(rng.random() < VISUAL_SHARE)
    refs = [reference_photo(rng, ident, nm, size, half) for nm, ident in zip(names, defined)] if visual else []
    system = " ".join(
        f"{tok(nm)} is {DEFINITION_SLOT if visual else describe(ident)}." for nm, ident in zip(names, defined)
    )
    return DefinedScene(names, defined, visual, scene, SceneFacts(scene, names), system, refs, tuple(changed))


def question_kind(question: str) -> str:
    """What a world question asks, read off its wording (`world.questions`): action, held, accessory, color,
    position, setting, category, relative or where."""
    for cue, kind in (
        ("doing?", "action"),
        ("holding?", "held"),
        ("'s ", "accessory"),
        ("What colour", "color"),
        ("Which part", "position"),
        ("in this photo?", "setting"),
        ("What kind", "category"),
        ("left or to the right", "relative"),
        ("Where is", "where"),
    ):
        if cue in question:
            return kind
    raise ValueError(f"not a question form of the world: {question!r}")


def _ask(rng: np.random.Generator, rec: dict, names: list[str]) -> str:
    """The record's question as `mcllava eval` asks it, in our wording or the official one (half each)."""
    return format_question(rec, PROMPTS[int(rng.integers(len(PROMPTS)))], names)


def choice_sample(rng: np.random.Generator, size: int, half: str = "base") -> dict[str, Any]:
    """A lettered choice about a present defined character: the world's choice questions (action, held object,
    colour, accessory colour), or its kind or part of the photo; the answer is the bare letter."""
    ds = defined_scene(rng, size, half)
    present = ds.facts.present
    form = ("world", "category", "position")[rng.choice(3, p=[0.7, 0.15, 0.15])]
    if form == "world":
        rec = visual_records(rng, "", ds.facts, n_choice=1, n_vqa=0)[0]
    else:
        c = present[int(rng.integers(len(present)))]
        k = ds.facts.index[c]
        if form == "category":
            q, correct, pool = f"What kind of character is {tok(c)}?", ds.facts.actor(c).identity.category, CATEGORIES
        else:
            q, correct, pool = f"Which part of the photo is {tok(c)} in?", position_phrase(ds.scene, k), POSITIONS
        options, letter = make_choice(rng, correct, list(pool))
        rec = record("", "choice", q, letter, [c], present, None, options)
    return ds.sample(
        "choice",
        _ask(rng, rec, ds.names),
        rec["answer"],
        options=rec["options"],
        truth=rec["options"][rec["answer"]],
        sub=question_kind(rec["question"]),
        about=[tok(c) for c in rec["concepts"]],
    )


def open_sample(rng: np.random.Generator, size: int, half: str = "base") -> dict[str, Any]:
    """A short open answer about a present defined character, as the world's VQA records word it ("<x> is
    jumping.", "<x> is to the left of <y>.")."""
    ds = defined_scene(rng, size, half)
    recs: list[dict] = []
    while not recs:  # a left/right question about two characters at the same x is skipped by the world: redraw
        recs = visual_records(rng, "", ds.facts, n_choice=0, n_vqa=1)
    rec = recs[0]
    head = f"{tok(rec['concepts'][0])} is "
    return ds.sample(
        "open",
        rec["question"],
        rec["answer"],
        sub=question_kind(rec["question"]),
        key=rec["answer"].removeprefix(head).rstrip("."),  # what the answer says beyond the name
        about=[tok(c) for c in rec["concepts"]],
    )


def where_sample(rng: np.random.Generator, size: int, half: str = "base") -> dict[str, Any]:
    """ "Where is <x>?" -> "<x> is on the left, near the camera." (the world's grounding record)."""
    ds = defined_scene(rng, size, half)
    recs = [r for r in caption_and_grounding("", ds.facts) if r["task"] == "grounding"]
    rec = recs[int(rng.integers(len(recs)))]
    c = rec["concepts"][0]
    return ds.sample(
        "where",
        rec["question"],
        rec["answer"],
        sub="where",
        key=position_phrase(ds.scene, ds.facts.index[c]),
        about=[tok(c)],
    )


def named_caption_sample(rng: np.random.Generator, size: int, half: str = "base") -> dict[str, Any]:
    """ "Describe this photo." (or the official caption prompt naming every defined character) -> the world's
    caption: the defined characters present as <x>, look-alikes and strangers described, nobody else named."""
    ds = defined_scene(rng, size, half, min_present=0)
    rec = record("", "caption", "Describe this photo.", caption(ds.facts), ds.names, ds.facts.present)
    return ds.sample("named_caption", _ask(rng, rec, ds.names), rec["answer"], sub="caption")


def facts_sample(rng: np.random.Generator, half: str = "base") -> dict[str, Any]:
    """Text only: the system text introduces 1-2 characters (description, then each fact as its question and
    answer) and the question asks one fact, open (the bare answer) or as a lettered choice, which of two is
    older (a letter), or what kind of character one is."""
    n = int(rng.integers(1, 3))
    idents, names = _identities(rng, n, half), nonce_names(rng, n)
    profiles = {nm: make_facts(rng, nm) for nm in names}
    system = " ".join(
        f"{tok(nm)} is {describe(ident)}. " + " ".join(f"{f['question']} {f['answer']}." for f in profiles[nm])
        for nm, ident in zip(names, idents)
    )
    j = int(rng.integers(n))
    c, facts = names[j], profiles[names[j]]
    older = older_records(rng, profiles, names) if n == 2 else []
    sub = ("fact", "fact_choice", "older", "category")[rng.choice(4, p=[0.4, 0.3, 0.15, 0.15])]
    if sub == "older" and not older:
        sub = "fact_choice"
    if sub == "fact":
        f = facts[int(rng.integers(len(facts)))]
        question, answer = f["question"], f["answer"]
    elif sub == "category":
        question, answer = f"What kind of character is {tok(c)}?", f"{tok(c)} is {noun_phrase(idents[j])}."
    else:
        recs = older if sub == "older" else [r for r in fact_records(rng, c, facts) if r["task"] == "choice"]
        rec = recs[int(rng.integers(len(recs)))]
        question, answer = _ask(rng, rec, names), rec["answer"]
    return {
        "image": None,
        "system": system,
        "question": question,
        "answer": answer,
        "kind": "facts",
        "sub": sub,
        "names": [tok(nm) for nm in names],
    }


TASKS = {
    "choice": choice_sample,
    "open": open_sample,
    "where": where_sample,
    "named_caption": named_caption_sample,
}


def task_sample(rng: np.random.Generator, kind: str, size: int = 192, half: str = "base") -> dict[str, Any]:
    """One sample of an evaluation task (`data.TASK_KINDS`)."""
    if kind == "facts":
        return facts_sample(rng, half)
    return TASKS[kind](rng, size, half)


def lm_sample(seed: int, index: int, cur: Curriculum, size: int = 192, half: str = "base") -> dict[str, Any]:
    """Sample `index` of the language-model stage: image (PIL or None), question, answer, kind (+ system, refs,
    and with an image its `slot_labels`). The kind is drawn by `cur.mix` over `data.KINDS` and `cur.tasks` over
    `data.TASK_KINDS`; without task weights the draw is the six-kind draw of earlier builds, sample for sample."""
    rng = rng_for(seed, "lm", index)
    if any(cur.tasks.values()):
        weights = np.array(list(cur.mix) + [cur.tasks.get(k, 0.0) for k in TASK_KINDS], float)
        kind = (KINDS + TASK_KINDS)[rng.choice(len(weights), p=weights / weights.sum())]
    else:
        kind = KINDS[rng.choice(len(KINDS), p=np.array(cur.mix) / sum(cur.mix))]
    if kind in TASK_KINDS:
        return task_sample(rng, kind, size, half)
    if kind in ("text_compare", "defined"):
        return defined_recognition(rng, size, cur, half, text_only=kind == "text_compare")
    if kind in ("visual_defined", "visual_caption"):
        return visual_defined(rng, size, cur, half, caption=kind == "visual_caption")
    scene = sample_visible_scene(rng, _identities(rng, int(rng.integers(1, 4)), half), size)
    if kind == "caption":
        return {
            "image": scene.image,
            "question": "Describe this photo.",
            "answer": short_caption(scene),
            "kind": "caption",
            "categories": sorted({a.identity.category for a in scene.spec.actors}),
            "slots": slot_labels(scene),
        }
    q, a, kind = generic_question(rng, scene, cur.questions)
    return {"image": scene.image, "question": q, "answer": a, "kind": kind, "slots": slot_labels(scene)}
