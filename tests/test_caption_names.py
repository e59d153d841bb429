"""Captions name the concepts recognition finds: each concept is asked about on its own, the caption starts with
the names of those found, and the model writes the rest, which names no one (not again, not one found absent).

Left to choose names itself, the proving-ground bank names one concept of a group photo at most (recall 0.42 on the
demo); its answers about one concept at a time are the reliable ones (recognition 0.93).
"""

from __future__ import annotations

import re

import pytest
import torch

from mcllava.assistant import CAPTION_QUESTION, asks_caption
from mcllava.testing import make_assistant, red_photo

CONCEPTS = {"bo": {"name": "Bo"}, "ana": {"name": "Ana"}, "kit": {"name": "Kit"}}


@pytest.mark.parametrize(
    "question, expected",
    [
        ("Describe this photo.", True),  # the test sets' and training's form
        (CAPTION_QUESTION, True),
        ("describe the image", True),
        ("Please describe this picture!", True),
        ("Write a caption for this photo.", True),
        ("  Describe   this photo.  ", True),
        ("Describe <bo>.", False),  # a question about a concept, asked as is
        ("Describe this photo in French.", False),
        ("What is <bo> doing in this photo?", False),
        ("Is <bo> in this photo?", False),
    ],
)
def test_which_questions_ask_for_a_caption(question, expected):
    assert asks_caption(question) is expected


@pytest.fixture(scope="module")
def assistant(tmp_path_factory, tokenizer_dir):
    return make_assistant(tmp_path_factory.mktemp("captions"), tokenizer_dir, CONCEPTS)


@pytest.fixture()
def scripted(assistant, monkeypatch):
    """The model says Yes to "Is <c> in this photo?" for the concepts in `present`, and continues a caption."""
    calls, present = [], {"bo", "ana"}

    def generate(prompt, features=None, max_new_tokens=64, suppress=(), prefix=""):
        calls.append({"prompt": prompt, "features": features, "suppress": set(suppress), "prefix": prefix})
        m = re.search(r"Is <(\w+)> in this photo\?", prompt)
        if m is None:
            return (prefix + " in a kitchen.").strip()
        return "Yes" if m.group(1) in present else "No"

    monkeypatch.setattr(assistant.backbone, "generate", generate)
    return calls, present


def test_a_caption_names_the_concepts_found_and_the_model_writes_the_rest(assistant, scripted):
    calls, _ = scripted
    a = assistant.respond(red_photo(), "Describe this photo.", visual_prompt=False)
    assert a.text == "<bo> and <ana> in a kitchen."
    assert a.parts == {"bo": "Yes", "ana": "Yes", "kit": "No"}  # every concept asked about, in bank order
    asked = [re.search(r"Is <(\w+)> in this photo\?", c["prompt"]) for c in calls]
    assert [m.group(1) for m in asked[:3]] == list(assistant.bank.concept_ids) and asked[3] is None
    assert len({id(c["features"]) for c in calls}) == 1  # the photo is embedded once
    caption = calls[-1]
    assert caption["prefix"] == "<bo> and <ana>" and "Describe this photo." in caption["prompt"]
    names = {assistant.tokens.ids[c][0] for c in CONCEPTS}  # the rest names no one: not again, not an absent one
    assert names <= caption["suppress"] and set(assistant.tokens.soft_ids) <= caption["suppress"]
    assert not names & calls[0]["suppress"]  # a recognition answer may say the name


def test_no_concept_found_means_a_caption_without_names(assistant, scripted):
    calls, present = scripted
    present.clear()
    a = assistant.respond(red_photo(), "Write a caption for this image.", visual_prompt=False)
    assert a.text == "in a kitchen." and calls[-1]["prefix"] == "" and set(a.parts.values()) == {"No"}
    assert {assistant.tokens.ids[c][0] for c in CONCEPTS} <= calls[-1]["suppress"]


def test_free_captions_and_photo_less_questions_are_asked_as_is(assistant, scripted):
    calls, _ = scripted
    a = assistant.respond(None, "Describe this photo.")
    assert a.parts == {} and len(calls) == 1 and calls[0]["prefix"] == ""
    assistant.free_captions = True
    try:
        a = assistant.respond(red_photo(), "Describe this photo.", visual_prompt=False)
    finally:
        assistant.free_captions = False
    assert a.parts == {} and len(calls) == 2 and calls[-1]["prefix"] == "" and a.text == "in a kitchen."


def test_relevant_introduction_asks_only_about_concepts_the_locator_sees(assistant, scripted):
    calls, _ = scripted
    assistant.introduce = "relevant"
    try:
        a = assistant.respond(red_photo(), "Describe this photo.", visual_prompt=False)
    finally:
        assistant.introduce = "all"
    seen = [loc.concept_id for loc in assistant.locations(red_photo()) if loc.present]
    assert list(a.parts) == seen and len(calls) == len(seen) + 1


def test_generate_starts_the_answer_with_the_prefix(assistant, monkeypatch):
    """The prefix is part of the model's input, tokenised as a training answer is, and leads the returned text."""
    backbone = assistant.backbone
    seen = []
    original = backbone.model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["inputs_embeds"])
        return original(*args, **kwargs)

    monkeypatch.setattr(backbone.model, "generate", spy)
    features = backbone.visual_tokens([red_photo()]).features[0]
    prompt = backbone.format_prompt("Describe this photo.", assistant.tokens.system_text())
    text = backbone.generate(prompt, features, max_new_tokens=4, prefix="<bo> and <ana>")
    plain = backbone.generate(prompt, features, max_new_tokens=4)
    assert text.startswith("<bo> and <ana>") and not plain.startswith("<bo> and <ana>")
    answer = backbone.tokenizer(backbone.answer_prefix + "<bo> and <ana>", add_special_tokens=False)["input_ids"]
    assert seen[0].shape[1] == seen[1].shape[1] + len(answer)
    expected = backbone.embed(torch.tensor([backbone.encode(prompt).input_ids + answer]), features[None])
    assert torch.allclose(seen[0], expected)


def test_the_demo_reports_the_free_caption_figure_beside_the_recognised_one(assistant, scripted, tmp_path):
    from mcllava.assistant import AssistantAnswerer
    from mcllava.demo import free_captions
    from mcllava.evaluate import evaluate

    photo = tmp_path / "photo.png"
    red_photo().save(photo)
    records = [
        {
            "task": "caption",
            "image": str(photo),
            "question": "Describe this photo.",
            "answer": "<bo> and <ana>.",
            "concepts": ["bo", "ana"],
            "present": ["bo", "ana"],
        }
    ]
    report = evaluate(records, AssistantAnswerer(assistant, visual_prompt=False), progress=False)
    assert (report["caption"]["recall"], report["caption"]["precision"]) == (1.0, 1.0)
    free = free_captions(assistant, records, 8)  # left to itself, the script names no one
    assert free["recall"] == 0.0 and free["precision"] is None and free["n"] == 1
    assert not assistant.free_captions  # switched back
