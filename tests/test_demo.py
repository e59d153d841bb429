"""`make demo` run twice: the second run evaluates the bank the first one trained, unless the recipe or the
concepts changed."""

from __future__ import annotations

import json
from dataclasses import replace

from mcllava import presets
from mcllava.bank import ConceptBank
from mcllava.demo import finished_bank
from mcllava.testing import make_bank


def test_a_finished_bank_is_reused_only_for_the_same_recipe_and_concepts(base_dir, tmp_path):
    config = presets.proving_ground(epochs=10, seed=0)
    assert finished_bank(tmp_path / "bank", config, ["bo", "ana"]) is None  # nothing trained yet
    bank = ConceptBank.load(make_bank(base_dir, tmp_path / "random"))
    bank.recipe = config.to_dict()  # tuples in the recipe come back from the manifest as lists
    bank.metrics = {"history": [{"epoch": 1, "loss": 1.0}]}
    bank.save(tmp_path / "bank")
    ids = list(bank.concept_ids)
    found = finished_bank(tmp_path / "bank", config, ids)
    assert found is not None and found.metrics["history"][0]["loss"] == 1.0
    assert json.loads((tmp_path / "bank" / "manifest.json").read_text())["recipe"]["epochs"] == 10
    assert finished_bank(tmp_path / "bank", replace(config, epochs=9), ids) is None
    assert finished_bank(tmp_path / "bank", presets.proving_ground(epochs=10, seed=1), ids) is None
    assert finished_bank(tmp_path / "bank", config, ids[:1]) is None
