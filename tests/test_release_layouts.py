"""Reading the MC-LLaVA release as its own code does: grounding test, official labels, foreign image keys,
the option formats it writes, and scenarios scored on their own."""

import json
from pathlib import Path

import pytest
from PIL import Image

from mcllava.datasets import read_mcllava
from mcllava.datasets.mcllava import choice_answer, split_options
from mcllava.evaluate import evaluate


def _png(path: Path, colour=(90, 90, 90)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


@pytest.fixture
def release(tmp_path):
    case = tmp_path / "mcdataset" / "two_concept"
    for k in range(2):
        _png(case / "concept" / "test" / "Alex" / f"{k}.png", (200, 0, 0))
        _png(case / "concept" / "test" / "Gloria" / f"{k}.png", (0, 200, 0))
        _png(case / "multi" / "Alex_Gloria" / f"{k}.png", (0, 0, 200))
    _png(case / "concept" / "test" / "Gloria" / "3.png", (0, 255, 0))
    (case / "multi" / "Alex_Gloria" / "position.json").write_text(
        json.dumps(
            {"0.png": {"Alex": [0, 0, 4, 4], "Gloria": [4, 4, 8, 8]}, "1.png": {"Alex": [0, 0, 4, 4], "Gloria": None}}
        )
    )
    return tmp_path / "mcdataset"


def _write(path: Path, data) -> None:
    path.write_text(json.dumps(data))


def test_vqa_position_is_read_and_scored_exactly(release):
    folder = release / "two_concept" / "multi" / "Alex_Gloria"
    _write(folder / "vqa_position.json", {"0.png": [{"Human": "Where is <Alex>?\nA. left\nB. right", "AI": "A"}]})
    pos = [r for r in read_mcllava(release) if r.get("kind") == "position"]
    assert len(pos) == 1 and pos[0]["options"] == {"A": "left", "B": "right"} and pos[0]["answer"] == "A"

    class Model:
        names = {"Alex": "Alex", "Gloria": "Gloria"}

        def answer(self, image, question):
            return "A." if "Where" in question else "No"

        def locate(self, image):
            return {}

    rep = evaluate(pos, Model(), progress=False)
    assert rep["position"]["official"]["accuracy"] == 0.0 and rep["position"]["lenient"]["accuracy"] == 1.0


def test_null_position_follows_official_labels_unless_asked(release):
    def gloria_on_1(labels):
        return next(
            r
            for r in read_mcllava(release, labels=labels)
            if r["task"] == "recognition" and r["image"].endswith("Alex_Gloria/1.png") and r["concepts"] == ["Gloria"]
        )

    assert gloria_on_1("official")["answer"] == "Yes"  # the official code labels every group photo Yes
    assert gloria_on_1("positions")["answer"] == "No"
    caption = next(
        r for r in read_mcllava(release) if r["task"] == "caption" and r["image"].endswith("Alex_Gloria/1.png")
    )
    assert caption["present"] == ["Alex"]  # the official caption rule does read position.json
    with pytest.raises(ValueError, match="labels"):
        read_mcllava(release, labels="guess")


def test_foreign_absolute_keys_resolve_to_their_own_folder(release):
    alex = release / "two_concept" / "concept" / "test" / "Alex"
    _write(
        alex / "vqa.json",
        {
            "/home/someone/mcdataset/two_concept/concept/test/Gloria/3.png": {
                "Human": "What colour is <Gloria>?",
                "AI": "green",
            }
        },
    )
    vqa = [r for r in read_mcllava(release) if r["task"] == "vqa"]
    assert Path(vqa[0]["image"]) == (release / "two_concept" / "concept" / "test" / "Gloria" / "3.png").resolve()
    # a key into a folder this copy lacks must not fall back to Alex/1.png of the same name
    _write(alex / "vqa.json", {"/elsewhere/Nobody/1.png": {"Human": "What colour is <Alex>?", "AI": "red"}})
    with pytest.raises(ValueError, match=r"/elsewhere/Nobody/1.png"):
        read_mcllava(release)
    _write(alex / "vqa.json", {"1.png": {"Human": "What colour is <Alex>?", "AI": "red"}})  # bare: its own folder
    assert [r["image"] for r in read_mcllava(release) if r["task"] == "vqa"] == [str((alex / "1.png").resolve())]


@pytest.mark.parametrize(
    "text,question,options",
    [
        ("What is it? A. a ball B. a cup", "What is it?", {"A": "a ball", "B": "a cup"}),
        (
            "What is it? Options: A: a ball, B: a cup, C: a hat",
            "What is it?",
            {"A": "a ball", "B": "a cup", "C": "a hat"},
        ),
        ("What is it? (A) a ball (B) a cup", "What is it?", {"A": "a ball", "B": "a cup"}),
        ("What is it?\nA. a ball\nB. a cup", "What is it?", {"A": "a ball", "B": "a cup"}),
        ("Is it A or B?", "Is it A or B?", {}),
    ],
)
def test_option_formats(text, question, options):
    assert split_options(text) == (question, options)


def test_answer_fields():
    opts = {"A": "a book", "B": "a scarf"}
    assert [choice_answer(a, opts) for a in ("B", "(B)", "B.", "B. a scarf", "a scarf")] == ["B"] * 5
    assert choice_answer("A book", opts) == "A"  # the option's text, not the letter A followed by a word
    assert choice_answer("A pen", opts) is None


def test_unreadable_choice_records_name_file_and_record(release):
    alex = release / "two_concept" / "concept" / "test" / "Alex"
    _write(alex / "choice.json", {"0.png": {"Human": "What does <Alex> hold? A. a cup B. a hat", "AI": "A book"}})
    with pytest.raises(ValueError, match=r"choice.json \['0.png' #0\].*'A book'"):
        read_mcllava(release)
    _write(alex / "choice.json", {"0.png": {"Human": "Who is on the left, <Alex> or <Gloria>?", "AI": "A"}})
    with pytest.raises(ValueError, match=r"choice.json \['0.png' #0\].*cannot read the options"):
        read_mcllava(release)


def test_each_scenario_on_its_own(release):
    case = release / "three_concept"
    for c in ("Bo", "Cy", "Di"):
        _png(case / "concept" / "test" / c / "0.png")
    _png(case / "multi" / "Bo_Cy_Di" / "0.png")
    recs = read_mcllava(release)
    assert {r["scenario"] for r in recs} == {"two_concept/Alex_Gloria", "three_concept/Bo_Cy_Di"}

    class Yes:
        names = {c: c for c in ("Alex", "Gloria", "Bo", "Cy", "Di")}

        def answer(self, image, question):
            return "Yes"

        def locate(self, image):
            return {}

    rep = evaluate([r for r in recs if r["task"] == "recognition"], Yes(), progress=False)
    assert set(rep["scenarios"]) == {"two_concept/Alex_Gloria", "three_concept/Bo_Cy_Di"}
    n = sum(s["recognition"]["n"] for s in rep["scenarios"].values())
    assert n == rep["recognition"]["n"]
