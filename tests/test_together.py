"""'Are <a> and <b> both in this photo?': asked one concept at a time on the same visual tokens.

A small model answers such a question much like "is either here?" (the proving-ground demo: every No of this
kind it got wrong was a photo of one of the two); its answers about one concept are the reliable ones.
"""

from __future__ import annotations

import re

import pytest
from PIL import Image

from mcllava.assistant import asked_together, together_answer
from mcllava.testing import make_assistant, red_photo

CONCEPTS = {"bo": {"name": "Bo"}, "ana": {"name": "Ana"}, "kit": {"name": "Kit"}}
IDS = list(CONCEPTS)


@pytest.mark.parametrize(
    "question, expected",
    [
        ("Are <bo> and <ana> both in this photo?", ["bo", "ana"]),  # the test sets' form
        ("are <kit>, <bo>, and <ana> all in this photo", ["kit", "bo", "ana"]),
        ("Can you see <bo> and <kit> in this image?", ["bo", "kit"]),  # training's group forms
        ("Does this picture show <ana> and <bo> together?", ["ana", "bo"]),
        ("Are <bo> and <ana>  both   here ?", ["bo", "ana"]),
        ("Is <bo> in this photo?", None),  # one concept: asked as is
        ("Are <bo> and <bo> both here?", None),
        ("Are <bo> and <zed> both here?", None),  # not in the bank
        ("Are <bo> and a red dog both here?", None),  # not only concepts
        ("Are <bo> and <ana> both happy?", None),  # not a presence question
    ],
)
def test_which_questions_are_asked_together(question, expected):
    assert asked_together(question, IDS) == expected


def test_the_answer_is_yes_only_when_every_concept_is_there():
    assert together_answer({"bo": "Yes", "ana": "Yes, she is."}) == "Yes."
    assert together_answer({"bo": "Yes", "ana": "No"}) == "No, <ana> is not in this photo."
    assert (
        together_answer({"bo": "I cannot tell", "ana": "No", "kit": "Yes"})
        == "No, <bo> and <ana> are not in this photo."
    )


@pytest.fixture(scope="module")
def assistant(tmp_path_factory, tokenizer_dir):
    return make_assistant(tmp_path_factory.mktemp("together"), tokenizer_dir, CONCEPTS)


@pytest.fixture()
def scripted(assistant, monkeypatch):
    """The model answers "Is <c> in this photo?" Yes for bo and ana, No for kit; other questions "Maybe"."""
    calls = []

    def generate(prompt, features=None, max_new_tokens=64, suppress=(), prefix=""):
        calls.append((prompt, features))
        m = re.search(r"Is <(\w+)> in this photo\?", prompt)
        return "Maybe" if m is None else ("Yes" if m.group(1) in ("bo", "ana") else "No")

    monkeypatch.setattr(assistant.backbone, "generate", generate)
    return calls


def test_each_concept_is_asked_about_on_the_same_visual_tokens(assistant, scripted):
    a = assistant.respond(red_photo(), "Are <bo> and <ana> both in this photo?", visual_prompt=False)
    assert a.text == "Yes." and a.parts == {"bo": "Yes", "ana": "Yes"}
    assert [re.search(r"Is <(\w+)> in this photo\?", p).group(1) for p, _ in scripted] == ["bo", "ana"]
    assert scripted[0][1] is scripted[1][1]  # the photo is embedded once
    assert a.system == assistant.tokens.system_text()

    scripted.clear()
    a = assistant.respond(red_photo(), "Are <bo>, <kit> and <ana> all in this photo?", visual_prompt=False)
    assert a.text == "No, <kit> is not in this photo." and set(a.parts) == {"bo", "kit", "ana"} and len(scripted) == 3


def test_with_a_cache_the_model_is_asked_each_distinct_input_once(assistant, scripted):
    blue = Image.new("RGB", (64, 64), (0, 0, 200))
    ask = lambda image, q: assistant.respond(image, q, visual_prompt=False).text  # noqa: E731
    assistant.cache_size = 1024
    try:
        assert ask(red_photo(), "Is <kit> in this photo?") == ask(red_photo(), "Is <kit> in this photo?") == "No"
        assert len(scripted) == 1 and assistant.cache_hits >= 1
        ask(blue, "Is <kit> in this photo?")  # another photo, other visual tokens
        ask(red_photo(), "What is <kit> doing?")  # another question
        ask(red_photo(), "Are <kit> and <bo> both in this photo?")  # <kit> is remembered, <bo> is new
        assert len(scripted) == 4
        assistant.cache_size = 1  # the least recently used output is forgotten first
        ask(blue, "Is <bo> in this photo?")
        ask(red_photo(), "Is <kit> in this photo?")
        assert len(scripted) == 6 and len(assistant._outputs) == 1
    finally:
        assistant.cache_size = 0  # the default: every answer from the model
        assistant.clear_cache()
    ask(blue, "Is <bo> in this photo?"), ask(blue, "Is <bo> in this photo?")
    assert len(scripted) == 8 and not assistant._outputs


def test_joint_mode_and_questions_without_a_photo_ask_as_is(assistant, scripted):
    question = "Are <bo> and <ana> both in this photo?"
    a = assistant.respond(None, question)
    assert a.text == "Maybe" and a.parts == {} and len(scripted) == 1
    assistant.joint = True
    try:
        a = assistant.respond(red_photo(), question, visual_prompt=False)
    finally:
        assistant.joint = False
    assert a.text == "Maybe" and a.parts == {} and question in scripted[-1][0]


def test_the_demo_reports_the_joint_figure_beside_the_split_one(assistant, scripted, tmp_path):
    from mcllava.assistant import AssistantAnswerer
    from mcllava.demo import joint_recognition
    from mcllava.evaluate import evaluate

    photo = tmp_path / "photo.png"
    red_photo().save(photo)
    both, kit = "Are <bo> and <ana> both in this photo?", "Is <kit> in this photo?"
    records = [
        {
            "task": "recognition",
            "image": str(photo),
            "question": q,
            "answer": a,
            "concepts": c,
            "present": ["bo", "ana"],
        }
        for q, a, c in ((both, "Yes", ["bo", "ana"]), (kit, "No", ["kit"]))
    ]
    report = evaluate(records, AssistantAnswerer(assistant, visual_prompt=False), progress=False)
    assert report["recognition"]["weighted_accuracy"] == 1.0
    joint = joint_recognition(assistant, records, report, 8)  # asked as one question, the script says "Maybe"
    assert joint["together"]["n"] == 1 and joint["together"]["positive_recall"] == 0.0
    assert joint["together_split"]["positive_recall"] == 1.0
    assert (joint["positive_recall"], joint["negative_recall"]) == (0.0, 1.0)  # the single question kept its answer
    assert not assistant.joint  # switched back
