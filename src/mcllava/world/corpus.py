"""`world corpus`: training data for the proving-ground base model, drawn only from the base half.

Besides generic captions and questions (categories, colours, positions, actions), the corpus teaches the
small base model to compare an in-context word definition with an image ("<dax> is a red striped cat with
round ears ... Is <dax> in this photo?"), answered Yes/No in balance and often against look-alikes. Personal
concepts' learned tokens later take the place of such definitions.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .make import rng_for
from .questions import join_words, position_phrase, recognition_question
from .render import HELD_WORDS
from .scenes import SETTING_PHRASES, RenderedScene, sample_visible_scene
from .traits import CATEGORIES, Identity, describe, make_lookalike, noun_phrase, random_identity

SYLLABLES = ["da", "wu", "ke", "lo", "mi", "zo", "ta", "vi", "ru", "pe", "fo", "gi", "na", "bu", "se", "xi"]
# kinds of corpus samples and their weights
KINDS = {"caption": 0.2, "vqa": 0.25, "defined_recognition": 0.4, "defined_caption": 0.15}


def nonce_name(rng: np.random.Generator) -> str:
    """A made-up name such as "dawu" or "kelozo" (never a concept id of `world make`)."""
    return "".join(SYLLABLES[j] for j in rng.integers(len(SYLLABLES), size=int(rng.integers(2, 4))))


def nonce_names(rng: np.random.Generator, n: int) -> list[str]:
    """`n` different made-up names (`nonce_name`), drawn until there are that many."""
    names: list[str] = []
    while len(names) < n:
        nm = nonce_name(rng)
        if nm not in names:
            names.append(nm)
    return names


def _base_identities(rng: np.random.Generator, k: int) -> list[Identity]:
    out: list[Identity] = []
    while len(out) < k:
        ident = random_identity(rng, "base")
        if ident not in out:
            out.append(ident)
    return out


def _generic_caption(scene: RenderedScene) -> str:
    actors = scene.spec.actors
    names = [noun_phrase(a.identity) for a in actors]
    first = join_words(names)
    parts = [f"{first[0].upper()}{first[1:]} {SETTING_PHRASES[scene.spec.setting]}."]
    for k, a in enumerate(actors):
        doing = a.action + (f" and holding {HELD_WORDS[a.held]}" if a.held else "")
        parts.append(
            f"The {noun_phrase(a.identity).split(' ', 1)[1]} is {doing} {position_phrase(scene, k).split(',')[0]}."
        )
    return " ".join(parts)


def _generic_vqa(rng: np.random.Generator, scene: RenderedScene) -> tuple[str, str]:
    actors = scene.spec.actors
    cats = [a.identity.category for a in actors]
    kind = ["count", "category", "unique", "exists"][rng.integers(4)]
    if kind == "count":
        n = len(actors)
        return (
            "How many characters are in this photo?",
            f"There {'is' if n == 1 else 'are'} {n} {'character' if n == 1 else 'characters'}.",
        )
    if kind == "exists":
        c = CATEGORIES[rng.integers(len(CATEGORIES))]
        art = "an" if c[0] in "aeiou" else "a"
        return f"Is there {art} {c} in this photo?", "Yes" if c in cats else "No"
    unique = [k for k, a in enumerate(actors) if cats.count(a.identity.category) == 1]
    if not unique:
        return "Where was this photo taken?", f"It was taken {SETTING_PHRASES[scene.spec.setting]}."
    k = unique[rng.integers(len(unique))]
    a = actors[k]
    the = f"the {a.identity.category}"
    if kind == "category":
        return (
            f"What is {position_phrase(scene, k).split(',')[0]}?",
            f"{noun_phrase(a.identity)[0].upper()}{noun_phrase(a.identity)[1:]}.",
        )
    q = ["colour", "action", "held", "where"][rng.integers(4)]
    if q == "colour":
        return f"What colour is {the}?", f"{the.capitalize()} is {a.identity.color}."
    if q == "action":
        return f"What is {the} doing?", f"{the.capitalize()} is {a.action}."
    if q == "held":
        return f"What is {the} holding?", (
            f"{the.capitalize()} is holding {HELD_WORDS[a.held]}."
            if a.held
            else f"{the.capitalize()} is not holding anything."
        )
    return f"Where is {the}?", f"{the.capitalize()} is {position_phrase(scene, k)}."


def corpus_sample(seed: int, index: int, size: int = 192) -> dict[str, Any]:
    """Corpus sample `index` for `seed`, in memory: image (PIL), task, question, answer and ground truth.

    Keys: image, task ("caption" | "vqa" | "recognition"), kind, question, answer, definitions ({name:
    description}), concepts (names asked about), present (defined names in the image), objects.
    """
    rng = rng_for(seed, "corpus", index)
    kinds = list(KINDS)
    kind = kinds[rng.choice(len(kinds), p=np.array(list(KINDS.values())))]
    definitions: dict[str, str] = {}
    asked: list[str] = []
    present: list[str] = []
    if kind in ("caption", "vqa"):
        scene = sample_visible_scene(rng, _base_identities(rng, int(rng.integers(1, 5))), size)
        if kind == "caption":
            q, a, task = "Describe this photo.", _generic_caption(scene), "caption"
        else:
            (q, a), task = _generic_vqa(rng, scene), "vqa"
    else:
        n_def = int(rng.integers(1, 5))
        defined = _base_identities(rng, n_def)
        names = nonce_names(rng, n_def)
        definitions = {nm: describe(ident) for nm, ident in zip(names, defined)}
        target = int(rng.integers(n_def))
        positive = rng.random() < 0.5
        actors: list[Any] = []
        for j, (nm, ident) in enumerate(zip(names, defined)):
            shown = (j == target and positive) or (j != target and rng.random() < 0.5)
            if shown:
                actors.append((ident, "concept", nm))
        if not positive and rng.random() < 0.7:  # a look-alike of the target stands in for it
            look, _ = make_lookalike(defined[target], rng, half="base", avoid=set(defined))
            actors.append((look, "distractor", names[target]))
        while len(actors) < 1 or (len(actors) < 4 and rng.random() < 0.3):
            actors.append((_base_identities(rng, 1)[0], "other", None))
        actors = actors[:4]
        scene = sample_visible_scene(rng, actors, size)
        present = [a.ref for a in scene.spec.actors if a.role == "concept"]
        intro = " ".join(f"<{nm}> is {d}." for nm, d in definitions.items())
        if kind == "defined_caption":
            task = "caption"
            q = f"{intro} Describe this photo."
            a = _defined_caption(scene)
            asked = list(present)
        else:
            task = "recognition"
            if len(present) >= 2 and rng.random() < 0.3:
                asked = list(present) if rng.random() < 0.5 else [present[0], names[target]]
                asked = list(dict.fromkeys(asked))
            else:
                asked = [names[target]]
            q = f"{intro} {recognition_question(asked)}"
            a = "Yes" if all(x in present for x in asked) else "No"
    return {
        "image": scene.image,
        "task": task,
        "kind": kind,
        "question": q,
        "answer": a,
        "definitions": definitions,
        "concepts": asked,
        "present": present,
        "objects": scene.objects(),
    }


def _defined_caption(scene: RenderedScene) -> str:
    names = []
    for a in scene.spec.actors:
        names.append(f"<{a.ref}>" if a.role == "concept" else noun_phrase(a.identity))
    first = join_words(names)
    parts = [f"{first[0].upper()}{first[1:]} {SETTING_PHRASES[scene.spec.setting]}."]
    for k, a in enumerate(scene.spec.actors):
        if a.role == "concept":
            parts.append(f"<{a.ref}> is {a.action} {position_phrase(scene, k).split(',')[0]}.")
    return " ".join(parts)


def corpus_samples(seed: int = 0, n: int | None = None, size: int = 192, start: int = 0) -> Iterator[dict[str, Any]]:
    """Yield corpus samples `start`, `start`+1, ... (forever when n is None) without writing files."""
    k = start
    while n is None or k < start + n:
        yield corpus_sample(seed, k, size)
        k += 1


def write_corpus(
    out: str | Path, seed: int = 0, n: int = 1000, size: int = 192, progress: bool = True
) -> dict[str, Any]:
    """Write `out/corpus.jsonl` and `out/images/<k>.png`; returns counts per kind."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    with open(out / "corpus.jsonl", "w") as f:
        for k, s in enumerate(tqdm(corpus_samples(seed, n, size), total=n, desc="world corpus", disable=not progress)):
            rel = f"images/{k}.png"
            s["image"].save(out / rel, format="PNG")
            s = {**s, "image": rel}
            f.write(json.dumps(s) + "\n")
            counts[s["kind"]] = counts.get(s["kind"], 0) + 1
    return {"out": str(out), "n": n, "kinds": counts}
