import json
import os

import pytest
from PIL import Image
from rich.console import Console

from mcllava.evaluate import (
    Answerer,
    bleu_mcllava,
    evaluate,
    headline,
    named_concepts,
    parse_choice,
    parse_yes_no,
    point_in_box,
    print_table,
    recognition_split,
)
from mcllava.report import write_html

OPTS = {"A": "a red bike", "B": "a dog", "C": "bike", "D": "Ana"}


class Scripted:
    """A fake model: answers by a function of the question (defaults to a fixed reply)."""

    def __init__(self, reply="No", points=None, names=None, by_question=None):
        self.reply, self.points, self.by_question = reply, points or {}, by_question or {}
        self.names = names or {"bo": "Bo", "ana": "Ana"}
        self.seen = []

    def answer(self, image, question):
        self.seen.append((image, question))
        return self.by_question.get(question.split("\n")[0], self.reply)

    def locate(self, image):
        return self.points


def rec(task, question, answer="", image=None, concepts=(), present=(), **kw):
    return dict(
        task=task,
        question=question,
        answer=answer,
        image=image,
        options=kw.pop("options", {}),
        concepts=list(concepts),
        present=list(present),
        boxes=kw.pop("boxes", {}),
        **kw,
    )


@pytest.fixture
def img(tmp_path):
    path = tmp_path / "scene.png"
    Image.new("RGB", (16, 12), (200, 30, 30)).save(path)
    return str(path)


@pytest.fixture
def recognition_set(img):
    # 2 single (1 yes, 1 no), 2 multi_one (1 yes, 1 no), 2 multi_all (1 yes, 1 no)
    return [
        rec("recognition", "Is <bo> here? q1", "Yes", img, ["bo"], ["bo"]),
        rec("recognition", "Is <ana> here? q2", "No", img, ["ana"], ["bo"]),
        rec("recognition", "Is <bo> here? q3", "Yes", img, ["bo"], ["bo", "ana"]),
        rec("recognition", "Is <cy> here? q4", "No", img, ["cy"], ["bo", "ana"]),
        rec("recognition", "Are <bo> and <ana> here? q5", "Yes", img, ["bo", "ana"], ["bo", "ana"]),
        rec("recognition", "Are <bo> and <cy> here? q6", "No", img, ["bo", "cy"], ["bo", "ana"]),
    ]


def truth_answerer(records):
    return Scripted(by_question={r["question"]: r["answer"] for r in records})


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text,want",
    [
        ("Yes", True),
        ("yes.", True),
        ("YES!", True),
        ("Yes, <bo> is in the photo.", True),
        ("(yes)", True),
        ("No", False),
        ("no.", False),
        ("NO", False),
        ("No, I don't see <bo>.", False),
        ("Nope", False),
        ("I think yes", True),
        ("Well... no!", False),
        ("Yes/No", True),
        ("<bo> is not here", None),
        ("", None),
        ("nobody knows", None),
        ("eyes closed", None),
        ("yesterday", None),
    ],
)
def test_parse_yes_no(text, want):
    assert parse_yes_no(text) is want


@pytest.mark.parametrize(
    "text,want",
    [
        ("A", "A"),
        ("b", "B"),
        ("(C)", "C"),
        ("D.", "D"),
        ("B)", "B"),
        ("(B) a dog", "B"),
        ("B. a dog", "B"),
        ("The answer is B.", "B"),
        ("Answer: C", "C"),
        ("answer is (D)", "D"),
        ("I pick (A) here", "A"),
        ("a dog", "B"),
        ("A dog.", "B"),
        ("It is a red bike", "A"),
        ("bike", "C"),
        ("ana", "D"),
        ("It's B.", "B"),
        ("E", None),
        ("something else", None),
        ("a dog or Ana", None),
    ],
)
def test_parse_choice(text, want):
    assert parse_choice(text, OPTS) == want


