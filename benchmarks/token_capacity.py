"""What can the image tokens show? The gate's ceiling for a design of the proving-ground base's image tokens.

The align stage makes each image token one word (or a sum of words, "a+b") of the character that owns its patch,
cycled over the grid by (stride * row + col) % len(words). A look-alike negative differs from the defined character in one
or two traits; the language model can only reject it if a changed trait is among the words on the distractor's
own patches, and it can only accept a positive if the character owns a patch at all. For each design this
renders `--scenes` pool scenes (base half) at the design's grid, draws the gate's look-alikes (personal half,
`make_lookalike`), and reports the median patches per character, the share that own a patch, the share of
look-alikes whose change the tokens show, and the weighted-accuracy ceiling of the gate's definition check (half
of the negatives look-alikes) with every shown word read perfectly, and how many of its words a character
shows on average. Superposed designs (two or three words a token) trade the reading, which the align stage learns
later for sums than for single words, against words shown. The version-3 designs cycle all eleven words (`data.LABEL_TRAITS`: nine traits, action, held
object) with stride 2 (`AlignStage.v3`) at 8x8 (its 64 tokens), 12x12 and 16x16. The "slots" design (36 tokens, row r the
character at scene slot r, one word of `SLOT_WORDS` per token) gives every character its own row whatever its
size. Written to benchmarks/out/token_capacity.json.

    python benchmarks/token_capacity.py [--scenes 400]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mcllava.proving_base.build import SLOT_WORDS, V3_WORDS
from mcllava.proving_base.build.align import patch_word_trait
from mcllava.proving_base.data import LABEL_TRAITS
from mcllava.proving_base.data import PATCH_TRAITS as ALL

GROUPS = ("category+color+pattern", "ears+head+eyes", "build+accessory+accessory_color")
# the eleven words of the version-3 tower superposed two or three to a token: fewer patches spell a whole character
PAIRS = V3_WORDS  # ("category+color", "pattern+ears", ..., "held"): the version-3 tokens
QUADS = ("category+color+pattern", "ears+head+eyes", "build+accessory+accessory_color", "action+held")
DESIGNS = [  # (grid at 192 px, words, stride): 6 = patches of 32 px (36 tokens), 8 = 24 px (v3), 12 = 16 px (144)
    (6, ("category", "color"), 1),
    (6, ("category", "color", "pattern"), 1),
    (6, ALL, 1),
    (6, GROUPS, 1),
    (6, ("+".join(ALL),), 1),
    (12, ("category", "color", "pattern"), 1),
    (12, ALL, 1),
    (12, GROUPS, 1),
    ("slots", SLOT_WORDS, 1),
    (8, LABEL_TRAITS, 2),
    (12, LABEL_TRAITS, 2),
    (16, LABEL_TRAITS, 2),
    (8, PAIRS, 2),
    (8, QUADS, 1),
    (12, PAIRS, 2),
]


def ceiling(owned: list[set[str]], changes: list[set[str]]) -> dict:
    """Shares seen / shown and the weighted-accuracy ceiling, pairing each character's shown traits with a change.

    Positives are right when the character owns a patch; a look-alike negative is right when a changed trait is
    shown, or when the distractor owns no patch (nothing to see: "No"); other negatives are right (half of them).
    """
    seen = float(np.mean([len(s) > 0 for s in owned]))
    shown = float(np.mean([bool(changes[i % len(changes)] & s) for i, s in enumerate(owned)]))
    negatives = 0.5 + 0.5 * (shown + (1 - seen))
    return {"owns_a_patch": seen, "lookalikes_shown": shown, "weighted_ceiling": (seen + negatives) / 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=400)
    ap.add_argument("--lookalikes", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/token_capacity.json"))
    args = ap.parse_args()

    from mcllava.proving_base.data import _identities, scene_pool
    from mcllava.world.traits import make_lookalike

    rng = np.random.default_rng(0)
    changes = [set(make_lookalike(_identities(rng, 1, "personal")[0], rng)[1]) for _ in range(args.lookalikes)]
    results, pools = [], {}
    for grid, words, stride in DESIGNS:
        if grid == "slots":  # every visible character has its slot's row, whatever patches it covers
            owned = [set(words)] * len(changes)
            res = {
                "grid": "slots",
                "tokens": 36,
                "words": list(words),
                "characters": None,
                "median_patches": None,
                "mean_traits_shown": len(words),  # every character has its row
                **ceiling(owned, changes),
            }
            results.append(res)
            print(
                f"  36 tokens, slots: {'/'.join(words):52s} every character a row, look-alikes shown "
                f"{res['lookalikes_shown']:.2f}, ceiling {res['weighted_ceiling']:.3f}"
            )
            continue
        if grid not in pools:
            pools[grid] = scene_pool(1, args.scenes, 192, grid, workers=1)
        pool = pools[grid]
        which = patch_word_trait(grid, len(words), stride).numpy()
        n_traits = len({t for w in words for t in w.split("+")})
        owned, n_patches = [], []
        for s in range(len(pool.owner)):
            own = pool.owner[s].numpy()
            for a in np.nonzero(pool.labels[s, :, 0].numpy() != -100)[0]:
                patches = np.nonzero(own == a)[0]
                n_patches.append(len(patches))
                owned.append({t for p in patches for t in words[which[p]].split("+")})
        res = {
            "grid": grid,
            "tokens": grid * grid,
            "words": list(words),
            "stride": stride,
            "characters": len(owned),
            "median_patches": float(np.median(n_patches)),
            "mean_traits_shown": float(np.mean([len(s) for s in owned])),
            **ceiling(owned, changes),
        }
        results.append(res)
        print(
            f"{grid * grid:4d} tokens, {'/'.join(words)[:60]:60s} median {res['median_patches']:.0f} patches, "
            f"owns one {res['owns_a_patch']:.2f}, shows {res['mean_traits_shown']:.1f} of {n_traits} traits, "
            f"look-alikes shown {res['lookalikes_shown']:.2f}, "
            f"ceiling {res['weighted_ceiling']:.3f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"scenes": args.scenes, "lookalikes": args.lookalikes, "designs": results}, indent=1)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
