"""Where a base's image tokens are in the image: which tokens show a masked object, and where a token map lies.

LLaVA's image tokens are its patches, row-major (`GridLayout`): a mask covers the patches it covers, and a map
over the tokens is a map over the image. The proving-ground base may instead spell out each character of a
world scene as one row of words at the character's scene slot (`SlotLayout`; its config says
`mcllava_token_layout: "slots"`): there a mask picks its character's row, and a row's confidence belongs to its
slot's part of the image. Masks (k-means initialisation, masked locator references) and location maps go
through the layout, so the rest of mcllava never needs to know which kind of base it runs on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LAYOUT_KEY = "mcllava_token_layout"  # the model config's attribute naming a non-grid layout


@dataclass(frozen=True)
class GridLayout:
    """Token (r, c) is the patch in row r, column c of a gh x gw grid over the whole image."""

    grid: tuple[int, int]
    reference_reduce = "mean"  # the locator averages a token's cosine over a concept's k-means references

    def coverage(self, mask: torch.Tensor) -> torch.Tensor:
        """[gh*gw] share of each token's patch inside a [H, W] float mask (in the processor's geometry)."""
        return F.adaptive_avg_pool2d(mask[None, None].float(), self.grid).flatten()

    def spatial(self, token_map: torch.Tensor) -> torch.Tensor:
        """A [gh, gw] map over the tokens as a [gh, gw] map over the image (the same thing here)."""
        return token_map


@dataclass(frozen=True)
class SlotLayout:
    """Row s of the 6 x 6 tokens shows the character at scene slot s = column * 2 + (0 near, 1 far); columns are
    the image's left, centre and right thirds (`proving_base.data._slot`). Near characters stand lower and larger:
    their feet (the mask's lowest row) are below `near_below` of the height, far ones' above it (world scenes put
    them at 0.90-0.97 and 0.64-0.72)."""

    grid: tuple[int, int] = (6, 6)
    columns: int = 3
    near_below: float = 0.8
    # Each of a row's six tokens is a different word, so a token matches one of the concept's six references and
    # their mean sinks to the background level: the locator takes the best one (docs/results.md, "Grounding").
    reference_reduce = "max"

    def slot(self, mask: torch.Tensor) -> int | None:
        """The slot of the character a [H, W] mask shows (None for an empty mask)."""
        ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
        if len(xs) == 0:
            return None
        h, w = mask.shape
        col = min(self.columns - 1, int(xs.float().mean() / (w / self.columns)))
        return col * 2 + (0 if ys.max().item() + 1 > self.near_below * h else 1)

    def coverage(self, mask: torch.Tensor) -> torch.Tensor:
        """[36]: 1 on the tokens of the masked character's row, 0 elsewhere (all 0 for an empty mask)."""
        out = torch.zeros(self.grid)
        s = self.slot(mask)
        if s is not None:
            out[s] = 1.0
        return out.flatten()

    def spatial(self, token_map: torch.Tensor) -> torch.Tensor:
        """A [6, 6] map over the tokens as a [6, 6] map over the image: each slot's mean over its row, painted on
        its part of the image (its column's third; far slots rows 2-3, near slots rows 4-5 of six, where their
        bodies are), 0 above."""
        gh, gw = self.grid
        per_slot = token_map.reshape(gh, -1).mean(1)
        out = torch.zeros(gh, gw)
        cw = gw // self.columns
        for s, v in enumerate(per_slot.tolist()):
            col, far = divmod(s, 2)
            rows = slice(gh // 3, 2 * gh // 3) if far else slice(2 * gh // 3, gh)
            out[rows, col * cw : (col + 1) * cw] = v
        return out


def layout_for(config, grid: tuple[int, int]) -> GridLayout | SlotLayout:
    """The layout a LLaVA config declares (`mcllava_token_layout`), the patch grid by default."""
    name = getattr(config, LAYOUT_KEY, None) or "grid"
    if name == "grid":
        return GridLayout(grid)
    if name == "slots":
        if tuple(grid) != SlotLayout.grid:
            raise ValueError(f"a 'slots' token layout needs a 6 x 6 token grid, this model has {grid[0]} x {grid[1]}")
        return SlotLayout()
    raise ValueError(f"unknown {LAYOUT_KEY} {name!r} in the model config (known: 'grid', 'slots')")
