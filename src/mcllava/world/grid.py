"""A labelled preview grid of the world (concepts beside their look-alikes, then test scenes) for the docs.

python -m mcllava.world.grid docs/img/world-grid.png
"""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
from PIL import Image, ImageDraw

from .make import plan_concepts
from .scenes import render_scene, sample_scene, sample_visible_scene
from .traits import random_identity

LABEL_H = 14
SHORT = {"accessory_color": "acc.colour", "accessory": "acc.", "pattern": "pattern", "color": "colour"}


def _tile(img: Image.Image, label: str, tile: int) -> Image.Image:
    out = Image.new("RGB", (tile, tile + LABEL_H), (255, 255, 255))
    out.paste(img.resize((tile, tile), Image.NEAREST), (0, LABEL_H))
    ImageDraw.Draw(out).text((3, 1), label[: tile // 6 + 2], fill=(0, 0, 0))
    return out


def preview_grid(seed: int = 0, tile: int = 144, cols: int = 6) -> Image.Image:
    """Row 1-2: two concepts, each followed by its two look-alikes in the same pose and place
    (labelled with the traits that differ); rows 3-4: test scenes with 1-4 characters."""
    concepts = plan_concepts(seed, 4, 2)
    rng = np.random.default_rng(seed)
    tiles: list[Image.Image] = []
    for c in concepts[:4]:
        spec = sample_scene(rng, [(c.identity, "concept", c.id)], 192, setting=None, held_p=0.0)
        spec.occluders = []
        a = spec.actors[0]
        a.x, a.y, a.height, a.angle, a.depth = 96.0, 180.0, 150.0, 0.0, "near"
        tiles.append(_tile(render_scene(spec).image, f"<{c.id}>", tile))
        for d, diff in c.distractors[:2]:
            look = replace(spec, actors=[replace(a, identity=d, role="distractor")])
            words = [SHORT.get(x, x) for x in diff]
            tiles.append(_tile(render_scene(look).image, "look-alike: " + "+".join(words), tile))
    for k in range(cols * 2):
        cast = [(c.identity, "concept", c.id) for c in concepts[: 1 + k % 3]] + [
            random_identity(rng, "personal") for _ in range(k % 2)
        ]
        scene = sample_visible_scene(rng, cast[:4], 192)
        present = [f"<{a.ref}>" for a in scene.spec.actors if a.role == "concept"]
        tiles.append(_tile(scene.image, f"{scene.spec.setting}: {' '.join(present)}", tile))
    rows = (len(tiles) + cols - 1) // cols
    grid = Image.new("RGB", (cols * (tile + 2), rows * (tile + LABEL_H + 2)), (255, 255, 255))
    for k, t in enumerate(tiles):
        grid.paste(t, ((k % cols) * (tile + 2), (k // cols) * (tile + LABEL_H + 2)))
    return grid


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "world-grid.png"
    preview_grid().quantize(colors=128, dither=Image.Dither.NONE).save(path, optimize=True)
    print(path)
