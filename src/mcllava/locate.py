"""Personalised visual prompt: where is each concept in a query image, and Set-of-Mark rendering.

A concept's location confidence map is the cosine similarity of every visual token of the query image with
the concept's reference vectors (its learned soft tokens, as the paper describes, or its masked training-image
features, as the paper's code does), averaged over the references. The released code makes the maps comparable
by subtracting the across-concept mean map and cutting the result at an absolute cosine level (0.318); with one
concept the subtraction leaves nothing and it falls back to the raw map. We instead take, at every token, a
softmax with temperature over the concepts plus one fixed "background" cosine level: each token's evidence is
shared among the concepts that resemble it (like the mean subtraction), values land in [0, 1], a concept that
matches nothing stays low however few concepts there are, and with one concept the map is simply
``sigmoid((cos - background) / temperature)``, i.e. the released code's absolute cut when ``threshold = 0.5``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont


@dataclass
class LocateConfig:
    """Knobs of the locator. `background` and `temperature` are on the raw cosine scale."""

    threshold: float = 0.5  # a token counts for a concept when its normalised confidence reaches this
    min_area: float = 0.02  # fraction of the grid that must reach `threshold` for the concept to be present
    temperature: float = 0.05  # softmax temperature over (concepts + background) at each token
    background: float = 0.3  # cosine a token must beat to count as evidence for any concept (calibrate per model)
    max_marks: int = 8  # most marks drawn on one image
    reduce: str = "mean"  # a token's cosine to a concept: "mean" or "max" over the concept's reference vectors

    def __post_init__(self) -> None:
        if self.reduce not in ("mean", "max"):
            raise ValueError(f"LocateConfig.reduce must be 'mean' or 'max', got {self.reduce!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"LocateConfig.threshold must be in (0, 1), got {self.threshold}")
        if not 0.0 <= self.min_area <= 1.0:
            raise ValueError(f"LocateConfig.min_area must be in [0, 1], got {self.min_area}")
        if not self.temperature > 0.0:
            raise ValueError(f"LocateConfig.temperature must be > 0, got {self.temperature}")
        if self.max_marks < 0:
            raise ValueError(f"LocateConfig.max_marks must be >= 0, got {self.max_marks}")


@dataclass
class Location:
    """Where one concept is in the query image (pixel coordinates of the image size given to `locate`)."""

    concept_id: str
    score: float  # presence score in [0, 1]; present <=> score >= threshold
    present: bool
    peak: tuple[float, float]  # (x, y): confidence-weighted centroid of the 3x3 patches around the map's peak
    box: tuple[float, float, float, float] | None  # (x0, y0, x1, y1) of the largest region over the threshold
    map: torch.Tensor  # [gh, gw] normalised confidence map


def _check_inputs(features: torch.Tensor, references: dict[str, torch.Tensor], grid: tuple[int, int]) -> None:
    if len(grid) != 2 or any(int(g) != g or g <= 0 for g in grid):
        raise ValueError(f"grid must be two positive integers (gh, gw), got {grid}")
    if features.dim() != 2:
        raise ValueError(f"features must be [N, D] visual tokens, got shape {tuple(features.shape)}")
    gh, gw = grid
    if features.shape[0] != gh * gw:
        raise ValueError(
            f"features has {features.shape[0]} tokens but grid {gh}x{gw} needs {gh * gw}; "
            "pass the patch grid of these visual tokens (without extra tokens such as CLS)"
        )
    if not references:
        raise ValueError("references is empty: give at least one concept id with its reference vectors")
    d = features.shape[1]
    for cid, ref in references.items():
        if ref.dim() != 2 or ref.shape[0] == 0:
            raise ValueError(f"references[{cid!r}] must be a non-empty [r, D] tensor, got shape {tuple(ref.shape)}")
        if ref.shape[1] != d:
            raise ValueError(
                f"references[{cid!r}] has width {ref.shape[1]} but the visual tokens have width {d}; "
                "references and features must come from the same projector / embedding space"
            )


def similarity_maps(
    features: torch.Tensor, references: dict[str, torch.Tensor], grid: tuple[int, int], reduce: str = "mean"
) -> dict[str, torch.Tensor]:
    """Raw location maps: cosine of every visual token with each reference, averaged (or, with `reduce="max"`,
    the best) over references -> [gh, gw]."""
    _check_inputs(features, references, grid)
    feats = F.normalize(features.detach().float(), dim=-1)
    maps = {}
    for cid, ref in references.items():
        refs = F.normalize(ref.detach().to(feats.device, torch.float32), dim=-1)
        cos = feats @ refs.T
        maps[cid] = (cos.max(dim=1).values if reduce == "max" else cos.mean(dim=1)).reshape(grid).cpu()
    return maps


def normalise_across_concepts(
    maps: dict[str, torch.Tensor], config: LocateConfig = LocateConfig()
) -> dict[str, torch.Tensor]:
    """Per-token softmax over the concepts plus a constant background level -> maps in [0, 1].

    A token that resembles two concepts equally counts half for each; a token that resembles none (cosine
    under `config.background`) goes to the background. With one concept this is sigmoid((cos - bg) / T).
    """
    if not maps:
        raise ValueError("maps is empty: nothing to normalise")
    stacked = torch.stack([m.float() for m in maps.values()])  # [C, gh, gw]
    background = torch.full_like(stacked[:1], config.background)
    probs = torch.softmax(torch.cat([stacked, background]) / config.temperature, dim=0)[:-1]
    return dict(zip(maps, probs))


def _regions(mask: torch.Tensor) -> list[list[tuple[int, int]]]:
    """8-connected regions of a boolean [gh, gw] mask, each a list of (row, col)."""
    gh, gw = mask.shape
    todo = {(int(r), int(c)) for r, c in mask.nonzero().tolist()}
    regions = []
    while todo:
        stack = [todo.pop()]
        region = []
        while stack:
            r, c = stack.pop()
            region.append((r, c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    n = (r + dr, c + dc)
                    if n in todo:
                        todo.remove(n)
                        stack.append(n)
        regions.append(region)
    return regions


def _locate_one(cid: str, conf: torch.Tensor, image_size: tuple[int, int], config: LocateConfig) -> Location:
    gh, gw = conf.shape
    sx, sy = image_size[0] / gw, image_size[1] / gh  # pixels per patch

    # Presence: the value reached by the k-th most confident token, k = the area gate in tokens, so that
    # "score >= threshold" is exactly "at least min_area of the grid reaches the threshold".
    k = max(1, math.ceil(config.min_area * gh * gw - 1e-9))
    score = float(conf.flatten().topk(k).values[-1])
    present = score >= config.threshold

    # Peak: confidence-weighted centroid of the patch centres in the 3x3 window around the argmax.
    r, c = divmod(int(conf.argmax()), gw)
    r0, r1, c0, c1 = max(r - 1, 0), min(r + 2, gh), max(c - 1, 0), min(c + 2, gw)
    w = conf[r0:r1, c0:c1]
    rows = torch.arange(r0, r1, dtype=torch.float32)[:, None] + 0.5
    cols = torch.arange(c0, c1, dtype=torch.float32)[None, :] + 0.5
    total = float(w.sum())
    if total > 0:
        py, px = float((w * rows).sum()) / total, float((w * cols).sum()) / total
    else:
        py, px = r + 0.5, c + 0.5
    peak = (px * sx, py * sy)

    box = None
    if present:
        regions = _regions(conf >= config.threshold)
        best = max(regions, key=lambda reg: (len(reg), max(float(conf[p]) for p in reg)))
        rs, cs = [p[0] for p in best], [p[1] for p in best]
        box = (min(cs) * sx, min(rs) * sy, (max(cs) + 1) * sx, (max(rs) + 1) * sy)
    return Location(cid, score, present, peak, box, conf)


def locate(
    features: torch.Tensor,
    references: dict[str, torch.Tensor],
    grid: tuple[int, int],
    image_size: tuple[int, int],
    config: LocateConfig = LocateConfig(),
    spatial: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[Location]:
    """Locate every concept of `references` (in its order) in a query image of `image_size` = (width, height).

    `features` are the image's projected visual tokens [gh*gw, D], row-major on the patch grid; the grid is
    assumed to cover the whole image, so patch (row, col) spans pixels scaled by (width/gw, height/gh).
    `spatial` turns a [gh, gw] map over tokens that are not patches into a map over the image
    (`layout.SlotLayout.spatial`); by default the tokens are the patches.
    """
    if len(image_size) != 2 or min(image_size) <= 0:
        raise ValueError(f"image_size must be a positive (width, height), got {image_size}")
    maps = normalise_across_concepts(similarity_maps(features, references, grid, config.reduce), config)
    spatial = spatial or (lambda m: m)
    return [_locate_one(cid, spatial(conf), image_size, config) for cid, conf in maps.items()]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: the bundled scalable font
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def draw_marks(
    image: Image.Image, locations: list[Location], max_marks: int = LocateConfig.max_marks
) -> tuple[Image.Image, dict[int, str]]:
    """Set-of-Mark: draw numbered marks at the present concepts' peaks on a copy of `image`.

    Marks are numbered 1, 2, ... by decreasing score (at most `max_marks`). Each is a white disc with a black
    outline, a thin white halo around it and a bold black number, so it reads on dark and light backgrounds;
    its diameter is 8% of the image's short side (at least 16 px) and it is kept inside the image.
    Returns the new image and {mark number: concept_id}.
    """
    out = image.copy() if image.mode in ("RGB", "RGBA") else image.convert("RGB")
    chosen = sorted((loc for loc in locations if loc.present), key=lambda loc: -loc.score)[:max_marks]
    marks = {n: loc.concept_id for n, loc in enumerate(chosen, start=1)}
    if not chosen:
        return out, marks

    width, height = out.size
    diameter = max(16, round(0.08 * min(width, height)))
    radius = diameter / 2
    outline = max(1, round(diameter / 14))
    halo = max(1, round(diameter / 20))
    draw = ImageDraw.Draw(out)
    for n in sorted(marks, reverse=True):  # mark 1 last, so it stays on top where marks overlap
        x, y = chosen[n - 1].peak
        edge = radius + halo
        x = min(max(x, edge), width - edge) if width > 2 * edge else width / 2
        y = min(max(y, edge), height - edge) if height > 2 * edge else height / 2
        draw.ellipse((x - edge, y - edge, x + edge, y + edge), fill="white")  # halo
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill="white", outline="black", width=outline)
        text = str(n)
        stroke = round(diameter / 28)  # stroke in the text colour = bold (none on tiny marks, it would blot)
        font = _font(max(6, round(diameter * (0.62 if len(text) == 1 else 0.48))))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
        draw.text(
            (x - (left + right) / 2, y - (top + bottom) / 2),
            text,
            fill="black",
            font=font,
            stroke_width=stroke,
            stroke_fill="black",
        )
    return out, marks


def mark_prompt(marks: dict[int, str], token_of: Callable[[str], str] = lambda cid: f"<{cid}>") -> str:
    """System text naming each mark: "Mark 1 is <bo>. Mark 2 is <ana>." ("" without marks)."""
    return " ".join(f"Mark {n} is {token_of(cid)}." for n, cid in sorted(marks.items()))
