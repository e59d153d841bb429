"""The version-3 tower on toy sizes: labels for every trait, action, held object and setting; heads that learn
them; align targets that spell them as words; the preset that picks all of it."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mcllava.backbone import Backbone
from mcllava.cli import app
from mcllava.layout import GridLayout
from mcllava.proving_base import load
from mcllava.proving_base.build import BACKGROUND_NORM, V3_WORDS, build, check_layout, tokenizer_for, v3_config
from mcllava.proving_base.build.align import (
    patch_word_targets,
    patch_word_trait,
    trait_word_vectors,
    word_readout,
    word_vectors,
)
from mcllava.proving_base.build.common import normalise, vision_model
from mcllava.proving_base.build.vision import CharacterHeads
from mcllava.proving_base.data import (
    ACT_TRAITS,
    HELD_PATCH_MIN,
    LABEL_TRAITS,
    LABEL_VALUES,
    MAX_ACTORS,
    OPTIONAL_TRAITS,
    _identities,
    held_masks,
    held_patch_labels,
    patch_coverage,
    rng_for,
    scene_labels,
    scene_pool,
)
from mcllava.proving_base.model import VisionSpec, tiny_text_model
from mcllava.world.render import HELD_OBJECTS
from mcllava.world.scenes import PROP, SETTINGS, sample_visible_scene

TOY = VisionSpec(image_size=64, patch_size=8, hidden=32, layers=1, heads=2)  # an 8 x 8 grid, as v3's


@pytest.fixture(scope="module")
def v3_build(tmp_path_factory, tokenizer_dir, toy_lm_sizes):
    work = tmp_path_factory.mktemp("v3")
    cfg = v3_config(work=work, progress=False, text_model=lambda tok: tiny_text_model(tok))
    cfg.vision = TOY
    cfg.vision_stage = replace(cfg.vision_stage, scenes=72, steps=2, batch_size=4)
    cfg.align = replace(cfg.align, steps=2, batch_size=4, tower_steps=2, tower_batch_size=4)
    cfg.lm = replace(cfg.lm, phases=tuple(replace(p, steps=1) for p in cfg.lm.phases), **toy_lm_sizes, eval_every=3)
    shutil.copytree(tokenizer_dir, work / "tokenizer")  # parsing the GGUF again would take seconds
    return cfg, build(cfg)


def test_the_preset_picks_the_v3_tower_heads_and_words():
    cfg = v3_config()
    check_layout(cfg)
    assert cfg.layout == "grid" and cfg.vision.image_size // cfg.vision.patch_size == 12 and cfg.vision.tokens == 144
    assert cfg.vision_stage.traits == LABEL_TRAITS and cfg.vision_stage.setting and cfg.vision_stage.device == "cpu"
    assert cfg.align.words == V3_WORDS and cfg.align.background_word == "setting" and cfg.align.stride == 2
    assert sorted(t for w in V3_WORDS for t in w.split("+")) == sorted(LABEL_TRAITS)  # each word once
    gpu = v3_config(gpu=True)
    assert gpu.vision_stage.device == "cuda" and gpu.vision.patch_size == 16 and gpu.vision.hidden > cfg.vision.hidden
    assert gpu.vision_stage.traits == LABEL_TRAITS


def test_the_cli_refuses_v3_with_slots_or_an_unknown_preset(tmp_path):
    for args, msg in ((["--preset", "v3", "--layout", "slots"], "grid build"), (["--preset", "v2"], "is v3")):
        res = CliRunner().invoke(app, ["base", "build", "--work", str(tmp_path), *args])
        assert res.exit_code == 2 and msg in res.output, res.output
    assert not (tmp_path / "vision").exists()


def test_scene_pool_labels_action_held_and_setting_of_each_scene():
    pool = scene_pool(3, 6, size=64, grid=8, workers=1)
    assert pool.acts.shape == (6, MAX_ACTORS, len(ACT_TRAITS)) and pool.setting.shape == (6,)
    assert pool.owner.shape == (6, 64)
    for i in range(6):  # scene i is fixed by (seed, i): draw it again and read its ground truth
        rng = rng_for(3, "scenes", i)
        scene = sample_visible_scene(rng, _identities(rng, int(rng.integers(1, MAX_ACTORS + 1)), "base"), 64)
        assert SETTINGS[int(pool.setting[i])] == scene.spec.setting
        for k in range(MAX_ACTORS):
            if k < len(scene.spec.actors):
                a = scene.spec.actors[k]
                assert LABEL_VALUES["action"][int(pool.acts[i, k, 0])] == a.action
                held = int(pool.acts[i, k, 1])
                assert (held == len(HELD_OBJECTS)) if a.held is None else HELD_OBJECTS[held] == a.held
            else:
                assert (pool.acts[i, k] == -100).all()
    heads = CharacterHeads(8, LABEL_TRAITS, setting=True)
    labels = heads.labels(pool.__dict__)
    assert labels.shape == (6, MAX_ACTORS, len(LABEL_TRAITS)) and torch.equal(labels[..., -2:], pool.acts)


def train_heads(pool: dict, steps: int, held_patch: bool = False):
    """A toy tower and the v3 heads trained together on `pool`; per step the loss and the per-patch held-object
    accuracy (before the step); the last patches and per-pair correctness."""
    torch.manual_seed(0)
    tower, heads = vision_model(TOY), CharacterHeads(TOY.hidden, LABEL_TRAITS, setting=True)
    labels, pixels = heads.labels(pool), normalise(pool["pixels"])
    opt = torch.optim.Adam(list(tower.parameters()) + list(heads.parameters()), lr=3e-3)
    losses, held = [], []
    for _ in range(steps):
        patches = tower(pixel_values=pixels).last_hidden_state[:, 1:]
        extra = (pool["held_patch"],) if held_patch else ()
        loss, correct = heads(patches, labels, pool["owner"], pool["setting"], *extra)
        if held_patch:
            held.append(heads.held_patch_loss(patches, pool["held_patch"])[1].mean().item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return heads, labels, patches, correct, losses, held


def test_the_v3_heads_learn_traits_action_held_and_setting_on_a_few_scenes():
    pool = scene_pool(0, 6, size=64, grid=8, workers=1).__dict__
    heads, labels, patches, correct, losses, _ = train_heads(pool, 25)
    assert losses[-1] < 0.6 * losses[0], losses
    # the setting is one more read-out per scene: without it, exactly 6 fewer pairs are scored
    assert len(correct) - len(heads(patches, labels, pool["owner"])[1]) == 6


def test_the_held_object_head_learns_the_patches_that_show_an_object():
    pool = scene_pool(0, 24, size=64, grid=8, workers=1, held=True).__dict__
    shown = (pool["held_patch"] >= 0) & (pool["held_patch"] < len(HELD_OBJECTS))
    assert shown.sum() >= 4
    heads, labels, patches, correct, _, accuracy = train_heads(pool, 40, held_patch=True)
    assert accuracy[-1] >= 0.9 > accuracy[0], accuracy  # chance among the objects and "none" is 1/6
    # each patch that shows an object is one more scored pair
    assert len(correct) - len(heads(patches, labels, pool["owner"], pool["setting"])[1]) == shown.sum()


def test_each_patch_is_labelled_with_the_held_object_it_shows():
    labelled = 0
    for i in range(16):
        rng = rng_for(7, "scenes", i)
        scene = sample_visible_scene(rng, _identities(rng, int(rng.integers(1, MAX_ACTORS + 1)), "base"), 192)
        owner = scene_labels(scene, 12, held=True)[1]
        y = held_patch_labels(scene, owner, 12)
        objects = held_masks(scene)
        anything = patch_coverage(scene.labels == PROP, 12)
        for j, thing in enumerate(HELD_OBJECTS):  # two characters may hold the same kind of object
            cover = [patch_coverage(objects[k], 12) for k, a in enumerate(scene.spec.actors) if a.held == thing]
            shown = np.max(cover, axis=0) if cover else np.zeros(144)
            assert (shown[y == j] >= HELD_PATCH_MIN).all()  # a labelled patch shows such an object...
            assert all((y[c >= HELD_PATCH_MIN] == j).any() for c in cover if (c >= HELD_PATCH_MIN).any())  # ...each one
            labelled += int((y == j).sum())
        none = y == len(HELD_OBJECTS)
        assert (owner[none] >= 0).all() and (anything[none] == 0).all()  # "none": owned, no object pixel
        assert ((y == -100) == ~none & ~((y >= 0) & (y < len(HELD_OBJECTS)))).all()
    assert labelled > 0


def test_v3_align_targets_spell_every_trait_on_owned_patches_and_the_setting_around(tokenizer):
    tok = tokenizer
    model = tiny_text_model(tok)
    words, stride = LABEL_TRAITS, 2
    which = patch_word_trait(8, len(words), stride).view(8, 8)
    assert set(which[:6, 2:4].reshape(-1).tolist()) == set(range(len(words)))  # 2 wide, 6 tall: every word
    values = {"category": "plush toy", "color": "red", "pattern": "striped", "ears": "round", "head": "square",
              "eyes": "wide-set", "build": "slim", "accessory": "none", "accessory_color": None, "action": "waving",
              "held": None}  # fmt: skip
    labels = torch.full((1, MAX_ACTORS, len(LABEL_TRAITS)), -100)
    labels[0, 0] = torch.tensor(
        [len(LABEL_VALUES[t]) if v is None else LABEL_VALUES[t].index(v) for t, v in values.items()]
    )
    owner = torch.full((8, 8), -1)
    owner[:6, 2:4] = 0
    owner = owner.view(1, 64)
    setting = torch.tensor([SETTINGS.index("living room")])
    tgt = patch_word_targets(model, tok, labels, owner, words, "setting", setting, stride)
    room = word_vectors(model, tok, ["room"])[0] * BACKGROUND_NORM
    assert torch.allclose(tgt[0, owner[0] < 0], room.expand(int((owner < 0).sum()), -1))
    spelled = {"category": "toy", "accessory_color": "none", "held": "nothing", "action": "waving", "head": "square"}
    for p in torch.nonzero(owner[0] >= 0).flatten().tolist():
        trait = words[int(which.view(-1)[p])]
        want = word_vectors(model, tok, [spelled.get(trait, str(values[trait]))])[0]
        assert torch.allclose(tgt[0, p], want, atol=1e-5), trait
    assert trait_word_vectors(model, tok, "held").shape[0] == len(HELD_OBJECTS) + 1
    # exact targets read back as the right word for every kind, shared words ("round", "red") included
    read = word_readout(model, tok, tgt, labels, owner, words, stride, setting)
    assert read == {**{t: 1.0 for t in words}, "setting": 1.0}
    shuffled = tgt[:, torch.randperm(64, generator=torch.Generator().manual_seed(1))]
    assert min(word_readout(model, tok, shuffled, labels, owner, words, stride, setting).values()) < 1.0


def test_v3_word_pairs_read_back_every_trait_from_a_character_six_patches_wide(tokenizer):
    """The version-3 tokens superpose two words: exact targets still read back as the right word of each trait,
    and a character owning a 2 x 3 block of the 12 x 12 grid shows all eleven."""
    tok, model, words, stride = tokenizer, tiny_text_model(tokenizer), V3_WORDS, 2
    which = patch_word_trait(12, len(words), stride).view(12, 12)
    assert {t for i in which[4:7, 5:7].reshape(-1).tolist() for t in words[i].split("+")} == set(LABEL_TRAITS)
    rng = np.random.default_rng(0)
    labels = torch.full((1, MAX_ACTORS, len(LABEL_TRAITS)), -100)
    labels[0, :2] = torch.tensor(
        [[int(rng.integers(len(LABEL_VALUES[t]) + (t in OPTIONAL_TRAITS))) for t in LABEL_TRAITS] for _ in range(2)]
    )
    owner = torch.full((12, 12), -1)
    owner[4:7, 5:7], owner[1:9, 9:11] = 0, 1
    owner = owner.view(1, 144)
    setting = torch.tensor([SETTINGS.index("beach")])
    tgt = patch_word_targets(model, tok, labels, owner, words, "setting", setting, stride)
    assert word_readout(model, tok, tgt, labels, owner, words, stride, setting) == {
        **{t: 1.0 for t in LABEL_TRAITS},
        "setting": 1.0,
    }
    swapped = labels[:, [1, 0, 2, 3]]  # each character's tokens read against the other's traits
    assert min(word_readout(model, tok, tgt, swapped, owner, words, stride, setting).values()) < 1.0


def test_a_v3_build_reports_every_trait_and_word_kind(v3_build):
    cfg, res = v3_build
    vision = json.loads((cfg.work / "vision" / "done.json").read_text())
    assert {f"val_{t}" for t in (*LABEL_TRAITS, "setting")} <= set(vision)
    words = res["align"]["held_out_word_accuracy"]
    assert set(words) == {*LABEL_TRAITS, "setting"} and all(0 <= v <= 1 for v in words.values())
    log = [json.loads(x) for x in (cfg.work / "vision" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and "val_held" in log[-1]
    # the language-model stage and the export run on the 8 x 8 tokens unchanged, and the export loads as a grid
    assert res["lm"]["steps"] == len(cfg.lm.phases)
    model, processor = load(cfg.work / "export", text_model=tiny_text_model(tokenizer_for(cfg)))
    backbone = Backbone(model, processor, "v3-toy")
    assert backbone.grid == (8, 8) and isinstance(backbone.layout, GridLayout) and backbone.num_image_tokens == 64


def test_held_objects_count_towards_their_holders_patches():
    """`scene_labels(..., held=True)`: every held-object pixel goes to a character that holds something, and the
    patches its holder owns then cover more of the object (most of it lies outside the body's patches)."""
    gained = []
    for i in range(12):
        rng = rng_for(5, "scenes", i)
        scene = sample_visible_scene(rng, _identities(rng, int(rng.integers(1, MAX_ACTORS + 1)), "base"), 64)
        objects = held_masks(scene)
        assert np.array_equal(np.logical_or.reduce(objects), scene.labels == PROP)
        for k, a in enumerate(scene.spec.actors):
            if a.held is None:
                assert not objects[k].any()
            elif objects[k].any():
                in_owned = [
                    (patch_coverage(objects[k], 8) * (scene_labels(scene, 8, held)[1] == k)).sum() for held in (0, 1)
                ]
                gained.append(in_owned[1] - in_owned[0])
        assert np.array_equal(scene_labels(scene, 8)[1], scene_labels(scene, 8, False)[1])
    assert gained and min(gained) >= 0 and max(gained) > 0