def test_recognition_split():
    assert recognition_split(rec("recognition", "", concepts=["bo"], present=["bo"])) == "single"
    assert recognition_split(rec("recognition", "", concepts=["bo"], present=[])) == "single"
    assert recognition_split(rec("recognition", "", concepts=["ana"], present=["bo", "ana"])) == "multi_one"
    assert recognition_split(rec("recognition", "", concepts=["bo", "ana"], present=["bo"])) == "multi_all"


# ----------------------------------------------------------------------------- recognition


def test_always_no(recognition_set):
    r = evaluate(recognition_set, Scripted("No"), progress=False)["recognition"]
    assert (r["positive_recall"], r["negative_recall"], r["weighted_accuracy"]) == (0.0, 1.0, 0.5)
    assert (r["n"], r["n_positive"], r["n_negative"]) == (6, 3, 3)
    assert set(r["splits"]) == {"single", "multi_one", "multi_all"}
    for s in r["splits"].values():
        assert (s["positive_recall"], s["negative_recall"], s["n"]) == (0.0, 1.0, 2)


def test_perfect_and_unparseable(recognition_set):
    rep = evaluate(recognition_set, truth_answerer(recognition_set), progress=False)
    assert rep["recognition"]["weighted_accuracy"] == 1.0
    assert all(s["weighted_accuracy"] == 1.0 for s in rep["recognition"]["splits"].values())
    assert [row["split"] for row in rep["rows"]] == ["single"] * 2 + ["multi_one"] * 2 + ["multi_all"] * 2
    rep = evaluate(recognition_set, Scripted("I cannot tell"), progress=False)
    assert rep["recognition"]["weighted_accuracy"] == 0.0
    json.dumps(rep)


def test_recognition_uneven(img):
    records = [
        rec("recognition", f"q{i}", a, img, ["bo"], ["bo"] if a == "Yes" else [])
        for i, a in enumerate(["Yes", "Yes", "Yes", "No"])
    ]
    ans = Scripted(by_question={"q0": "yes", "q1": "Yes.", "q2": "No", "q3": "no"})
    r = evaluate(records, ans, progress=False)["recognition"]
    assert r["positive_recall"] == pytest.approx(2 / 3)
    assert r["negative_recall"] == 1.0
    assert r["weighted_accuracy"] == pytest.approx(5 / 6)
    assert set(r["splits"]) == {"single"}


def test_lookalikes_rejected_is_reported_where_the_test_set_marks_them(img):
    records = [
        {**rec("recognition", f"q{i}", "No", img, ["bo"], []), **({"lookalike": True} if i < 3 else {})}
        for i in range(4)
    ] + [rec("recognition", "q4", "Yes", img, ["bo"], ["bo"])]
    ans = Scripted(by_question={"q0": "No", "q1": "No, it is a look-alike.", "q2": "Yes", "q3": "No", "q4": "Yes"})
    rep = evaluate(records, ans, progress=False)
    look = rep["recognition"]["lookalikes_rejected"]
    assert (look["n"], look["accuracy"], look["official"]["accuracy"]) == (
        3,
        pytest.approx(2 / 3),
        pytest.approx(1 / 3),
    )
    assert ("recognition", "look-alikes", "accuracy", pytest.approx(1 / 3), pytest.approx(2 / 3), 3) in headline(rep)
    assert "lookalikes_rejected" not in evaluate(records[3:], ans, progress=False)["recognition"]


# ----------------------------------------------------------------------------- choice, vqa


