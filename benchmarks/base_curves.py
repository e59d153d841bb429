"""Training curves of a proving-ground build, from its work folder's logs (JSON + an SVG plot, no matplotlib).

    python benchmarks/base_curves.py [WORK] [--out benchmarks/out/base_curves]

Reads WORK/{vision,align,lm}/log.jsonl (written by `mcllava base build`) and writes `<out>.json` (the curves)
and `<out>.svg` (LM loss, and the held-out Yes/No weighted accuracy per kind of question).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]


def read(work: Path, stage: str) -> list[dict]:
    p = work / stage / "log.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def svg_panel(x0: int, title: str, series: dict[str, list[tuple[float, float]]], ymax: float | None = None) -> str:
    w, h, pad = 420, 260, 40
    pts = [p for s in series.values() for p in s]
    if not pts:
        return ""
    xm = max(p[0] for p in pts) or 1
    ym = ymax or max(p[1] for p in pts) or 1
    out = [f'<g transform="translate({x0},0)"><text x="{pad}" y="18" font-size="13">{title}</text>',
           f'<rect x="{pad}" y="{pad}" width="{w - 2 * pad}" height="{h - 2 * pad}" fill="none" stroke="#999"/>',
           f'<text x="{pad - 4}" y="{pad + 4}" font-size="10" text-anchor="end">{ym:.2g}</text>',
           f'<text x="{w - pad}" y="{h - pad + 14}" font-size="10" text-anchor="end">step {xm:.0f}</text>']
    for k, (name, s) in enumerate(series.items()):
        c = COLOURS[k % len(COLOURS)]
        path = " ".join(f"{pad + (x / xm) * (w - 2 * pad):.1f},{h - pad - (y / ym) * (h - 2 * pad):.1f}" for x, y in s)
        out.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="1.5"/>')
        out.append(f'<text x="{w - pad + 4}" y="{pad + 14 * k + 8}" font-size="10" fill="{c}">{name}</text>')
    return "".join(out) + "</g>"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", nargs="?", default=str(Path("~/.cache/mcllava/proving-base-build").expanduser()))
    ap.add_argument("--out", default="benchmarks/out/base_curves")
    args = ap.parse_args()
    work = Path(args.work)
    curves = {s: read(work, s) for s in ("vision", "align", "lm")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(curves, indent=1))
    lm = curves["lm"]
    loss = {"LM loss": [(r["step"], r["loss"]) for r in lm]}
    acc: dict[str, list] = {}
    for r in lm:
        for kind, v in r.get("val", {}).items():
            acc.setdefault(kind, []).append((r["step"], v["weighted_accuracy"]))
    vis = {"vision val mean": [(r["step"], r["val_mean"]) for r in curves["vision"]]}
    body = svg_panel(0, "projector + LoRA: training loss", loss) + svg_panel(
        430, "held-out Yes/No weighted accuracy", acc, 1.0) + svg_panel(860, "vision tower: held-out trait accuracy", vis, 1.0)
    out.with_suffix(".svg").write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="1300" height="270" font-family="sans-serif">{body}</svg>')
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.svg')}")


if __name__ == "__main__":
    main()
