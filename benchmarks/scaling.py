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

An interrupted sweep resumes: counts and arms already finished with the same settings are read back from the
scratch folder, and a bank interrupted mid-training continues from its last epoch checkpoint (`--fresh` redoes
them). `--arms remedy` (or `plain`) runs one arm; a later run with both adds the other to the same rows. Training
seconds are the sum of the bank's epochs, so a resumed bank reports what an uninterrupted one would.

    python benchmarks/scaling.py --base proving-ground --epochs 10 --train-images 10 --concepts 4,50 --arms remedy
"""

from __future__ import annotations

import json
import shutil
import statistics

from _common import (
    BankEvaluator,
    Setup,
    build_world,
    header,
    parser,
    peak_rss_mb,
    reset_peak_rss,
    setup,
    test_records,
    train,
    train_config,
    write_results,
)

from mcllava.training_data import PROBE_QUESTION


def plot_panels(rows: list[dict]) -> list[dict]:
    """The plot: each measure against the concept count, for the plain method and the remedy (the arms that ran)."""

    def points(get, arm: str | None) -> list[tuple[int, float]]:
        return [(r["concepts"], get(r[arm] if arm else r)) for r in rows if (arm or "recognition") in r]

    def both(get_all, get_relevant) -> dict:
        return {
            "all concepts": points(get_all, None),
            "relevant, inference only": points(get_relevant, "relevant"),
            "relevant, trained so (remedy)": points(get_relevant, "remedy"),
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
                "all concepts": points(lambda r: r["train_s"], None),
                "remedy": points(lambda r: r["train_s"], "remedy"),
            },
        },
        {
            "title": "system text (tokens)",
            "x": "concepts",
            "series": {
                "all concepts": [(r["concepts"], r["system_tokens"]) for r in rows],
                "relevant, inference only": points(lambda r: r["system_tokens_mean"], "relevant"),
                "relevant, trained so (remedy)": points(lambda r: r["system_tokens_mean"], "remedy"),
            },
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
                "all concepts, prompt cache": points(lambda r: r["answer_latency_s"], "prompt_cache"),
            },
        },
    ]


def with_prompt_cache(evaluator: BankEvaluator, bank) -> dict:
    """The plain bank (every concept introduced) answering with `Backbone.prompt_cache`: the key-value cache of the
    chat template's start and the system text, computed once and reused by every question."""
    report = evaluator(bank, introduce="all", prompt_cache=True)
    return {"recognition": report["recognition"], "answer_latency_s": report["latency_s"]["recognition"]}


def training(result, seconds: float) -> dict:
    """What a row says of one bank's training: seconds (every epoch's, also across an interrupted run) and steps."""
    return {
        "train_s": sum(h["seconds"] for h in result.history) or seconds,
        "epoch_s": statistics.mean(h["seconds"] for h in result.history),
        "steps_per_epoch": result.history[0]["steps"],
    }


def plain_arm(world, s: Setup, args, evaluator: BankEvaluator, resume: bool) -> dict:
    """Every concept introduced in every prompt: trained so, answering so, with only the relevant ones, and with the
    prompt cache."""
    result, seconds = train(
        world, s.base, s.work / f"bank-{len(world.ids)}", train_config(s, args.epochs, args.train_seed), resume=resume
    )
    # the plain method and the two remedies answer without the prompt cache; the cache is measured on its own
    modes = {mode: evaluator(result.bank, introduce=mode, prompt_cache=False) for mode in ("all", "relevant")}
    return {
        "recognition": modes["all"]["recognition"],
        **training(result, seconds),
        "answer_latency_s": modes["all"]["latency_s"]["recognition"],
        "relevant": {  # the plain bank, answering with introduce="relevant" (never trained that way)
            "recognition": modes["relevant"]["recognition"],
            "system_tokens_mean": modes["relevant"]["system_tokens_mean"],
            "answer_latency_s": modes["relevant"]["latency_s"]["recognition"],
        },
        "prompt_cache": with_prompt_cache(evaluator, result.bank),
    }


