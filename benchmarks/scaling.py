"""Joint training with 2 to 50 concepts: recognition, training time, prompt length, peak memory, answer latency.

Not a test: a measurement. For each concept count a fresh world with that many concepts is personalised jointly
(the fast recipe, the same epochs for every count) and evaluated on held-out recognition questions
(`--test-per-concept` scenes per concept). Prompt length is the token count of a recognition question with the
system text that introduces every concept (image tokens included), and of that system text alone. Peak memory is
the process's peak resident set during the count's training and evaluation (on Linux the peak mark is reset
before each count; elsewhere it is the process-wide maxrss). In the tiny base's shapes world looks repeat beyond
18 concepts: questions about a concept whose look is shown under another name are left out, and `distinct_looks`
says how many looks there were.

The remedy for a system text that grows with every concept is measured beside the plain method:
`introduce="relevant"` introduces only the concepts the question names or the photo shows (the locator's finding
at inference, the photo's labels in training). Three arms per count: the plain bank answering with every concept
introduced; the same bank answering with only the relevant ones (never trained that way); and a bank trained and
answering that way (`mcllava personalize --introduce relevant`). Each reports recognition, mean system-text length
and answer latency. The plain bank is also measured answering with the prompt cache (`Backbone.prompt_cache`: the
key-value cache of the system text, computed once and reused by every question; the other arms answer without it).
Training always runs a batch's shared prefix once (`Backbone.hidden_states`). Writes benchmarks/out/scaling.json
and scaling.png.

    python benchmarks/scaling.py                                 # 2,4,8,16,32,50 concepts, make demo's tiny base
    python benchmarks/scaling.py --concepts 2,4,8 --epochs 20    # a quick run
    python benchmarks/scaling.py --base proving-ground --epochs 3 --train-images 4 --test-per-concept 1 --min-test-scenes 12

An interrupted sweep resumes: counts already finished with the same settings are read back from the scratch
folder (`--fresh` redoes them).
"""

from __future__ import annotations

import json
import statistics

