"""Scenes: a setting, 1-4 characters placed at named positions, occluders, lighting and noise.

`sample_scene` draws a `SceneSpec` (plain data, JSON-able) from a random generator; `render_scene` turns a
spec into pixels plus an exact label map (which actor owns each pixel), from which masks, boxes and
position words are read. Rendering is a pure function of the spec, so the same spec gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .render import ACTIONS, HELD_OBJECTS, Sprite, draw_character, shade
from .traits import Identity

SETTINGS = ("park", "kitchen", "beach", "street", "living room")
SETTING_PHRASES = {
    "park": "in a park",
    "kitchen": "in a kitchen",
    "beach": "on a beach",
    "street": "on a street",
    "living room": "in a living room",
}
BACKGROUND = 255  # label of background and occluder pixels
PROP = 254  # label of held-object pixels
MIN_VISIBLE = 0.45  # a placed character keeps at least this fraction of its pixels visible
N_VARIANTS = 6  # cached background variants per setting and size


@dataclass
class Actor:
    """One character in a scene and how it is placed (pixel units; (x, y) is the feet point)."""

    identity: Identity
    x: float
    y: float
    height: float
    angle: float = 0.0
    flip: bool = False
    action: str = "standing"
    held: str | None = None
    depth: str = "near"
    role: str = "other"  # "concept", "distractor" or "other"
    ref: str | None = None  # the concept id (for concepts and their distractors)

    def to_dict(self) -> dict[str, Any]:
        d = {
            k: getattr(self, k) for k in ("x", "y", "height", "angle", "flip", "action", "held", "depth", "role", "ref")
        }
        d["identity"] = self.identity.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Actor:
        return cls(identity=Identity.from_dict(d["identity"]), **{k: v for k, v in d.items() if k != "identity"})


@dataclass
class SceneSpec:
    """Everything needed to render a scene; actors are listed back to front."""

    setting: str
    size: int
    seed: int
    variant: int
    light: tuple[float, float, float]
    actors: list[Actor] = field(default_factory=list)
    occluders: list[dict[str, Any]] = field(default_factory=list)
    shadows: bool = True  # ground shadows under characters (part of the background, not of any mask)

    def to_dict(self) -> dict[str, Any]:
        return {
            "setting": self.setting,
            "size": self.size,
            "seed": self.seed,
            "variant": self.variant,
            "light": list(self.light),
            "actors": [a.to_dict() for a in self.actors],
            "occluders": self.occluders,
            "shadows": self.shadows,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SceneSpec:
        return cls(
            setting=d["setting"],
            size=d["size"],
            seed=d["seed"],
            variant=d["variant"],
            light=tuple(d["light"]),
            actors=[Actor.from_dict(a) for a in d["actors"]],
            occluders=d["occluders"],
            shadows=d.get("shadows", True),
        )


@dataclass
class RenderedScene:
    """Pixels of a scene and its exact ground truth."""

    spec: SceneSpec
    image: Image.Image
    labels: np.ndarray  # H x W uint8: actor index, PROP or BACKGROUND
    full_pixels: list[int]  # per actor, pixels it would cover in the frame without occlusion

    def mask(self, index: int) -> np.ndarray:
        """Exact bool mask of actor `index` as visible (occlusion respected, held objects excluded)."""
        return self.labels == index

    def visible_fraction(self, index: int) -> float:
        return float(self.mask(index).sum()) / max(1, self.full_pixels[index])

    def box(self, index: int) -> list[int] | None:
        """[x0, y0, x1, y1] of the visible mask (x1, y1 exclusive), or None when nothing is visible."""
        m = self.mask(index)
        ys, xs = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
        if len(ys) == 0:
            return None
        return [int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1]

    def objects(self) -> list[dict[str, Any]]:
        """Ground truth per actor: traits, role, action, held object, box, position words, visibility."""
        out = []
        for k, a in enumerate(self.spec.actors):
            box = self.box(k)
            out.append(
                {
                    "index": k,
                    "role": a.role,
                    "ref": a.ref,
                    "identity": a.identity.to_dict(),
                    "action": a.action,
                    "held": a.held,
                    "depth": a.depth,
                    "box": box,
                    "horizontal": horizontal_word(box, self.spec.size) if box else None,
                    "visible": round(self.visible_fraction(k), 3),
                }
            )
        return out


def horizontal_word(box: list[int], size: int) -> str:
    """'left', 'centre' or 'right': the third of the image holding the box centre."""
    c = (box[0] + box[2]) / 2 / size
    return "left" if c < 1 / 3 else ("right" if c > 2 / 3 else "centre")


# ----------------------------------------------------------------------------- backgrounds


def _noise(rng: np.random.Generator, h: int, w: int, amp: float) -> np.ndarray:
    return rng.normal(0, amp, (h, w, 1)).astype(np.float32)


@lru_cache(maxsize=64)
def background(setting: str, size: int, variant: int) -> np.ndarray:
    """A cached background (H x W x 3 uint8) for a setting; `variant` picks colours and furniture."""
    rng = np.random.default_rng([SETTINGS.index(setting), size, variant, 7])
    s = size
    img = Image.new("RGB", (s, s))
    d = ImageDraw.Draw(img)
    hz = int(s * rng.uniform(0.42, 0.5))  # horizon / wall-floor line

    def jitter(c, k=18):
        return tuple(int(np.clip(v + rng.integers(-k, k + 1), 0, 255)) for v in c)

    if setting == "park":
        sky = jitter((140, 190, 235))
        d.rectangle([0, 0, s, hz], fill=sky)
        for _ in range(3):
            x = rng.uniform(0, s)
            d.ellipse([x - s * 0.12, hz - s * 0.3, x + s * 0.12, hz - s * 0.02], fill=jitter((50, 120, 50)))
            d.rectangle([x - s * 0.015, hz - s * 0.05, x + s * 0.015, hz + 2], fill=(100, 70, 40))
        d.rectangle([0, hz, s, s], fill=jitter((90, 170, 70)))
        tex = 14
    elif setting == "beach":
        d.rectangle([0, 0, s, hz], fill=jitter((150, 205, 240)))
        d.rectangle([0, hz - s * 0.12, s, hz], fill=jitter((40, 110, 180)))
        sun = s * rng.uniform(0.6, 0.9)
        d.ellipse([sun - s * 0.05, s * 0.04, sun + s * 0.05, s * 0.14], fill=(250, 230, 120))
        d.rectangle([0, hz, s, s], fill=jitter((230, 205, 150)))
        tex = 12
    elif setting == "street":
        d.rectangle([0, 0, s, s], fill=jitter((170, 200, 225)))
        x = 0.0
        while x < s:
            bw = s * rng.uniform(0.18, 0.3)
            top = s * rng.uniform(0.05, 0.3)
            c = jitter((150, 120, 110), 40)
            d.rectangle([x, top, x + bw, hz], fill=c)
            for wy in np.arange(top + 6, hz - 8, 14):
                for wx in np.arange(x + 5, x + bw - 8, 12):
                    d.rectangle([wx, wy, wx + 5, wy + 7], fill=(230, 230, 190))
            x += bw + 2
        d.rectangle([0, hz, s, hz + s * 0.12], fill=jitter((180, 180, 180)))
        d.rectangle([0, hz + s * 0.12, s, s], fill=jitter((80, 80, 85)))
        for x in np.arange(0, s, s / 6):
            d.rectangle([x, s * 0.9, x + s / 12, s * 0.92], fill=(240, 240, 240))
        tex = 10
    elif setting == "kitchen":
        wall = jitter((230, 225, 205))
        d.rectangle([0, 0, s, hz], fill=wall)
        t = max(6, s // 16)
        for y in range(0, hz, t):
            d.line([0, y, s, y], fill=shade(wall, 0.85))
        for x in range(0, s, t):
            d.line([x, 0, x, hz], fill=shade(wall, 0.85))
        d.rectangle([0, hz - s * 0.14, s, hz], fill=jitter((150, 100, 60)))
        d.rectangle([s * 0.1, hz - s * 0.4, s * 0.35, hz - s * 0.2], fill=(200, 220, 240), outline=(120, 90, 60))
        floor = jitter((200, 190, 170))
        d.rectangle([0, hz, s, s], fill=floor)
        for y in range(hz, s, t * 2):
            for x in range((y // (t * 2)) % 2 * t * 2, s, t * 4):
                d.rectangle([x, y, x + t * 2, y + t * 2], fill=shade(floor, 0.8))
        tex = 6
    elif setting == "living room":
        wall = jitter((200, 170, 200), 30)
        d.rectangle([0, 0, s, hz], fill=wall)
        for x in range(0, s, max(6, s // 20)):
            d.line([x, 0, x, hz], fill=shade(wall, 0.9), width=2)
        d.rectangle(
            [s * 0.55, hz - s * 0.35, s * 0.85, hz - s * 0.1], fill=(180, 210, 235), outline=(90, 60, 40), width=2
        )
        sofa = jitter((120, 60, 60), 40)
        d.rounded_rectangle([s * 0.05, hz - s * 0.16, s * 0.45, hz + s * 0.05], radius=6, fill=sofa)
        floor = jitter((160, 110, 70))
        d.rectangle([0, hz, s, s], fill=floor)
        for y in range(hz, s, max(5, s // 24)):
            d.line([0, y, s, y], fill=shade(floor, 0.85))
        tex = 8
    else:
        raise ValueError(f"unknown setting {setting!r}; expected one of {', '.join(SETTINGS)}")
    arr = np.asarray(img).astype(np.float32)
    arr += _noise(rng, s, s, tex)
    return np.clip(arr, 0, 255).astype(np.uint8)


@lru_cache(maxsize=8)
def _noise_bank(size: int) -> np.ndarray:
    """A fixed 2x-size field of per-pixel noise; scenes take random crops of it (fast, deterministic)."""
    rng = np.random.default_rng([size, 99])
    return rng.normal(0, 1, (2 * size, 2 * size, 3)).astype(np.float32)


# ----------------------------------------------------------------------------- sampling


def sample_scene(
    rng: np.random.Generator,
    actors: list[Identity | tuple[Identity, str, str | None]],
    size: int = 192,
    setting: str | None = None,
    held_p: float = 0.4,
) -> SceneSpec:
    """Place 1-4 characters in a random setting at distinct (column, depth) slots with random poses.

    `actors` items are identities or (identity, role, ref) triples. Columns are left / centre / right; near
    characters are larger and lower in the frame, far ones smaller and higher, so near ones may partly hide
    far ones.
    """
    if not 1 <= len(actors) <= 4:
        raise ValueError("a scene has 1 to 4 characters")
    setting = setting or SETTINGS[rng.integers(len(SETTINGS))]
    s = size
    slots = [(c, dep) for c in range(3) for dep in ("near", "far")]
    chosen = [slots[j] for j in rng.choice(len(slots), size=len(actors), replace=False)]
    placed = []
    for item, (col, dep) in zip(actors, chosen):
        ident, role, ref = item if isinstance(item, tuple) else (item, "other", None)
        near = dep == "near"
        h = s * (rng.uniform(0.44, 0.54) if near else rng.uniform(0.28, 0.35))
        x = s * (1 / 6 + col / 3) + rng.uniform(-0.07, 0.07) * s
        y = s * (rng.uniform(0.9, 0.97) if near else rng.uniform(0.64, 0.72))
        action = ACTIONS[rng.integers(len(ACTIONS))]
        held = HELD_OBJECTS[rng.integers(len(HELD_OBJECTS))] if rng.random() < held_p else None
        placed.append(
            Actor(
                identity=ident,
                x=float(x),
                y=float(y),
                height=float(round(h, 1)),
                angle=float(rng.uniform(-10, 10)) if rng.random() < 0.5 else 0.0,
                flip=bool(rng.random() < 0.5),
                action=action,
                held=held,
                depth=dep,
                role=role,
                ref=ref,
            )
        )
    placed.sort(key=lambda a: a.y)  # back to front
    occluders = []
    if rng.random() < 0.35:
        occluders.append(
            {
                "kind": "bush" if setting in ("park", "beach") else ("post" if setting == "street" else "table"),
                "x": float(rng.uniform(0.1, 0.9) * s),
                "w": float(rng.uniform(0.1, 0.2) * s),
                "h": float(rng.uniform(0.08, 0.16) * s),
            }
        )
    light = tuple(float(v) for v in rng.uniform(0.8, 1.15) * rng.uniform(0.93, 1.07, 3))
    return SceneSpec(
        setting=setting,
        size=s,
        seed=int(rng.integers(2**31)),
        variant=int(rng.integers(N_VARIANTS)),
        light=light,
        actors=placed,
        occluders=occluders,
    )  # type: ignore[arg-type]


def sample_visible_scene(
    rng: np.random.Generator, actors, size: int = 192, setting: str | None = None, tries: int = 20, **kw
) -> RenderedScene:
    """`sample_scene` + `render_scene`, resampling until every character is at least MIN_VISIBLE visible."""
    for _ in range(tries):
        scene = render_scene(sample_scene(rng, actors, size, setting, **kw))
        if all(scene.visible_fraction(k) >= MIN_VISIBLE for k in range(len(scene.spec.actors))):
            return scene
    return scene  # rare: keep the last one (its ground truth is still exact)


# ----------------------------------------------------------------------------- rendering


def _sprite_pixels(a: Actor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sp: Sprite = draw_character(a.identity, a.height, a.action, a.held)
    rgba, code = sp.rgba, np.where(sp.body, 1, np.where(sp.held, 2, 0)).astype(np.uint8)
    if a.flip:
        rgba, code = rgba[:, ::-1], code[:, ::-1]
    if a.angle:
        im = Image.fromarray(np.ascontiguousarray(rgba)).rotate(a.angle, Image.NEAREST, expand=True)
        cm = Image.fromarray(np.ascontiguousarray(code)).rotate(a.angle, Image.NEAREST, expand=True)
        rgba, code = np.asarray(im), np.asarray(cm)
    return rgba, code, sp.rgba.shape[:2]


def render_scene(spec: SceneSpec) -> RenderedScene:
    """Render a spec: background, shadows, characters back to front, occluders, lighting and noise."""
    s = spec.size
    img = background(spec.setting, s, spec.variant).copy()
    labels = np.full((s, s), BACKGROUND, np.uint8)
    full = []
    jump = [0.12 * a.height if a.action == "jumping" else 0.0 for a in spec.actors]
    # ground shadows first (part of the background)
    for a in spec.actors if spec.shadows else []:
        cx, cy, rx, ry = int(a.x), int(a.y), int(a.height * 0.22), max(1, int(a.height * 0.04))
        y0, y1, x0, x1 = max(0, cy - ry), min(s, cy + ry), max(0, cx - rx), min(s, cx + rx)
        if y1 > y0 and x1 > x0:
            img[y0:y1, x0:x1] = (img[y0:y1, x0:x1] * 0.8).astype(np.uint8)
    for k, a in enumerate(spec.actors):
        rgba, code, (h0, w0) = _sprite_pixels(a)
        h, w = code.shape
        # the sprite's feet point (FOOT_X, FOOT_Y design units) is at the sprite centre-bottom region;
        # rotation with expand keeps the image centre fixed, so place by centre.
        fx, fy = 65 / 130 * w0, 118 / 125 * h0
        ox = int(round(a.x - fx - (w - w0) / 2))
        oy = int(round(a.y - jump[k] - fy - (h - h0) / 2))
        sx0, sy0, sx1, sy1 = max(0, -ox), max(0, -oy), min(w, s - ox), min(h, s - oy)
        if sx1 <= sx0 or sy1 <= sy0:
            full.append(0)
            continue
        c = code[sy0:sy1, sx0:sx1]
        on = c > 0
        region = (slice(oy + sy0, oy + sy1), slice(ox + sx0, ox + sx1))
        img[region][on] = rgba[sy0:sy1, sx0:sx1, :3][on]
        lab = labels[region]
        lab[on] = np.where(c[on] == 1, k, PROP)
        full.append(int((c == 1).sum()))
    if spec.occluders:
        pil, lab = Image.fromarray(img), Image.fromarray(labels)
        d, dl = ImageDraw.Draw(pil), ImageDraw.Draw(lab)
        for o in spec.occluders:
            x, w, h = o["x"], o["w"], o["h"]
            if o["kind"] == "bush":
                shapes = [
                    ("e", [x - w / 2, s - h, x + w / 2, s + h * 0.5], (40, 110, 40)),
                    ("e", [x - w * 0.3, s - h * 1.3, x + w * 0.3, s - h * 0.4], (50, 130, 50)),
                ]
            elif o["kind"] == "post":
                shapes = [
                    ("r", [x - w * 0.12, s - h * 2.2, x + w * 0.12, s], (60, 60, 70)),
                    ("r", [x - w * 0.25, s - h * 2.4, x + w * 0.25, s - h * 2.1], (60, 60, 70)),
                ]
            else:
                shapes = [
                    ("r", [x - w / 2, s - h, x + w / 2, s - h * 0.75], (140, 90, 50)),
                    ("r", [x - w / 2 + 2, s - h * 0.75, x - w / 2 + 6, s], (110, 70, 40)),
                    ("r", [x + w / 2 - 6, s - h * 0.75, x + w / 2 - 2, s], (110, 70, 40)),
                ]
            for kind, b, col in shapes:
                (d.ellipse if kind == "e" else d.rectangle)(b, fill=col)
                (dl.ellipse if kind == "e" else dl.rectangle)(b, fill=BACKGROUND)
        img, labels = np.asarray(pil).copy(), np.asarray(lab).copy()
    # lighting and sensor noise, from the scene seed
    rng = np.random.default_rng(spec.seed)
    bank = _noise_bank(s)
    oy, ox = rng.integers(0, s, 2)
    out = img.astype(np.float32) * np.asarray(spec.light, np.float32)
    out += bank[oy : oy + s, ox : ox + s] * 4.0
    image = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    return RenderedScene(spec=spec, image=image, labels=labels, full_pixels=full)
