"""The personalised bank against the training-free retrieval arm, on the same recognition questions.

Not a test: a measurement, through the command line a user runs. For each world seed: `mcllava world make`,
`mcllava personalize W/concepts --base proving-ground --negatives W/negatives` (the default recipe), then
`mcllava eval` of the bank and `mcllava eval --method retrieval` of the arm on the same tests.jsonl, each with
both prompt wordings; recognition is compared official and lenient, with the cost of each (training time, seconds
per photo). Worlds and banks are kept under --work and reused. Writes benchmarks/out/retrieval_arm.json and .png.

    python benchmarks/retrieval_arm.py                       # seeds 0 5 1, 4 concepts, 10 photos, 30 scenes
    python benchmarks/retrieval_arm.py --seeds 0 --prompts ours
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import OUT, ROOT, write_results

WORLD = ["--concepts", "4", "--train-images", "10", "--distractors", "2", "--test-scenes", "30"]


def cli(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-m", "mcllava.cli", *args], check=True, env=env)


def recognition(path: Path) -> dict:
    report = json.loads(path.read_text())
    rec = report["recognition"]
    keep = ("weighted_accuracy", "positive_recall", "negative_recall", "n")
    out = {col: {k: rec[col][k] for k in keep} for col in ("official", "lenient")}
    out["splits"] = {
        s: {col: v[col]["weighted_accuracy"] for col in ("official", "lenient")} for s, v in rec["splits"].items()
    }
    out["seconds_per_question"] = report["timing"]["mean_answer_s"]
    if "retrieval" in report:
        out["seconds_per_photo"] = report["retrieval"]["seconds_per_photo"]
        out["fit_seconds"] = report["retrieval"]["fit_seconds"]
    return out


def run_seed(seed: int, work: Path, prompts: list[str]) -> dict:
    world, bank = work / f"world{seed}", work / f"bank{seed}"
    if not (world / "world.json").exists():
        cli("world", "make", str(world), "--seed", str(seed), *WORLD)
    train_s = None
    if not (bank / "manifest.json").exists():
        t0 = time.perf_counter()
        cli(
            "personalize",
            str(world / "concepts"),
            "--base",
            "proving-ground",
            "--negatives",
            str(world / "negatives"),
            "--out",
            str(bank),
            "--quiet",
        )
        train_s = time.perf_counter() - t0
    out: dict = {"seed": seed, "train_s": train_s}
    for p in prompts:
        bank_json, arm_json = work / f"bank{seed}-{p}.json", work / f"arm{seed}-{p}.json"
        cli("eval", str(bank), str(world / "tests.jsonl"), "--prompts", p, "--out", str(bank_json), "--quiet")
        cli(
            "eval",
            str(world / "concepts"),
            str(world / "tests.jsonl"),
            "--method",
            "retrieval",
            "--base",
            "proving-ground",
            "--negatives",
            str(world / "negatives"),
            "--prompts",
            p,
            "--out",
            str(arm_json),
            "--quiet",
        )
        out[p] = {"bank": recognition(bank_json), "arm": recognition(arm_json)}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 5, 1])
    ap.add_argument("--prompts", nargs="+", choices=("ours", "official"), default=["ours", "official"])
    ap.add_argument("--work", type=Path, default=OUT / "cache" / "retrieval_arm")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    results = {"benchmark": "retrieval_arm", "world": WORLD, "seeds": {}}
    for seed in args.seeds:
        results["seeds"][str(seed)] = r = run_seed(seed, args.work, args.prompts)
        for p in args.prompts:
            b, a = r[p]["bank"], r[p]["arm"]
            print(
                f"seed {seed}, prompts {p}: recognition official bank {b['official']['weighted_accuracy']:.3f} "
                f"arm {a['official']['weighted_accuracy']:.3f}; lenient bank {b['lenient']['weighted_accuracy']:.3f} "
                f"arm {a['lenient']['weighted_accuracy']:.3f}; arm {a['seconds_per_photo']:.3f} s/photo"
            )
    panels = [
        {
            "title": f"recognition weighted accuracy ({col}, prompts {p})",
            "ymax": 1.0,
            "bars": {
                f"seed {s}": {
                    "bank": r[p]["bank"][col]["weighted_accuracy"],
                    "retrieval arm": r[p]["arm"][col]["weighted_accuracy"],
                }
                for s, r in results["seeds"].items()
            },
        }
        for p in args.prompts
        for col in ("official", "lenient")
    ]
    write_results(args.out, "retrieval_arm", results, panels)
    return results


if __name__ == "__main__":
    main()
