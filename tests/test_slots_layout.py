"""The proving ground's "slots" token layout: image-token row r shows the character at scene slot r, one word each."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from mcllava.errors import McLlavaError
from mcllava.proving_base.build import (
    BACKGROUND_NORM,
    SLOT_WORDS,
    AlignStage,
    BuildConfig,
    LMStage,
    Phase,
    VisionStage,
    build,
    check_layout,
    tokenizer_for,
)
from mcllava.proving_base.build.align import slot_word_readout, slot_word_targets, trait_word_vectors, word_vectors
from mcllava.proving_base.build.pool import sample_features
from mcllava.proving_base.data import (
    MIRROR_SLOTS,
    N_SLOTS,
    PATCH_TRAITS,
    VALUES,
    Curriculum,
    _identities,
    _slot,
    rng_for,
    slot_labels,
)
from mcllava.proving_base.model import VisionSpec, tiny_text_model
from mcllava.proving_base.tasks import lm_sample
from mcllava.world.scenes import render_scene, sample_scene

TOY_VISION = VisionSpec(image_size=96, patch_size=16, hidden=32, layers=2, heads=2)  # 6 x 6 tokens, as the base


@pytest.fixture(scope="module")
def slots_toy(tmp_path_factory, toy_lm_sizes):
    work = tmp_path_factory.mktemp("slots")
    phases = (
        Phase("read", 1, Curriculum(mix=(0, 1, 0, 0, 0, 0)), oracle=True),
        Phase("compare", 1, Curriculum(2, 0.5, (0, 0.5, 0, 0.5, 0, 0))),
    )
    cfg = BuildConfig(
        work=work,
        vision=TOY_VISION,
        layout="slots",
        vision_stage=VisionStage(scenes=72, steps=2, batch_size=4),
        align=AlignStage(steps=2, batch_size=4, words=SLOT_WORDS, tower_steps=2),
        lm=LMStage(phases=phases, **toy_lm_sizes, eval_every=1, checkpoint_every=1),
        progress=False,
        text_model=lambda tok: tiny_text_model(tok),
    )
    (work / "tokenizer").mkdir(exist_ok=True)
    return cfg, build(cfg)


def test_slot_labels_put_each_character_at_its_scene_position_and_mirror():
    rng = rng_for(0, "scenes", 5)
    spec = sample_scene(rng, _identities(rng, 3, "base"), 96)
    scene = render_scene(spec)
    table = slot_labels(scene)
    assert table.shape == (N_SLOTS, len(PATCH_TRAITS))
    for k, a in enumerate(spec.actors):
        assert table[_slot(scene, k), 0] == VALUES["category"].index(a.identity.category)
        assert table[_slot(scene, k), 1] == VALUES["color"].index(a.identity.color)
    assert (table[:, 0] != -100).sum() == 3  # three characters, three distinct slots, the rest empty
    # the vision stage mirrors scenes: the mirrored scene's table is the table with left and right swapped
    mirrored = render_scene(replace(spec, actors=[replace(a, x=spec.size - a.x) for a in spec.actors]))
    assert np.array_equal(slot_labels(mirrored), table[MIRROR_SLOTS])
    assert sorted(MIRROR_SLOTS) == list(range(N_SLOTS)) and [MIRROR_SLOTS[s] for s in MIRROR_SLOTS] == list(
        range(N_SLOTS)
    )


def test_slot_word_targets_show_one_word_per_token_and_read_back(slots_toy):
    cfg, _ = slots_toy
    tok = tokenizer_for(cfg)
    model = tiny_text_model(tok)
    slots = torch.full((1, N_SLOTS, len(PATCH_TRAITS)), -100)
    traits = ("dog", "red", "striped", "round", "round", "close-set", "slim", "hat", "blue")
    slots[0, 4] = torch.tensor([VALUES[t].index(v) for t, v in zip(PATCH_TRAITS, traits)])
    tgt = slot_word_targets(model, tok, slots, SLOT_WORDS)
    assert tgt.shape == (1, N_SLOTS * len(SLOT_WORDS), model.get_input_embeddings().weight.shape[1])
    rows = tgt.view(N_SLOTS, len(SLOT_WORDS), -1)
    for t, word in enumerate(SLOT_WORDS):  # slot 4's row spells the character out, one trait per token
        value = VALUES[word].index(traits[PATCH_TRAITS.index(word)])
        assert torch.allclose(rows[4, t], trait_word_vectors(model, tok, word)[value])
    bg = word_vectors(model, tok, ["grass"])[0] * BACKGROUND_NORM
    assert torch.allclose(rows[[0, 1, 2, 3, 5]], bg.expand(5, len(SLOT_WORDS), -1))
    assert slot_word_readout(model, tok, tgt, slots, SLOT_WORDS) == {**{w: 1.0 for w in SLOT_WORDS}, "empty": 1.0}
    # a token showing another trait's word of the same character is read as wrong
    wrong = tgt.clone().view(N_SLOTS, len(SLOT_WORDS), -1)
    wrong[4, 1] = wrong[4, 0]
    assert slot_word_readout(model, tok, wrong.view(1, -1, wrong.shape[-1]), slots, SLOT_WORDS)["color"] == 0.0


def test_slots_build_trains_slot_heads_and_oracle_phases(slots_toy):
    cfg, res = slots_toy
    assert {f"val_slot_{w}" for w in SLOT_WORDS} <= set(res["vision"])
    assert set(res["align"]["held_out_word_accuracy"]) == {*SLOT_WORDS, "empty"} and res["align"]["tower_steps"] == 2
    log = [json.loads(x) for x in (cfg.work / "lm" / "log.jsonl").read_text().splitlines() if "val" in x]
    assert [r["tokens"] for r in log] == ["oracle", "tower"]  # each evaluation scores the phase's own tokens
    # an oracle phase feeds the pool's exact targets in place of the projected tower tokens
    from mcllava.proving_base.build import EncodedPool

    saved = torch.load(cfg.work / "lm" / "pool_read.pt", weights_only=False)
    saved.pop("spec")
    pool = EncodedPool(**saved)
    assert pool.oracle is not None and pool.oracle.shape[1] == N_SLOTS * len(SLOT_WORDS)

    class FakeBackbone:  # sample_features needs only the projector
        model = type(
            "M",
            (),
            {
                "model": type(
                    "I", (), {"multi_modal_projector": torch.nn.Linear(cfg.vision.hidden, pool.oracle.shape[-1])}
                )()
            },
        )()

    idx = torch.tensor([0, 1])
    assert torch.equal(
        sample_features(FakeBackbone, pool, idx, 1.0, oracle=True), pool.oracle[idx].reshape(-1, pool.oracle.shape[-1])
    )
    assert not torch.equal(
        sample_features(FakeBackbone, pool, idx, 1.0), pool.oracle[idx].reshape(-1, pool.oracle.shape[-1])
    )


def test_a_slots_export_loads_with_its_layout(slots_toy):
    from mcllava.backbone import Backbone
    from mcllava.layout import SlotLayout
    from mcllava.proving_base import load

    cfg, _ = slots_toy
    model, processor = load(cfg.work / "export", text_model=tiny_text_model(tokenizer_for(cfg)))
    assert isinstance(Backbone(model, processor, "slots-export").layout, SlotLayout)


def test_lm_samples_carry_the_slot_table():
    s = lm_sample(0, 3, Curriculum(1, 0.5, (0, 0, 0, 1, 0, 0)), 96)
    assert s["slots"].shape == (N_SLOTS, len(PATCH_TRAITS)) and (s["slots"][:, 0] != -100).any()
    assert "slots" not in lm_sample(0, 3, Curriculum(1, 0.5, (0, 0, 1, 0, 0, 0)), 96)  # text only: no photo


def test_layout_is_checked_before_any_stage(tmp_path):
    oracle = LMStage(phases=(Phase("read", 1, Curriculum(), oracle=True),))
    with pytest.raises(McLlavaError, match="oracle LM phases need layout='slots'"):
        check_layout(BuildConfig(work=tmp_path, lm=oracle))
    with pytest.raises(McLlavaError, match="6 x 6 token grid"):
        check_layout(
            BuildConfig(
                work=tmp_path,
                layout="slots",
                align=AlignStage(words=SLOT_WORDS),
                vision=VisionSpec(image_size=64, patch_size=16),
            )
        )
    with pytest.raises(McLlavaError, match="6 single align words"):
        build(BuildConfig(work=tmp_path, layout="slots"), stages=("vision",))  # the default grid words
    assert not (tmp_path / "vision").exists()
    with pytest.raises(McLlavaError, match="layout must be"):
        check_layout(BuildConfig(work=tmp_path, layout="rows"))
    check_layout(BuildConfig(work=tmp_path, layout="slots", align=AlignStage(words=SLOT_WORDS)))
