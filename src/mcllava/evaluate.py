"""Evaluation: the MC-LLaVA metrics (recognition, choice, VQA, caption) plus grounding, and a runner.

Everything here is model-independent: `evaluate` drives any object that follows `Answerer` over the
records of a `tests.jsonl` (see DESIGN.md, "Formats") and returns a JSON-serialisable report.
"""

from __future__ import annotations

import re
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import sacrebleu
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from PIL import Image
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

SPLITS = ("single", "multi_one", "multi_all")
_YES = {"yes", "yeah", "yep"}
_NO = {"no", "nope"}


@runtime_checkable
class Answerer(Protocol):
    """What `evaluate` needs from a model: free-form answers and a point per concept."""

    names: dict[str, str]  # concept id -> display name

    def answer(self, image: Image.Image | None, question: str) -> str: ...

    def locate(self, image: Image.Image) -> dict[str, tuple[float, float] | None]: ...


# ----------------------------------------------------------------------------- parsing


def parse_yes_no(text: str) -> bool | None:
    """The first yes/no word of `text` (case and punctuation ignored); None when there is none."""
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in _YES:
            return True
        if word in _NO:
            return False
    return None


def _norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def parse_choice(text: str, options: dict[str, str]) -> str | None:
    """The option letter `text` picks: a letter ("B", "(B)", "B.", "Answer: B") or an option's text.

    Explicit letter forms win; then an option's text (the most specific one contained in the answer);
    a bare leading letter followed by words ("B because ...") is the last resort, since "A" is also a word.
    """
    letters = {k.upper(): k for k in options}
    s = text.strip()

    def pick(m: re.Match | None) -> str | None:
        return letters.get(m.group(1).upper()) if m else None

    found = (
        pick(re.fullmatch(r"\(?([A-Za-z])\)?[.:)]?", s))
        or pick(re.match(r"\(([A-Za-z])\)", s))
        or pick(re.match(r"([A-Z])[.:)](?:\s|$)", s))
        or pick(re.search(r"(?i:\b(?:answer|option|choice)(?: is)?)\s*[:\-]?\s*\(?([A-Z])\b", s))
        or pick(re.search(r"\(([A-Z])\)", s))
    )
    if found:
        return found
    ns = _norm(s)
    texts = {k: _norm(str(v)) for k, v in options.items() if _norm(str(v))}
    for k, v in texts.items():
        if ns == v:
            return k
    hits = {k: v for k, v in texts.items() if re.search(rf"\b{re.escape(v)}\b", ns)}
    # drop options whose text is part of another hit ("bike" inside "red bike")
    hits = {k: v for k, v in hits.items() if not any(v != w and v in w for w in hits.values())}
    if len(hits) == 1:
        return next(iter(hits))
    if not hits:  # "It is B." / "B because ..."
        return pick(re.search(r"(?:^|\s)([A-Z])[.!]?$", s)) or pick(re.match(r"([A-Z])\b", s))
    return None


def format_question(record: dict) -> str:
    """The question as asked: choice questions get their options and LLaVA's letter instruction
    appended, unless the question text already lists them."""
    q, options = record["question"], record.get("options") or {}
    if not options or all(str(v) in q for v in options.values()):
        return q
    lines = "\n".join(f"{k}. {v}" for k, v in options.items())
    return f"{q}\n{lines}\nAnswer with the option's letter from the given choices directly."


# ----------------------------------------------------------------------------- metrics


def recognition_split(record: dict) -> str:
    """MC-LLaVA's split: asked about several concepts, multi-concept image asked about one, single."""
    if len(record.get("concepts") or []) >= 2:
        return "multi_all"
    if len(record.get("present") or []) >= 2:
        return "multi_one"
    return "single"


def recognition_metrics(truths: list[bool], preds: list[bool | None]) -> dict:
    """Positive recall, negative recall and their mean; an unparseable prediction (None) is wrong."""
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


def accuracy(correct: list[bool]) -> dict:
    return {"accuracy": sum(correct) / len(correct) if correct else None, "n": len(correct)}