def remedy_arm(world, s: Setup, args, evaluator: BankEvaluator, resume: bool) -> dict:
    """A bank trained and answering with only the relevant concepts introduced (`--introduce relevant`)."""
    config = train_config(s, args.epochs, args.train_seed, introduce="relevant")
    result, seconds = train(world, s.base, s.work / f"bank-{len(world.ids)}-relevant", config, resume=resume)
    report = evaluator(result.bank, prompt_cache=False)  # answers as it was trained: introduce="relevant"
    return {
        "recognition": report["recognition"],
        **training(result, seconds),
        "system_tokens_mean": report["system_tokens_mean"],
        "answer_latency_s": report["latency_s"]["recognition"],
    }


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, epochs=20, test_images=None)
    ap.add_argument("--concepts", default="2,4,8,16,32,50", help="comma-separated concept counts")
    ap.add_argument("--test-per-concept", type=int, default=3, help="test scenes per concept")
    ap.add_argument("--min-test-scenes", type=int, default=0, help="at least this many test scenes at every count")
    ap.add_argument("--train-seed", type=int, default=0)
    ap.add_argument(
        "--arms",
        default="plain,remedy",
        help="plain: every concept introduced (also answering with only the relevant ones, and with the prompt "
        "cache); remedy: trained and answering with only the relevant ones. A later run adds a missing arm.",
    )
    ap.add_argument(
        "--fresh", action="store_true", help="redo every count (default: reuse counts finished with these settings)"
    )
    args = ap.parse_args(argv)
    counts = [int(n) for n in args.concepts.split(",")]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or set(arms) - {"plain", "remedy"}:
        ap.error(f"--arms takes plain and/or remedy, not {args.arms!r}")
    s = setup(args, "scaling")
    # Each count is kept in the scratch folder with the settings it runs with, its row filled arm by arm, so that an
    # interrupted sweep (hours on a CPU with the proving ground) resumes: finished arms are read back, an unfinished
    # training continues from its last epoch checkpoint, on the same world.
    excluded = ("concepts", "arms", "fresh", "out", "work")
    settings = {k: v for k, v in header("scaling", s, args)["settings"].items() if k not in excluded}
    rows = []
    for n in counts:
        done = s.work / f"row-{n}.json"
        scenes = max(args.test_per_concept * n, args.min_test_scenes)
        saved = json.loads(done.read_text()) if done.exists() else None
        resume = not args.fresh and saved is not None and saved["settings"] == settings
        row = saved["row"] if resume else {}
        missing = [a for a in arms if (a == "plain" and "recognition" not in row) or (a == "remedy" and a not in row)]
        if not missing:
            rows.append(row)
            print(f"{n} concepts: reused from {done}")
            continue
        if not resume:  # another run's banks and checkpoints must not be continued
            for bank in (s.work / f"bank-{n}", s.work / f"bank-{n}-relevant"):
                shutil.rmtree(bank, ignore_errors=True)
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps({"settings": settings, "row": {}}))
        world = build_world(
            s.world, s.work / f"world-{n}", n, args.seed, args.train_images, scenes, args.multi, reuse=resume
        )
        evaluator = BankEvaluator(s.base, test_records(world))
        for arm in missing:
            reset_peak_rss()
            measured = (plain_arm if arm == "plain" else remedy_arm)(world, s, args, evaluator, resume)
            peak = max(peak_rss_mb(), row.get("peak_rss_mb", 0))
            row = {**row, **measured} if arm == "plain" else {**row, "remedy": measured}
            row.update(concepts=n, distinct_looks=world.distinct_looks, peak_rss_mb=peak)
            done.write_text(json.dumps({"settings": settings, "row": row}, default=str))
        tokens, backbone = evaluator.assistant.tokens, evaluator.assistant.backbone
        system = tokens.system_text()
        question = backbone.format_prompt(PROBE_QUESTION.format(c=tokens.token(world.ids[0])), system=system)
        row["prompt_tokens"] = len(backbone.encode(question).input_ids)  # every concept introduced, image included
        row["system_tokens"] = len(backbone.tokenizer(system, add_special_tokens=False)["input_ids"])
        done.write_text(json.dumps({"settings": settings, "row": row}, default=str))
        rows.append(json.loads(json.dumps(row, default=str)))
        print(f"{n} concepts: " + summary(row))

    results = {**header("scaling", s, args), "concept_counts": counts, "rows": rows}
    write_results(args.out, "scaling", results, plot_panels(rows))
    return results


def summary(r: dict) -> str:
    """One line of a count's figures, for the arms that ran."""
    parts = []
    if "recognition" in r:
        parts.append(
            f"recognition {r['recognition']['weighted_accuracy']:.3f} (relevant at inference only: "
            f"{r['relevant']['recognition']['weighted_accuracy']:.3f}), train {r['train_s']:.1f}s, "
            f"{r['answer_latency_s'] * 1000:.1f} ms/answer ({r['prompt_cache']['answer_latency_s'] * 1000:.1f} cached)"
        )
    if "remedy" in r:
        m = r["remedy"]
        parts.append(
            f"remedy {m['recognition']['weighted_accuracy']:.3f}, train {m['train_s']:.1f}s, "
            f"{m['answer_latency_s'] * 1000:.1f} ms/answer"
        )
    return "; ".join(parts) + f"; prompt {r['prompt_tokens']} tokens, peak {r['peak_rss_mb']:.0f} MB"


if __name__ == "__main__":
    main()
