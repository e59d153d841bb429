"""How many pixels does each look-alike trait change? Written to benchmarks/out/lookalike_pixels.json.

A look-alike distractor is a concept with one or two traits changed. For each trait, this renders the same scene
twice, once with a random personal-half character and once with that character's copy that differs in that trait
only, and counts the pixels whose colour moves by more than `--threshold` (of 255). It says which differences are
there to be seen at a given image size, apart from what any model makes of them (docs/proving_base.md).

    python benchmarks/lookalike_pixels.py [--sizes 192,384] [--n 150]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="192,384")
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--threshold", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/lookalike_pixels.json"))
    args = ap.parse_args()

    from mcllava.world.scenes import render_scene, sample_scene
    from mcllava.world.traits import LOOKALIKE_TRAITS, VALUES, _set_trait, random_identity

    out: dict = {"n": args.n, "threshold": args.threshold, "sizes": {}}
    for size in (int(s) for s in args.sizes.split(",")):
        changed: dict[str, list[int]] = {t: [] for t in LOOKALIKE_TRAITS}
        own = []
        for i in range(args.n):
            rng = np.random.default_rng(i)
            ident = random_identity(rng, "personal")
            if ident.accessory == "none":  # so that accessory colour can change too
                ident = _set_trait(ident, "accessory", "hat", rng)
            spec = sample_scene(np.random.default_rng(10**6 + i), [(ident, "concept", "x")], size)
            first = render_scene(spec)
            own.append(int(first.mask(0).sum()))
            for t in LOOKALIKE_TRAITS:
                values = [v for v in VALUES[t] if v not in (getattr(ident, t), "none")]
                other = _set_trait(ident, t, values[int(rng.integers(len(values)))], rng)
                second = render_scene(replace(spec, actors=[replace(spec.actors[0], identity=other)]))
                diff = np.abs(np.asarray(first.image, int) - np.asarray(second.image, int)).max(-1)
                changed[t].append(int((diff > args.threshold).sum()))
        out["sizes"][size] = {
            "character_pixels_median": float(np.median(own)),
            "changed_pixels": {
                t: {"median": float(np.median(v)), "p10": float(np.percentile(v, 10))} for t, v in changed.items()
            },
        }
        print(size, json.dumps(out["sizes"][size]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
