"""Lettered choices are answered by ranking the offered options, and an answer-format instruction is obeyed.

The official MC-LLaVA scoring counts a choice right only when the answer *is* the letter and a recognition answer
only when it *is* "Yes" or "No" (`scoring_official`); a small model writes neither reliably, so the assistant
scores each option's text as the answer and replies with the letter, and reduces a yes/no answer to the bare word
when the question asks for a single word.
"""

from __future__ import annotations

import re

import pytest
import torch

from mcllava.evaluate import format_question
from mcllava.question_forms import asked_together, asks_caption, choice_question, split_format
from mcllava.scoring_official import CAPTION_PROMPT, CHOICE_SUFFIX, RECOGNITION_PROMPT
from mcllava.testing import make_assistant, red_photo

CONCEPTS = {"bo": {"name": "Bo"}, "ana": {"name": "Ana"}}
RECORD = {"task": "choice", "question": "What is <bo> doing?", "options": {"A": "sitting", "B": "jumping"}}


def test_format_instructions_are_split_off():
    official = RECOGNITION_PROMPT.format(names="<bo>")
    assert split_format(official) == ("Can you see <bo> in this photo?", "word")
    assert split_format("Is <bo> here? Answer with a single word or phrase.") == ("Is <bo> here?", "word")
    assert split_format("Is <bo> here? answer yes or no") == ("Is <bo> here?", "word")
    ours = format_question(RECORD)
    assert split_format(ours) == ("What is <bo> doing?\nA. sitting\nB. jumping", "letter")
    assert split_format("What is <bo> doing?\nA. x\nB. y" + CHOICE_SUFFIX)[1] == "letter"
    assert split_format("Answer yes or no: is <bo> in the photo?") == ("Answer yes or no: is <bo> in the photo?", None)
    assert split_format("What is <bo> doing?") == ("What is <bo> doing?", None)


@pytest.mark.parametrize(
    "question, expected",
    [
        ("What is <bo> doing?\nA. sitting\nB. jumping", ("What is <bo> doing?", {"A": "sitting", "B": "jumping"})),
        ("Who?\n(A) <bo>\n(B) <ana>\n(C) nobody", ("Who?", {"A": "<bo>", "B": "<ana>", "C": "nobody"})),
        ("Colour? Options: A: red B: a blue hat", ("Colour?", {"A": "red", "B": "a blue hat"})),
        ("What is <bo> doing? A. sitting B. jumping C. waving", None),  # resolved below (inline form)
        ("What is <bo> doing?\nB. sitting\nA. jumping", None),  # letters out of order
        ("What is <bo> doing?\nA. sitting", None),  # one option
        ("What is <bo> doing?\nA. sitting\nB. jumping\nWhy?", None),  # more question after the options
        ("Is <bo> in this photo?", None),
        ("A. sitting\nB. jumping", None),  # no question
    ],
)
def test_lettered_options_are_read(question, expected):
    if question.endswith("C. waving"):
        expected = ("What is <bo> doing?", {"A": "sitting", "B": "jumping", "C": "waving"})
    assert choice_question(question) == expected


def test_the_official_prompts_are_recognised():
    assert asks_caption(CAPTION_PROMPT.format(names="<bo>, <ana>"))
    assert not asks_caption("Can you see <bo> in the image?")
    question, _ = split_format(RECOGNITION_PROMPT.format(names="<bo> and <ana>"))
    assert asked_together(question, ["bo", "ana"]) == ["bo", "ana"]


@pytest.fixture(scope="module")
def assistant(tmp_path_factory, tokenizer_dir):
    return make_assistant(tmp_path_factory.mktemp("choice"), tokenizer_dir, CONCEPTS)


def test_answer_scores_are_the_models_own_answer_likelihoods(assistant):
    backbone = assistant.backbone
    features = backbone.visual_tokens([red_photo()]).features[0]
    prompt = backbone.format_prompt("What is <bo> doing?", assistant.tokens.system_text())
    answers = ["sitting", "jumping on one leg", "a"]
    scores = backbone.answer_scores(prompt, answers, features)
    for answer, score in zip(answers, scores):  # one answer at a time, by the training loss
        enc = backbone.encode(prompt, answer)
        ids = torch.tensor([enc.input_ids])
        loss = backbone.answer_loss(ids, torch.ones_like(ids), torch.tensor([enc.labels]), features[None])
        assert score == pytest.approx(-loss.item(), abs=1e-4)
    assert len(set(scores)) == 3


def test_a_choice_is_answered_with_the_best_options_letter(assistant, monkeypatch):
    question = format_question({**RECORD, "options": {"A": "sitting", "B": "jumping", "C": "waving"}})
    for image in (red_photo(), None):
        a = assistant.respond(image, question, visual_prompt=False)
        scores = {k: float(v) for k, v in a.parts.items()}
        assert set(scores) == {"A", "B", "C"} and a.text == max(scores, key=scores.get)
    official = "What is <bo> doing?\nA. sitting\nB. jumping" + CHOICE_SUFFIX
    monkeypatch.setattr(assistant.backbone, "answer_scores", lambda prompt, answers, features=None: [-2.0, -1.0])
    assert assistant.respond(red_photo(), official, visual_prompt=False).text == "B"
    assistant.generate_choices = True  # the model writes the answer itself
    prompts = []
    monkeypatch.setattr(assistant.backbone, "generate", lambda prompt, *a, **k: prompts.append(prompt) or "I think B.")
    try:
        assert assistant.respond(red_photo(), official, visual_prompt=False).text == "I think B."
        assert CHOICE_SUFFIX.strip() in prompts[-1]  # the model is told the form it must write
    finally:
        assistant.generate_choices = False


def test_a_single_word_is_answered_when_one_is_asked_for(assistant, monkeypatch):
    asked = []

    def generate(prompt, features=None, max_new_tokens=64, suppress=(), prefix=""):
        asked.append(prompt)
        m = re.search(r"<(\w+)> in this photo\?", prompt)
        return "Yes, <bo> is in this photo." if m and m.group(1) == "bo" else "No, it is not."

    monkeypatch.setattr(assistant.backbone, "generate", generate)
    ask = lambda q: assistant.respond(red_photo(), q, visual_prompt=False).text  # noqa: E731
    assert ask(RECOGNITION_PROMPT.format(names="<bo>")) == "Yes"
    assert "Answer the question" not in asked[-1]  # the instruction is obeyed, not passed on
    assert ask(RECOGNITION_PROMPT.format(names="<ana>")) == "No"
    assert ask(RECOGNITION_PROMPT.format(names="<bo> and <ana>")) == "No"  # asked one concept at a time
    assert ask("Can you see <bo> in this photo?") == "Yes, <bo> is in this photo."  # no instruction: as written
