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

from rich.console import Console

from .assistant import PersonalAssistant
from .backbone import Backbone
from .concepts import ConceptSet
from .datasets import read_tests_jsonl
from .evaluate import evaluate, print_table
from .report import write_html
from .train import personalize

console = Console()

SHAPE_CONCEPTS = {"bo": ("red", "circle"), "ana": ("blue", "square"), "kiki": ("yellow", "triangle"), "momo": ("green", "circle")}


class DemoAnswerer:
    """Evaluation adapter that also keeps each question's marked image for the report.

    The tiny base never saw Set-of-Mark marks or "Mark n is <c>." in training, so it answers from the plain
    photo; the marks are still computed and shown, so the report shows where each concept was located.
    """

    def __init__(self, assistant: PersonalAssistant):
        self.assistant, self.names, self.marked = assistant, assistant.names, {}
        self._n = 0

    def answer(self, image, question):
        from .locate import draw_marks

        locations = self.assistant.locations(image)
        if any(loc.present for loc in locations):
            self.marked[self._n] = draw_marks(image, locations)[0]
        self._n += 1
        return self.assistant.answer(image, question, visual_prompt=False, max_new_tokens=8)

    def locate(self, image):
        self._n += 1
        return self.assistant.locate(image)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--report", type=Path, default=Path("demo-report"))
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from .cli import quiet_libraries

    quiet_libraries()
    t0 = time.perf_counter()

    from .tiny import make_shape_concepts, make_tiny_base, tiny_train_config

    console.rule("1. base model")
    console.print("No LLaVA checkpoint is needed: a tiny LLaVA is built from a config and pretrained on shapes (cached in demo-out/base).")
    base_dir = make_tiny_base(args.out / "base", tokenizer_cache=args.out / "tokenizer")
    console.rule("2. concepts and test set")
    concepts_dir, tests = make_shape_concepts(args.out / "world", SHAPE_CONCEPTS, n_train=8, n_test=6, seed=args.seed + 1)
    console.print(f"concepts: {', '.join(f'<{c}> ({a} {b})' for c, (a, b) in SHAPE_CONCEPTS.items())}; tests: {tests}")

    console.rule("3. personalise (all concepts jointly, --recipe fast)")
    backbone = Backbone.load(base_dir)
    concept_set = ConceptSet.load(concepts_dir, tokenizer=backbone.tokenizer)
    config = tiny_train_config(epochs=args.epochs, seed=args.seed)
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
