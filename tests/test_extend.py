"""Adding concepts to a trained bank: old rows stay bit-identical, old photos are negatives, bad input is refused."""

from __future__ import annotations

import random

import pytest
import torch
from typer.testing import CliRunner

from mcllava.backbone import Backbone
from mcllava.bank import ConceptBank
from mcllava.cli import app
from mcllava.concepts import ConceptSet
from mcllava.errors import BankError, McLlavaError
from mcllava.extend import OLD_PREFIX, old_catalog
from mcllava.presets import tiny as tiny_train_config
from mcllava.testing import make_base
from mcllava.tiny import make_shape_concepts
from mcllava.train import build_catalog, personalize
from mcllava.training_data import ConceptFacts, DataOptions, build_epoch

OLD = {"bo": ("red", "circle"), "ana": ("blue", "square")}
NEW = {"kiki": ("yellow", "triangle")}
QUICK = tiny_train_config(epochs=1, holdout=0)
QUIET = {"progress": False, "log": lambda *_: None}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_dir):
    """An untrained tiny base, the old and the new concepts' folders, and a bank of the old concepts (1 epoch)."""
    root = tmp_path_factory.mktemp("extend")
    base = make_base(tokenizer_dir, root / "base")
    old_dir, _ = make_shape_concepts(root / "old", OLD, n_train=3, n_test=0, seed=1)
    new_dir, _ = make_shape_concepts(root / "new", NEW, n_train=3, n_test=0, seed=2)
    backbone = Backbone.load(base)
    personalize(ConceptSet.load(old_dir, tokenizer=backbone.tokenizer), backbone, root / "bank", QUICK, **QUIET)
    return {"root": root, "base": base, "old": old_dir, "new": new_dir, "bank": root / "bank"}


def extend(world, out_name="extended", new=None, old=None, bank=None, config=QUICK):
    backbone = Backbone.load(world["base"])
    new_set = ConceptSet.load(new or world["new"], tokenizer=backbone.tokenizer)
    old_set = ConceptSet.load(old or world["old"], tokenizer=backbone.tokenizer)
    result = personalize(
        new_set,
        backbone,
        world["root"] / out_name,
        config,
        extend=ConceptBank.load(bank or world["bank"]),
        extend_concepts=old_set,
        **QUIET,
    )
    return result, backbone


def test_extension_keeps_old_rows_bit_identical_and_trains_only_new_rows(world):
    old = ConceptBank.load(world["bank"])
    result, backbone = extend(world)
    ext = ConceptBank.load(world["root"] / "extended")
    assert ext.concept_ids == old.concept_ids + ["kiki"]
    n = len(old.concept_ids)
    assert torch.equal(ext.input_rows[:n], old.input_rows)
    assert torch.equal(ext.head_rows[:n], old.head_rows)  # the tiny base's head is untied
    assert all(torch.equal(ext.locator_refs[c], old.locator_refs[c]) for c in old.concept_ids)
    assert ext.display["bo"] == old.display["bo"] and ext.recipe["extends"]["concepts"] == old.concept_ids
    # the new concept's rows did train (the first epoch moved them), and only they were trainable
    trainable = [p for name, p in backbone.model.named_parameters() if "trainable_tokens_delta" in name]
    assert [p.shape[0] for p in trainable] == [QUICK.k + 1] * 2  # embedding and head rows of one concept
    assert not torch.equal(ext.input_rows[n], torch.zeros_like(ext.input_rows[n]))


