"""Evaluation: the MC-LLaVA metrics (recognition, choice, VQA, caption) plus grounding, and a runner.

Everything here is model-independent: `evaluate` drives any object that follows `Answerer` over the
records of a `tests.jsonl` (see DESIGN.md, "Formats") and returns a JSON-serialisable report.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import sacrebleu
from PIL import Image
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from . import scoring_official as official
from .scoring_official import recognition_metrics

SPLITS = ("single", "multi_one", "multi_all")
COLUMNS = ("official", "lenient")
WHY_LENIENT = (
    "lenient: our parsing ('Yes.', '(B)', an option's text count), so that a model's wording does not hide "
    "what it knows; official: the MC-LLaVA / Yo'LLaVA code's exact-string rules, the figure papers compare"
)
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


def format_question(record: dict, prompts: str = "ours", all_concepts: Iterable[str] = ()) -> str:
    """The question as asked. Ours: choice questions get their options and LLaVA's letter instruction appended,
    unless the question text already lists them. Official: the MC-LLaVA code's wording (`scoring_official`)."""
    if prompts not in official.PROMPTS:
        raise ValueError(f"prompts must be one of {', '.join(official.PROMPTS)}, got {prompts!r}")
    q, options = record["question"], record.get("options") or {}
    listed = not options or all(str(v) in q for v in options.values())
    lines = "\n".join(f"{k}. {v}" for k, v in options.items())
    if prompts == "official":
        return official.official_question(record, q if listed else f"{q}\n{lines}", all_concepts)
    if listed:
        return q
    return f"{q}\n{lines}\nAnswer with the option's letter from the given choices directly."


# ----------------------------------------------------------------------------- metrics


def recognition_split(record: dict) -> str:
    """MC-LLaVA's split: asked about several concepts, multi-concept image asked about one, single."""
    if len(record.get("concepts") or []) >= 2:
        return "multi_all"
    if len(record.get("present") or []) >= 2:
        return "multi_one"
    return "single"


def accuracy(correct: list[bool]) -> dict:
    return {"accuracy": sum(correct) / len(correct) if correct else None, "n": len(correct)}


def bleu_mcllava(reference: str, prediction: str) -> float:
    """MC-LLaVA's VQA score: NLTK sentence BLEU over characters, weights (0.7, 0.3), smoothing method1 (our column
    strips both strings before calling it; the official one does not)."""
    return official.bleu(reference, prediction)


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
    if record.get("kind") == "position":  # the release's grounding test: a lettered choice of positions
        return "position"
    if task == "choice" or (task == "text" and has_options):
        return "choice"
    if task == "text":
        return "vqa"
    return task


def evaluate(
    records: Iterable[dict], answerer: Answerer, progress: bool = True, keep_rows: bool = True, prompts: str = "ours"
) -> dict:
    """Ask `answerer` every record (worded by `prompts`: "ours" or "official") and score it both ways;
    returns the report (only sections with questions appear; per scenario too when records name one)."""
    records = list(records)
    all_concepts = sorted(answerer.names)
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
            row["asked"] = format_question(rec, prompts, all_concepts)
            row["prediction"] = answerer.answer(image, row["asked"])
        row["seconds"] = time.perf_counter() - t0
        answer_s += row["seconds"]
        _score(row, answerer.names)
        rows.append(row)

    report = _aggregate(rows)
    scenarios = sorted({r["scenario"] for r in rows if r.get("scenario")})
    if scenarios:
        report["scenarios"] = {s: _aggregate([r for r in rows if r.get("scenario") == s]) for s in scenarios}
    report["scoring"] = {"columns": list(COLUMNS), "prompts": prompts, "why_lenient": WHY_LENIENT}
    report["timing"] = {
        "total_s": time.perf_counter() - t_start,
        "answer_s": answer_s,
        "mean_answer_s": answer_s / len(rows) if rows else None,
        "n": len(rows),
    }
    if keep_rows:
        report["rows"] = rows
    return report


def _visual_split(row: dict) -> str:
    """single / multi_one / multi_all (the official si_sq / mi_sq / mi_mq) of a question about a photo."""
    if row.get("split") in SPLITS:  # the release's files fix it (their first two questions of a multi photo: mi_sq)
        return row["split"]
    named = row.get("concepts") or []
    if len(row.get("present") or []) >= 2 or len(named) >= 2:
        return "multi_all" if len(named) >= 2 else "multi_one"
    return "single"


