"""Odd but readable bank manifests are refused on load with one error naming the field; a bank's base is named
by a hub id or `proving-ground`, never followed as a local path; rows of absurd size are refused on a model."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from typer.testing import CliRunner

from mcllava.assistant import PersonalAssistant
from mcllava.bank import ConceptBank
from mcllava.cli import app
from mcllava.errors import BankError
from mcllava.testing import make_bank, make_base

runner = CliRunner()


@pytest.fixture()
def bank_dir(tmp_path):
    bank = ConceptBank(
        base_model="proving-ground",
        base_config_hash="0123456789abcdef",
        tokenizer_len_before=10,
        concept_ids=["bo", "ana"],
        k=2,
        hidden_size=4,
        tied_head=True,
        input_rows=torch.randn(2, 3, 4),
        head_rows=None,
        display={"bo": {"name": "Bo", "category": "dog"}},
        metrics={"history": [{"epoch": 1, "loss": 0.5, "probe": {"weighted_accuracy": 0.9}}]},
    )
    return bank.save(tmp_path / "bank")


def tamper(bank_dir, path: str, value) -> None:
    """Set a field of the manifest, by a dotted path."""
    manifest = json.loads((bank_dir / "manifest.json").read_text())
    *parents, last = path.split(".")
    node = manifest
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    (bank_dir / "manifest.json").write_text(json.dumps(manifest))


ODD = [
    ("metrics.history", [{}], "metrics.history[0].epoch must be a non-negative integer"),
    ("metrics.history", "abc", "metrics.history must be a list of epochs"),
    ("metrics.history", [{"epoch": 1, "loss": "x"}], "metrics.history[0].loss must be a number"),
    ("metrics.history", [{"epoch": 1, "loss": 1.0}, 7], "metrics.history[1] must be an object"),
    (
        "metrics.history",
        [{"epoch": 1, "loss": 1.0, "probe": {"weighted_accuracy": "high"}}],
        "metrics.history[0].probe",
    ),
    ("display.bo.name", 5, "display.bo.name must be a string, not int"),
    ("display.bo.name", ["a", "b"], "display.bo.name must be a string, not list"),
    ("display.ana", "Ana", "display.ana must be an object"),
    ("display.bo.facts", "likes bones", "display.bo.facts must be a list of objects"),
    ("recipe.introduce", "some", "recipe.introduce must be 'all' or 'relevant'"),
    ("base_model", " ", "field 'base_model' is empty"),
]


@pytest.mark.parametrize("field, value, words", ODD, ids=[f"{f}={v!r}" for f, v, _ in ODD])
def test_odd_manifests_are_refused_naming_the_field(bank_dir, field, value, words):
    tamper(bank_dir, field, value)
    with pytest.raises(BankError, match="manifest.json: " + words.replace("[", r"\[").replace("]", r"\]")):
        ConceptBank.load(bank_dir)
    res = runner.invoke(app, ["info", str(bank_dir)])
    assert res.exit_code == 2 and words in " ".join(res.output.split()) and "Traceback" not in res.output, res.output


def test_info_shows_a_good_manifest(bank_dir):
    res = runner.invoke(app, ["info", str(bank_dir)])
    assert res.exit_code == 0 and "final loss 0.5000" in res.output and "held-out recognition 0.900" in res.output


def test_a_base_is_named_by_hub_id_or_proving_ground_never_by_a_path(bank_dir, tmp_path, monkeypatch):
    bank = ConceptBank.load(bank_dir)
    for name in ("proving-ground", "llava-hf/llava-1.5-7b-hf", "gpt2"):
        bank.base_model = name
        assert bank.base_to_load() == name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mybase").mkdir()
    for name in ("../../etc", "/etc", "./model", "~/model", "mybase", "a/b/c", "C:\\models\\x", "org/..", "x" * 300):
        bank.base_model = name
        with pytest.raises(BankError, match="local path .* not followed .* --base"):
            bank.base_to_load()
        assert bank.base_to_load(override="/my/own/base") == "/my/own/base"
    tamper(bank_dir, "base_model", "../../etc")
    res = runner.invoke(app, ["ask", str(bank_dir), "Who is <bo>?"])
    assert res.exit_code == 2 and "pass it as --base" in res.output and "Traceback" not in res.output, res.output


def test_serve_refuses_an_odd_bank_or_base_in_words(bank_dir, tmp_path, tokenizer_dir):
    tamper(bank_dir, "display.bo.name", 5)
    res = runner.invoke(app, ["serve", str(bank_dir)])
    assert res.exit_code == 2 and "display.bo.name must be a string" in res.output, res.output
    tamper(bank_dir, "display.bo.name", "Bo")
    evil = shutil.copytree(make_base(tokenizer_dir, tmp_path / "base"), tmp_path / "evil")
    for weights in evil.glob("*.safetensors"):
        weights.unlink()

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "pwned"),))

    (evil / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    res = runner.invoke(app, ["serve", str(bank_dir), "--base", str(evil)])
    assert res.exit_code == 2 and "cannot load base model" in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("rows", ["input_rows", "head_rows"])
def test_rows_of_absurd_size_are_refused_on_a_model(tmp_path, tokenizer_dir, rows):
    base = make_base(tokenizer_dir, tmp_path / "base")
    bank = ConceptBank.load(make_bank(base, tmp_path / "bank"))
    assert PersonalAssistant.load(bank, str(base)).bank is bank  # as trained: accepted
    getattr(bank, rows)[1, 2] *= 1e30
    with pytest.raises(
        BankError, match=f"{rows} of <ana_2> has norm [0-9.]+e\\+(29|30|31), more than 1000 times this base's mean"
    ):
        PersonalAssistant.load(bank, str(base))
