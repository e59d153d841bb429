"""Token layouts: which image tokens show a masked object, and where a map over the tokens lies in the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mcllava.layout import LAYOUT_KEY, GridLayout, SlotLayout, layout_for
from mcllava.locate import LocateConfig, locate
from mcllava.proving_base.data import _identities, _slot, rng_for
from mcllava.world.scenes import sample_visible_scene


def _scenes(n: int):
    for i in range(n):
        rng = rng_for(3, "scenes", i)
        yield sample_visible_scene(rng, _identities(rng, int(rng.integers(1, 5)), "personal"), 192)


def test_grid_layout_is_the_patch_grid():
    mask = torch.zeros(8, 8)
    mask[:4, :4] = 1.0
    mask[4:, 4:6] = 1.0
    lay = GridLayout((2, 2))
    assert lay.coverage(mask).tolist() == [1.0, 0.0, 0.0, 0.5]
    m = torch.rand(2, 2)
    assert torch.equal(lay.spatial(m), m)


def test_slot_layout_finds_each_characters_row_from_its_mask_and_locates_it_in_its_box():
    lay, total, found, inside = SlotLayout(), 0, 0, 0
    for scene in _scenes(40):
        for k in range(len(scene.spec.actors)):
            mask = torch.from_numpy(scene.mask(k).astype(np.float32))
            cov = lay.coverage(mask).view(6, 6)
            total += 1
            found += int(cov[_slot(scene, k)].eq(1).all() and cov.sum() == 6)
            # a map that lights the character's row only: the locator's point falls in its true box
            feats = torch.zeros(6, 6, 8)
            feats[..., 1] = 1.0  # every token points one way, the character's row another
            feats[_slot(scene, k)] = torch.eye(8)[0]
            loc = locate(feats.view(36, 8), {"c": torch.eye(8)[:1]}, (6, 6), (192, 192), LocateConfig(), lay.spatial)[0]
            assert loc.present
            x0, y0, x1, y1 = scene.box(k)
            inside += int(x0 <= loc.peak[0] < x1 and y0 <= loc.peak[1] < y1)
    assert found == total  # the mask's column and foot line give the scene slot exactly
    assert inside / total >= 0.9, inside / total
    assert lay.coverage(torch.zeros(192, 192)).sum() == 0  # an empty mask shows nobody


def test_slot_layout_paints_rows_onto_their_part_of_the_image():
    token_map = torch.zeros(6, 6)
    token_map[5] = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 1.0])  # slot 5: right column, far; mean 2/3
    out = SlotLayout().spatial(token_map)
    assert torch.allclose(out[2:4, 4:6], torch.full((2, 2), 2 / 3)) and out.sum() == pytest.approx(4 * 2 / 3)


def test_layout_comes_from_the_model_config():
    class Config:
        pass

    cfg = Config()
    assert isinstance(layout_for(cfg, (24, 24)), GridLayout)
    setattr(cfg, LAYOUT_KEY, "slots")
    assert isinstance(layout_for(cfg, (6, 6)), SlotLayout)
    with pytest.raises(ValueError, match="6 x 6 token grid"):
        layout_for(cfg, (24, 24))
    setattr(cfg, LAYOUT_KEY, "spiral")
    with pytest.raises(ValueError, match="unknown mcllava_token_layout"):
        layout_for(cfg, (6, 6))


def test_backbone_masks_go_through_the_configured_layout(tiny_backbone):
    from PIL import Image

    img = Image.new("RGB", (32, 32))
    mask = np.zeros((32, 32), dtype=bool)
    mask[:16, :16] = True
    grid = tiny_backbone.mask_coverage([mask], [img])[0]
    assert grid.view(4, 4)[:2, :2].eq(1).all() and grid.sum() == 4  # the patch grid: the four top-left patches
