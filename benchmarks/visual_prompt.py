"""The personalised visual prompt: off, on with learned-token references, on with masked-feature references.

Not a test: a measurement. Trains one bank (all concepts jointly, the fast recipe) and answers the same held-out
questions three ways: without the visual prompt; with location maps from each concept's learned soft tokens (the
paper's variant, `PersonalAssistant(reference="tokens")`); with location maps from its masked training-image
features (the released code's variant, `reference="features"`, the default). Both variants exist, so none is
missing. Reports recognition weighted accuracy, grounding hit rate (the locator's point inside the concept's box;
there is no locator with the prompt off, so no grounding there), caption concept recall, and mean answer latency
per task with the overhead over "off". Writes benchmarks/out/visual_prompt.json and .png.

    python benchmarks/visual_prompt.py                          # make demo's tiny shapes base, 4 concepts
    python benchmarks/visual_prompt.py --epochs 40 --test-images 24
    python benchmarks/visual_prompt.py --base proving-ground
"""

from __future__ import annotations

from _common import (
    BankEvaluator,
    build_world,
    header,
    parser,
    setup,
    strip_rows,
    test_records,
    train,
    train_config,
    write_results,
)

MODES = {"off": (False, "features"), "on_tokens": (True, "tokens"), "on_features": (True, "features")}


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, epochs=40)
    ap.add_argument("--train-seed", type=int, default=0)
    args = ap.parse_args(argv)
    s = setup(args, "visual_prompt")
    world = build_world(
        s.world, s.work / "world", args.concepts, args.seed, args.train_images, args.test_images, args.multi
    )
    records = test_records(world, ("recognition", "caption", "grounding"))
    result, train_s = train(world, s.base, s.work / "bank", train_config(s, args.epochs, args.train_seed))
    results = {
        **header("visual_prompt", s, args, world),
        "train_s": train_s,
        "missing_variants": [],
        "test_questions": {t: sum(r["task"] == t for r in records) for t in ("recognition", "caption", "grounding")},
    }

    evaluator = BankEvaluator(s.base, [])
    for mode, (visual_prompt, reference) in MODES.items():
        evaluator.records = [r for r in records if visual_prompt or r["task"] != "grounding"]
        report = evaluator(result.bank, visual_prompt=visual_prompt, reference=reference)
        results[mode] = {
            "visual_prompt": visual_prompt,
            "reference": reference if visual_prompt else None,
            "recognition": report["recognition"]["weighted_accuracy"],
            "grounding": report["grounding"]["hit_rate"] if "grounding" in report else None,
            "caption_recall": report["caption"]["recall"] if "caption" in report else None,
            "latency_s": report["latency_s"],
            "report": strip_rows(report),
        }
        print(
            f"{mode}: recognition {results[mode]['recognition']:.3f}, grounding {results[mode]['grounding']}, "
            f"caption recall {results[mode]['caption_recall']}, {report['latency_s'].get('recognition', 0) * 1000:.1f} ms/recognition answer"
        )
    off = results["off"]["latency_s"]
    for mode in ("on_tokens", "on_features"):
        results[mode]["latency_overhead_s"] = {t: v - off[t] for t, v in results[mode]["latency_s"].items() if t in off}

    quality = {
        label: {m: results[m][key] for m in MODES}
        for label, key in (
            ("recognition", "recognition"),
            ("grounding", "grounding"),
            ("caption recall", "caption_recall"),
        )
    }
    latency = {
        task: {m: results[m]["latency_s"].get(task, 0) * 1000 for m in MODES} for task in ("recognition", "caption")
    }
    panels = [
        {"title": "quality by visual prompt mode", "bars": quality, "ymax": 1.0},
        {"title": "mean answer latency (ms)", "bars": latency},
    ]
    write_results(args.out, "visual_prompt", results, panels)
    return results


if __name__ == "__main__":
    main()
