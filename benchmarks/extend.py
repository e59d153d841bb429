"""Adding concepts to a trained bank (`personalize --extend`) against training every concept jointly.

Not a test: a measurement. One world of N concepts (6 by default): a bank of the first N-M concepts is trained,
then extended with the last M (only their rows train; the old concepts' photos are their negatives); the
reference is one bank of all N trained jointly. All arms use the same recipe, epochs and generic negatives.
Reported per arm: the old concepts' recognition (and, for the bank before extension, the same questions), the new
concepts' recognition, and the confusion between old and new: the Yes-rate of 'is <A> here?' on photos that show a
concept of the other group and not A. Also training seconds and steps per epoch (the extension's cost follows the
new concepts). Group photos that mix old and new concepts are used only by the joint arm (an extension's folder
cannot name the bank's concepts). Each arm's bank stays in the scratch folder and is reused by later runs, so the
arms can train in separate processes. Writes benchmarks/out/extend.json and extend.png.

    python benchmarks/extend.py --base proving-ground --epochs 10 --train-images 10   # make demo's budget
    python benchmarks/extend.py --base proving-ground --arm joint &   # the same, in two processes (joint; old bank,
    python benchmarks/extend.py --base proving-ground --arm chain     # then its extension), each evaluating its banks,
    python benchmarks/extend.py --base proving-ground                 # then the results
    python benchmarks/extend.py --concepts 6 --new 2 --epochs 40      # the tiny shapes base
"""

from __future__ import annotations

import json
import time

