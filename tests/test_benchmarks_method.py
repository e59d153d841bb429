"""The method benchmarks (benchmarks/init_compare.py, joint_vs_separate.py, visual_prompt.py, scaling.py) run end to end.

Each runs its `main` at the smallest settings on an untrained tiny LLaVA saved as a base folder, in a tmp dir, and
the JSON it writes must have the expected structure and sane values. The figures themselves come from running the
scripts (see their docstrings); an untrained base says nothing about them.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def bench(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer_dir):
    """An untrained tiny LLaVA (untied head) saved like a checkpoint: the benchmarks load it through `--base`."""
    from transformers import AutoTokenizer

    from mcllava.tiny import build_tiny_llava

    model, processor = build_tiny_llava(AutoTokenizer.from_pretrained(tokenizer_dir))
    path = tmp_path_factory.mktemp("untrained-base")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture()
def run(base_dir, tmp_path):
    """Run a benchmark's main with the shared small settings; return (returned results, the JSON it wrote)."""
    threads = torch.get_num_threads()

    def go(name: str, *extra: str) -> tuple[dict, dict]:
        common = [
            "--base",
            str(base_dir),
            "--world",
            "shapes",
            "--train-images",
            "3",
            "--threads",
            "1",
            "--out",
            str(tmp_path / "out"),
            "--work",
            str(tmp_path / "work"),
        ]
        returned = bench(name).main([*common, *extra])
        assert (tmp_path / "out" / f"{name}.png").read_bytes().startswith(b"\x89PNG")
        return returned, json.loads((tmp_path / "out" / f"{name}.json").read_text())

    yield go
    torch.set_num_threads(threads)


def unit(x) -> bool:
    return x is not None and 0.0 <= x <= 1.0


@pytest.mark.slow  # runs the benchmark end to end
def test_init_compare_curves_per_init_and_seed(run):
    returned, saved = run(
        "init_compare", "--concepts", "2", "--seeds", "1", "--epochs", "2", "--eval-every", "1", "--test-images", "4"
    )
    assert saved["benchmark"] == "init_compare" and saved["world"] == "shapes" and len(saved["concepts"]) == 2
    assert saved["target"] == 0.9 and saved["test_questions"] > 0
    for init in ("kmeans", "random"):
        r = saved[init]
        (one,) = r["runs"]
        steps = [s for s, _ in one["curve"]]
        assert len(steps) == 2 and steps[0] > 0 and steps == sorted(set(steps))
        assert all(unit(acc) for _, acc in one["curve"]) and one["train_s"] > 0
        assert r["steps_to_target"] == [one["steps_to_target"]] and one["steps_to_target"] in (None, *steps)
        assert [s for s, _ in r["mean_curve"]] == steps and unit(r["final_accuracy_mean"])
        assert set(r["mean_curve_steps_to"]) == {"0.6", "0.7", "0.8"} and all(
            v in (None, *steps) for v in r["mean_curve_steps_to"].values()
        )
    assert returned["kmeans"]["steps_to_target"] == saved["kmeans"]["steps_to_target"]


@pytest.mark.slow  # runs the benchmark end to end
def test_joint_vs_separate_recognition_and_confusion(run):
    _, saved = run("joint_vs_separate", "--concepts", "3", "--epochs", "1", "--test-images", "6")
    ids = set(saved["concepts"])
    for arm in ("joint", "separate"):
        r = saved[arm]
        assert unit(r["recognition"]["weighted_accuracy"]) and r["recognition"]["n"] == saved["test_questions"]
        assert r["multi_concept_recognition"] is None or unit(r["multi_concept_recognition"]["weighted_accuracy"])
        c = r["confusion"]
        assert c["n"] > 0 and unit(c["rate"]) and set(c["by_asked"]) <= ids
        assert all(unit(v) for v in c["by_asked"].values())
        assert all(b != a and b in ids for a, row in c["pairs"].items() for b in row)
        assert r["train_s"] > 0


@pytest.mark.slow  # runs the benchmark end to end
def test_visual_prompt_three_modes(run):
    _, saved = run("visual_prompt", "--concepts", "2", "--epochs", "1", "--test-images", "3")
    assert saved["missing_variants"] == [] and saved["test_questions"]["grounding"] > 0
    assert saved["off"]["grounding"] is None and saved["off"]["reference"] is None
    assert (saved["on_tokens"]["reference"], saved["on_features"]["reference"]) == ("tokens", "features")
    for mode in ("off", "on_tokens", "on_features"):
        m = saved[mode]
        assert unit(m["recognition"]) and unit(m["caption_recall"])
        assert m["latency_s"]["recognition"] > 0 and m["latency_s"]["caption"] > 0
    for mode in ("on_tokens", "on_features"):
        assert unit(saved[mode]["grounding"]) and set(saved[mode]["latency_overhead_s"]) == {"recognition", "caption"}


