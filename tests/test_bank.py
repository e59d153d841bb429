"""Concept bank: round trip, atomic saves, refusals on load, base checks, merge and subset."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

import mcllava.bank as bank_mod
from mcllava.bank import FORMAT_VERSION, ConceptBank, config_hash
from mcllava.errors import BankError

K, D = 3, 8


def make_bank(ids=("bo", "ana"), tied=False, seed=0, **kw) -> ConceptBank:
    g = torch.Generator().manual_seed(seed)
    m = len(ids)
    fields = dict(
        base_model="tiny/base",
        base_config_hash="0123456789abcdef",
        tokenizer_len_before=100,
        concept_ids=list(ids),
        k=K,
        hidden_size=D,
        tied_head=tied,
        input_rows=torch.randn(m, K + 1, D, generator=g),
        head_rows=None if tied else torch.randn(m, K + 1, D, generator=g),
        locator_refs={ids[0]: torch.randn(5, D, generator=g)},
        display={ids[0]: {"name": "Bo", "category": "dog", "description": None, "facts": []}},
        recipe={"lr": 1e-3, "epochs": 2},
        metrics={"loss": 0.25},
    )
    fields.update(kw)
    return ConceptBank(**fields)


def assert_same(a: ConceptBank, b: ConceptBank) -> None:
    for f in (
        "base_model",
        "base_config_hash",
        "tokenizer_len_before",
        "concept_ids",
        "k",
        "hidden_size",
        "tied_head",
        "display",
        "recipe",
        "metrics",
    ):
        assert getattr(a, f) == getattr(b, f), f
    assert torch.equal(a.input_rows, b.input_rows)
    assert (a.head_rows is None and b.head_rows is None) or torch.equal(a.head_rows, b.head_rows)
    assert a.locator_refs.keys() == b.locator_refs.keys()
    assert all(torch.equal(a.locator_refs[c], b.locator_refs[c]) for c in a.locator_refs)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip(tmp_path, tied):
    bank = make_bank(tied=tied)
    out = bank.save(tmp_path / "bank")
    loaded = ConceptBank.load(out)
    assert_same(bank, loaded)
    assert loaded.path == out and bank.path == out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["tokenizer_len_after"] == 100 + 2 * (K + 1)
    assert manifest["tokens"]["bo"] == ["<bo>", "<bo_1>", "<bo_2>", "<bo_3>"]
    assert {"created", "mcllava_version"} <= manifest.keys()
    assert bank.all_tokens[:5] == ["<bo>", "<bo_1>", "<bo_2>", "<bo_3>", "<ana>"]
    assert 0 < ConceptBank.size_bytes(out) < 10_000
    assert leftovers(tmp_path) == []


def test_save_over_existing_bank_replaces_it(tmp_path):
    make_bank(seed=0).save(tmp_path / "bank")
    new = make_bank(seed=1)
    new.save(tmp_path / "bank")
    assert_same(new, ConceptBank.load(tmp_path / "bank"))
    assert leftovers(tmp_path) == []


def test_save_refuses_to_replace_a_non_bank_folder(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "precious.txt").write_text("keep me")
    with pytest.raises(BankError, match="not a concept bank"):
        make_bank().save(tmp_path / "docs")
    assert (tmp_path / "docs" / "precious.txt").read_text() == "keep me"


def test_disk_full_midway_keeps_old_bank(tmp_path, monkeypatch):
    old = make_bank(seed=0)
    old.save(tmp_path / "bank")

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 64)  # a partial file, then the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bank_mod, "save_file", half_write)
    with pytest.raises(BankError, match="disk is full") as info:
        make_bank(seed=1).save(tmp_path / "bank")
    assert str(tmp_path / "bank") in str(info.value)
    assert_same(old, ConceptBank.load(tmp_path / "bank"))
    assert leftovers(tmp_path) == []


def test_failed_rename_restores_old_bank(tmp_path, monkeypatch):
    old = make_bank(seed=0)
    old.save(tmp_path / "bank")
    real_rename = os.rename

    def flaky(src, dst):
        if ".tmp-" in str(src):
            raise OSError(errno.EIO, "I/O error")
        return real_rename(src, dst)

    monkeypatch.setattr(bank_mod.os, "rename", flaky)
    with pytest.raises(BankError, match="I/O error"):
        make_bank(seed=1).save(tmp_path / "bank")
    assert_same(old, ConceptBank.load(tmp_path / "bank"))
    assert leftovers(tmp_path) == []


def test_read_only_folder(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    old = make_bank(seed=0)
    old.save(parent / "bank")
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("running as root: chmod does not make the folder read-only")
        with pytest.raises(BankError, match="permission denied") as info:
            make_bank(seed=1).save(parent / "bank")
        assert str(parent / "bank") in str(info.value)
    finally:
        parent.chmod(0o755)
    assert_same(old, ConceptBank.load(parent / "bank"))
    assert leftovers(parent) == []


def test_permission_denied_even_as_root(tmp_path, monkeypatch):
    """The read-only case, simulated where chmod cannot be (root): the temp folder cannot be created."""
    old = make_bank(seed=0)
    old.save(tmp_path / "bank")

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(bank_mod.tempfile, "mkdtemp", denied)
    with pytest.raises(BankError, match="permission denied"):
        make_bank(seed=1).save(tmp_path / "bank")
    assert_same(old, ConceptBank.load(tmp_path / "bank"))


def _tamper(path: Path, drop=(), **changes) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    for key in drop:
        del manifest[key]
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_load_refusals(tmp_path):
    with pytest.raises(BankError, match="not found"):
        ConceptBank.load(tmp_path / "nothing")

    b = make_bank().save(tmp_path / "newer")
    _tamper(b, format_version=FORMAT_VERSION + 1)
    with pytest.raises(BankError, match="newer"):
        ConceptBank.load(b)

    b = make_bank().save(tmp_path / "shape")
    _tamper(b, k=K + 1, drop=("tokens", "tokenizer_len_after"))
    with pytest.raises(BankError, match=r"input_rows has shape \(2, 4, 8\), expected .* \(2, 5, 8\)"):
        ConceptBank.load(b)

    b = make_bank().save(tmp_path / "missing")
    (b / "concepts.safetensors").unlink()
    with pytest.raises(BankError, match="concepts.safetensors is missing"):
        ConceptBank.load(b)

    b = make_bank().save(tmp_path / "json")
    (b / "manifest.json").write_text("{not json")
    with pytest.raises(BankError, match="not valid JSON"):
        ConceptBank.load(b)

    b = make_bank().save(tmp_path / "tokens")
    _tamper(b, tokens={"bo": ["<x>"], "ana": []})
    with pytest.raises(BankError, match="'tokens' does not match"):
        ConceptBank.load(b)

    b = make_bank().save(tmp_path / "keys")
    _tamper(b, tied_head=True)
    with pytest.raises(BankError, match="unexpected.*head_rows"):
        ConceptBank.load(b)

    b = make_bank().save(tmp_path / "locator")
    _tamper(b, locator_refs={"bo": 5, "ana": 2})
    with pytest.raises(BankError, match=r"missing \['locator.ana'\]"):
        ConceptBank.load(b)

    b = make_bank().save(tmp_path / "garbage")
    (b / "concepts.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(BankError, match="safetensors"):
        ConceptBank.load(b)


def test_load_refuses_tampered_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    b = make_bank().save(tmp_path / "bank")
    tensors = load_file(b / "concepts.safetensors")
    tensors["input_rows"] = tensors["input_rows"][:, :2].contiguous()
    save_file(tensors, b / "concepts.safetensors")
    with pytest.raises(BankError, match="input_rows has shape"):
        ConceptBank.load(b)
    tensors = load_file(make_bank().save(tmp_path / "nan") / "concepts.safetensors")
    tensors["head_rows"][0, 0, 0] = float("nan")
    save_file(tensors, tmp_path / "nan" / "concepts.safetensors")
    with pytest.raises(BankError, match="head_rows contains NaN"):
        ConceptBank.load(tmp_path / "nan")


def test_check_base(tmp_path):
    bank = ConceptBank.load(make_bank().save(tmp_path / "bank"))
    bank.check_base("0123456789abcdef", tokenizer_len=100)
    with pytest.raises(
        BankError, match=r"was trained on base tiny/base \(config 0123456789abcdef\), not on this model \(config ffff\)"
    ) as info:
        bank.check_base("ffff")
    assert str(tmp_path / "bank") in str(info.value)
    with pytest.raises(BankError, match="tokenizer of 100 tokens"):
        bank.check_base("0123456789abcdef", tokenizer_len=101)


def test_merge_and_subset():
    a, b = make_bank(("bo", "ana"), seed=0), make_bank(("cy",), seed=1, recipe={"lr": 1e-2})
    merged = a.merge(b)
    assert merged.concept_ids == ["bo", "ana", "cy"]
    assert torch.equal(merged.input_rows[2], b.input_rows[0]) and torch.equal(merged.head_rows[:2], a.head_rows)
    assert merged.locator_refs.keys() == {"bo", "cy"} and merged.recipe == {"merged": [a.recipe, b.recipe]}
    sub = merged.subset(["cy", "bo"])
    assert sub.concept_ids == ["cy", "bo"] and torch.equal(sub.input_rows[1], a.input_rows[0])
    assert sub.display.keys() == {"bo", "cy"} and sub.locator_refs.keys() == {"bo", "cy"}
    with pytest.raises(BankError, match="no concept 'zed'"):
        merged.subset(["zed"])


@pytest.mark.parametrize(
    "other, expected",
    [
        (dict(ids=("Bo",)), "'bo' and 'Bo'"),
        (dict(ids=("bo_2",)), "soft token"),
        (dict(ids=("cy",), tied=True), "tied_head differs"),
        (dict(ids=("cy",), base_config_hash="ffff"), "base_config_hash differs"),
        (dict(ids=("cy",), tokenizer_len_before=7), "tokenizer_len_before differs"),
    ],
)
def test_merge_refusals(other, expected):
    ids = other.pop("ids")
    with pytest.raises(BankError, match=expected):
        make_bank(("bo", "ana")).merge(make_bank(ids, seed=1, **other))


def test_constructor_checks():
    with pytest.raises(BankError, match="head is untied"):
        make_bank(head_rows=None)
    with pytest.raises(BankError, match="input_rows has shape"):
        make_bank(input_rows=torch.zeros(2, K, D))
    with pytest.raises(BankError, match="NaN"):
        make_bank(input_rows=torch.full((2, K + 1, D), float("inf")))
    with pytest.raises(BankError, match="concept id"):
        make_bank(ids=("bo", "9x"))


def test_config_hash_ignores_volatile_keys():
    base = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=100)
    grown = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=140
    )
    grown._name_or_path = "/somewhere/else"
    assert config_hash(base) == config_hash(grown) and len(config_hash(base)) == 16
    other = LlamaConfig(
        hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=100
    )
    assert config_hash(other) != config_hash(base)
    nested = {"text_config": {"vocab_size": 1, "hidden_size": 4}, "architectures": ["X"]}
    assert config_hash(nested) == config_hash({"text_config": {"vocab_size": 2, "hidden_size": 4}})