def _score(row: dict, names: dict[str, str]) -> None:
    """Fill `correct`/`score` (lenient) and `official` (the official rule's right/wrong or score) of one row."""
    kind, pred = row["kind"], row["prediction"]
    if kind == "recognition":
        truth = parse_yes_no(str(row["answer"]))
        if truth is None:  # no usable reference: fall back to the ground truth of presence
            truth = all(c in row.get("present", []) for c in row.get("concepts", []))
        row["split"], row["truth"], row["parsed"] = recognition_split(row), truth, parse_yes_no(pred)
        row["correct"] = row["parsed"] is truth
        row["official"] = official.exact(pred, "Yes" if truth else "No")
    elif kind in ("choice", "position"):
        options = row["options"]
        ref = row["answer"] if row["answer"] in options else parse_choice(str(row["answer"]), options)
        row["split"] = _visual_split(row) if row.get("image") else "text"
        row["parsed"] = parse_choice(pred, options)
        row["correct"] = row["parsed"] is not None and row["parsed"] == ref
        row["official"] = official.exact(pred, row.get("official_answer", row["answer"]))
    elif kind == "vqa":
        row["split"] = _visual_split(row) if row.get("image") else "text"
        row["score"] = bleu_mcllava(str(row["answer"]).strip(), pred.strip())
        row["official"] = official.bleu(str(row["answer"]), pred)
        row["correct"] = None
        return
    elif kind == "caption":
        present = list(row.get("present") or [])
        row["split"] = "multi" if len(present) >= 2 else "single"
        row["named"] = named_concepts(pred, present, names)
        # every concept the caption names, present or not: a caption naming them all would have perfect recall
        row["named_any"] = named_concepts(pred, sorted(set(names) | set(present)), names)
        row["score"] = len(row["named"]) / len(present) if present else None
        row["correct"] = None if not present else len(row["named"]) == len(present)
        row["official"] = official.caption_score(pred, present)
        return
    elif kind == "grounding":
        boxes = row.get("boxes") or {}
        row["hits"] = {c: point_in_box(pred.get(c), boxes[c]) for c in row.get("present") or [] if c in boxes}
        row["score"] = sum(row["hits"].values()) / len(row["hits"]) if row["hits"] else None
        row["correct"] = all(row["hits"].values()) if row["hits"] else None
        row["official"] = None  # the official grounding test is the lettered one ("position")
        return
    else:
        raise ValueError(f"unknown task {row['task']!r} in record {row['index']}")
    row["score"] = float(row["correct"])


def _both(lenient: dict, off: dict) -> dict:
    """A section: the lenient figures flat (as earlier reports had them), and under 'lenient' and 'official'."""
    return {**lenient, "lenient": dict(lenient), "official": off}


def _recognition(rows: list[dict]) -> dict:
    skip = any(r.get("protocol") == "yollava" for r in rows)
    truths = [r["truth"] for r in rows]
    out = _both(
        recognition_metrics(truths, [r["parsed"] for r in rows]),
        official.recognition(truths, [r["prediction"] for r in rows], skip_unparseable=skip),
    )
    # negatives whose photo shows a look-alike of the concept asked about (test sets that mark them: world make)
    if look := [r for r in rows if r.get("lookalike") and not r["truth"]]:
        out["lookalikes_rejected"] = _accuracy(look)
    return out


def _accuracy(rows: list[dict]) -> dict:
    return _both(accuracy([r["correct"] for r in rows]), accuracy([r["official"] for r in rows]))


def _vqa(rows: list[dict]) -> dict:
    refs, preds = [str(r["answer"]).strip() for r in rows], [r["prediction"].strip() for r in rows]
    lenient = {
        "bleu_mcllava": sum(r["score"] for r in rows) / len(rows),
        "bleu_sacrebleu": bleu_sacrebleu(refs, preds),
        "n": len(rows),
    }
    return _both(lenient, {"bleu_mcllava": sum(r["official"] for r in rows) / len(rows), "n": len(rows)})


def _caption(rows: list[dict]) -> dict:
    present = sum(len(r.get("present") or []) for r in rows)
    named = sum(len(r["named"]) for r in rows)
    said = sum(len(r["named_any"]) for r in rows)
    scored = [r["official"] for r in rows if r["official"] is not None]
    lenient = {
        "recall": named / present if present else None,
        "precision": named / said if said else None,
        "n": len(rows),
        "n_concepts": present,
    }
    return _both(lenient, {"recall": sum(scored) / len(scored) if scored else None, "n": len(scored)})