@pytest.mark.slow  # runs the benchmark end to end
def test_scaling_grows_prompt_with_concepts(run):
    _, first = run("scaling", "--concepts", "2,3", "--epochs", "1", "--test-per-concept", "1", "--arms", "remedy")
    assert all("remedy" in r and "recognition" not in r and "prompt_cache" not in r for r in first["rows"])
    # the same command with both arms reads the remedy back and adds the plain bank to the same rows
    _, saved = run("scaling", "--concepts", "2,3", "--epochs", "1", "--test-per-concept", "1")
    rows = saved["rows"]
    assert [r["remedy"] for r in rows] == [r["remedy"] for r in first["rows"]]
    assert saved["concept_counts"] == [2, 3] and [r["concepts"] for r in rows] == [2, 3]
    assert rows[0]["prompt_tokens"] < rows[1]["prompt_tokens"] and rows[0]["system_tokens"] < rows[1]["system_tokens"]
    assert rows[0]["steps_per_epoch"] <= rows[1]["steps_per_epoch"]
    for r in rows:
        assert unit(r["recognition"]["weighted_accuracy"]) and r["distinct_looks"] == r["concepts"]
        assert r["train_s"] > 0 and r["peak_rss_mb"] > 0 and r["answer_latency_s"] > 0
        rel = r["relevant"]  # the remedy: only the concepts a question names or the locator sees are introduced
        assert unit(rel["recognition"]["weighted_accuracy"]) and rel["answer_latency_s"] > 0
        assert 0 < rel["system_tokens_mean"] <= r["system_tokens"]
        cached = r["prompt_cache"]  # the plain bank answering with the system text's key-value cache reused
        assert unit(cached["recognition"]["weighted_accuracy"]) and cached["answer_latency_s"] > 0
        assert cached["recognition"]["n"] == r["recognition"]["n"]
        remedy = r["remedy"]  # a bank trained with introduce="relevant", answering that way
        assert unit(remedy["recognition"]["weighted_accuracy"]) and remedy["train_s"] > 0
        assert 0 < remedy["system_tokens_mean"] <= r["system_tokens"]
    # an interrupted sweep resumes: the finished count is read back, only the new one runs
    _, again = run("scaling", "--concepts", "3,4", "--epochs", "1", "--test-per-concept", "1", "--min-test-scenes", "0")
    assert again["rows"][0] == json.loads(json.dumps(rows[1], default=str))
    assert [r["concepts"] for r in again["rows"]] == [3, 4]
    _, other = run("scaling", "--concepts", "3", "--epochs", "2", "--test-per-concept", "1")  # other settings: redone
    assert (
        other["rows"][0]["steps_per_epoch"] == rows[1]["steps_per_epoch"]
        and other["rows"][0]["train_s"] != rows[1]["train_s"]
    )


@pytest.mark.slow  # runs the benchmark end to end
def test_recipe_speed_fast_against_paper(run, tmp_path):
    _, saved = run(
        "recipe_speed", "--concepts", "2", "--epochs", "2", "--test-images", "3", "--new-tokens", "2", "--repeats", "1"
    )
    fast, paper = saved["fast"], saved["paper"]
    assert (fast["config"]["recipe"], paper["config"]["recipe"]) == ("fast", "paper") and paper["config"][
        "batch_size"
    ] == 1
    for r in (fast, paper):
        assert len(r["epoch_s"]) == 2 and len(r["curve"]) == 2 and all(unit(a) for _, a in r["curve"])
        assert r["curve"][0][0] < r["curve"][1][0] and r["seconds_to_common_accuracy"] in [t for t, _ in r["curve"]]
        assert r["bank_bytes"] > 0 and r["peak_rss_mb"] > 0
    rows = [(tmp_path / "work" / f"bank-{r}" / "concepts.safetensors").stat().st_size for r in ("fast", "paper")]
    assert rows[0] == rows[1]  # both recipes save the concept rows only
    assert paper["trainable_parameters"] > 100 * fast["trainable_parameters"]  # whole matrices against concept rows
    assert saved["common_accuracy"] == min(fast["best_accuracy"], paper["best_accuracy"])
    lat = saved["answer_latency"]
    assert set(lat) == {"plain", "personalised", "visual_prompt"} and all(v["answer_s"] > 0 for v in lat.values())
    assert (
        lat["plain"]["prompt_tokens"] < lat["personalised"]["prompt_tokens"]
    )  # the system text introduces the concepts


def test_each_base_is_benchmarked_with_the_recipe_personalize_gives_it():
    """On the proving ground the benchmarks must train as `personalize --base proving-ground` does (k = 6, lr 1e-2,
    bare Yes/No): the library's defaults collapse there to answering one way (0.50)."""
    from mcllava.presets import proving_ground as proving_ground_config
    from mcllava.train import TrainConfig

    common = bench("_common")
    pg = common.train_config(common.Setup("proving-ground", "characters", Path(".")), 3, 1, introduce="relevant")
    assert pg == proving_ground_config(epochs=3, seed=1, holdout=0, introduce="relevant")
    other = common.train_config(common.Setup("some/llava", "characters", Path(".")), 3, 1)
    assert other == TrainConfig(epochs=3, seed=1, holdout=0)


def test_extend_against_joint(run):
    _, saved = run("extend", "--concepts", "3", "--new", "1", "--epochs", "1", "--test-images", "12")
    assert (
        saved["old_rows_bit_identical"] is True and len(saved["old_concepts"]) == 2 and len(saved["new_concepts"]) == 1
    )
    for arm in ("joint", "extended", "old"):
        r = saved[arm]
        assert unit(r["old"]["weighted_accuracy"]) and r["train_s"] > 0 and r["steps_per_epoch"] > 0
        assert r["confusion_old_asked_on_new"]["n"] > 0 and unit(r["confusion_old_new"]["rate"])
    assert saved["old"]["new"] is None and unit(saved["extended"]["new"]["weighted_accuracy"])
    assert saved["extended"]["steps_per_epoch"] < saved["joint"]["steps_per_epoch"]
