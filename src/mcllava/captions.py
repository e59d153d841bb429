"""Caption answers for personalisation, written by the base itself from word definitions.

A user gives photos, not captions. Before any concept token exists, the base sees each training photo with the
concepts it shows defined in words (`<ana> is a pink striped cat with floppy ears ...`) and is asked to describe
it. A caption that names exactly the concepts the photo shows becomes a training answer for "Describe this photo."
without the definitions: the learned tokens then take the words' place, and the model learns to say a concept's
name where it sees the concept (without such answers, a tied head emits the trained name rows anywhere).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .backbone import Backbone
from .evaluate import named_concepts
from .training_data import CAPTION_QUESTION, CatalogEntry


def whole_sentences(text: str) -> str:
    """`text` up to its last full stop: a caption cut off by the token limit must not teach stopping mid-sentence."""
    end = text.rfind(".")
    return text[: end + 1] if end >= 0 else ""


def distil_captions(
    backbone: Backbone,
    entries: list[CatalogEntry],
    descriptions: dict[str, str | None],
    image_features: Callable[[list[CatalogEntry]], torch.Tensor],
    progress: bool = True,
    max_new_tokens: int = 48,
) -> dict[str, str]:
    """Caption per catalogue key, for the photos whose concepts all have a description and whose caption the base
    wrote naming exactly those concepts. Must run before concept tokens are added (the names are still words)."""
    known = [cid for cid, d in descriptions.items() if d]
    as_tokens = {cid: f"<{cid}>" for cid in known}  # a name counts as said only as `<id>`, as the base writes it
    todo = [e for e in entries if e.present and all(descriptions.get(c) for c in e.present)]
    out: dict[str, str] = {}
    for entry in tqdm(todo, desc="captions from word definitions", disable=not progress, leave=False):
        intro = " ".join(f"<{c}> is {descriptions[c]}." for c in sorted(entry.present))
        prompt = backbone.format_prompt(f"{intro} {CAPTION_QUESTION}")
        caption = whole_sentences(backbone.generate(prompt, image_features([entry])[0], max_new_tokens=max_new_tokens))
        if caption and set(named_concepts(caption, known, as_tokens)) == set(entry.present):
            out[entry.key] = caption
    return out
