"""The official scoring rules and prompts of MC-LLaVA (github.com/arctanxarc/MC-LLaVA, `eval/eval.py` and
`llava/dataset.py`) and Yo'LLaVA (github.com/WisconsinAIVision/YoLLaVA, `test-sks-acc.py`), restated.

Papers compare figures scored this way, so every `mcllava eval` report carries them as the **official**
column beside our **lenient** one (`evaluate.py`, which parses "Yes.", "(B)" or an option's text). The rules:

- recognition and choice: right only when the answer *is* the reference string ("Yes", "No", "A"), untouched;
  Yo'LLaVA's recognition drops answers that are neither "Yes" nor "No" instead of counting them wrong;
- VQA: character BLEU (weights 0.7/0.3, smoothing method1) of the unstripped strings, averaged per split;
- captions: a single-concept image counts when the caption contains the literal, case-sensitive ``<id>``;
  a multi-concept image scores the share of its concepts' bare ids found as substrings; the mean over images.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

PROMPTS = ("ours", "official")
RECOGNITION_PROMPT = "Can you see {names} in this photo? Answer the question using a single word Yes or No."
YOLLAVA_RECOGNITION_PROMPT = "Can you see {names} in this photo? Answer with a single word or phrase."
CHOICE_SUFFIX = "\nIMPORTANT: Answer the question using a single letter."
CAPTION_PROMPT = (
    "Can you see {names} in the image? Don't answer the question but remember it, and only response a "
    "detailed caption for the image. Your caption:"
)


def official_question(record: dict, with_options: str, all_concepts: Iterable[str]) -> str:
    """The question as the official code words it. `with_options` is the question with its options listed
    (as the release's files hold it); `all_concepts` are the concepts a caption prompt names."""
    task = record["task"]
    if task == "recognition":
        names = " and ".join(f"<{c}>" for c in record.get("concepts") or [])
        form = YOLLAVA_RECOGNITION_PROMPT if record.get("protocol") == "yollava" else RECOGNITION_PROMPT
        return form.format(names=names)
    if record.get("options"):
        return with_options + CHOICE_SUFFIX
    if task == "caption":
        return CAPTION_PROMPT.format(names=", ".join(f"<{c}>" for c in all_concepts))
    return record["question"]


def exact(prediction: str, reference: str) -> bool:
    """The official right/wrong: the answer is the reference string, character for character."""
    return prediction == reference


def yes_no_exact(prediction: str) -> bool | None:
    """True for exactly "Yes", False for exactly "No", None for anything else."""
    return {"Yes": True, "No": False}.get(prediction)


def bleu(reference: str, prediction: str) -> float:
    """Character BLEU, weights (0.7, 0.3), smoothing method1, on the strings as they are (nothing stripped)."""
    if not prediction or not reference:
        return float(prediction == reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(
            sentence_bleu(
                [list(reference)], list(prediction), weights=(0.7, 0.3), smoothing_function=SmoothingFunction().method1
            )
        )


def caption_score(caption: str, present: list[str]) -> float | None:
    """One image's official caption recall: the literal ``<id>`` for one concept, bare-id substrings for several."""
    if not present:
        return None
    if len(present) == 1:
        return float(f"<{present[0]}>" in caption)
    return sum(c in caption for c in present) / len(present)


def recognition_metrics(truths: list[bool], preds: list[bool | None]) -> dict:
    """Positive recall, negative recall and their mean; an unparseable prediction (None) is wrong. Both columns
    count this way; they differ in what makes an answer Yes or No."""
    pos = [p is True for t, p in zip(truths, preds) if t]
    neg = [p is False for t, p in zip(truths, preds) if not t]
    pr = sum(pos) / len(pos) if pos else None
    nr = sum(neg) / len(neg) if neg else None
    parts = [x for x in (pr, nr) if x is not None]
    return {
        "weighted_accuracy": sum(parts) / len(parts) if parts else None,
        "positive_recall": pr,
        "negative_recall": nr,
        "n": len(truths),
        "n_positive": len(pos),
        "n_negative": len(neg),
    }


def recognition(truths: list[bool], preds: list[str], skip_unparseable: bool = False) -> dict:
    """Official recognition figures from raw answers: positive recall (exact "Yes"), negative recall (exact "No")
    and their mean. With `skip_unparseable` (Yo'LLaVA), answers other than "Yes"/"No" are left out."""
    pairs = [(t, yes_no_exact(p)) for t, p in zip(truths, preds)]
    skipped = sum(p is None for _, p in pairs) if skip_unparseable else 0
    if skip_unparseable:
        pairs = [(t, p) for t, p in pairs if p is not None]
    kept = recognition_metrics([t for t, _ in pairs], [p for _, p in pairs])
    return {**kept, "n": len(truths), "skipped": skipped}
