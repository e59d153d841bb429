"""Location maps, presence, boxes and Set-of-Mark rendering on synthetic visual tokens."""

import numpy as np
import pytest
import torch
from PIL import Image

from mcllava.locate import (
    LocateConfig,
    Location,
    draw_marks,
    locate,
    mark_prompt,
    normalise_across_concepts,
    similarity_maps,
)

GH, GW, D = 6, 8, 256
SIZE = (640, 360)  # (width, height): one patch is 80 x 60 px
BLOCK_A = [(0, 0), (0, 1), (1, 0), (1, 1)]  # top-left, pixels (0, 0, 160, 120)
BLOCK_B = [(4, 6), (4, 7), (5, 6), (5, 7)]  # bottom-right, pixels (480, 240, 640, 360)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture()
def scene():
    """Random unit tokens with concept A planted top-left and B bottom-right; 3 noisy references each."""
    g = torch.Generator().manual_seed(0)
    feats = unit(torch.randn(GH, GW, D, generator=g))
    dirs = {cid: unit(torch.randn(D, generator=g)) for cid in ("a", "b", "c")}
    for cid, block in (("a", BLOCK_A), ("b", BLOCK_B)):
        for r, c in block:
            feats[r, c] = unit(dirs[cid] + 0.5 * unit(torch.randn(D, generator=g)))
    refs = {cid: unit(d + 0.3 * unit(torch.randn(3, D, generator=g))) for cid, d in dirs.items()}
    return feats.reshape(GH * GW, D), refs


def inside(point, box):
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def test_two_concepts_get_their_own_peak_and_box(scene):
    feats, refs = scene
    a, b = locate(feats, {"a": refs["a"], "b": refs["b"]}, (GH, GW), SIZE)
    assert (a.concept_id, b.concept_id) == ("a", "b")
    assert a.present and b.present and a.score > 0.9 and b.score > 0.9
    assert a.box == (0.0, 0.0, 160.0, 120.0)
    assert b.box == (480.0, 240.0, 640.0, 360.0)
    assert a.peak == pytest.approx((80.0, 60.0), abs=15)
    assert b.peak == pytest.approx((560.0, 300.0), abs=15)
    assert a.map.shape == (GH, GW) and float(a.map.max()) > 0.9 and float(a.map.median()) < 0.1


def test_unrelated_concept_is_absent(scene):
    feats, refs = scene
    locs = locate(feats, refs, (GH, GW), SIZE)
    c = locs[2]
    assert [loc.present for loc in locs] == [True, True, False]
    assert c.concept_id == "c" and c.box is None and c.score < 0.5


def test_single_concept(scene):
    feats, refs = scene
    (a,) = locate(feats, {"a": refs["a"]}, (GH, GW), SIZE)
    assert a.present and a.box == (0.0, 0.0, 160.0, 120.0)
    (c,) = locate(feats, {"c": refs["c"]}, (GH, GW), SIZE)
    assert not c.present and c.box is None


def test_area_gate(scene):
    feats, refs = scene
    # the planted block is 4 of 48 tokens (8%): a 10% gate rejects it, an 8% gate keeps it
    assert not locate(feats, {"a": refs["a"]}, (GH, GW), SIZE, LocateConfig(min_area=0.10))[0].present
    assert locate(feats, {"a": refs["a"]}, (GH, GW), SIZE, LocateConfig(min_area=4 / 48))[0].present


def test_normalisation_shares_evidence(scene):
    feats, refs = scene
    maps = normalise_across_concepts(similarity_maps(feats, {"a": refs["a"], "twin": refs["a"]}, (GH, GW)))
    total = maps["a"] + maps["twin"]
    assert float(total.max()) <= 1 + 1e-6 and float(total.min()) >= 0
    assert torch.allclose(maps["a"], maps["twin"]) and float(maps["a"].max()) == pytest.approx(0.5, abs=0.01)

    cfg = LocateConfig()
    raw = similarity_maps(feats, {"a": refs["a"]}, (GH, GW))["a"]
    alone = normalise_across_concepts({"a": raw}, cfg)["a"]
    assert torch.allclose(alone, torch.sigmoid((raw - cfg.background) / cfg.temperature), atol=1e-6)


@pytest.fixture()
def located(scene):
    feats, refs = scene
    return locate(feats, refs, (GH, GW), SIZE)


def test_draw_marks_new_image_changed_only_near_peaks(located):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8))
    before = image.tobytes()
    out, marks = draw_marks(image, located)
    assert out is not image and out.size == image.size and image.tobytes() == before
    a, b = located[0], located[1]
    assert marks == ({1: "a", 2: "b"} if a.score >= b.score else {1: "b", 2: "a"})

    changed = torch.from_numpy((np.asarray(out) != np.asarray(image)).any(-1))
    ys, xs = changed.nonzero(as_tuple=True)
    assert len(ys) > 0
    reach = max(16, round(0.08 * min(SIZE))) / 2 + 3  # radius + halo + antialiasing
    near = torch.zeros_like(ys, dtype=torch.bool)
    for loc in (a, b):
        near |= ((xs + 0.5 - loc.peak[0]) ** 2 + (ys + 0.5 - loc.peak[1]) ** 2) <= reach**2
    assert bool(near.all())