def test_old_concepts_are_negatives_and_cost_follows_new_concepts(world):
    backbone = Backbone.load(world["base"])
    old_set = ConceptSet.load(world["old"], tokenizer=backbone.tokenizer)
    new_set = ConceptSet.load(world["new"], tokenizer=backbone.tokenizer)
    new_entries, _ = build_catalog(new_set, None, holdout=0)
    old_entries = old_catalog(old_set)
    assert all(e.key.startswith(OLD_PREFIX) for e in old_entries)
    facts = [ConceptFacts("kiki")]
    options = DataOptions(short_answers=True, text=False)
    samples = build_epoch(new_entries + old_entries, facts, random.Random(0), options, frozen=["bo", "ana"])
    kiki_neg = [s for s in samples if s.concepts == ("kiki",) and s.kind == "negative"]
    assert kiki_neg and all(s.image.key.startswith(OLD_PREFIX) for s in kiki_neg)  # the only other photos are old ones
    # the old concepts are asked about too: No on the new concept's photos, Yes on their own
    about_old = [s for s in samples if s.concepts[0] in ("bo", "ana")]
    assert {s.answer for s in about_old if s.image.key.startswith("kiki/")} == {"No."}
    assert any(s.answer == "Yes." and s.image.key.startswith(OLD_PREFIX) for s in about_old)
    # cost: the samples follow the new concept's photos, not how many old concepts (and photos) there are
    doubled = old_entries + [e.__class__(OLD_PREFIX + "x" + e.key, e.path, e.mask_path, e.present) for e in old_entries]
    more = build_epoch(new_entries + doubled, facts, random.Random(0), options, frozen=["bo", "ana"])
    assert len(more) == len(samples) == 4 * len([e for e in new_entries if "kiki" in e.present])


def test_extension_refuses_bad_input(world, tokenizer_dir):
    root = world["root"]
    # an id already in the bank
    with pytest.raises(McLlavaError, match="already in bank"):
        extend(world, "x1", new=world["old"])
    # the bank's concept folder must hold the bank's concepts
    with pytest.raises(McLlavaError, match="lacks ana, bo"):
        extend(world, "x2", old=world["new"])
    # another k than the bank's
    with pytest.raises(McLlavaError, match="k=4"):
        extend(world, "x3", config=tiny_train_config(epochs=1, holdout=0, k=3))
    # a bank made on another base
    other = make_base(tokenizer_dir, root / "other-base", tied=True)
    backbone = Backbone.load(other)
    with pytest.raises(BankError, match="trained on base"):
        personalize(
            ConceptSet.load(world["new"], tokenizer=backbone.tokenizer),
            backbone,
            root / "x4",
            QUICK,
            extend=ConceptBank.load(world["bank"]),
            extend_concepts=ConceptSet.load(world["old"]),
            **QUIET,
        )
    # without the bank's concept folder
    with pytest.raises(McLlavaError, match="--concepts-of-bank"):
        personalize(
            ConceptSet.load(world["new"]),
            Backbone.load(world["base"]),
            root / "x5",
            QUICK,
            extend=ConceptBank.load(world["bank"]),
            **QUIET,
        )
    assert not any((root / f"x{i}").exists() for i in range(1, 6))  # nothing half-written


def test_cli_extend(world):
    runner = CliRunner()
    out = world["root"] / "cli-ext"
    args = [
        "personalize",
        str(world["new"]),
        "--extend",
        str(world["bank"]),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--holdout",
        "0",
        "--quiet",
        "--concepts-of-bank",
        str(world["old"]),
    ]
    with_base = [*args, "--base", str(world["base"])]
    clash = runner.invoke(app, ["personalize", str(world["old"]), *with_base[2:]])
    assert clash.exit_code == 2 and "already in bank" in clash.output
    stray = runner.invoke(
        app,
        [
            "personalize",
            str(world["new"]),
            "--base",
            str(world["base"]),
            "--out",
            str(out),
            "--concepts-of-bank",
            str(world["old"]),
        ],
    )
    assert stray.exit_code == 2 and "--extend" in stray.output
    local = runner.invoke(app, args)  # the bank names its base by a local path: followed only with --base
    assert local.exit_code == 2 and "--base" in local.output
    done = runner.invoke(app, with_base)
    assert done.exit_code == 0, done.output
    ext, old = ConceptBank.load(out), ConceptBank.load(world["bank"])
    assert ext.concept_ids == old.concept_ids + ["kiki"] and torch.equal(ext.input_rows[:2], old.input_rows)
