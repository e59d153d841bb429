"""Per-epoch time and trainable state of `--recipe fast` against `--recipe paper` on the same tiny data.

Not a test: a measurement. Writes benchmarks/out/recipe_speed.json (median of several runs per recipe).

    python benchmarks/recipe_speed.py [--runs 3] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mcllava.backbone import Backbone
from mcllava.concepts import ConceptSet
from mcllava.tiny import make_shape_concepts, make_tiny_base
from mcllava.train import TrainConfig, personalize

OUT = Path(__file__).parent / "out"
SHAPES = {"bo": ("red", "circle"), "ana": ("blue", "square"), "kiki": ("yellow", "triangle")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=OUT / "cache")
    ap.add_argument("--base", type=Path, default=None, help="an existing tiny base folder (default: build one)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    base = args.base or make_tiny_base(args.cache / "tiny-base", tokenizer_cache=args.cache / "tokenizer")
    concepts_dir, _ = make_shape_concepts(args.cache / "shapes", SHAPES, n_train=6, n_test=2, seed=1)
    results = {}
    for recipe in ("fast", "paper"):
        epoch_times, totals = [], []
        for run in range(args.runs):
            bb = Backbone.load(base)
            cs = ConceptSet.load(concepts_dir, tokenizer=bb.tokenizer)
            common = {"k": 4, "epochs": args.epochs, "seed": run, "holdout": 0}
            cfg = TrainConfig(**common, batch_size=8) if recipe == "fast" else TrainConfig.paper(**common)
            t0 = time.perf_counter()
            res = personalize(cs, bb, args.cache / f"bank-{recipe}-{run}", cfg, progress=False, log=lambda *_: None)
            totals.append(time.perf_counter() - t0)
            epoch_times += [h["seconds"] for h in res.history]
        n_trainable = (
            sum(t.numel() for t in (res.bank.input_rows, res.bank.head_rows) if t is not None)
            if recipe == "fast"
            else sum(p.numel() for p in {id(p): p for p in (bb.model.get_input_embeddings().weight, bb.model.get_output_embeddings().weight)}.values())
        )
        results[recipe] = {
            "median_epoch_s": statistics.median(epoch_times),
            "epoch_s": epoch_times,
            "median_run_s": statistics.median(totals),
            "trainable_parameters": n_trainable,
            "steps_per_epoch": res.history[0]["steps"],
            "batch_size": cfg.batch_size,
        }
    results["paper_over_fast_epoch_time"] = results["paper"]["median_epoch_s"] / results["fast"]["median_epoch_s"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "recipe_speed.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
