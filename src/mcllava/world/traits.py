"""Characters as fixed combinations of named traits, their sentences, look-alikes and the identity split.

Every trait value is a word, so any character can be described in a sentence and asked about. The identity
space is split once and for all into a "personal" half (test concepts, `world make`) and a "base" half (the
corpus the proving-ground base model trains on) by a stable hash of the traits, so the base model can never
have seen a test concept.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

CATEGORIES = ("cat", "dog", "bird", "robot", "person", "plush toy")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (208, 48, 44),
    "orange": (236, 128, 32),
    "yellow": (240, 206, 54),
    "green": (66, 160, 72),
    "blue": (52, 96, 204),
    "purple": (128, 64, 168),
    "pink": (238, 130, 176),
    "brown": (128, 82, 46),
    "grey": (134, 134, 140),
    "white": (236, 236, 230),
}
PATTERNS = ("plain", "striped", "spotted", "checked", "two-tone")
ACCESSORIES = ("none", "hat", "scarf", "glasses", "bow tie", "backpack")
ACCESSORY_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (30, 30, 34),
    "red": (200, 30, 40),
    "blue": (30, 70, 190),
    "yellow": (245, 200, 20),
    "green": (30, 130, 60),
    "white": (250, 250, 250),
}
EAR_SHAPES = ("round", "pointed", "floppy")
HEAD_SHAPES = ("round", "square")
EYE_SPACINGS = ("close-set", "wide-set")
BUILDS = ("slim", "stocky")

# What "ears" are on each category, and how each ear shape reads for it.
EAR_WORDS: dict[str, dict[str, str]] = {
    "cat": {"round": "round ears", "pointed": "pointed ears", "floppy": "floppy ears"},
    "dog": {"round": "round ears", "pointed": "pointed ears", "floppy": "floppy ears"},
    "bird": {"round": "a round crest", "pointed": "a pointed crest", "floppy": "a drooping crest"},
    "robot": {"round": "ball antennae", "pointed": "spike antennae", "floppy": "bent antennae"},
    "person": {"round": "curly hair", "pointed": "spiky hair", "floppy": "long hair"},
    "plush toy": {"round": "round ears", "pointed": "pointed ears", "floppy": "floppy ears"},
}

# Traits in description order; a distractor changes one or two of `LOOKALIKE_TRAITS`.
TRAITS = ("category", "color", "pattern", "ears", "head", "eyes", "build", "accessory", "accessory_color")
LOOKALIKE_TRAITS = ("color", "pattern", "ears", "head", "eyes", "build", "accessory", "accessory_color")
VALUES: dict[str, tuple[str, ...]] = {
    "category": CATEGORIES,
    "color": tuple(COLORS),
    "pattern": PATTERNS,
    "ears": EAR_SHAPES,
    "head": HEAD_SHAPES,
    "eyes": EYE_SPACINGS,
    "build": BUILDS,
    "accessory": ACCESSORIES,
    "accessory_color": tuple(ACCESSORY_COLORS),
}


@dataclass(frozen=True, order=True)
class Identity:
    """One character: a fixed combination of traits (accessory_color is None exactly when accessory is none)."""

    category: str
    color: str
    pattern: str
    ears: str
    head: str
    eyes: str
    build: str
    accessory: str = "none"
    accessory_color: str | None = None

    def __post_init__(self) -> None:
        for name in TRAITS:
            value = getattr(self, name)
            if name == "accessory_color" and value is None and self.accessory == "none":
                continue
            if value not in VALUES[name]:
                raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(VALUES[name])}")
        if self.accessory == "none" and self.accessory_color is not None:
            raise ValueError("an identity without accessory has no accessory_color")

    @property
    def key(self) -> str:
        """A stable text key of the traits (used for hashing, caching and world.json)."""
        return "|".join(str(getattr(self, t)) for t in TRAITS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Identity:
        return cls(**{t: d.get(t) for t in TRAITS})


def is_personal_half(identity: Identity) -> bool:
    """Whether an identity belongs to the personal half (test concepts) rather than the base half (corpus)."""
    return hashlib.sha256(identity.key.encode()).digest()[0] % 2 == 0


def accessory_phrase(identity: Identity) -> str:
    """ "a blue hat", "red glasses", or "" for no accessory."""
    if identity.accessory == "none":
        return ""
    if identity.accessory == "glasses":
        return f"{identity.accessory_color} glasses"
    return f"a {identity.accessory_color} {identity.accessory}"


def noun_phrase(identity: Identity) -> str:
    """ "a red striped cat", or "a person in a red striped shirt" (a person's colour is their shirt's)."""
    pattern = "" if identity.pattern == "plain" else f"{identity.pattern} "
    if identity.category == "person":
        return f"a person in a {identity.color} {pattern}shirt"
    head = f"{identity.color} {pattern}{identity.category}"
    return ("an " if head[0] in "aeiou" else "a ") + head


def describe(identity: Identity, detail: str = "full") -> str:
    """A sentence fragment naming the traits, e.g. "a red striped cat with round ears and a blue hat".

    ``detail="full"`` names every trait (enough to tell the identity from any other); ``"short"`` names
    category, colour, pattern, ears and accessory.
    """
    i = identity
    parts = [EAR_WORDS[i.category][i.ears]]
    if detail == "full":
        parts += [f"a {i.head} head", f"{i.eyes} eyes", f"a {i.build} build"]
    if i.accessory != "none":
        parts.append(accessory_phrase(i))
    tail = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{noun_phrase(i)} with {tail}"


def trait_diff(a: Identity, b: Identity) -> list[str]:
    """Names of the traits in which two identities differ (accessory colour only counts when both wear one)."""
    out = [t for t in TRAITS if t != "accessory_color" and getattr(a, t) != getattr(b, t)]
    if a.accessory != "none" and b.accessory != "none" and a.accessory_color != b.accessory_color:
        out.append("accessory_color")
    return out


def random_identity(rng: np.random.Generator, half: str | None = None, **fixed: str) -> Identity:
    """A uniformly random identity, optionally restricted to one half ("personal"/"base") and fixed traits."""
    for _ in range(1000):
        d = {t: fixed.get(t, VALUES[t][rng.integers(len(VALUES[t]))]) for t in TRAITS}
        if d["accessory"] == "none":
            d["accessory_color"] = None
        ident = Identity(**d)
        if half is None or is_personal_half(ident) == (half == "personal"):
            return ident
    raise RuntimeError(f"no identity with {fixed} in the {half} half")


def _set_trait(identity: Identity, trait: str, value: str, rng: np.random.Generator) -> Identity:
    if trait == "accessory":
        color = identity.accessory_color
        if value == "none":
            color = None
        elif color is None:
            color = VALUES["accessory_color"][rng.integers(len(ACCESSORY_COLORS))]
        return replace(identity, accessory=value, accessory_color=color)
    return replace(identity, **{trait: value})


def make_lookalike(
    identity: Identity,
    rng: np.random.Generator,
    n_changes: int | None = None,
    half: str | None = "personal",
    avoid: set[Identity] | frozenset = frozenset(),
    tries: int = 200,
) -> tuple[Identity, list[str]]:
    """A distractor: `identity` with one or two traits changed; returns it and the changed trait names.

    It is drawn from `half` where possible (falls back to any half after `tries` attempts) and is never one
    of `avoid` (the other concepts). The returned names always equal ``trait_diff(identity, distractor)``.
    """
    best: tuple[Identity, list[str]] | None = None
    for _ in range(tries):
        k = n_changes or int(rng.integers(1, 3))
        candidates = [t for t in LOOKALIKE_TRAITS if not (t == "accessory_color" and identity.accessory == "none")]
        traits = [candidates[j] for j in rng.choice(len(candidates), size=k, replace=False)]
        if "accessory" in traits and "accessory_color" in traits:
            continue
        new = identity
        for t in traits:
            options = [v for v in VALUES[t] if v != getattr(identity, t)]
            new = _set_trait(new, t, options[rng.integers(len(options))], rng)
        diff = trait_diff(identity, new)
        if sorted(diff) != sorted(traits) or new in avoid or new == identity:
            continue
        if half is None or is_personal_half(new) == (half == "personal"):
            return new, [t for t in TRAITS if t in diff]
        if best is None:
            best = (new, [t for t in TRAITS if t in diff])
    if best is None:
        raise RuntimeError(f"could not make a look-alike of {identity.key}")
    return best
