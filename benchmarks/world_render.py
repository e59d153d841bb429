"""Render rate of the proving-ground world (scenes per second, one process), written to benchmarks/out/.

Three measurements at the given size: cold (every character a new random identity, so every sprite is
drawn), recurring (characters drawn from a fixed cast, as in a `world make` test set, so sprites are reused)
and with PNG encoding added (what `world make` pays per image). Sampling the layout is included; writing
files is not.

    python benchmarks/world_render.py [--size 192] [--n 600]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from mcllava.world.render import _draw_cached
    from mcllava.world.scenes import N_VARIANTS, SETTINGS, background, render_scene, sample_scene
    from mcllava.world.traits import random_identity

    rng = np.random.default_rng(args.seed)
    for s in SETTINGS:  # backgrounds are cached per (setting, size, variant); build them outside the timing
        for v in range(N_VARIANTS):
            background(s, args.size, v)

    def rate(pick, encode: bool = False) -> float:
        specs = [sample_scene(rng, [pick() for _ in range(int(rng.integers(1, 5)))], args.size) for _ in range(args.n)]
        t = time.perf_counter()
        for spec in specs:
            scene = render_scene(spec)
            if encode:
                scene.image.save(io.BytesIO(), format="PNG")
        return args.n / (time.perf_counter() - t)

    _draw_cached.cache_clear()
    cold = rate(lambda: random_identity(rng))
    cast = [random_identity(rng) for _ in range(12)]
    rate(lambda: cast[rng.integers(len(cast))])  # warm the sprite cache
    recurring = rate(lambda: cast[rng.integers(len(cast))])
    with_png = rate(lambda: cast[rng.integers(len(cast))], encode=True)
    t = time.perf_counter()
    _ = [
        sample_scene(rng, [random_identity(rng) for _ in range(int(rng.integers(1, 5)))], args.size)
        for _ in range(args.n)
    ]
    sampling = args.n / (time.perf_counter() - t)
    result = {
        "benchmark": "world_render",
        "size": args.size,
        "n": args.n,
        "processes": 1,
        "scenes_per_s": {
            "cold_sprites": round(cold, 1),
            "recurring_cast": round(recurring, 1),
            "recurring_cast_with_png": round(with_png, 1),
            "layout_sampling_only": round(sampling, 1),
        },
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "note": "render_scene only (layout sampled beforehand); characters per scene uniform in 1..4",
    }
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    path = out / f"world_render_{args.size}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
