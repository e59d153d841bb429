"""Can the language model learn to read the image tokens? A reading-only probe of a base build's work folder.

Trains only a LoRA (rank 32, lr 1e-3, batch 16; projector frozen) on balanced "Is there a <category> in this
photo?" questions about scenes of the build's vision pool, and scores the AUC of logit(Yes) - logit(No) every 25
steps on scenes that the vision stage held out too. Image tokens, by --tokens:
  oracle     each patch is exactly its align target (the upper bound: words the LM already reads)
  fit        the projector is fitted to the align targets of --words first (as the align stage does), then frozen
  work       the work folder's own aligned projector

    python benchmarks/read_probe.py WORK --tokens fit --words category --steps 125
    python benchmarks/read_probe.py WORK --tokens fit --words category,color,pattern --steps 100
    python benchmarks/read_probe.py WORK --tokens oracle --words category+color --questions exists,colour
    python benchmarks/read_probe.py WORK144 --patch-size 16 --tokens oracle --words category,color,pattern,ears,...

--words: comma-separated words cycled over the grid; "a+b" superposes two traits' words on the same patch.

Writes benchmarks/out/read_probe_<tokens>_<words>.json (the curve). Needs `mcllava base build --stages vision`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from mcllava.backbone import Backbone
from mcllava.proving_base.build import BuildConfig, EncodedPool, yes_no_report, yes_no_scores
from mcllava.proving_base.build.align import _align_loss, patch_word_targets, word_readout
from mcllava.proving_base.build.common import _start, tower_features
from mcllava.proving_base.build.lm import add_lora
from mcllava.proving_base.data import PATCH_TRAITS, VALUES, patch_labels
from mcllava.proving_base.model import VisionSpec
from mcllava.training_data import collate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path)
    ap.add_argument("--tokens", choices=("oracle", "fit", "work"), default="fit")
    ap.add_argument("--words", default="category", help="comma-separated traits cycled over the grid")
    ap.add_argument("--questions", default="exists", help="exists or exists,colour (alternated)")
    ap.add_argument("--steps", type=int, default=125)
    ap.add_argument("--scenes", type=int, default=3000)
    ap.add_argument("--held-out", type=int, default=300)
    ap.add_argument("--patch-size", type=int, default=32, help="the work folder's tower patch (16: 144 image tokens)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = ap.parse_args()
    words = tuple(args.words.split(","))
    cfg = BuildConfig(work=args.work, vision=VisionSpec(patch_size=args.patch_size), progress=False)
    tok, model, proc = _start(cfg, "read_probe")
    backbone = Backbone(model, proc, "read-probe")
    pool = torch.load(args.work / "vision" / "pool.pt", weights_only=False)
    # held-out questions on the scenes the vision stage held out (its first n_val), training questions on others:
    # the tower's features of its own training scenes are cleaner than those of new photos
    n_va, half = args.held_out, len(pool["owner"]) // 2
    assert n_va <= max(64, len(pool["owner"]) // 20), "more held-out scenes than the vision stage held out"
    sel = torch.cat([torch.arange(n_va), torch.arange(half, half + args.scenes)])
    feats, owner, labels = tower_features(model, pool["pixels"][sel]), pool["owner"][sel], pool["labels"][sel]
    targets = patch_word_targets(model, tok, labels, owner, words)

    # balanced questions about what owns at least one patch (what the tokens can show): "Is there a <category> in
    # this photo?" (exists) and, with --questions exists,colour, "Is the <category> <colour>?" about a category
    # that appears once (colour: its own colour or another)
    cats, colours, rng, samples = VALUES["category"], VALUES["color"], np.random.default_rng(0), []
    per_patch = patch_labels(labels, owner)
    kinds = args.questions.split(",")
    for i in range(len(sel)):
        owned = per_patch[i, owner[i] >= 0]  # [owned patches, T]
        present = sorted(set(owned[:, 0].tolist()))
        kind, pos = kinds[i % len(kinds)], rng.random() < 0.5
        cat_counts = labels[i, :, 0].tolist()
        single = [c for c in present if cat_counts.count(c) == 1]
        if kind == "colour" and single:
            c = single[rng.integers(len(single))]
            true = int(owned[owned[:, 0] == c][0, PATCH_TRAITS.index("color")])
            col = true if pos else [k for k in range(len(colours)) if k != true][rng.integers(len(colours) - 1)]
            samples.append((f"Is the {cats[c]} {colours[col]}?", "Yes" if pos else "No", "colour"))
            continue
        pos = bool(present) and pos
        pick = present if pos else [c for c in range(len(cats)) if c not in present]
        c = cats[pick[rng.integers(len(pick))]]
        samples.append(
            (f"Is there {'an' if c[0] in 'aeiou' else 'a'} {c} in this photo?", "Yes" if pos else "No", "exists")
        )
    batch = collate(
        [backbone.encode(backbone.format_prompt(q, None, image=True), a) for q, a, _ in samples],
        [None] * len(samples),
        tok.pad_token_id,
    )

    proj = model.model.multi_modal_projector
    fit = {}
    if args.tokens == "fit":
        proj.requires_grad_(True)
        opt = torch.optim.AdamW(proj.parameters(), lr=1e-3)
        for _ in range(600):
            idx = torch.randint(n_va, len(sel), (64,))
            loss = _align_loss(proj(feats[idx]), targets[idx])
            opt.zero_grad(), loss.backward(), opt.step()
        with torch.no_grad():
            fit = word_readout(model, tok, proj(feats[:n_va]), labels[:n_va], owner[:n_va], words)
        print("fitted projector, held-out nearest-word accuracy:", fit)
    add_lora(model, 32, 32, projector=False)
    lora = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(lora, lr=1e-3, weight_decay=0.0)
    tokens = (lambda idx: targets[idx]) if args.tokens == "oracle" else (lambda idx: proj(feats[idx]))

    held_out = EncodedPool(
        batch.input_ids[:n_va],
        batch.attention_mask[:n_va],
        batch.labels[:n_va],
        feats[:n_va],
        torch.ones(n_va, dtype=torch.bool),
        [k for *_, k in samples[:n_va]],
        [a for _, a, _ in samples[:n_va]],
    )

    def held_out_auc() -> dict[str, float]:
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scores = yes_no_scores(backbone, held_out, batch=50, features=tokens)
        model.train()
        return {k: round(v["auc"], 3) for k, v in yes_no_report(scores, held_out).items()}

    curve, gen, t0 = [{"step": 0, "auc": held_out_auc()}], torch.Generator().manual_seed(0), time.time()
    model.train()
    for step in range(1, args.steps + 1):
        idx = torch.randint(n_va, len(sel), (16,), generator=gen)
        w = int(batch.attention_mask[idx].sum(1).max())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = backbone.answer_loss(
                batch.input_ids[idx, :w], batch.attention_mask[idx, :w], batch.labels[idx, :w], tokens(idx)
            )
        opt.zero_grad(), loss.backward()
        torch.nn.utils.clip_grad_norm_(lora, 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps:
            curve.append(
                {
                    "step": step,
                    "loss": loss.item(),
                    "auc": held_out_auc(),
                    "seconds_per_step": (time.time() - t0) / step,
                }
            )
            print(curve[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"read_probe_{args.tokens}_{'-'.join(words)}_{'-'.join(kinds)}.json"
    out.write_text(
        json.dumps(
            {
                "work": str(args.work),
                "tokens": args.tokens,
                "words": words,
                "questions": kinds,
                "fitted_word_accuracy": fit,
                "held_out": n_va,
                "curve": curve,
            },
            indent=1,
        )
    )
    print("wrote", out)


if __name__ == "__main__":
    main()
