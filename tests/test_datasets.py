"""Evaluation-set readers: validation errors name the file and line; MC-LLaVA and Yo'LLaVA layouts parse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mcllava.datasets import read_any, read_mcllava, read_tests_jsonl, read_yollava, split_options, validate_record

GOOD = {
    "image": "a.png",
    "task": "recognition",
    "question": "Is <bo> in this photo?",
    "answer": "Yes",
    "concepts": ["bo"],
    "present": ["bo"],
    "boxes": {"bo": [1, 2, 30, 40]},
}


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)


def _write(tmp_path: Path, *records) -> Path:
    _png(tmp_path / "a.png")
    p = tmp_path / "tests.jsonl"
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return p


def test_reads_and_resolves_images(tmp_path):
    text = {"image": None, "task": "text", "question": "How old is <bo>?", "answer": "3 years old", "concepts": ["bo"]}
    recs = read_tests_jsonl(_write(tmp_path, GOOD, "", text))
    assert len(recs) == 2
    assert recs[0]["image"] == str((tmp_path / "a.png").resolve())
    assert recs[1]["image"] is None and recs[1]["present"] == [] and recs[1]["boxes"] == {}
    assert read_any(tmp_path) == recs == read_any(tmp_path / "tests.jsonl")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"task": "quiz"}, "unknown task 'quiz'"),
        ({"answer": "Maybe"}, "'Yes' or 'No'"),
        ({"question": ""}, "'question' must be non-empty"),
        ({"image": None}, "needs an 'image'"),
        ({"concepts": "bo"}, "'concepts' must be a list"),
        ({"boxes": {"bo": [5, 5, 1, 1]}}, "box of 'bo'"),
        ({"boxes": {"bo": [1, 2, 3]}}, "box of 'bo'"),
        ({"task": "choice", "answer": "A"}, "needs 'options'"),
        ({"task": "choice", "answer": "C", "options": {"A": "x", "B": "y"}}, "not one of the options"),
        ({"task": "grounding", "answer": "left", "boxes": {}}, "needs a box"),
        ({"task": "text", "answer": "x"}, "text question has no image"),
        ({"image": "missing.png"}, "not found"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, change, message):
    path = _write(tmp_path, GOOD, {**GOOD, **change})
    with pytest.raises(ValueError, match=message) as err:
        read_tests_jsonl(path)
    assert f"{path}:2" in str(err.value)


def test_bad_json_line(tmp_path):
    path = _write(tmp_path, GOOD, GOOD, "{not json")
    with pytest.raises(ValueError, match=r"tests.jsonl:3: invalid JSON"):
        read_tests_jsonl(path)
    with pytest.raises(ValueError, match="expected a JSON object"):
        validate_record([1, 2], "x")


def test_split_options():
    assert split_options("What is <bo> holding?\nA. a ball\nB. a cup") == (
        "What is <bo> holding?",
        {"A": "a ball", "B": "a cup"},
    )
    assert split_options("Plain question?") == ("Plain question?", {})


def test_mcllava_release_shapes(tmp_path):
    """A hand-made folder in the release's shape: case folder, single dict entries, multi lists, no position.json."""
    case = tmp_path / "two_concept"
    for k in range(2):
        _png(case / "concept" / "test" / "Alex" / f"{k}.png")
        _png(case / "concept" / "test" / "Gloria" / f"{k}.png")
        _png(case / "multi" / "Alex_Gloria" / f"{k}.png")
    _png(case / "concept" / "test" / "Alex" / "0_mask.png")
    (case / "concept" / "test" / "Alex" / "choice.json").write_text(
        json.dumps({"0.png": {"Human": "What is <Alex> wearing?\nA. a hat\nB. a scarf\nC. nothing", "AI": "B"}})
    )
    (case / "concept" / "test" / "Alex" / "vqa.json").write_text(
        json.dumps(
            {
                str(case / "concept" / "test" / "Alex" / "1.png"): {
                    "Human": "What is <Alex> doing?",
                    "AI": "He is running.",
                }
            }
        )
    )
    (case / "concept" / "test" / "Alex" / "qa.json").write_text(
        json.dumps([{"question": "What does <Alex> eat?\nA. fish\nB. hay", "answer": "B"}])
    )
    (case / "multi" / "Alex_Gloria" / "choice.json").write_text(
        json.dumps({"1.png": [{"Human": "Who is on the left? A. <Alex> B. <Gloria>", "AI": "A"}]})
    )
    recs = read_mcllava(tmp_path)
    rec = [r for r in recs if r["task"] == "recognition"]
    assert len(rec) == 4 * 2 + 2 * 3  # single: yes + no per image; multi: each + all
    choice = [r for r in recs if r["task"] == "choice" and r["image"]]
    assert {r["question"] for r in choice} == {"What is <Alex> wearing?", "Who is on the left?"}
    assert choice[0]["options"] == {"A": "a hat", "B": "a scarf", "C": "nothing"}
    inline = next(r for r in choice if "left" in r["question"])
    assert inline["concepts"] == ["Alex", "Gloria"] and inline["options"] == {"A": "<Alex>", "B": "<Gloria>"}
    assert {r["scenario"] for r in recs} == {"two_concept/Alex_Gloria"}
    text = [r for r in recs if r["image"] is None]
    assert text[0]["options"] == {"A": "fish", "B": "hay"} and text[0]["answer"] == "B"
    assert not any("_mask" in (r["image"] or "") for r in recs)
    assert read_any(tmp_path) == recs


def test_mcllava_errors_name_the_file(tmp_path):
    _png(tmp_path / "concept" / "test" / "bo" / "0.png")
    bad = tmp_path / "concept" / "test" / "bo" / "vqa.json"
    bad.write_text("{oops")
    with pytest.raises(ValueError, match="vqa.json:1: invalid JSON"):
        read_mcllava(tmp_path)
    bad.write_text(json.dumps({"nothere.png": {"Human": "Q?", "AI": "A."}}))
    with pytest.raises(ValueError, match="image 'nothere.png' not found"):
        read_mcllava(tmp_path)
    with pytest.raises(ValueError, match="not an MC-LLaVA layout"):
        read_mcllava(tmp_path / "concept" / "test")


def test_yollava(tmp_path):
    data = tmp_path / "yollava-data"
    for name in ("bo", "mam"):
        for k in range(2):
            _png(data / "test" / name / f"{k}.png")
    (data / "yollava-visual-qa.json").write_text(
        json.dumps(
            {
                "bo": {
                    "./yollava-data/test/bo/1.png": {
                        "question": "What color is <sks>?",
                        "options": {"A": "Brown", "B": "Pink"},
                        "correct_answer": "A",
                    }
                }
            }
        )
    )
    recs = read_yollava(tmp_path)
    rec = [r for r in recs if r["task"] == "recognition"]
    assert len(rec) == 2 * 4 and sum(r["answer"] == "Yes" for r in rec) == 4
    qa = next(r for r in recs if r["task"] == "choice")
    assert qa["question"] == "What color is <bo>?" and qa["image"].endswith("bo/1.png") and qa["answer"] == "A"
    assert read_any(tmp_path) == recs
    (data / "yollava-visual-qa.json").write_text(json.dumps({"bo": {"x.png": {"question": "Q"}}}))
    with pytest.raises(ValueError, match="yollava-visual-qa.json"):
        read_yollava(tmp_path)


def test_read_any_refuses_unknown(tmp_path):
    with pytest.raises(ValueError, match="not a tests.jsonl, MC-LLaVA or Yo'LLaVA"):
        read_any(tmp_path)
    with pytest.raises(ValueError, match="no such file"):
        read_any(tmp_path / "nope")
