"""The `mcllava` command line end to end on an untrained tiny base: shapes of commands, outputs, clear errors."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from mcllava.cli import app
from mcllava.tiny import make_shape_concepts

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_shape_concepts(
        tmp_path_factory.mktemp("w"), {"bo": ("red", "circle"), "ana": ("blue", "square")}, n_train=3, n_test=2
    )


@pytest.fixture(scope="module")
def bank(tmp_path_factory, base_dir, world):
    out = tmp_path_factory.mktemp("banks") / "bank"
    res = runner.invoke(
        app,
        [
            "personalize",
            str(world[0]),
            "--base",
            str(base_dir),
            "--out",
            str(out),
            "--k",
            "2",
            "--epochs",
            "1",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    return out


def test_personalize_writes_a_small_bank(bank):
    manifest = json.loads((bank / "manifest.json").read_text())
    assert manifest["concept_ids"] == ["ana", "bo"] and manifest["k"] == 2 and manifest["tied_head"] is True
    assert (bank / "concepts.safetensors").stat().st_size < 64 * 1024
    assert not bank.with_name("bank.ckpt").exists()


def test_info_and_ask(bank, world, base_dir):
    res = runner.invoke(app, ["info", str(bank)])
    assert res.exit_code == 0 and "2 concepts" in res.output and "ana" in res.output
    image = next((world[1].parent / "scenes").iterdir())
    res = runner.invoke(
        app, ["ask", str(bank), "--image", str(image), "Is <bo> in this photo?", "--json", "--base", str(base_dir)]
    )
    assert res.exit_code == 0, res.output
    payload = json.loads(res.output.strip().splitlines()[-1])
    assert set(payload) == {"answer", "marks", "locations", "parts"} and len(payload["locations"]) == 2
    assert payload["parts"] == {}  # one concept: asked as is
    both = [
        "ask",
        str(bank),
        "--image",
        str(image),
        "Are <bo> and <ana> both in this photo?",
        "--json",
        "--base",
        str(base_dir),
    ]
    payload = json.loads(runner.invoke(app, both).output.strip().splitlines()[-1])
    assert set(payload["parts"]) == {"bo", "ana"} and payload["answer"].startswith(("Yes", "No"))
    assert json.loads(runner.invoke(app, both + ["--joint"]).output.strip().splitlines()[-1])["parts"] == {}
    caption = ["ask", str(bank), "--image", str(image), "Describe this photo.", "--json", "--base", str(base_dir)]
    assert set(json.loads(runner.invoke(app, caption).output.strip().splitlines()[-1])["parts"]) == {"bo", "ana"}
    assert json.loads(runner.invoke(app, caption + ["--free-captions"]).output.strip().splitlines()[-1])["parts"] == {}
    res = runner.invoke(app, ["ask", str(bank), "   ", "--base", str(base_dir)])
    assert res.exit_code == 2 and "question is empty" in res.output


def test_eval_writes_report(bank, world, tmp_path, base_dir):
    out = tmp_path / "report.json"
    res = runner.invoke(
        app,
        [
            "eval",
            str(bank),
            str(world[1]),
            "--base",
            str(base_dir),
            "--out",
            str(out),
            "--html",
            str(tmp_path / "html"),
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    for key in ("weighted_accuracy", "positive_recall", "negative_recall"):
        assert 0.0 <= report["recognition"][key] <= 1.0
    page = (tmp_path / "html" / "index.html").read_text()
    marked = list((tmp_path / "html" / "img").glob("marked_*.jpg"))
    assert marked and all(f"img/{m.name}" in page for m in marked)  # the photos with their marks are shown


def test_bad_concepts_give_clear_error_and_write_nothing(tmp_path, base_dir):
    concepts = tmp_path / "c"
    (concepts / "bo" / "train").mkdir(parents=True)
    Image.new("RGB", (40, 40), "red").save(concepts / "bo" / "train" / "0.png")
    Image.new("L", (20, 20), 255).save(concepts / "bo" / "train" / "0_mask.png")
    (concepts / "ana" / "train").mkdir(parents=True)
    out = tmp_path / "bank"
    res = runner.invoke(app, ["personalize", str(concepts), "--base", str(base_dir), "--out", str(out)])
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "0_mask.png" in text and "ana" in text
    assert not out.exists() and not out.with_name("bank.ckpt").exists()


def test_unknown_base_is_a_clear_error(tmp_path, world):
    res = runner.invoke(
        app, ["personalize", str(world[0]), "--base", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")]
    )
    assert res.exit_code == 2 and "cannot load base model" in " ".join(res.output.split())