import torch
from _common import (
    BankEvaluator,
    World,
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

from mcllava.backbone import Backbone
from mcllava.bank import ConceptBank
from mcllava.concepts import ConceptSet
from mcllava.evaluate import recognition_metrics
from mcllava.train import personalize


def subset(concepts: ConceptSet, ids: list[str]) -> ConceptSet:
    keep = set(ids)
    return ConceptSet(
        concepts.root, [c for c in concepts if c.id in keep], [m for m in concepts.multi if set(m.present) <= keep]
    )


def yes_rate(rows: list[dict]) -> float | None:
    return sum(r["parsed"] is True for r in rows) / len(rows) if rows else None


def measures(rows: list[dict], old: list[str], new: list[str]) -> dict:
    """Recognition of the old and of the new concepts' questions, and old/new confusion, from an evaluation's rows."""
    rec = [r for r in rows if r["kind"] == "recognition"]

    def about(group: list[str]) -> dict:
        chosen = [r for r in rec if set(r["concepts"]) <= set(group)]
        return recognition_metrics([r["truth"] for r in chosen], [r["parsed"] for r in chosen])

    def confused(asked: list[str], shown: list[str]) -> dict:
        cases = [
            r
            for r in rec
            if r["concepts"][0] in asked
            and not set(r["concepts"]) & set(r["present"])
            and set(r["present"]) & set(shown)
        ]
        return {"rate": yes_rate(cases), "n": len(cases)}

    out = {
        "old": about(old),
        "new": about(new) if all(c in {x for r in rec for x in r["concepts"]} for c in new) else None,
    }
    out["confusion_old_asked_on_new"] = confused(old, new)
    out["confusion_new_asked_on_old"] = confused(new, old)
    cases = [
        c
        for c in (out["confusion_old_asked_on_new"], out["confusion_new_asked_on_old"])
        if c["n"] and c["rate"] is not None
    ]
    out["confusion_old_new"] = {
        "rate": sum(c["rate"] * c["n"] for c in cases) / sum(c["n"] for c in cases) if cases else None,
        "n": sum(c["n"] for c in cases),
    }
    return out


ARMS = ("joint", "old", "extended")


def world_of(kind: str, root, args) -> World:
    """The benchmark's world: built once, then read back, so that arms run as separate processes share it."""
    if (root / "tests.jsonl").exists():
        ids = sorted(p.name for p in (root / "concepts").iterdir() if not p.name.startswith("_"))
        negatives = root / "negatives"
        return World(root / "concepts", root / "tests.jsonl", negatives if negatives.is_dir() else None, ids, len(ids))
    return build_world(kind, root, args.concepts, args.seed, args.train_images, args.test_images, args.multi)


def train_arm(arm: str, s, world: World, config, old_ids: list[str], new_ids: list[str]) -> dict:
    """Train one arm's bank into the scratch folder (kept: a later run reuses it) and record its cost."""
    out, record = s.work / arm, s.work / f"{arm}.json"
    if record.exists():
        return json.loads(record.read_text())
    if arm == "extended":
        backbone = Backbone.load(s.base)
        concepts = ConceptSet.load(world.concepts, tokenizer=backbone.tokenizer)
        t0 = time.perf_counter()
        result = personalize(
            subset(concepts, new_ids),
            backbone,
            out,
            config,
            negatives=world.negatives,
            progress=False,
            log=lambda *_: None,
            extend=ConceptBank.load(s.work / "old"),
            extend_concepts=subset(concepts, old_ids),
        )
        seconds = time.perf_counter() - t0
    else:
        result, seconds = train(world, s.base, out, config, only=old_ids if arm == "old" else None)
    info = {
        "train_s": seconds,
        "steps_per_epoch": result.history[0]["steps"],
        "epoch_s": [h["seconds"] for h in result.history],
    }
    record.write_text(json.dumps(info))
    return info


def evaluate_arm(arm: str, s, world: World, old_ids: list[str], new_ids: list[str]) -> dict:
    """Evaluate one arm's bank on the world's recognition questions (the old bank: those about old concepts only);
    kept beside the bank, so that arms evaluated in separate processes are read back."""
    record = s.work / f"{arm}-eval.json"
    if record.exists():
        return json.loads(record.read_text())
    records = test_records(world)
    if arm == "old":
        records = [r for r in records if set(r["concepts"]) <= set(old_ids)]
    report = BankEvaluator(s.base, records)(ConceptBank.load(s.work / arm))
    out = {
        **measures(report["rows"], old_ids, new_ids),
        "overall": strip_rows(report)["recognition"],
        "questions": len(records),
    }
    record.write_text(json.dumps(out, default=str))
    return out


def main(argv: list[str] | None = None) -> dict | None:
    ap = parser(__doc__, epochs=10, test_images=36)
    ap.add_argument("--new", type=int, default=2, help="concepts added by extension (the last ones by id)")
    ap.add_argument("--train-seed", type=int, default=0)
    ap.add_argument(
        "--arm",
        choices=("all", "joint", "chain", "old", "extended"),
        default="all",
        help="train and evaluate one arm (chain: the old bank, then its extension), so that arms run in "
        "separate processes; `all` reuses what they left and writes the results",
    )
    ap.set_defaults(concepts=6)
    args = ap.parse_args(argv)
    s = setup(args, "extend")
    # the scratch folder is named by every setting that decides the world and the banks: never reuse another run's
    s.work = s.work / (
        f"{s.world}-c{args.concepts}-n{args.new}-e{args.epochs}-t{args.train_images}-x{args.test_images}"
        f"-s{args.seed}-ts{args.train_seed}-{str(s.base).replace('/', '_')}"
    )
    world = world_of(s.world, s.work / "world", args)
    old_ids, new_ids = world.ids[: -args.new], world.ids[-args.new :]
    config = train_config(s, args.epochs, args.train_seed)
    todo = {"all": ARMS, "chain": ("old", "extended")}.get(args.arm, (args.arm,))
    cost = {arm: train_arm(arm, s, world, config, old_ids, new_ids) for arm in todo}
    quality = {arm: evaluate_arm(arm, s, world, old_ids, new_ids) for arm in todo}
    if args.arm != "all":
        return None

    banks = {arm: ConceptBank.load(s.work / arm) for arm in ARMS}
    n_old = len(old_ids)
    identical = torch.equal(banks["extended"].input_rows[:n_old], banks["old"].input_rows) and (
        banks["old"].head_rows is None or torch.equal(banks["extended"].head_rows[:n_old], banks["old"].head_rows)
    )
    results = {
        **header("extend", s, args, world),
        "old_concepts": old_ids,
        "new_concepts": new_ids,
        "old_rows_bit_identical": identical,
        "test_questions": len(test_records(world)),
    }
    for arm in ARMS:
        results[arm] = {**quality[arm], **cost[arm]}
        r = results[arm]
        print(
            f"{arm}: old {r['old']['weighted_accuracy']:.3f}, new {(r['new'] or {}).get('weighted_accuracy')}, "
            f"confusion old/new {r['confusion_old_new']['rate']}, train {r['train_s']:.0f}s, {r['steps_per_epoch']} steps/epoch"
        )

    metrics = {
        "old concepts' recognition": lambda r: r["old"]["weighted_accuracy"],
        "new concepts' recognition": lambda r: (r["new"] or {}).get("weighted_accuracy"),
        "confusion old/new": lambda r: r["confusion_old_new"]["rate"],
    }
    bars = {label: {arm: get(results[arm]) for arm in ARMS} for label, get in metrics.items()}
    steps = {"steps per epoch": {arm: results[arm]["steps_per_epoch"] for arm in ARMS}}
    write_results(
        args.out,
        "extend",
        results,
        [
            {"title": f"extend ({n_old} + {len(new_ids)}) vs joint ({len(world.ids)})", "bars": bars, "ymax": 1.0},
            {"title": "training cost", "bars": steps},
        ],
    )
    return results


if __name__ == "__main__":
    main()
