"""`mcllava base gate`: the proving-ground base's quality gate, on a world seed and identities it never saw.

- captions: "Describe this photo." names the categories present (recall >= 0.80);
- generic questions: colour, category and position (and "Is there a <category>?") answered right (>= 0.80);
- definition recognition: "<x> is <full description>. Is <x> in this photo?" on personal-half characters, half
  of the negatives look-alikes (weighted accuracy >= 0.80);
- named recognition without any definition or concept bank: should stay near chance (0.5);
- recognition with visual definitions ("<x> is" + k-means rows of another photo of x), reported: it is the form
  that personal concepts take, so it predicts how well personalisation can start; and with two visual
  definitions, "are <x> and <y> both in this photo?" where a No shows one of them (reported), split by how many
  names the system text defines (one or two), with the share of look-alikes rejected;
- the evaluation's tasks (`gate_tasks.py`, reported): multiple choice, open answers, "Where is <x>?", captions
  naming the defined characters, text-only facts, each with names defined by words or by visual rows.
`GateConfig.checks` runs a subset.
Yes/No answers are read off the first answer token (logit of "Yes" against "No"); open answers are generated
greedily.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..backbone import Backbone
from ..errors import McLlavaError
from .build.common import tower_features
from .build.pool import encode_pool
from .build.scoring import yes_no_report, yes_no_scores
from .data import GATE_DEFINITIONS, TASK_KINDS, Curriculum, defined_recognition, named_recognition, visual_defined
from .data import rng_for as data_rng
from .gate_tasks import by_names, run_task_checks, task_summary
from .loader import load
from .tasks import lm_sample

GATE_SEED = 9001  # never used for training (the build uses seed 0 and the base half only)
THRESHOLDS = {"caption_category_recall": 0.8, "generic_accuracy": 0.8, "definition_weighted_accuracy": 0.8}
POSITIONS = ("left", "centre", "right")
CATEGORY_WORDS = {
    "cat": "cat",
    "dog": "dog",
    "bird": "bird",
    "robot": "robot",
    "person": "person",
    "plush toy": "plush",
}
CHECKS = ("definitions", "named", "visual", "both", "captions", "generic", *TASK_KINDS)


@dataclass
class GateConfig:
    seed: int = GATE_SEED
    captions: int = 40
    generic: int = 120
    definitions: int = 200
    named: int = 100
    visual: int = 100  # recognition with visual definitions (the form personalisation takes); reported, not gated
    visual_rows: int = 6  # rows per visual definition: one slot row, the k personalisation uses on this base
    both: int = 100  # "are <x> and <y> both here?" with visual definitions, a No showing one of them; reported
    # the evaluation's tasks (reported, not gated): generated answers, names defined by words or visual rows
    choice: int = 60
    open: int = 60
    where: int = 40
    named_caption: int = 30
    facts: int = 60
    size: int = 192
    autocast: bool = True
    checks: tuple[str, ...] = CHECKS  # the checks to run (`CHECKS`); the others are left out of the report

    def __post_init__(self) -> None:
        unknown = sorted(set(self.checks) - set(CHECKS))
        if unknown:
            raise McLlavaError(f"unknown gate check(s) {unknown}; the checks are {', '.join(CHECKS)}")

    def count(self, check: str) -> int:
        """How many samples `check` draws (0 when it is not among `checks`)."""
        return getattr(self, check) if check in self.checks else 0


def run_gate(model, processor, cfg: GateConfig = GateConfig(), progress: bool = True) -> dict:
    backbone = Backbone(model, processor, "proving-ground")
    t0 = time.time()
    res: dict = {"config": asdict(cfg)}
    ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.autocast)

    # recognition with definitions (personal half, look-alikes) and named recognition without definitions
    cur = GATE_DEFINITIONS
    defs = [
        defined_recognition(data_rng(cfg.seed, "lm", i), cfg.size, cur, half="personal")
        for i in range(cfg.count("definitions"))
    ]
    named = [named_recognition(cfg.seed, i, cfg.size) for i in range(cfg.count("named"))]
    visual = [
        visual_defined(data_rng(cfg.seed, "named", 10**6 + i), cfg.size, cur, half="personal")
        for i in range(cfg.count("visual"))
    ]
    both = [
        visual_defined(data_rng(cfg.seed, "named", 2 * 10**6 + i), cfg.size, replace(cur, both=1.0), half="personal")
        for i in range(cfg.count("both"))
    ]
    for key, samples in (
        ("definition_recognition", defs),
        ("named_recognition", named),
        ("visual_definition_recognition", visual),
        ("visual_both_recognition", both),
    ):
        if not samples:
            continue
        pool = encode_pool(backbone, model, samples, cfg.size, rows=cfg.visual_rows)
        with ac:
            scores = yes_no_scores(backbone, pool)
        res[key] = yes_no_report(scores, pool)[samples[0]["kind"]]  # with look-alike recall per changed trait
        if key == "visual_definition_recognition":
            res[key]["by_names"] = by_names(scores, samples)
    res.update(
        run_task_checks(
            backbone, model, {k: cfg.count(k) for k in TASK_KINDS}, cfg.seed, cfg.size, cfg.visual_rows, progress
        )
    )

    # generic captions and questions (personal-half characters, generated answers)
    caps, gens = [], []
    i = 0
    n_caps, n_gens = cfg.count("captions"), cfg.count("generic")
    while len(caps) < n_caps or len(gens) < n_gens:
        s = lm_sample(cfg.seed, 10**6 + i, Curriculum(mix=(0.3, 0.7, 0, 0, 0, 0)), cfg.size, half="personal")
        i += 1
        (caps if s["kind"] == "caption" else gens).append(s) if len(caps if s["kind"] == "caption" else gens) < (
            n_caps if s["kind"] == "caption" else n_gens
        ) else None
    bar = tqdm(total=len(caps) + len(gens), desc="gate: generated answers", disable=not progress)
    recalls, by_kind = [], {}
    for s in caps + gens:
        feats = tower_features(model, torch.from_numpy(np.array(s["image"].convert("RGB")))[None])
        feats = model.model.multi_modal_projector(feats.to(backbone.device))[0]
        with torch.no_grad():  # fp32: bf16 autocast makes one-token (GEMV) decoding steps much slower on CPU
            out = backbone.generate(
                backbone.format_prompt(s["question"]), feats, max_new_tokens=32 if s["kind"] == "caption" else 12
            )
        bar.update(1)
        low = out.lower()
        if s["kind"] == "caption":
            cats = s["categories"]
            recalls.append(np.mean([CATEGORY_WORDS[c] in low for c in cats]))
            s["output"] = out
            continue
        ok = _generic_correct(s, low)
        by_kind.setdefault(s["kind"], []).append(ok)
        s["output"] = out
    bar.close()
    if caps:
        res["captions"] = {
            "n": len(caps),
            "category_recall": float(np.mean(recalls)),
            "examples": [{"answer": s["answer"], "output": s["output"]} for s in caps[:5]],
        }
    if gens:
        res["generic"] = {
            "n": len(gens),
            "accuracy": float(np.mean([x for v in by_kind.values() for x in v])),
            "by_kind": {k: float(np.mean(v)) for k, v in by_kind.items()},
            "examples": [{"question": s["question"], "answer": s["answer"], "output": s["output"]} for s in gens[:8]],
        }
    res["summary"] = {
        "caption_category_recall": res.get("captions", {}).get("category_recall"),
        "generic_accuracy": res.get("generic", {}).get("accuracy"),
        "definition_weighted_accuracy": res.get("definition_recognition", {}).get("weighted_accuracy"),
        "named_weighted_accuracy": res.get("named_recognition", {}).get("weighted_accuracy"),
        "visual_definition_weighted_accuracy": res.get("visual_definition_recognition", {}).get("weighted_accuracy"),
        "visual_both_weighted_accuracy": res.get("visual_both_recognition", {}).get("weighted_accuracy"),
        **task_summary(res),
    }
    gated = [res["summary"][k] for k in THRESHOLDS]
    # None when a gated check was left out (`checks`): a subset neither passes nor fails the gate
    res["passed"] = None if None in gated else all(v >= t for v, t in zip(gated, THRESHOLDS.values()))
    res["seconds"] = time.time() - t0
    return res


def _generic_correct(s: dict, out: str) -> bool:
    """The answer's key word (Yes/No, the colour, the category or the position) is in the output."""
    ans = s["answer"].lower().rstrip(".")
    if s["kind"] == "exists":
        return out.startswith(ans)
    if s["kind"] == "colour":
        return ans.split()[-1] in out
    if s["kind"] == "position":
        return next(p for p in POSITIONS if p in ans) in out
    cat = next(w for c, w in CATEGORY_WORDS.items() if c in ans)
    return cat in out


def gate(weights: str | Path | None = None, out: str | Path | None = None, cfg: GateConfig = GateConfig()) -> dict:
    model, processor = load(weights)
    res = run_gate(model, processor, cfg)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=1))
    return res
