"""benchmarks/gpu_llava15.py runs end to end on CPU: LLaVA-1.5-7B and 13B at full width, one layer per tower.

The 336 px / 576-token image is shrunk to 56 px (16 tokens) to keep the run short; everything else (32064 x 4096
or x 5120 embeddings and untied head, 32002-entry tokenizer, batch 8 fast vs batch 1 paper) is as published.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # LLaVA-1.5-7B and 13B at full width

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_llava15.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("gpu_llava15", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_measures_both_models_recipes_and_answers(tmp_path):
    bench = _bench_module()
    out = tmp_path / "bench.json"
    returned = bench.main(
        [
            "--model",
            "7b,13b",
            "--text-layers",
            "1",
            "--vision-layers",
            "1",
            "--image-size",
            "56",
            "--device",
            "cpu",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--new-tokens",
            "3",
            "--repeats",
            "1",
            "--out",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert saved["models"].keys() == {"7b", "13b"} and saved["device"]["type"] == "cpu"
    assert returned["plot"] is None or Path(returned["plot"]).stat().st_size > 0
    k, concepts = 16, 2  # TrainConfig().k, the benchmark's two concepts
    for name, width in (("7b", 4096), ("13b", 5120)):
        m = saved["models"][name]
        assert (
            m["config"]["text_config"]["hidden_size"] == width and m["config"]["text_config"]["num_hidden_layers"] == 1
        )
        assert m["config"]["text_config"]["vocab_size"] == 32064
        fast, paper = m["train"]["fast"], m["train"]["paper"]
        assert (fast["batch_size"], paper["batch_size"]) == (8, 1)
        for r in (fast, paper):
            assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["flops_per_step"] > 0 and r["peak_bytes"] > 0
            assert math.isfinite(r["loss"]) and len(r["step_s_all"]) == 1
            assert r["fraction_of_peak"] is None  # no peak for a CPU without --peak-tflops
        # fast: the concept rows of the embedding and of the untied head; paper: both whole matrices
        assert fast["trainable_parameters"] == 2 * concepts * (k + 1) * width
        assert paper["trainable_parameters"] == 2 * 32064 * width
        assert paper["optimizer_state_bytes"] > 500 * fast["optimizer_state_bytes"] > 0  # 32064 rows against 34
        assert fast["tokens_per_step"] > 8 * 16  # every sample carries the 16 image tokens
        answers = m["answer"]
        assert answers.keys() == {"plain", "personalised", "visual_prompt", "personalised_50", "personalised_relevant"}
        for a in answers.values():
            assert a["answer_s"] > 0 and a["first_token_s"] > 0 and a["new_tokens"] == 3
        # concept introductions, then the marks' sentences, lengthen the prompt
        assert (
            answers["plain"]["prompt_tokens"]
            < answers["personalised"]["prompt_tokens"]
            < answers["visual_prompt"]["prompt_tokens"]
        )
        assert answers["visual_prompt"]["marks"] == concepts
        # 50 introductions of 1 + 1 + 16 + 1 tokens each; the remedy introduces only the concept the question names
        intro = answers["personalised"]["prompt_tokens"] - answers["personalised_relevant"]["prompt_tokens"]
        assert answers["personalised_relevant"]["concepts_introduced"] == 1 and intro >= k + 2
        assert (
            answers["personalised_50"]["prompt_tokens"]
            == answers["personalised_relevant"]["prompt_tokens"] + 49 * intro
        )
