"""Short open answers for personalisation, written by the base itself from word definitions.

MC-LLaVA trains its concept tokens on questions about the user's photos ("What is <bo> doing?") whose answers a
larger model wrote. Here the base writes them: before any concept token exists, it sees each training photo with
the concepts shown defined in words (`<bo> is a red dog with floppy ears ...`) and answers each open question
about them. An answer that names no other concept becomes a training answer to the same question without the
definitions, so the learned tokens take the words' place for open questions as well as for Yes / No. How good
the answers are is the base's: on a base that cannot answer about a defined character they teach nothing, and
the recipe leaves them off (`DataOptions.open_answers = 0`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .backbone import Backbone
from .evaluate import named_concepts
from .training_data import CatalogEntry


def first_sentence(text: str) -> str:
    """`text` up to and including its first full stop (all of it when there is none), stripped."""
    end = text.find(".")
    return (text[: end + 1] if end >= 0 else text).strip()


def distil_answers(
    backbone: Backbone,
    entries: list[CatalogEntry],
    descriptions: dict[str, str | None],
    image_features: Callable[[list[CatalogEntry]], torch.Tensor],
    questions: tuple[str, ...],
    progress: bool = True,
    max_new_tokens: int = 24,
) -> dict[str, list[list[str]]]:
    """Per catalogue key, [concept id, question, answer] triples (the question with `{c}` left in, the answer naming
    the concept as `<id>`) for every concept the photo shows and every question; only photos whose concepts all have a
    description, only answers that name no concept but the one asked about and are not a bare Yes or No. Must run
    before concept tokens are added (the names are still words)."""
    known = [cid for cid, d in descriptions.items() if d]
    as_tokens = {cid: f"<{cid}>" for cid in known}
    todo = [e for e in entries if e.present and all(descriptions.get(c) for c in e.present)]
    out: dict[str, list[list[str]]] = {}
    for entry in tqdm(todo, desc="open answers from word definitions", disable=not progress, leave=False):
        intro = " ".join(f"<{c}> is {descriptions[c]}." for c in sorted(entry.present))
        features = image_features([entry])[0]
        for cid in sorted(entry.present):
            for question in questions:
                prompt = backbone.format_prompt(f"{intro} {question.format(c=f'<{cid}>')}")
                answer = first_sentence(backbone.generate(prompt, features, max_new_tokens=max_new_tokens))
                if not answer or answer.rstrip(".").strip().lower() in ("yes", "no"):
                    continue
                if set(named_concepts(answer, known, as_tokens)) - {cid}:
                    continue
                out.setdefault(entry.key, []).append([cid, question, answer])
    return out