def bleu_mcllava(reference: str, prediction: str) -> float:
    """MC-LLaVA's VQA score: NLTK sentence BLEU over characters, weights (0.7, 0.3), smoothing method1."""
    if not prediction or not reference:
        return float(prediction == reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(
            sentence_bleu(
                [list(reference)], list(prediction), weights=(0.7, 0.3),
                smoothing_function=SmoothingFunction().method1,
            )
        )


def bleu_sacrebleu(references: list[str], predictions: list[str]) -> float:
    """Standard word-level corpus BLEU (0-100)."""
    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def named_concepts(caption: str, concepts: Iterable[str], names: dict[str, str]) -> list[str]:
    """The concepts a caption names: by token `<id>` or by display name (case-insensitive, whole word)."""
    low = caption.lower()
    out = []
    for c in concepts:
        name = (names.get(c) or c).lower()
        if f"<{c.lower()}>" in low or re.search(rf"(?<!\w){re.escape(name)}(?!\w)", low):
            out.append(c)
    return out


def point_in_box(point: tuple[float, float] | None, box: list[float]) -> bool:
    """Whether a point lies in a box [x0, y0, x1, y1], edges included; no point is a miss."""
    if point is None:
        return False
    x, y = point
    x0, y0, x1, y1 = box
    return x0 <= x <= x1 and y0 <= y <= y1


# ----------------------------------------------------------------------------- runner


def _kind(record: dict) -> str:
    task, has_options = record["task"], bool(record.get("options"))
    if task == "choice" or (task == "text" and has_options):
        return "choice"
    if task == "text":
        return "vqa"
    return task


def evaluate(records: Iterable[dict], answerer: Answerer, progress: bool = True, keep_rows: bool = True) -> dict:
    """Ask `answerer` every record and score it; returns the report (only sections with questions appear)."""
    records = list(records)
    images: OrderedDict[str, Image.Image] = OrderedDict()

    def load(path: str | None) -> Image.Image | None:
        if path is None:
            return None
        if path not in images:
            with Image.open(path) as im:
                images[path] = im.convert("RGB")
            if len(images) > 8:
                images.popitem(last=False)
        images.move_to_end(path)
        return images[path]

    rows: list[dict] = []
    t_start = time.perf_counter()
    answer_s = 0.0
    for i, rec in enumerate(tqdm(records, desc="eval", disable=not progress)):
        kind, image = _kind(rec), load(rec.get("image"))
        row = dict(rec, index=i, kind=kind)
        t0 = time.perf_counter()
        if kind == "grounding":
            pred = answerer.locate(image)
            row["prediction"] = {c: ([float(v) for v in p] if p is not None else None) for c, p in pred.items()}
        else:
            row["prediction"] = answerer.answer(image, format_question(rec))
        row["seconds"] = time.perf_counter() - t0
        answer_s += row["seconds"]
        _score(row, answerer.names)
        rows.append(row)

    report = _aggregate(rows)
    report["timing"] = {
        "total_s": time.perf_counter() - t_start,
        "answer_s": answer_s,
        "mean_answer_s": answer_s / len(rows) if rows else None,
        "n": len(rows),
    }
    if keep_rows:
        report["rows"] = rows
    return report


def _score(row: dict, names: dict[str, str]) -> None:
    """Fill `correct` (right/wrong where that is defined) and `score` (0..1) of one row, in place."""
    kind, pred = row["kind"], row["prediction"]
    if kind == "recognition":
        truth = parse_yes_no(str(row["answer"]))
        if truth is None:  # no usable reference: fall back to the ground truth of presence
            truth = all(c in row.get("present", []) for c in row.get("concepts", []))
        row["split"], row["truth"], row["parsed"] = recognition_split(row), truth, parse_yes_no(pred)
        row["correct"] = row["parsed"] is truth
    elif kind == "choice":
        options = row["options"]
        ref = row["answer"] if row["answer"] in options else parse_choice(str(row["answer"]), options)
        row["split"] = "visual" if row.get("image") else "text"
        row["parsed"] = parse_choice(pred, options)
        row["correct"] = row["parsed"] is not None and row["parsed"] == ref
    elif kind == "vqa":
        row["split"] = "visual" if row.get("image") else "text"
        row["score"] = bleu_mcllava(str(row["answer"]).strip(), pred.strip())
        row["correct"] = None
        return
    elif kind == "caption":
        present = list(row.get("present") or [])
        row["named"] = named_concepts(pred, present, names)
        # every concept the caption names, present or not: a caption naming them all would have perfect recall
        row["named_any"] = named_concepts(pred, sorted(set(names) | set(present)), names)
        row["score"] = len(row["named"]) / len(present) if present else None
        row["correct"] = None if not present else len(row["named"]) == len(present)
        return
    elif kind == "grounding":
        boxes = row.get("boxes") or {}
        row["hits"] = {c: point_in_box(pred.get(c), boxes[c]) for c in row.get("present") or [] if c in boxes}
        row["score"] = sum(row["hits"].values()) / len(row["hits"]) if row["hits"] else None
        row["correct"] = all(row["hits"].values()) if row["hits"] else None
        return
    else:
        raise ValueError(f"unknown task {row['task']!r} in record {row['index']}")
    row["score"] = float(row["correct"])


def _aggregate(rows: list[dict]) -> dict:
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["kind"], []).append(r)
    report: dict[str, Any] = {}

    if rec := by.get("recognition"):
        report["recognition"] = recognition_metrics([r["truth"] for r in rec], [r["parsed"] for r in rec])
        report["recognition"]["splits"] = {
            s: recognition_metrics([r["truth"] for r in rec if r["split"] == s], [r["parsed"] for r in rec if r["split"] == s])
            for s in SPLITS if any(r["split"] == s for r in rec)
        }
    if ch := by.get("choice"):
        report["choice"] = accuracy([r["correct"] for r in ch])
        report["choice"]["splits"] = {
            s: accuracy([r["correct"] for r in ch if r["split"] == s]) for s in ("visual", "text") if any(r["split"] == s for r in ch)
        }
    if vqa := by.get("vqa"):
        refs, preds = [str(r["answer"]).strip() for r in vqa], [r["prediction"].strip() for r in vqa]
        report["vqa"] = {
            "bleu_mcllava": sum(r["score"] for r in vqa) / len(vqa),
            "bleu_sacrebleu": bleu_sacrebleu(refs, preds),
            "n": len(vqa),
        }
    if cap := by.get("caption"):
        present = sum(len(r.get("present") or []) for r in cap)
        named = sum(len(r["named"]) for r in cap)
        said = sum(len(r["named_any"]) for r in cap)
        report["caption"] = {"recall": named / present if present else None, "precision": named / said if said else None,
                             "n": len(cap), "n_concepts": present}
    if gr := by.get("grounding"):
        hits = [h for r in gr for h in r["hits"].values()]
        report["grounding"] = {"hit_rate": sum(hits) / len(hits) if hits else None, "n": len(gr), "n_concepts": len(hits)}
    return report