def test_choice_visual_and_text(img):
    records = [
        rec("choice", "What is <bo>?", "B", img, ["bo"], ["bo"], options=OPTS),
        rec("choice", "What does <ana> ride?", "A", img, ["ana"], ["ana"], options=OPTS),
        rec("choice", "What is <bo>'s name?", "D", None, ["bo"], options=OPTS),
        rec("text", "Who owns <bo>?", "D", None, ["bo"], options=OPTS),
    ]
    ans = Scripted(
        by_question={
            "What is <bo>?": "(B)",
            "What does <ana> ride?": "bike",
            "What is <bo>'s name?": "The answer is D",
            "Who owns <bo>?": "Ana",
        }
    )
    rep = evaluate(records, ans, progress=False)
    c = rep["choice"]
    assert (c["accuracy"], c["n"]) == (0.75, 4)
    assert (c["splits"]["single"]["accuracy"], c["splits"]["single"]["n"]) == (0.5, 2)
    assert (c["splits"]["text"]["accuracy"], c["splits"]["text"]["n"]) == (1.0, 2)
    assert c["official"]["accuracy"] == 0.0  # none of them is the bare letter
    assert "recognition" not in rep and "vqa" not in rep
    # the options reach the model, with the letter instruction; images only where the record has one
    assert "\nB. a dog\n" in ans.seen[0][1] and ans.seen[0][0].mode == "RGB" and ans.seen[0][0].size == (16, 12)
    assert ans.seen[2][0] is None


def test_vqa_bleu(img):
    records = [
        rec("vqa", "What is <bo> doing?", "<bo> is playing with a ball", img, ["bo"], ["bo"]),
        rec("text", "What colour is <bo>?", "brown and white", None, ["bo"]),
    ]
    rep = evaluate(records, truth_answerer(records), progress=False)
    assert rep["vqa"]["bleu_mcllava"] == pytest.approx(1.0)
    assert rep["vqa"]["bleu_sacrebleu"] == pytest.approx(100.0)
    assert rep["vqa"]["n"] == 2
    rep = evaluate(records, Scripted("xyz"), progress=False)
    assert rep["vqa"]["bleu_mcllava"] < 0.05 and rep["vqa"]["bleu_sacrebleu"] == 0.0
    assert bleu_mcllava("hello there", "") == 0.0
    assert 0.3 < bleu_mcllava("the dog runs", "the dog sits") < 1.0


# ----------------------------------------------------------------------------- caption, grounding


def test_named_concepts():
    names = {"bo": "Bo", "ana": "Ana Maria", "cy": "Cy"}
    assert named_concepts("<bo> sits next to ANA MARIA.", ["bo", "ana", "cy"], names) == ["bo", "ana"]
    assert named_concepts("A bonobo and Cy's hat", ["bo", "cy"], names) == ["cy"]
    assert named_concepts("Ana is here", ["ana"], names) == []  # the full display name is needed
    assert named_concepts("<ana> waves", ["ana"], names) == ["ana"]


def test_caption_recall(img):
    records = [
        rec("caption", "Describe c1", "", img, [], ["bo", "ana"]),
        rec("caption", "Describe c2", "", img, [], ["bo"]),
    ]
    ans = Scripted(by_question={"Describe c1": "Bo is sitting alone.", "Describe c2": "<bo> runs."})
    rep = evaluate(records, ans, progress=False)
    assert rep["caption"]["lenient"] == {"recall": pytest.approx(2 / 3), "precision": 1.0, "n": 2, "n_concepts": 3}
    # official: the multi-concept caption needs the ids as substrings ("Bo" is not "bo"), the single one "<bo>"
    assert rep["caption"]["official"] == {"recall": 0.5, "n": 2}
    assert [row["correct"] for row in rep["rows"]] == [False, True]


def test_caption_precision_counts_names_of_absent_concepts(img):
    """A caption that names every concept has full recall; precision says how many of the names were right."""
    records = [rec("caption", "Describe", "", img, [], ["bo"])]
    ans = Scripted(by_question={"Describe": "<bo><ana><ana> and <bo>."}, names={"bo": "Bo", "ana": "Ana", "kit": "Kit"})
    rep = evaluate(records, ans, progress=False)
    assert rep["caption"]["recall"] == 1.0 and rep["caption"]["precision"] == pytest.approx(1 / 2)
    assert rep["rows"][0]["named_any"] == ["ana", "bo"]


