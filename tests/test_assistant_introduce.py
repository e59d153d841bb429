"""`PersonalAssistant(introduce="relevant")`: the system text introduces only the concepts a question needs.

The plain method introduces every concept of the bank in every prompt, so the prompt grows with the bank; the
"relevant" mode (the scaling remedy measured by benchmarks/scaling.py) keeps the concepts the question names as
`<id>` and those the locator finds in the photo.
"""

from __future__ import annotations

import pytest

from mcllava.assistant import PersonalAssistant
from mcllava.testing import make_bank, make_base, red_photo

CONCEPTS = {"bo": {"name": "Bo"}, "ana": {"name": "Ana"}, "kit": {"name": "Kit"}, "rex": {"name": "Rex"}}


@pytest.fixture(scope="module")
def assistant(tmp_path_factory, tokenizer_dir):
    from mcllava.bank import ConceptBank

    root = tmp_path_factory.mktemp("introduce")
    base = make_base(tokenizer_dir, root / "base")
    bank = ConceptBank.load(make_bank(base, root / "bank", concepts=CONCEPTS))
    assert PersonalAssistant.load(bank, base).introduce == "all"  # a bank trained the plain way answers that way
    bank.recipe["introduce"] = "relevant"  # as `personalize --introduce relevant` records it
    return PersonalAssistant.load(bank, base)


def test_without_photo_only_the_named_concepts_are_introduced(assistant):
    a = assistant.respond(None, "Is <kit> older than <ana>?", max_new_tokens=1)
    intro = assistant.tokens.introduction
    assert a.system == f"{intro('ana')} {intro('kit')}"  # the bank's order, not the question's (as in training)
    assert "<bo>" not in a.system and "<rex>" not in a.system


def test_with_photo_the_named_and_the_located_concepts_are_introduced(assistant):
    photo = red_photo()
    seen = [loc.concept_id for loc in sorted(assistant.locations(photo), key=lambda loc: -loc.score) if loc.present]
    assert "bo" in seen  # mcllava.testing makes bo's locator references from this very photo
    a = assistant.respond(photo, "Is <rex> here?", visual_prompt=False, max_new_tokens=1)
    expected = [c for c in CONCEPTS if c == "rex" or c in seen]
    assert a.system == " ".join(assistant.tokens.introduction(c) for c in expected)
    assert a.locations == [] and a.marks == {}  # no visual prompt: the locator only chose the introductions


def test_all_introduces_every_concept(assistant):
    assistant.introduce = "all"
    try:
        a = assistant.respond(None, "Is <kit> here?", max_new_tokens=1)
    finally:
        assistant.introduce = "relevant"
    assert a.system == assistant.tokens.system_text()
    assert all(f"<{c}>" in a.system for c in CONCEPTS)


def test_relevant_is_one_rule_for_training_and_answering():
    from mcllava.tokens import ConceptTokens

    tokens = ConceptTokens(concept_ids=["bo", "ana", "kit"], k=2)
    assert tokens.relevant("Is <kit> next to <bo>?") == ["bo", "kit"]
    assert tokens.relevant("Describe this photo.", seen={"ana"}) == ["ana"]
    assert tokens.relevant("Is <bob> here?") == []  # <bob> is not <bo>
