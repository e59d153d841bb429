"""k-means against random initialisation of the concept tokens: held-out recognition against training step.

Not a test: a measurement. For each init and each of `--seeds` training seeds, personalises the base on the same
world (all concepts jointly, the fast recipe of `make demo`) and, every `--eval-every` epochs, answers the world's
held-out recognition questions with the bank trained so far. Reports every run's curve (weighted accuracy against
optimizer step), the seed-mean curve, and the steps each run and the mean curve need to reach `--target` (null if
never; for the mean curve also 0.6, 0.7 and 0.8). Writes benchmarks/out/init_compare.json and init_compare.png.

    python benchmarks/init_compare.py                          # make demo's tiny shapes base, 4 concepts, 3 seeds
    python benchmarks/init_compare.py --epochs 40 --eval-every 2 --seeds 3
    python benchmarks/init_compare.py --base proving-ground    # the proving ground's character world
"""

from __future__ import annotations

import statistics
import time

from _common import (
    BankEvaluator,
    build_world,
    first_reaching,
    header,
    parser,
    setup,
    test_records,
    train,
    train_config,
    write_results,
)


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, epochs=40)
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per init")
    ap.add_argument("--eval-every", type=int, default=2, help="epochs between evaluations")
    ap.add_argument("--target", type=float, default=0.9)
    ap.set_defaults(multi=0.0)  # one concept per test scene, as in make demo's test set
    args = ap.parse_args(argv)
    s = setup(args, "init_compare")
    world = build_world(
        s.world, s.work / "world", args.concepts, args.seed, args.train_images, args.test_images, args.multi
    )
    records = test_records(world)
    evaluator = BankEvaluator(s.base, records)
    results = {**header("init_compare", s, args, world), "target": args.target, "test_questions": len(records)}

    for init in ("kmeans", "random"):
        runs = []
        for seed in range(args.seeds):
            curve, steps, eval_s = [], [0], [0.0]

            def on_epoch(entry: dict, bank) -> None:
                steps[0] += entry["steps"]
                if entry["epoch"] % args.eval_every == 0 or entry["epoch"] == args.epochs:
                    t0 = time.perf_counter()
                    curve.append((steps[0], evaluator(bank)["recognition"]["weighted_accuracy"]))
                    eval_s[0] += time.perf_counter() - t0

            config = train_config(s, args.epochs, seed, init=init)
            _, seconds = train(world, s.base, s.work / f"bank-{init}-{seed}", config, on_epoch=on_epoch)
            runs.append(
                {
                    "seed": seed,
                    "curve": curve,
                    "steps_to_target": first_reaching(curve, args.target),
                    "train_s": seconds - eval_s[0],
                }
            )
            print(
                f"{init} seed {seed}: final {curve[-1][1]:.3f}, steps to {args.target}: {runs[-1]['steps_to_target']}"
            )
        mean_curve = [(pts[0][0], statistics.mean(y for _, y in pts)) for pts in zip(*(r["curve"] for r in runs))]
        results[init] = {
            "steps_to_target": [r["steps_to_target"] for r in runs],
            "mean_curve": mean_curve,
            "mean_curve_steps_to_target": first_reaching(mean_curve, args.target),
            "mean_curve_steps_to": {t: first_reaching(mean_curve, t) for t in (0.6, 0.7, 0.8)},
            "final_accuracy_mean": mean_curve[-1][1],
            "runs": runs,
        }

    series = {f"{init} seed {r['seed']}": r["curve"] for init in ("kmeans", "random") for r in results[init]["runs"]}
    panels = [
        {
            "title": f"recognition, every run (target {args.target})",
            "x": "step",
            "series": series,
            "ymax": 1.0,
            "target": args.target,
        },
        {
            "title": "recognition, mean over seeds",
            "x": "step",
            "ymax": 1.0,
            "target": args.target,
            "series": {init: results[init]["mean_curve"] for init in ("kmeans", "random")},
        },
    ]
    write_results(args.out, "init_compare", results, panels)
    return results


if __name__ == "__main__":
    main()