from _common import (
    BankEvaluator,
    build_world,
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

from mcllava.bank import ConceptBank
from mcllava.training_data import PROBE_QUESTION


def plot_panels(rows: list[dict]) -> list[dict]:
    """The plot: each measure against the concept count, for the plain method and the remedy."""

    def both(get_all, get_relevant) -> dict:
        return {
            "all concepts": [(r["concepts"], get_all(r)) for r in rows],
            "relevant, inference only": [(r["concepts"], get_relevant(r["relevant"])) for r in rows],
            "relevant, trained so (remedy)": [(r["concepts"], get_relevant(r["remedy"])) for r in rows],
        }

    return [
        {
            "title": "recognition weighted accuracy",
            "x": "concepts",
            "ymax": 1.0,
            "series": both(
                lambda r: r["recognition"]["weighted_accuracy"], lambda r: r["recognition"]["weighted_accuracy"]
            ),
        },
        {
            "title": "training time (s)",
            "x": "concepts",
            "series": {
                "all concepts": [(r["concepts"], r["train_s"]) for r in rows],
                "remedy": [(r["concepts"], r["remedy"]["train_s"]) for r in rows],
            },
        },
        {
            "title": "system text (tokens)",
            "x": "concepts",
            "series": both(lambda r: r["system_tokens"], lambda r: r["system_tokens_mean"]),
        },
        {
            "title": "peak RSS (MB)",
            "x": "concepts",
            "series": {"peak RSS": [(r["concepts"], r["peak_rss_mb"]) for r in rows]},
        },
        {
            "title": "answer latency (s)",
            "x": "concepts",
            "series": {
                **both(lambda r: r["answer_latency_s"], lambda r: r["answer_latency_s"]),
                "all concepts, prompt cache": [(r["concepts"], r["prompt_cache"]["answer_latency_s"]) for r in rows],
            },
        },
    ]


def with_prompt_cache(evaluator: BankEvaluator, bank) -> dict:
    """The plain bank (every concept introduced) answering with `Backbone.prompt_cache`: the key-value cache of the
    chat template's start and the system text, computed once and reused by every question."""
    report = evaluator(bank, introduce="all", prompt_cache=True)
    return {"recognition": report["recognition"], "answer_latency_s": report["latency_s"]["recognition"]}


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, epochs=20, test_images=None)
    ap.add_argument("--concepts", default="2,4,8,16,32,50", help="comma-separated concept counts")
    ap.add_argument("--test-per-concept", type=int, default=3, help="test scenes per concept")
    ap.add_argument("--min-test-scenes", type=int, default=0, help="at least this many test scenes at every count")
    ap.add_argument("--train-seed", type=int, default=0)
    ap.add_argument(
        "--fresh", action="store_true", help="redo every count (default: reuse counts finished with these settings)"
    )
    args = ap.parse_args(argv)
    counts = [int(n) for n in args.concepts.split(",")]
    s = setup(args, "scaling")
    # Each finished count is kept in the scratch folder with the settings it ran with, so that an interrupted
    # sweep (an hour and more on a CPU with the proving ground) resumes at the first count it had not finished.
    settings = {
        k: v for k, v in header("scaling", s, args)["settings"].items() if k not in ("concepts", "fresh", "out", "work")
    }
    rows = []
    for n in counts:
        done = s.work / f"row-{n}.json"
        scenes = max(args.test_per_concept * n, args.min_test_scenes)
        saved = json.loads(done.read_text()) if not args.fresh and done.exists() else None
        if saved is not None and saved["settings"] == settings:
            rows.append(saved["row"])
            print(f"{n} concepts: reused from {done}")
            if "prompt_cache" not in rows[-1]:  # finished before the prompt cache was measured: add it
                world = build_world(s.world, s.work / f"world-{n}", n, args.seed, args.train_images, scenes, args.multi)
                rows[-1]["prompt_cache"] = with_prompt_cache(
                    BankEvaluator(s.base, test_records(world)), ConceptBank.load(s.work / f"bank-{n}")
                )
                done.write_text(json.dumps({"settings": settings, "row": rows[-1]}, default=str))
            continue
        reset_peak_rss()
        rss_before = rss_mb()
        world = build_world(s.world, s.work / f"world-{n}", n, args.seed, args.train_images, scenes, args.multi)
        result, train_s = train(world, s.base, s.work / f"bank-{n}", train_config(s, args.epochs, args.train_seed))
        remedy, remedy_s = train(
            world,
            s.base,
            s.work / f"bank-{n}-relevant",
            train_config(s, args.epochs, args.train_seed, introduce="relevant"),
        )
        evaluator = BankEvaluator(s.base, test_records(world))
        # the plain method and the two remedies answer without the prompt cache; the cache is measured on its own
        modes = {mode: evaluator(result.bank, introduce=mode, prompt_cache=False) for mode in ("all", "relevant")}
        modes["remedy"] = evaluator(remedy.bank, prompt_cache=False)  # trained and answering with introduce="relevant"
        cached = with_prompt_cache(evaluator, result.bank)
        tokens, backbone = evaluator.assistant.tokens, evaluator.assistant.backbone
        system = tokens.system_text()
        question = backbone.format_prompt(PROBE_QUESTION.format(c=tokens.token(world.ids[0])), system=system)
        rows.append(
            {
                "concepts": n,
                "distinct_looks": world.distinct_looks,
                "recognition": modes["all"]["recognition"],
                "train_s": train_s,
                "epoch_s": statistics.mean(h["seconds"] for h in result.history),
                "steps_per_epoch": result.history[0]["steps"],
                "prompt_tokens": len(backbone.encode(question).input_ids),
                "system_tokens": len(backbone.tokenizer(system, add_special_tokens=False)["input_ids"]),
                "peak_rss_mb": peak_rss_mb(),
                "rss_before_mb": rss_before,
                "answer_latency_s": modes["all"]["latency_s"]["recognition"],
                "relevant": {  # the plain bank, answering with introduce="relevant" (never trained that way)
                    "recognition": modes["relevant"]["recognition"],
                    "system_tokens_mean": modes["relevant"]["system_tokens_mean"],
                    "answer_latency_s": modes["relevant"]["latency_s"]["recognition"],
                },
                "prompt_cache": cached,
                "remedy": {  # trained and answering with introduce="relevant"
                    "recognition": modes["remedy"]["recognition"],
                    "train_s": remedy_s,
                    "system_tokens_mean": modes["remedy"]["system_tokens_mean"],
                    "answer_latency_s": modes["remedy"]["latency_s"]["recognition"],
                },
            }
        )
        r = rows[-1]
        done.write_text(json.dumps({"settings": settings, "row": r}, default=str))
        print(
            f"{n} concepts: recognition {r['recognition']['weighted_accuracy']:.3f} (relevant at inference only: "
            f"{r['relevant']['recognition']['weighted_accuracy']:.3f}, remedy: {r['remedy']['recognition']['weighted_accuracy']:.3f}), "
            f"train {train_s:.1f}s, prompt {r['prompt_tokens']} tokens, peak {r['peak_rss_mb']:.0f} MB, "
            f"{r['answer_latency_s'] * 1000:.1f} ms/answer ({r['remedy']['answer_latency_s'] * 1000:.1f} remedy)"
        )

    results = {**header("scaling", s, args), "concept_counts": counts, "rows": rows}
    write_results(args.out, "scaling", results, plot_panels(rows))
    return results


if __name__ == "__main__":
    main()
