"""One bank trained jointly on all concepts against one bank per concept, trained alone and merged afterwards.

Not a test: a measurement. Both arms use the same world, the same epochs (so every concept sees as many samples of
its own) and the same generic negative images (where the world has them); only joint training also uses the other
concepts' photos as negatives. The per-concept banks are combined with `ConceptBank.merge`. Reports recognition
overall and on multi-concept images (MC-LLaVA's multi_one split), and the confusion rate: how often the model
answers Yes about concept A on an image that shows another concept but not A (overall, on multi-concept images,
per asked concept, and per (asked, shown) pair). Writes benchmarks/out/joint_vs_separate.json and .png.

    python benchmarks/joint_vs_separate.py                      # make demo's tiny shapes base, 4 concepts
    python benchmarks/joint_vs_separate.py --concepts 6 --epochs 40
    python benchmarks/joint_vs_separate.py --base proving-ground
"""

from __future__ import annotations

import functools

from _common import BankEvaluator, build_world, header, parser, setup, test_records, train, train_config, write_results

from mcllava.bank import ConceptBank


def yes_rate(rows: list[dict]) -> float | None:
    return sum(r["parsed"] is True for r in rows) / len(rows) if rows else None


def confusion(rows: list[dict]) -> dict:
    """Yes-rate on 'Is <A> here?' where the image shows some other concept but not A."""
    cases = [
        r for r in rows if r["kind"] == "recognition" and r["present"] and not set(r["concepts"]) & set(r["present"])
    ]
    asked = sorted({r["concepts"][0] for r in cases})
    shown = sorted({c for r in cases for c in r["present"]})
    return {
        "rate": yes_rate(cases),
        "n": len(cases),
        "multi_concept_images": yes_rate([r for r in cases if len(r["present"]) >= 2]),
        "by_asked": {a: yes_rate([r for r in cases if r["concepts"][0] == a]) for a in asked},
        "pairs": {
            a: {b: yes_rate([r for r in cases if r["concepts"][0] == a and b in r["present"]]) for b in shown if b != a}
            for a in asked
        },
    }


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, epochs=40, test_images=40)
    ap.add_argument("--train-seed", type=int, default=0)
    ap.set_defaults(multi=0.75)
    args = ap.parse_args(argv)
    s = setup(args, "joint_vs_separate")
    world = build_world(
        s.world, s.work / "world", args.concepts, args.seed, args.train_images, args.test_images, args.multi
    )
    records = test_records(world)
    config = train_config(s, args.epochs, args.train_seed)

    joint, joint_s = train(world, s.base, s.work / "joint", config)
    alone = [train(world, s.base, s.work / f"alone-{cid}", config, only=[cid]) for cid in world.ids]
    merged = functools.reduce(ConceptBank.merge, [r.bank for r, _ in alone])

    evaluator = BankEvaluator(s.base, records)
    results = {**header("joint_vs_separate", s, args, world), "test_questions": len(records)}
    for name, bank, seconds in (("joint", joint.bank, joint_s), ("separate", merged, sum(t for _, t in alone))):
        report = evaluator(bank)
        rec = report["recognition"]
        results[name] = {
            "recognition": rec,
            "multi_concept_recognition": rec["splits"].get("multi_one"),
            "confusion": confusion(report["rows"]),
            "train_s": seconds,
            "timing": report["timing"],
        }
        print(f"{name}: recognition {rec['weighted_accuracy']:.3f}, confusion {results[name]['confusion']['rate']}")

    metrics = {
        "recognition": lambda r: r["recognition"]["weighted_accuracy"],
        "multi-concept recognition": lambda r: (r["multi_concept_recognition"] or {}).get("weighted_accuracy"),
        "confusion rate": lambda r: r["confusion"]["rate"],
    }
    bars = {label: {arm: get(results[arm]) for arm in ("joint", "separate")} for label, get in metrics.items()}
    write_results(
        args.out, "joint_vs_separate", results, [{"title": "joint vs separate + merged", "bars": bars, "ymax": 1.0}]
    )
    return results


if __name__ == "__main__":
    main()
