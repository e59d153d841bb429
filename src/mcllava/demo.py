"""`make demo`: the whole method end to end, offline, on this machine's CPU.

Builds (or reuses) a small base model, generates concepts and a test set with exact ground truth,
personalises the base with all concepts jointly (`--recipe fast`), evaluates, prints the table and writes
`demo-report/index.html` with every test image, its marks and the answers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console

from .assistant import PersonalAssistant
from .backbone import Backbone
from .concepts import ConceptSet
from .datasets import read_tests_jsonl
from .evaluate import evaluate, print_table
from .report import write_html
from .train import TrainConfig, personalize

console = Console()

SHAPE_CONCEPTS = {"bo": ("red", "circle"), "ana": ("blue", "square"), "kiki": ("yellow", "triangle"), "momo": ("green", "circle")}


class DemoAnswerer:
    """Evaluation adapter that also keeps each question's marked image for the report."""

    def __init__(self, assistant: PersonalAssistant):
        self.assistant, self.names, self.marked = assistant, assistant.names, {}
        self._n = 0

    def answer(self, image, question):
        result = self.assistant.respond(image, question, visual_prompt=True, max_new_tokens=24)
        if result.marked_image is not None:
            self.marked[self._n] = result.marked_image
        self._n += 1
        return result.text

    def locate(self, image):
        self._n += 1
        return self.assistant.locate(image)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--report", type=Path, default=Path("demo-report"))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()

    from .tiny import make_shape_concepts, make_tiny_base

    console.rule("1. base model")
    console.print("No LLaVA checkpoint is needed: a tiny LLaVA is built from a config and pretrained on shapes (cached in demo-out/base).")
    base_dir = make_tiny_base(args.out / "base", tokenizer_cache=args.out / "tokenizer")
    console.rule("2. concepts and test set")
    concepts_dir, tests = make_shape_concepts(args.out / "world", SHAPE_CONCEPTS, n_train=6, n_test=6, seed=args.seed + 1)
    console.print(f"concepts: {', '.join(f'<{c}> ({a} {b})' for c, (a, b) in SHAPE_CONCEPTS.items())}; tests: {tests}")

    console.rule("3. personalise (all concepts jointly, --recipe fast)")
    backbone = Backbone.load(base_dir)
    concept_set = ConceptSet.load(concepts_dir, tokenizer=backbone.tokenizer)
    config = TrainConfig(k=4, epochs=args.epochs, lr=1e-2, batch_size=8, seed=args.seed)
    result = personalize(concept_set, backbone, args.out / "bank", config, resume=True, log=console.print)
    console.print(f"bank: {args.out / 'bank'} ({sum(p.stat().st_size for p in (args.out / 'bank').iterdir()) / 1024:.1f} KiB)")

    console.rule("4. evaluate")
    records = read_tests_jsonl(tests)
    answerer = DemoAnswerer(PersonalAssistant.load(args.out / "bank", Backbone.load(base_dir)))
    report = evaluate(records, answerer)
    print_table(report, console)
    report["training"] = result.history
    (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    page = write_html(report, args.report, marked_images=answerer.marked)
    console.print(f"report: {page}  (JSON: {args.out / 'report.json'})  total {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
