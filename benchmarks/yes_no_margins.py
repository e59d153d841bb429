"""Could a Yes/No threshold fix a bank's recognition? Written to benchmarks/out/yes_no_margins.json.

For every recognition question of a test set, the bank's margin logit("Yes") - logit("No") at the first answer
token, asked as `mcllava eval --no-visual-prompt` asks it (the same system text and prompt; "are A and B both
here?" once per concept, its margin the smallest of theirs, or as one question with `--joint`). Reports the AUC of
the margin (how well it ranks the answers, apart from calibration), the weighted accuracy at a margin of 0, and
the best weighted accuracy any single threshold reaches, chosen on these same answers (an upper bound for a
calibrated bank, not a result to quote as one).

    python benchmarks/yes_no_margins.py demo-out/bank demo-out/world/tests.jsonl [--base proving-ground]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image


def weighted(truth: list[bool], margin: list[float], threshold: float) -> float:
    """Mean of the Yes recall and the No recall when a margin above `threshold` answers Yes."""
    pos = [m > threshold for t, m in zip(truth, margin) if t]
    neg = [m <= threshold for t, m in zip(truth, margin) if not t]
    return (sum(pos) / len(pos) + sum(neg) / len(neg)) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bank", type=Path)
    ap.add_argument("tests", type=Path)
    ap.add_argument("--base", default=None, help="the base model (default: the one the bank remembers)")
    ap.add_argument("--joint", action="store_true", help='ask "are A and B both here?" as one question')
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/yes_no_margins.json"))
    args = ap.parse_args()

    from sklearn.metrics import roc_auc_score

    from mcllava.assistant import PersonalAssistant
    from mcllava.datasets import read_tests_jsonl, recognition_question
    from mcllava.evaluate import format_question, recognition_split
    from mcllava.train import yes_no_margin

    assistant = PersonalAssistant.load(args.bank, args.base, joint=args.joint)
    backbone = assistant.backbone

    def margin(question: str, features: torch.Tensor) -> float:
        return yes_no_margin(
            backbone, assistant.tokens.system_text(assistant.introduced(question, [])), question, features
        )

    rows = []
    for r in (r for r in read_tests_jsonl(args.tests) if r["task"] == "recognition"):
        question = format_question(r)
        image = Image.open(r["image"]).convert("RGB")
        features = backbone.visual_tokens([image]).features[0]
        together = assistant.asked_together(question)  # Yes only if every concept's own answer is Yes
        m = (
            min(margin(recognition_question([c]), features) for c in together)
            if together
            else margin(question, features)
        )
        rows.append(
            {
                "question": question,
                "image": r["image"],
                "split": recognition_split(r),
                "truth": r["answer"].strip().lower().startswith("yes"),
                "margin": m,
            }
        )
    truth, margin = [x["truth"] for x in rows], [x["margin"] for x in rows]
    if all(truth) or not any(truth):
        raise SystemExit(f"{args.tests}: the recognition questions need both Yes and No answers")
    best = max((weighted(truth, margin, t), t) for t in [min(margin) - 1] + margin)
    res = {
        "bank": str(args.bank),
        "tests": str(args.tests),
        "joint": args.joint,
        "n": len(rows),
        "auc": roc_auc_score(truth, margin),
        "weighted_accuracy_at_0": weighted(truth, margin, 0.0),
        "best_threshold": best[1],
        "weighted_accuracy_at_best_threshold": best[0],
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