@pytest.mark.parametrize("shade", [0, 255])
def test_marks_readable_on_black_and_white(shade):
    image = Image.new("RGB", (200, 120), (shade,) * 3)
    loc = Location("bo", 0.9, True, (100.0, 60.0), (80.0, 40.0, 120.0, 80.0), torch.zeros(2, 2))
    out, marks = draw_marks(image, [loc])
    assert marks == {1: "bo"}
    radius = 16 / 2  # 8% of 120 px is under the 16 px minimum
    disc = torch.from_numpy(np.asarray(out.convert("L"), dtype=np.int16))
    yy, xx = torch.meshgrid(torch.arange(120), torch.arange(200), indexing="ij")
    pixels = disc[((xx + 0.5 - 100) ** 2 + (yy + 0.5 - 60) ** 2) <= (radius + 1) ** 2]
    assert int((pixels < 40).sum()) > 0 and int((pixels > 215).sum()) > 0
    # the mark as a whole also shows the opposite of the background
    assert int((disc != shade).sum()) > 0


def test_draw_marks_limits_and_skips_absent():
    image = Image.new("L", (300, 300), 128)
    locs = [Location(f"c{i}", i / 20, True, (20.0 + 25 * i, 150.0), None, torch.zeros(1, 1)) for i in range(10)]
    locs.append(Location("gone", 0.99, False, (150.0, 150.0), None, torch.zeros(1, 1)))
    out, marks = draw_marks(image, locs, max_marks=3)
    assert out.size == (300, 300) and marks == {1: "c9", 2: "c8", 3: "c7"}
    out, marks = draw_marks(image, [locs[-1]])
    assert marks == {} and out.tobytes() == image.convert("RGB").tobytes()


def test_mark_prompt():
    assert mark_prompt({2: "ana", 1: "bo"}) == "Mark 1 is <bo>. Mark 2 is <ana>."
    assert mark_prompt({}) == ""
    assert mark_prompt({1: "bo"}, token_of=lambda cid: f"[{cid}]") == "Mark 1 is [bo]."


def test_invalid_inputs(scene):
    feats, refs = scene
    with pytest.raises(ValueError, match="48 tokens but grid 6x7"):
        locate(feats, refs, (6, 7), SIZE)
    with pytest.raises(ValueError, match=r"features must be \[N, D\]"):
        locate(feats[0], refs, (GH, GW), SIZE)
    with pytest.raises(ValueError, match="references is empty"):
        locate(feats, {}, (GH, GW), SIZE)
    with pytest.raises(ValueError, match=r"references\['a'\] must be a non-empty"):
        locate(feats, {"a": torch.zeros(0, D)}, (GH, GW), SIZE)
    with pytest.raises(ValueError, match=r"references\['a'\] has width 10 .* width 256"):
        locate(feats, {"a": torch.zeros(2, 10)}, (GH, GW), SIZE)
    with pytest.raises(ValueError, match="image_size"):
        locate(feats, refs, (GH, GW), (0, 10))
    with pytest.raises(ValueError, match="threshold"):
        LocateConfig(threshold=1.5)


def test_max_over_references_finds_a_concept_whose_tokens_are_different_words():
    """A slots-layout character is a row of six different words and its references are those six: each token
    matches one reference, so the mean over references sinks to the background while the best one finds it."""
    g = torch.Generator().manual_seed(1)
    words = unit(torch.randn(6, D, generator=g))
    feats = unit(torch.randn(GH, GW, D, generator=g))
    feats[2, :6] = words  # the concept's row
    feats = feats.reshape(GH * GW, D)
    refs = {"a": words, "b": unit(torch.randn(6, D, generator=g))}
    mean = {loc.concept_id: loc for loc in locate(feats, refs, (GH, GW), SIZE, LocateConfig())}
    best = {loc.concept_id: loc for loc in locate(feats, refs, (GH, GW), SIZE, LocateConfig(reduce="max"))}
    assert not mean["a"].present
    assert best["a"].present and not best["b"].present
    assert 120 <= best["a"].peak[1] <= 180  # row 2 of six over 360 px
    with pytest.raises(ValueError, match="reduce"):
        LocateConfig(reduce="median")


def test_slot_layout_locates_with_the_best_reference():
    from mcllava.layout import GridLayout, SlotLayout

    assert SlotLayout().reference_reduce == "max" and GridLayout((6, 6)).reference_reduce == "mean"
