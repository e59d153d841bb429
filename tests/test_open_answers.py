"""Open answers for personalisation: written by the base from word definitions about each photo's concepts, kept
only when they name no other concept and say more than Yes or No, and drawn per concept and epoch."""

from __future__ import annotations

import random

import torch

from mcllava.open_answers import distil_answers, first_sentence
from mcllava.training_data import OPEN_QUESTIONS, CatalogEntry, ConceptFacts, DataOptions, build_epoch


def _catalog():
    cat = [CatalogEntry(f"bo/{i}", f"bo{i}.png", None, frozenset(["bo"])) for i in range(3)]
    cat += [CatalogEntry(f"ana/{i}", f"ana{i}.png", None, frozenset(["ana"])) for i in range(2)]
    cat.append(CatalogEntry("_multi/0", "m.png", None, frozenset(["bo", "ana"])))
    cat.append(CatalogEntry("_neg/0", "n.png", None, frozenset()))
    return cat


def test_first_sentence():
    assert first_sentence(" <bo> is running. <bo> is") == "<bo> is running."
    assert first_sentence("a red ball") == "a red ball"


def test_distil_keeps_answers_about_the_concept_asked(scripted_base):
    base = scripted_base(
        {
            "What is <ana> doing?": "<bo> is running.",  # names another concept: dropped
            "What is <ana> holding?": "Yes.",  # says nothing: dropped
            "doing?": "<bo> is sitting. It looks happy",  # first sentence kept
            "holding?": "a red ball",  # a bare phrase is an answer too
            "in this photo?": "<bo> is in a park.",
        }
    )
    got = distil_answers(
        base,
        _catalog(),
        {"bo": "a red circle", "ana": "a blue square"},
        lambda chosen: torch.zeros(1, 2, 3),
        OPEN_QUESTIONS,
    )
    assert got["bo/0"] == [
        ["bo", "What is {c} doing?", "<bo> is sitting."],
        ["bo", "What is {c} holding?", "a red ball"],
        ["bo", "Where is {c} in this photo?", "<bo> is in a park."],
    ]
    assert "ana/0" not in got and "_neg/0" not in got  # every answer about ana named bo or said Yes
    assert [c for c, _, _ in got["_multi/0"]] == ["bo"] * 3
    # the group photo: both concepts defined before each question, one set of questions per concept shown
    assert base.prompts[-1] == "<ana> is a blue square. <bo> is a red circle. Where is <bo> in this photo?"
    assert len(base.prompts) == 3 * 3 + 2 * 3 + 2 * 3
    # a concept without a description cannot be defined in words: its photos are not asked about
    none = distil_answers(
        base, _catalog(), {"bo": "a red circle", "ana": None}, lambda c: torch.zeros(1, 2, 3), OPEN_QUESTIONS
    )
    assert set(none) == {"bo/0", "bo/1", "bo/2"}


def test_open_answer_samples_per_concept_and_epoch():
    concepts = [ConceptFacts("bo"), ConceptFacts("ana")]
    answers = {
        "bo/0": [["bo", "What is {c} doing?", "<bo> is sitting."], ["bo", "What is {c} holding?", "a ball"]],
        "bo/1": [["bo", "What is {c} doing?", "<bo> is running."]],
        "_multi/0": [
            ["ana", "What is {c} doing?", "<ana> is waving."],
            ["bo", "What is {c} doing?", "<bo> is jumping."],
        ],
    }
    plain = build_epoch(_catalog(), concepts, random.Random(3), DataOptions(text=False), answers=answers)
    assert not [s for s in plain if s.kind == "open"]  # off by default, and the rest of the epoch unchanged
    assert [(s.question, s.answer) for s in plain] == [
        (s.question, s.answer) for s in build_epoch(_catalog(), concepts, random.Random(3), DataOptions(text=False))
    ]
    for seed in range(10):
        options = DataOptions(text=False, open_answers=2)
        opened = [
            s
            for s in build_epoch(_catalog(), concepts, random.Random(seed), options, answers=answers)
            if s.kind == "open"
        ]
        bo = [s for s in opened if s.concepts == ("bo",)]
        ana = [s for s in opened if s.concepts == ("ana",)]
        assert len(bo) == 2 and len(ana) == 1  # ana has one answer: what there is
        assert ana[0].question == "What is <ana> doing?" and ana[0].answer == "<ana> is waving."
        assert ana[0].image.key == "_multi/0" and not ana[0].image.flip
        for s in bo:  # a bo question is answered about bo, on a photo that shows bo
            assert s.question.startswith("What is <bo>") and s.image.key in answers and "<ana>" not in s.answer
