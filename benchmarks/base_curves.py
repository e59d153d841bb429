"""Training curves of a proving-ground build, from its work folder's logs (JSON + a PNG plot).

    python benchmarks/base_curves.py [WORK] [--out benchmarks/out/base_curves]

Reads WORK/{vision,align,lm}/log.jsonl (written by `mcllava base build`) and writes `<out>.json` (the curves)
and `<out>.png` (LM loss, the held-out Yes/No weighted accuracy per kind of question, the vision tower's accuracy).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import write_results


def read(work: Path, stage: str) -> list[dict]:
    p = work / stage / "log.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", nargs="?", default=str(Path("~/.cache/mcllava/proving-base-build").expanduser()))
    ap.add_argument("--out", default="benchmarks/out/base_curves")
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    curves = {s: read(work, s) for s in ("vision", "align", "lm")}
    acc: dict[str, list] = {}
    for r in curves["lm"]:
        for kind, v in r.get("val", {}).items():
            acc.setdefault(kind, []).append((r["step"], v["weighted_accuracy"]))
    panels = [
        {
            "title": "projector + LoRA: training loss",
            "x": "step",
            "series": {"LM loss": [(r["step"], r["loss"]) for r in curves["lm"]]},
        },
        {"title": "held-out Yes/No weighted accuracy", "x": "step", "series": acc, "ymax": 1.0},
        {
            "title": "vision tower: held-out trait accuracy",
            "x": "step",
            "ymax": 1.0,
            "series": {"vision val mean": [(r["step"], r["val_mean"]) for r in curves["vision"]]},
        },
    ]
    write_results(out.parent, out.name, curves, panels)


if __name__ == "__main__":
    main()
