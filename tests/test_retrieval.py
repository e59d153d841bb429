"""The training-free retrieval arm: region scores, thresholds from training photos only, and `mcllava eval
--method retrieval` end to end on a tiny base."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mcllava.cli import app
from mcllava.layout import GridLayout, SlotLayout
from mcllava.retrieval import best_cut, region_score
from mcllava.tiny import make_shape_concepts

runner = CliRunner()


def test_region_score_takes_the_best_window_or_slot_row():
    scores = torch.zeros(4, 4)
    scores[2:4, 0:2] = 1.0  # a 2 x 2 patch region that matches
    scores[0, 3] = 1.0  # a lone matching patch
    assert region_score(scores.flatten(), GridLayout((4, 4)), 2) == 1.0
    assert region_score(scores.flatten(), GridLayout((4, 4)), 3) == pytest.approx(4 / 9)
    slots = torch.zeros(6, 6)
    slots[4] = 0.9
    slots[1, 0] = 1.0
    assert region_score(slots.flatten(), SlotLayout(), 1) == pytest.approx(0.9)


def test_best_cut_balances_recalls():
    t = best_cut([0.9, 0.8, 0.7], [0.2, 0.75, 0.1, 0.3])
    assert 0.3 < t <= 0.7  # every positive kept, three of four negatives rejected
    assert best_cut([0.5], []) == 0.5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_shape_concepts(
        tmp_path_factory.mktemp("w"), {"bo": ("red", "circle"), "ana": ("blue", "square")}, n_train=4, n_test=3
    )


def test_eval_method_retrieval(base_dir, world, tmp_path):
    concepts, tests = world
    out = tmp_path / "arm.json"
    args = [
        "eval",
        str(concepts),
        str(tests),
        "--method",
        "retrieval",
        "--base",
        str(base_dir),
        "--out",
        str(out),
        "--quiet",
        "--prompts",
        "official",
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "official" in res.output and "lenient" in res.output and "s per photo" in res.output
    report = json.loads(out.read_text())
    assert set(report) >= {"recognition", "retrieval", "scoring"} and "choice" not in report
    rec = report["recognition"]
    assert rec["official"]["weighted_accuracy"] == rec["lenient"]["weighted_accuracy"]  # it says exactly Yes or No
    assert rec["official"]["weighted_accuracy"] > 0.5  # red circles and blue squares are told apart untrained
    arm = report["retrieval"]
    assert set(arm["thresholds"]) == {"bo", "ana"} and arm["seconds_per_photo"] > 0
    # the thresholds come from the concept folder alone: a different test file leaves them unchanged
    rows = [json.loads(x) for x in tests.read_text().splitlines()[:2]]
    other = tmp_path / "other.jsonl"
    other.write_text(
        "".join(json.dumps(dict(r, image=str((tests.parent / r["image"]).resolve()))) + "\n" for r in rows)
    )
    res = runner.invoke(app, args[:2] + [str(other)] + args[3:] + ["--out", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "b.json").read_text())["retrieval"]["thresholds"] == arm["thresholds"]


def test_retrieval_needs_a_base_and_a_concept_folder(world, tmp_path, base_dir):
    concepts, tests = world
    (tmp_path / "manifest.json").write_text("{}")  # a bank folder
    res = runner.invoke(app, ["eval", str(tmp_path), str(tests), "--method", "retrieval", "--base", str(base_dir)])
    assert res.exit_code == 2 and "concept folder" in res.output
    res = runner.invoke(app, ["eval", str(concepts), str(tests), "--method", "retrieval", "--quiet"])
    assert res.exit_code == 2 and "--base" in res.output
    res = runner.invoke(app, ["eval", str(concepts), str(tests), "--method", "magic", "--quiet"])
    assert res.exit_code == 2 and "--method" in res.output
