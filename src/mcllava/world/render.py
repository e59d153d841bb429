"""Drawing characters (sprites) with PIL ImageDraw and NumPy pattern textures.

A sprite is drawn in design units (a character is 100 units tall, feet at (65, 118) on a 130 x 125 canvas)
scaled to pixels. It comes back as RGBA pixels plus two exact masks: the character's own pixels (body, face,
accessories) and the held object's pixels, so that scene masks can exclude what a character holds.
Everything is drawn without anti-aliasing, so masks are exact and binary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from .traits import ACCESSORY_COLORS, COLORS, Identity

ACTIONS = ("standing", "sitting", "jumping", "waving")
HELD_OBJECTS = ("ball", "flower", "book", "balloon", "cup")
HELD_WORDS = {"ball": "a ball", "flower": "a flower", "book": "a book", "balloon": "a balloon", "cup": "a cup"}

CANVAS_W, CANVAS_H = 130, 125  # design units
FOOT_X, FOOT_Y = 65, 118
SKIN = (226, 182, 142)
HAIR = (70, 44, 30)
INK = (28, 24, 24)
TROUSERS = (44, 52, 88)
ORANGE = (240, 150, 30)
HELD_COLORS = {
    "ball": (230, 40, 40),
    "flower": (250, 90, 160),
    "book": (40, 110, 170),
    "balloon": (250, 210, 0),
    "cup": (245, 245, 245),
}


def shade(c: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    """`c` darkened (f < 1) or lightened towards white (f > 1)."""
    if f <= 1:
        return tuple(int(v * f) for v in c)  # type: ignore[return-value]
    t = f - 1
    return tuple(int(v + (255 - v) * t) for v in c)  # type: ignore[return-value]


@dataclass
class Sprite:
    """A drawn character: RGBA pixels, the character mask and the held-object mask (H x W bool arrays)."""

    rgba: np.ndarray
    body: np.ndarray
    held: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        return self.rgba.shape[1], self.rgba.shape[0]


class _Pen:
    """Draws shapes given in design units onto an RGBA image and, in step, into a mask image."""

    def __init__(self, height_px: float):
        self.u = height_px / 100.0
        self.w = max(4, int(math.ceil(CANVAS_W * self.u)))
        self.h = max(4, int(math.ceil(CANVAS_H * self.u)))
        self.img = Image.new("RGBA", (self.w, self.h), (0, 0, 0, 0))
        self.d = ImageDraw.Draw(self.img)

    def box(self, x0: float, y0: float, x1: float, y1: float) -> list[float]:
        u = self.u
        return [x0 * u, y0 * u, max(x0, x1) * u, max(y0, y1) * u]

    def pts(self, *xy: tuple[float, float]) -> list[tuple[float, float]]:
        return [(x * self.u, y * self.u) for x, y in xy]

    def lw(self, units: float) -> int:
        return max(1, int(round(units * self.u)))

    def ellipse(self, b, fill, outline=None, width=1.0):
        self.d.ellipse(self.box(*b), fill=fill, outline=outline, width=self.lw(width) if outline else 0)

    def rect(self, b, fill, outline=None, width=1.0, radius=0.0):
        if radius:
            self.d.rounded_rectangle(
                self.box(*b), radius=radius * self.u, fill=fill, outline=outline, width=self.lw(width) if outline else 0
            )
        else:
            self.d.rectangle(self.box(*b), fill=fill, outline=outline, width=self.lw(width) if outline else 0)

    def poly(self, pts, fill, outline=None):
        self.d.polygon(self.pts(*pts), fill=fill, outline=outline)

    def line(self, pts, fill, width):
        self.d.line(self.pts(*pts), fill=fill, width=self.lw(width), joint="curve")


def _texture(
    w: int, h: int, u: float, color: tuple[int, int, int], pattern: str, belly: tuple[float, ...]
) -> Image.Image:
    """An RGB image of the body colour with the pattern, in pixel space (period scales with the sprite)."""
    base = np.empty((h, w, 3), np.uint8)
    base[:] = color
    if pattern == "plain":
        return Image.fromarray(base)
    dark = np.array(shade(color, 0.55), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    p = max(3.0, 9.0 * u)
    if pattern == "striped":
        sel = (yy % p) < p * 0.45
    elif pattern == "spotted":
        row = np.floor(yy / p)
        xs = (xx + (row % 2) * p / 2) % p - p / 2
        ys = yy % p - p / 2
        sel = xs * xs + ys * ys < (p * 0.28) ** 2
    elif pattern == "checked":
        q = p * 0.8
        sel = ((np.floor(xx / q) + np.floor(yy / q)) % 2) == 0
    elif pattern == "two-tone":
        cx, cy, ax, ay = (v * u for v in belly)
        sel = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 < 1
        base[sel] = shade(color, 1.55) if sum(color) < 600 else shade(color, 0.75)
        return Image.fromarray(base)
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    base[sel] = dark
    return Image.fromarray(base)


def draw_character(identity: Identity, height_px: float, action: str = "standing", held: str | None = None) -> Sprite:
    """Draw one character `height_px` tall doing `action` and holding `held` (or nothing)."""
    return _draw_cached(identity, round(float(height_px), 1), action, held)


@lru_cache(maxsize=1024)
def _draw_cached(identity: Identity, height_px: float, action: str, held: str | None) -> Sprite:
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
    if held is not None and held not in HELD_OBJECTS:
        raise ValueError(f"unknown held object {held!r}; expected one of {', '.join(HELD_OBJECTS)}")
    i = identity
    pen = _Pen(height_px)
    cat = i.category
    col = COLORS[i.color]
    dark = shade(col, 0.6)
    acc = ACCESSORY_COLORS.get(i.accessory_color or "", (0, 0, 0))

    # --- skeleton (design units)
    cx = FOOT_X
    drop = 14 if action == "sitting" else 0
    bw = 14 if i.build == "slim" else 19  # body half width
    if cat == "robot":
        bw += 2
    body = (cx - bw, 62 + drop, cx + bw, 104 + drop if action != "sitting" else 112)
    r = 16 if i.build == "slim" else 18  # head radius
    hy = 44 + drop
    head = (cx - r, hy - r, cx + r, hy + r)
    btop = body[1]
    limb = col if cat not in ("person", "robot") else (SKIN if cat == "person" else shade(col, 0.8))

    # --- behind the body: backpack, tail, long hair, floppy/hanging ears
    if i.accessory == "backpack":
        pen.rect((cx - bw - 7, btop + 4, cx - bw + 10, btop + 32), acc, INK, 1, radius=3)
    if cat == "cat":
        pen.line([(cx + bw - 3, body[3] - 8), (cx + bw + 12, body[3] - 18), (cx + bw + 10, body[3] - 36)], dark, 5)
    elif cat == "dog":
        pen.line([(cx + bw - 3, body[3] - 12), (cx + bw + 9, body[3] - 24)], dark, 5)
    elif cat == "bird":
        pen.poly([(cx + bw - 6, body[3] - 14), (cx + bw + 14, body[3] - 2), (cx + bw + 6, body[3] + 2)], dark)
    if cat == "person" and i.ears == "floppy":
        pen.rect((cx - r - 3, hy - r + 2, cx + r + 3, hy + r + 14), HAIR, radius=6)

    # --- legs
    if cat == "bird":
        for s in (-1, 1):
            x = cx + s * 6
            pen.line([(x, body[3] - 2), (x, FOOT_Y - 1)], ORANGE, 2.2)
            pen.line([(x - 4, FOOT_Y - 1), (x + 4, FOOT_Y - 1)], ORANGE, 2.2)
    elif action == "sitting":
        leg_col = TROUSERS if cat == "person" else shade(limb, 0.85)
        for s in (-1, 1):
            pen.ellipse((cx + s * bw * 0.55 - 7, FOOT_Y - 10, cx + s * bw * 0.55 + 7, FOOT_Y), leg_col, INK)
    else:
        leg_col = TROUSERS if cat == "person" else (shade(col, 0.7) if cat == "robot" else shade(limb, 0.85))
        spread = 4 if action == "jumping" else 0
        for s in (-1, 1):
            x = cx + s * (bw * 0.5 + spread)
            top, bottom = body[3] - 6, FOOT_Y - (6 if action == "jumping" else 0)
            pen.rect((x - 4.5, top, x + 4.5, bottom), leg_col, INK, 1, radius=0 if cat == "robot" else 2)
            if cat == "person":
                pen.rect((x - 5, bottom - 4, x + 6, bottom), INK)

    # --- body with pattern texture, then its outline
    belly = (cx, (body[1] + body[3]) / 2 + 6, bw * 0.62, (body[3] - body[1]) * 0.33)
    tex = _texture(pen.w, pen.h, pen.u, col, i.pattern, belly)
    shape = Image.new("L", (pen.w, pen.h), 0)
    sd = ImageDraw.Draw(shape)
    if cat == "robot":
        sd.rectangle(pen.box(*body), fill=255)
    else:
        sd.ellipse(pen.box(*body), fill=255)
    if cat != "person":  # a person's pattern is on the shirt only
        if i.head == "square" or cat == "robot":
            sd.rounded_rectangle(pen.box(*head), radius=(3 if cat == "robot" else 6) * pen.u, fill=255)
        else:
            sd.ellipse(pen.box(*head), fill=255)
    pen.img.paste(tex, (0, 0), shape)
    if cat == "robot":
        pen.rect(body, None, INK, 1.2)
        pen.rect((cx - bw * 0.5, btop + 10, cx + bw * 0.5, btop + 22), shade(col, 1.4), INK, 0.8)
    else:
        pen.ellipse(body, None, INK, 1.2)

    # --- arms (the right hand, in image terms at +x, holds the object)
    shoulder_y = btop + 9
    hands = {}
    for s in (-1, 1):
        raised = action == "jumping" or (action == "waving" and s == -1)
        sx = cx + s * (bw - 3)
        if raised:
            hx, hy_ = cx + s * (bw + 11), btop - 10
        else:
            hx, hy_ = cx + s * (bw + 8), btop + 26
        hands[s] = (hx, hy_)
        pen.line([(sx, shoulder_y), (hx, hy_)], limb if cat != "person" else col, 5)
        pen.ellipse((hx - 3, hy_ - 3, hx + 3, hy_ + 3), limb if cat != "bird" else dark, INK, 0.8)

    # --- head
    face = SKIN if cat == "person" else None
    if cat == "person":
        if i.head == "square":
            pen.rect(head, face, INK, 1.2, radius=6)
        else:
            pen.ellipse(head, face, INK, 1.2)
    elif i.head == "square" or cat == "robot":
        pen.rect(head, None, INK, 1.2, radius=3 if cat == "robot" else 6)
    else:
        pen.ellipse(head, None, INK, 1.2)

    _ears(pen, i, cx, hy, r, col)
    _face(pen, i, cx, hy, r, col)
    _accessory(pen, i, cx, hy, r, bw, btop, acc)

    body_alpha = np.asarray(pen.img.getchannel("A")) > 0
    held_mask = np.zeros_like(body_alpha)
    if held is not None:
        hx, hy_ = hands[1]
        obj = Image.new("L", (pen.w, pen.h), 0)
        _held(pen, ImageDraw.Draw(obj), held, hx, hy_)
        held_mask = np.asarray(obj) > 0
    rgba = np.asarray(pen.img).copy()
    rgba[..., 3] = np.where(body_alpha | held_mask, 255, 0)
    return Sprite(rgba=rgba, body=body_alpha & ~held_mask, held=held_mask)


def _ears(pen: _Pen, i: Identity, cx: float, hy: float, r: float, col) -> None:
    cat, shape = i.category, i.ears
    top = hy - r
    if cat in ("cat", "dog", "plush toy"):
        ear = shade(col, 0.8) if cat == "dog" else col
        for s in (-1, 1):
            if shape == "pointed":
                pen.poly(
                    [(cx + s * r * 0.95, hy - r * 0.35), (cx + s * r * 0.15, top + 2), (cx + s * r * 0.75, top - 13)],
                    ear,
                    INK,
                )
                if cat == "cat":
                    pen.poly(
                        [(cx + s * r * 0.75, hy - r * 0.45), (cx + s * r * 0.35, top + 3), (cx + s * r * 0.7, top - 7)],
                        (240, 150, 170),
                    )
            elif shape == "round":
                pen.ellipse((cx + s * r * 0.72 - 7, top - 5, cx + s * r * 0.72 + 7, top + 9), ear, INK)
            else:  # floppy: hanging down the sides of the head
                x = cx + s * (r + 1)
                pen.ellipse((x - 5, hy - r * 0.7, x + 5, hy + r * 0.6), shade(col, 0.75), INK)
    elif cat == "bird":
        if shape == "round":
            pen.ellipse((cx - 6, top - 10, cx + 6, top + 2), shade(col, 0.7), INK)
        elif shape == "pointed":
            for dx in (-5, 0, 5):
                pen.poly([(cx + dx - 3, top + 2), (cx + dx + 3, top + 2), (cx + dx, top - 11)], shade(col, 0.7), INK)
        else:
            pen.ellipse((cx - 2, top - 6, cx + 16, top + 3), shade(col, 0.7), INK)
    elif cat == "robot":
        for s in (-1, 1):
            x0, y0 = cx + s * 7, top
            if shape == "floppy":
                pen.line([(x0, y0), (x0 + s * 2, y0 - 7), (x0 + s * 8, y0 - 10)], INK, 1.8)
            else:
                pen.line([(x0, y0), (x0 + s * 2, y0 - 11)], INK, 1.8)
                if shape == "round":
                    pen.ellipse((x0 + s * 2 - 3, y0 - 15, x0 + s * 2 + 3, y0 - 9), (230, 60, 60), INK)
                else:
                    pen.poly([(x0 + s * 2 - 3, y0 - 9), (x0 + s * 2 + 3, y0 - 9), (x0 + s * 2, y0 - 17)], (230, 60, 60))
    else:  # person: hair
        if shape == "round":
            for dx in (-12, -6, 0, 6, 12):
                pen.ellipse((cx + dx - 6, top - 5, cx + dx + 6, top + 7), HAIR)
        elif shape == "pointed":
            pts = [(cx - r, top + 6)]
            for k in range(6):
                x = cx - r + (k + 0.5) * 2 * r / 6
                pts += [(x, top - 8), (x + r / 6, top + 3)]
            pts.append((cx + r, top + 6))
            pen.poly(pts, HAIR)
        else:
            pen.ellipse((cx - r - 2, top - 3, cx + r + 2, top + 10), HAIR)


def _face(pen: _Pen, i: Identity, cx: float, hy: float, r: float, col) -> None:
    cat = i.category
    dx = 5 if i.eyes == "close-set" else 9
    ey = hy - 2
    if cat == "robot":
        for s in (-1, 1):
            pen.rect((cx + s * dx - 3, ey - 3, cx + s * dx + 3, ey + 2), (90, 230, 250), INK, 0.8)
        pen.rect((cx - 7, hy + 7, cx + 7, hy + 10), INK)
        return
    er = 3.2 if cat == "plush toy" else 2.4
    for s in (-1, 1):
        if cat in ("cat", "dog", "person"):
            pen.ellipse((cx + s * dx - er - 0.8, ey - er - 0.8, cx + s * dx + er + 0.8, ey + er + 0.8), (255, 255, 255))
        pen.ellipse((cx + s * dx - er, ey - er, cx + s * dx + er, ey + er), INK)
    if cat == "cat":
        pen.poly([(cx - 2.5, hy + 4), (cx + 2.5, hy + 4), (cx, hy + 7)], (240, 120, 150))
        for s in (-1, 1):
            for k in (-1, 1):
                pen.line([(cx + s * 5, hy + 7), (cx + s * 16, hy + 5 + 3 * k)], INK, 0.7)
    elif cat == "dog":
        pen.ellipse((cx - 7, hy + 3, cx + 7, hy + 13), shade(col, 1.5))
        pen.ellipse((cx - 3, hy + 3, cx + 3, hy + 7), INK)
    elif cat == "bird":
        pen.poly([(cx - 4, hy + 3), (cx + 4, hy + 3), (cx, hy + 12)], ORANGE, INK)
    elif cat == "person":
        pen.line([(cx - 4, hy + 8), (cx, hy + 10), (cx + 4, hy + 8)], (150, 40, 40), 1.2)
    else:  # plush toy
        pen.ellipse((cx - 7, hy + 3, cx + 7, hy + 12), shade(col, 1.5), INK)
        pen.ellipse((cx - 2.5, hy + 4, cx + 2.5, hy + 7), INK)


def _accessory(pen: _Pen, i: Identity, cx, hy, r, bw, btop, acc) -> None:
    a = i.accessory
    if a == "hat":
        pen.rect((cx - r - 4, hy - r + 1, cx + r + 4, hy - r + 6), acc, INK, 1)
        pen.rect((cx - r * 0.62, hy - r - 12, cx + r * 0.62, hy - r + 2), acc, INK, 1)
    elif a == "scarf":
        pen.rect((cx - bw + 1, btop - 2, cx + bw - 1, btop + 6), acc, INK, 1, radius=3)
        pen.rect((cx + 3, btop + 3, cx + 9, btop + 20), acc, INK, 1)
    elif a == "glasses":
        dx = 5 if i.eyes == "close-set" else 9
        for s in (-1, 1):
            pen.ellipse((cx + s * dx - 5, hy - 7, cx + s * dx + 5, hy + 3), None, acc, 2)
        pen.line([(cx - dx + 5, hy - 3), (cx + dx - 5, hy - 3)], acc, 2)
    elif a == "bow tie":
        pen.poly([(cx, btop + 4), (cx - 10, btop - 2), (cx - 10, btop + 10)], acc, INK)
        pen.poly([(cx, btop + 4), (cx + 10, btop - 2), (cx + 10, btop + 10)], acc, INK)
        pen.ellipse((cx - 3, btop + 1, cx + 3, btop + 7), shade(acc, 0.7))
    elif a == "backpack":  # the bag is drawn behind the body; its straps show in front
        for s in (-1, 1):
            pen.line([(cx + s * (bw - 5), btop + 2), (cx + s * (bw - 5), btop + 22)], acc, 3)


def _held(pen: _Pen, mask: ImageDraw.ImageDraw, obj: str, hx: float, hy: float) -> None:
    """Draw the held object at hand (hx, hy) onto the sprite and into `mask`."""
    c = HELD_COLORS[obj]
    shapes: list[tuple[str, tuple, tuple]] = []
    if obj == "ball":
        shapes = [
            ("ellipse", (hx - 1, hy - 6, hx + 11, hy + 6), c),
            ("line", ((hx + 5, hy - 6), (hx + 5, hy + 6)), (255, 255, 255)),
        ]
    elif obj == "flower":
        shapes = [("line", ((hx + 2, hy + 4), (hx + 2, hy - 14)), (40, 140, 40))]
        shapes += [
            ("ellipse", (hx + 2 + ox - 3.5, hy - 16 + oy - 3.5, hx + 2 + ox + 3.5, hy - 16 + oy + 3.5), c)
            for ox, oy in ((-3, 0), (3, 0), (0, -3), (0, 3))
        ]
        shapes.append(("ellipse", (hx, hy - 18, hx + 4, hy - 14), (250, 220, 40)))
    elif obj == "book":
        shapes = [
            ("rect", (hx - 2, hy - 8, hx + 10, hy + 7), c),
            ("rect", (hx + 7, hy - 8, hx + 10, hy + 7), (240, 240, 230)),
        ]
    elif obj == "balloon":
        shapes = [("line", ((hx + 1, hy), (hx + 4, hy - 22)), INK), ("ellipse", (hx - 3, hy - 38, hx + 11, hy - 21), c)]
    elif obj == "cup":
        shapes = [
            ("rect", (hx - 1, hy - 6, hx + 8, hy + 6), c),
            ("ellipse", (hx + 6, hy - 3, hx + 12, hy + 3), c),
            ("rect", (hx, hy - 5, hx + 7, hy - 3), (120, 70, 40)),
        ]
    for kind, geom, color in shapes:
        if kind == "ellipse":
            pen.ellipse(geom, color, INK, 0.8)
            mask.ellipse(pen.box(*geom), fill=255, outline=255, width=pen.lw(0.8))
        elif kind == "rect":
            pen.rect(geom, color, INK, 0.8)
            mask.rectangle(pen.box(*geom), fill=255, outline=255, width=pen.lw(0.8))
        else:
            pen.line(list(geom), color, 1.5)
            mask.line(pen.pts(*geom), fill=255, width=pen.lw(1.5), joint="curve")