# ----------------------------------------------------------------------------- display


def headline(report: dict) -> list[tuple[str, str, str, float | None, int]]:
    """The report's figures as (task, split, metric, value, n) rows, for tables and pages."""
    out: list[tuple[str, str, str, float | None, int]] = []
    if r := report.get("recognition"):
        for split, m in [("all", r), *r.get("splits", {}).items()]:
            for key in ("weighted_accuracy", "positive_recall", "negative_recall"):
                out.append(("recognition", split, key, m[key], m["n"]))
    if r := report.get("choice"):
        for split, m in [("all", r), *r.get("splits", {}).items()]:
            out.append(("choice", split, "accuracy", m["accuracy"], m["n"]))
    if r := report.get("vqa"):
        out.append(("vqa", "all", "bleu_mcllava", r["bleu_mcllava"], r["n"]))
        out.append(("vqa", "all", "bleu_sacrebleu", r["bleu_sacrebleu"], r["n"]))
    if r := report.get("caption"):
        out.append(("caption", "all", "recall", r["recall"], r["n_concepts"]))
        if "precision" in r:
            out.append(("caption", "all", "precision", r["precision"], r["n_concepts"]))
    if r := report.get("grounding"):
        out.append(("grounding", "all", "hit_rate", r["hit_rate"], r["n_concepts"]))
    return out


def fmt(value: float | None, metric: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if metric == "bleu_sacrebleu" else f"{value:.3f}"


def print_table(report: dict, console: Any = None) -> None:
    """Print the headline metrics and their splits as one rich table."""
    console = console or Console()
    table = Table(title="mcllava evaluation")
    for col, justify in (("task", "left"), ("split", "left"), ("metric", "left"), ("value", "right"), ("n", "right")):
        table.add_column(col, justify=justify)
    last = (None, None)
    for task, split, metric, value, n in headline(report):
        if last[0] is not None and task != last[0]:
            table.add_section()
        same_task, same_split = task == last[0], (task, split) == last
        table.add_row("" if same_task else task, "" if same_split else split, metric, fmt(value, metric), str(n))
        last = (task, split)
    console.print(table)
    if t := report.get("timing"):
        mean = f"{t['mean_answer_s'] * 1000:.1f} ms/question" if t["mean_answer_s"] is not None else "-"
        console.print(f"{t['n']} questions in {t['total_s']:.1f} s ({mean})")
