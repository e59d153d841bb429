"""`--recipe fast` against `--recipe paper` on the same concepts: time, accuracy, memory, state size, latency.

Not a test: a measurement. Both recipes personalise the same world (all concepts jointly, the same data options)
for `--epochs` epochs; after every epoch the bank so far answers the world's held-out recognition questions.
Reports per recipe: wall time per epoch (training only), the curve of accuracy against cumulative training time,
the time each needs to reach the accuracy both reach (the lower of their best), the process's peak resident memory
during training above what it held before, trainable parameters and their AdamW state, and the bank's size on disk.
Inference, on the fast recipe's bank: latency of a plain answer of the base model, a personalised answer, and a
personalised answer with the visual prompt, each with exactly `--new-tokens` new tokens (`gpu_llava15.answer_latency`).
Writes benchmarks/out/recipe_speed.json and .png.

    python benchmarks/recipe_speed.py                           # make demo's tiny shapes base, 4 concepts
    python benchmarks/recipe_speed.py --epochs 15 --concepts 4
    python benchmarks/recipe_speed.py --base proving-ground
"""

from __future__ import annotations

import dataclasses
import statistics

import torch
from _common import (
    BankEvaluator,
    build_world,
    first_reaching,
    header,
    parser,
    peak_rss_mb,
    reset_peak_rss,
    rss_mb,
    setup,
    test_records,
    train,
    train_config,
    write_results,
)
from gpu_llava15 import answer_latency


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, epochs=15)
    ap.add_argument("--train-seed", type=int, default=0)
    ap.add_argument("--new-tokens", type=int, default=8, help="new tokens per timed answer")
    ap.add_argument("--repeats", type=int, default=10, help="timed answers per inference mode (median)")
    ap.set_defaults(multi=0.0)
    args = ap.parse_args(argv)
    s = setup(args, "recipe_speed")
    world = build_world(
        s.world, s.work / "world", args.concepts, args.seed, args.train_images, args.test_images, args.multi
    )
    evaluator = BankEvaluator(s.base, test_records(world))
    results = {**header("recipe_speed", s, args, world)}

    banks = {}
    for recipe in ("fast", "paper"):
        fast = train_config(s, args.epochs, args.train_seed)
        config = fast if recipe == "fast" else dataclasses.replace(fast, recipe="paper", batch_size=1, lr=1e-3)
        snapshots, clock = [], [0.0]

        def on_epoch(entry: dict, bank) -> None:  # evaluated after training, so that its memory and time stay out
            clock[0] += entry["seconds"]
            snapshots.append((clock[0], bank))

        reset_peak_rss()
        before = rss_mb()
        result, _ = train(world, s.base, s.work / f"bank-{recipe}", config, on_epoch=on_epoch)
        peak = peak_rss_mb()
        banks[recipe] = result.bank
        curve = [(t, evaluator(bank)["recognition"]["weighted_accuracy"]) for t, bank in snapshots]
        model = evaluator.assistant.backbone.model
        matrices = {
            id(p): p for p in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)
        }.values()
        trainable = (
            sum(t.numel() for t in (result.bank.input_rows, result.bank.head_rows) if t is not None)
            if recipe == "fast"
            else sum(p.numel() for p in matrices)
        )
        results[recipe] = {
            "config": {k: v for k, v in config.to_dict().items() if k in ("recipe", "batch_size", "lr", "epochs", "k")},
            "epoch_s": [h["seconds"] for h in result.history],
            "median_epoch_s": statistics.median(h["seconds"] for h in result.history),
            "steps_per_epoch": result.history[0]["steps"],
            "curve": curve,  # (cumulative training seconds, held-out recognition weighted accuracy)
            "best_accuracy": max(a for _, a in curve),
            "peak_rss_mb": peak,
            "training_rss_increase_mb": peak - before if before is not None else None,
            "trainable_parameters": trainable,
            "adamw_state_bytes": 2 * 4 * trainable,  # two fp32 moments per trainable parameter
            "bank_bytes": sum(p.stat().st_size for p in (s.work / f"bank-{recipe}").iterdir() if p.is_file()),
        }
        print(
            f"{recipe}: {results[recipe]['median_epoch_s']:.2f} s/epoch, best recognition {results[recipe]['best_accuracy']:.3f}, "
            f"{trainable} trainable parameters, peak RSS {peak:.0f} MB"
        )

    same = min(results[r]["best_accuracy"] for r in ("fast", "paper"))
    for recipe in ("fast", "paper"):
        results[recipe]["seconds_to_common_accuracy"] = first_reaching(results[recipe]["curve"], same)
    fast, paper = results["fast"], results["paper"]
    results["common_accuracy"] = same
    results["ratios_paper_over_fast"] = {
        "epoch_time": paper["median_epoch_s"] / fast["median_epoch_s"],
        "time_to_common_accuracy": paper["seconds_to_common_accuracy"] / fast["seconds_to_common_accuracy"],
        "training_rss_increase": (
            paper["training_rss_increase_mb"] / fast["training_rss_increase_mb"]
            if fast["training_rss_increase_mb"]
            else None
        ),
        "trainable_parameters": paper["trainable_parameters"] / fast["trainable_parameters"],
    }

    # inference on the fast bank: plain base answer, personalised, personalised + visual prompt
    evaluator(banks["fast"])
    torch.manual_seed(0)
    results["answer_latency"] = answer_latency(
        evaluator.assistant.backbone, evaluator.assistant.tokens, args.new_tokens, args.repeats, warmup=2
    )
    lat = results["answer_latency"]
    results["visual_prompt_overhead_s"] = lat["visual_prompt"]["answer_s"] - lat["personalised"]["answer_s"]
    for kind, r in lat.items():
        print(f"{kind:13s}: {r['answer_s'] * 1000:.1f} ms ({r['prompt_tokens']} prompt + {r['new_tokens']} new tokens)")

    write_results(args.out, "recipe_speed", results, panels(results))
    return results


def panels(results: dict) -> list[dict]:
    """The plot of a result (also to redraw a saved one: `write_results(out, name, r, panels(r))`)."""
    lat = results["answer_latency"]
    new_tokens = next(iter(lat.values()))["new_tokens"]
    return [
        {
            "title": "held-out recognition vs training time",
            "x": "seconds",
            "ymax": 1.0,
            "series": {r: results[r]["curve"] for r in ("fast", "paper")},
        },
        {
            "title": "paper / fast (log scale)",
            "log": True,
            "bars": {
                k.replace("_", " "): {"ratio": v} for k, v in results["ratios_paper_over_fast"].items() if v is not None
            },
        },
        {
            "title": f"answer latency (ms, {new_tokens} new tokens)",
            "bars": {k: {"ms": v["answer_s"] * 1000} for k, v in lat.items()},
        },
    ]


if __name__ == "__main__":
    main()
