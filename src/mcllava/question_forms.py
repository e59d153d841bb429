"""What a question asks, read from its wording: a caption, "are A and B both here?", a lettered choice, and the
answer format it demands ("Answer ... using a single word Yes or No.").

`PersonalAssistant.respond` answers some questions by a route of its own (one question per concept, ranking the
offered options) and puts its answer in the form asked for; this module decides which questions those are. The
forms are the test sets' (`datasets.records`, `world/questions.py`), training's (`training_data`) and the official
MC-LLaVA / Yo'LLaVA prompts' (`scoring_official`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal

from .training_data import GROUP_QUESTIONS

# "Are they all here?" questions: the test sets' form (datasets.records.recognition_question), training's, and
# the official recognition prompt's ("Can you see <a> and <b> in this photo?", its format instruction removed)
TOGETHER_FORMS = (
    "Are {cs} both in this photo?",
    "Are {cs} all in this photo?",
    "Can you see {cs} in this photo?",
    *GROUP_QUESTIONS,
)
_TOGETHER = [
    re.compile(
        r"\s+".join(re.escape(w) for w in form.rstrip("?").split()).replace(re.escape("{cs}"), "(?P<cs>.+?)")
        + r"\s*\??",
        re.IGNORECASE,
    )
    for form in TOGETHER_FORMS
]

# Requests for a caption: "Describe this photo." (the test sets' and training's form), its close variants, and the
# official caption prompt ("Can you see <a>, <b> in the image? Don't answer the question but remember it, and only
# response a detailed caption for the image. Your caption:")
_CAPTION = re.compile(
    r"(?:please\s+)?(?:describe|write\s+a\s+caption\s+for|caption)\s+(?:this|the)\s+(?:photo|picture|image)"
    r"(?:\s*[.!]?\s*name\s+everyone\s+you\s+recogni[sz]e)?\s*[.!?]?"
    r"|can\s+you\s+see\s+.+?\s+in\s+the\s+image\?\s*don'?t\s+answer\s+the\s+question\s+but\s+remember\s+it,?\s+"
    r"and\s+only\s+respon[sd]e?\s+a\s+detailed\s+caption\s+for\s+the\s+image\.?\s*your\s+caption:?",
    re.IGNORECASE | re.DOTALL,
)

# Answer-format instructions at the end of a question: LLaVA's and the official prompts' (scoring_official)
_FORMAT = re.compile(
    r"\s*(?:important:\s*)?answer\s+(?:the\s+question\s+)?(?:using|with)\s+(?:a\s+)?single\s+"
    r"(?P<unit>word|letter)(?:\s+yes\s+or\s+no|\s+or\s+phrase)?\s*\.?\s*$"
    r"|\s*answer\s+with\s+the\s+option'?s\s+letter\s+from\s+the\s+given\s+choices\s+directly\s*\.?\s*$"
    r"|\s*answer\s+(?:with\s+)?yes\s+or\s+no\s*\.?\s*$",
    re.IGNORECASE,
)
_OPTION_LINE = re.compile(r"\(?(?P<letter>[A-Z])[.):]\s*(?P<text>\S.*)")
_OPTION_INLINE = re.compile(r"(?:^|\s)\(?(?P<letter>[A-Z])[.):]\s+")
LETTERS = "ABCDEFGH"


def asks_caption(question: str) -> bool:
    """Whether a question asks for a caption of its photo ("Describe this photo.", "Write a caption for this
    image.", the official caption prompt), case and spacing aside; no other question."""
    return _CAPTION.fullmatch(question.strip()) is not None


def asked_together(question: str, concept_ids: Iterable[str]) -> list[str] | None:
    """The concepts a question asks about together, in its order, when it has one of `TOGETHER_FORMS` (case and
    spacing aside) and lists two or more distinct concepts as `<id>`; None for any other question."""
    known = set(concept_ids)
    for pattern in _TOGETHER:
        m = pattern.fullmatch(question.strip())
        if not m:
            continue
        items = [x.strip() for x in re.split(r",|\band\b", m.group("cs")) if x.strip()]
        ids = [x[1:-1] for x in items]
        if all(re.fullmatch(r"<[^<>\s]+>", x) for x in items) and len(set(ids)) == len(ids) >= 2 and set(ids) <= known:
            return ids
    return None


def split_format(question: str) -> tuple[str, Literal["word", "letter"] | None]:
    """The question without its trailing answer-format instructions, and the form they ask for: "word" (a single
    word, Yes or No), "letter" (an option's letter) or None. Instructions on lines of their own count too."""
    form: Literal["word", "letter"] | None = None
    text = question.strip()
    while m := _FORMAT.search(text):
        unit = (m.group("unit") or ("letter" if "option" in m.group(0).lower() else "word")).lower()
        form = form or unit  # the last instruction wins; it is read first
        text = text[: m.start()].rstrip()
    return text or question.strip(), form


def choice_question(question: str) -> tuple[str, dict[str, str]] | None:
    """(stem, options) of a question that lists two or more options lettered A, B, C... in order, one per line
    ("A. x", "(A) x", "A) x", "A: x") or on the stem's line ("... A. x B. y"); None for any other question.
    Format instructions must be removed first (`split_format`)."""
    lines = [line.strip() for line in question.strip().splitlines() if line.strip()]
    stem: list[str] = []
    options: dict[str, str] = {}
    for line in lines:
        m = _OPTION_LINE.fullmatch(line)
        if m and len(options) < len(LETTERS) and m.group("letter") == LETTERS[len(options)] and stem:
            options[m.group("letter")] = m.group("text").strip()
        elif options:
            return None  # text after the options: not a question of this form
        else:
            stem.append(line)
    if len(options) < 2:
        return _inline_choice(" ".join(lines))
    return " ".join(stem), options


def _inline_choice(text: str) -> tuple[str, dict[str, str]] | None:
    marks = [m for m in _OPTION_INLINE.finditer(text)]
    # the markers must read A, B, C... in order, the first after some stem text
    start = next((i for i, m in enumerate(marks) if m.group("letter") == "A"), None)
    if start is None or marks[start].start() == 0:
        return None
    seq = [marks[start]]
    for m in marks[start + 1 :]:
        if m.group("letter") == LETTERS[len(seq)]:
            seq.append(m)
    if len(seq) < 2:
        return None
    ends = [m.start() for m in seq[1:]] + [len(text)]
    options = {m.group("letter"): text[m.end() : end].strip().rstrip(",;") for m, end in zip(seq, ends)}
    if not all(options.values()):
        return None
    stem = re.sub(r"\s*options?\s*:?\s*$", "", text[: seq[0].start()].strip(), flags=re.IGNORECASE)
    return stem, options