def _with_splits(rows: list[dict], section, order: tuple[str, ...]) -> dict:
    out = section(rows)
    out["splits"] = {
        s: section([r for r in rows if r["split"] == s]) for s in order if any(r["split"] == s for r in rows)
    }
    return out


def _aggregate(rows: list[dict]) -> dict:
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["kind"], []).append(r)
    report: dict[str, Any] = {}
    if rec := by.get("recognition"):
        report["recognition"] = _with_splits(rec, _recognition, SPLITS)
    if ch := by.get("choice"):
        report["choice"] = _with_splits(ch, _accuracy, (*SPLITS, "text"))
    if vqa := by.get("vqa"):
        report["vqa"] = _with_splits(vqa, _vqa, (*SPLITS, "text"))
    if cap := by.get("caption"):
        report["caption"] = _with_splits(cap, _caption, ("single", "multi"))
    if gr := by.get("grounding"):
        hits = [h for r in gr for h in r["hits"].values()]
        report["grounding"] = {
            "hit_rate": sum(hits) / len(hits) if hits else None,
            "n": len(gr),
            "n_concepts": len(hits),
        }
    if pos := by.get("position"):
        report["position"] = _accuracy(pos)
    return report


# ----------------------------------------------------------------------------- display

Line = tuple[str, str, str, "float | None", "float | None", int]
_METRICS = {
    "recognition": ("weighted_accuracy", "positive_recall", "negative_recall"),
    "choice": ("accuracy",),
    "vqa": ("bleu_mcllava", "bleu_sacrebleu"),
    "caption": ("recall", "precision"),
    "position": ("accuracy",),
}


def headline(report: dict) -> list[Line]:
    """The report's figures as (task, split, metric, official, lenient, n) rows, for tables and pages; a figure
    the official code does not compute is None in its column."""
    out: list[Line] = []
    for task, metrics in _METRICS.items():
        if not (r := report.get(task)):
            continue
        for split, m in [("all", r), *r.get("splits", {}).items()]:
            for key in metrics:
                if key in m:
                    out.append((task, split, key, m["official"].get(key), m[key], m["n"]))
        if look := r.get("lookalikes_rejected"):
            out.append((task, "look-alikes", "accuracy", look["official"]["accuracy"], look["accuracy"], look["n"]))
    if r := report.get("grounding"):
        out.append(("grounding", "all", "hit_rate", None, r["hit_rate"], r["n_concepts"]))
    return out


def fmt(value: float | None, metric: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if metric == "bleu_sacrebleu" else f"{value:.3f}"


def print_table(report: dict, console: Any = None) -> None:
    """Print the figures, official and lenient side by side, per split; then per scenario when there are several."""
    console = console or Console()
    table = Table(title="mcllava evaluation", caption=WHY_LENIENT)
    for col, justify in (
        ("task", "left"),
        ("split", "left"),
        ("metric", "left"),
        ("official", "right"),
        ("lenient", "right"),
        ("n", "right"),
    ):
        table.add_column(col, justify=justify)
    last = (None, None)
    for task, split, metric, off, len_, n in headline(report):
        if last[0] is not None and task != last[0]:
            table.add_section()
        same_task, same_split = task == last[0], (task, split) == last
        table.add_row(
            "" if same_task else task, "" if same_split else split, metric, fmt(off, metric), fmt(len_, metric), str(n)
        )
        last = (task, split)
    console.print(table)
    if len(scen := report.get("scenarios") or {}) > 1:
        per = Table(title="per scenario (split 'all')")
        for col in ("scenario", "task", "metric", "official", "lenient", "n"):
            per.add_column(col)
        for name, sub in scen.items():
            for task, split, metric, off, len_, n in headline(sub):
                if split == "all" and metric in ("weighted_accuracy", "accuracy", "bleu_mcllava", "recall", "hit_rate"):
                    per.add_row(name, task, metric, fmt(off, metric), fmt(len_, metric), str(n))
        console.print(per)
    if t := report.get("timing"):
        mean = f"{t['mean_answer_s'] * 1000:.1f} ms/question" if t["mean_answer_s"] is not None else "-"
        console.print(f"{t['n']} questions in {t['total_s']:.1f} s ({mean})")