def test_point_in_box_edges():
    box = [10, 20, 30, 40]
    for p in [(10, 20), (30, 40), (10, 40), (20, 30)]:
        assert point_in_box(p, box)
    for p in [(9.99, 30), (30.01, 30), (20, 19.9), (20, 40.5), None]:
        assert not point_in_box(p, box)


def test_grounding(img):
    records = [
        rec("grounding", "Where?", "", img, [], ["bo", "ana"], boxes={"bo": [0, 0, 5, 5], "ana": [8, 0, 15, 11]}),
        rec("grounding", "Where?", "", img, [], ["bo"], boxes={"bo": [0, 0, 5, 5]}),
    ]
    # bo on its box's corner (hit), ana predicted absent (miss)
    rep = evaluate(records, Scripted(points={"bo": (5.0, 5.0), "ana": None}), progress=False)
    assert rep["grounding"] == {"hit_rate": pytest.approx(2 / 3), "n": 2, "n_concepts": 3}
    assert rep["rows"][0]["hits"] == {"bo": True, "ana": False}
    rep = evaluate(records, Scripted(points={}), progress=False)
    assert rep["grounding"]["hit_rate"] == 0.0


# ----------------------------------------------------------------------------- runner, display, html


def test_report_shape_and_table(img, recognition_set):
    records = recognition_set + [rec("vqa", "What?", "a ball", img, ["bo"], ["bo"])]
    ans = Scripted("Yes")
    assert isinstance(ans, Answerer)
    rep = evaluate(records, ans, progress=False, keep_rows=False)
    assert set(rep) == {"recognition", "vqa", "timing", "scoring"}
    assert rep["timing"]["n"] == 7 and rep["timing"]["total_s"] >= rep["timing"]["answer_s"] >= 0
    json.dumps(rep)
    console = Console(record=True, width=120)
    print_table(rep, console)
    out = console.export_text()
    for word in ("weighted_accuracy", "multi_one", "multi_all", "bleu_sacrebleu", "0.500", "official", "lenient"):
        assert word in out


def test_write_html(tmp_path, img):
    records = [
        rec("recognition", "Is <bo> here? <script>alert(1)</script>", "Yes", img, ["bo"], ["bo"]),
        rec("choice", "Which & what?", "A", None, ["bo"], options={"A": "x < y", "B": "z"}),
        rec("grounding", "Where?", "", img, [], ["bo"], boxes={"bo": [0, 0, 5, 5]}),
    ]
    rep = evaluate(records, Scripted("No", points={"bo": (1, 1)}), progress=False)
    marked = {2: Image.new("RGB", (40, 30), (0, 0, 255))}
    page = write_html(rep, tmp_path / "site", marked_images=marked)
    text = page.read_text()
    assert page == tmp_path / "site" / "index.html"
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "Which &amp; what?" in text and "x &lt; y" in text
    assert "class='wrong'" in text and "class='right'" in text
    assert "weighted_accuracy" in text
    srcs = [s.split("'")[0] for s in text.split("<img src='")[1:]]
    assert len(srcs) == 2 and "img/marked_2.jpg" in srcs
    for s in srcs:
        assert (tmp_path / "site" / s).is_file()
    assert Image.open(tmp_path / "site" / "img" / "marked_2.jpg").size == (40, 30)
    assert not list((tmp_path / "site").glob(".index.*"))
    mask = os.umask(0)
    os.umask(mask)
    assert page.stat().st_mode & 0o777 == 0o666 & ~mask  # readable by a web server, as any new file


def test_write_html_relative_images(tmp_path, img):
    rep = {"rows": [dict(rec("vqa", "Q", "a", "scene.png"), prediction="a", correct=None, score=1.0, kind="vqa")]}
    text = write_html(rep, tmp_path / "out", images_root=tmp_path).read_text()
    assert text.count("<img src='img/") == 1
