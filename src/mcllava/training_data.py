"""Joint multi-concept training samples: what each epoch asks, and how a batch is collated.

All concepts train together. A concept's positives are its own photos (and group photos it is in); its
negatives come from the *other* concepts' photos, group photos without it and, optionally, generic images,
so no external negative set is needed. Yes and No are balanced every epoch: a small model trained on an
unbalanced set learns to answer "No" to everything. The wording below is ours.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

RECOGNITION_QUESTIONS = [
    "Is {c} in this photo?",
    "Can you see {c} in this image?",
    "Does this picture show {c}?",
    "Is {c} anywhere in this picture?",
    "Do you spot {c} here?",
    "Is {c} visible in this image?",
    "Does {c} appear in this photo?",
    "Look at the image. Is {c} there?",
    "Would you say {c} is in this picture?",
    "Is this a photo with {c} in it?",
    "Can {c} be seen in this shot?",
    "Is {c} part of this scene?",
    "Check the photo: is {c} present?",
    "Does the image contain {c}?",
    "Is {c} shown here?",
    "Can you find {c} in this photo?",
    "Is there {c} in the picture?",
    "Does {c} show up in this image?",
    "Tell me whether {c} is in this photo.",
    "Is {c} among what this picture shows?",
    "Has this photo captured {c}?",
    "Do I see {c} in this image?",
    "Answer yes or no: is {c} in the photo?",
    "Is {c} in the scene?",
]
YES_ANSWERS = [
    "Yes, {c} is in this photo.",
    "Yes, I can see {c}.",
    "Yes, {c} is there.",
    "Yes, this picture shows {c}.",
    "Yes, {c} appears in the image.",
    "Yes, {c} is visible here.",
    "Yes.",
    "Yes, that is {c}.",
    "Yes, {c} is in the scene.",
    "Yes, I spot {c} in the picture.",
    "Yes, the photo contains {c}.",
    "Yes, {c} can be seen.",
    "Yes, {c} is part of this scene.",
    "Yes, {c} shows up in this image.",
    "Yes, {c} is present.",
    "Yes, I found {c}.",
    "Yes, {c} is right there.",
    "Yes, this is a photo with {c}.",
    "Yes, {c} is shown.",
    "Yes, the image has {c} in it.",
]
NO_ANSWERS = [
    "No, {c} is not in this photo.",
    "No, I cannot see {c}.",
    "No, {c} is not there.",
    "No, this picture does not show {c}.",
    "No, {c} does not appear in the image.",
    "No, {c} is not visible here.",
    "No.",
    "No, that is not {c}.",
    "No, {c} is not in the scene.",
    "No, I do not spot {c} in the picture.",
    "No, the photo does not contain {c}.",
    "No, {c} cannot be seen.",
    "No, {c} is not part of this scene.",
    "No, {c} does not show up in this image.",
    "No, {c} is absent.",
    "No, I did not find {c}.",
    "No, {c} is missing from this photo.",
    "No, this photo has no {c} in it.",
    "No, {c} is not shown.",
    "No, the image does not have {c} in it.",
]
GROUP_QUESTIONS = [
    "Are {cs} all in this photo?",
    "Can you see {cs} in this image?",
    "Does this picture show {cs} together?",
    "Are {cs} both here?",
]
CAPTION_QUESTION = "Describe this photo."  # the question the proving-ground base learnt captions with
# Open questions whose answers the base writes about the user's photos before training (`open_answers.py`).
OPEN_QUESTIONS = ("What is {c} doing?", "What is {c} holding?", "Where is {c} in this photo?")
DESCRIBE_QUESTIONS = ["Who is {c}?", "What is {c}?", "Tell me about {c}.", "Describe {c}."]

# The fixed check question of the per-epoch recognition probe and of evaluation's yes/no scoring.
PROBE_QUESTION = RECOGNITION_QUESTIONS[0]


def join_names(tokens: list[str]) -> str:
    return tokens[0] if len(tokens) == 1 else ", ".join(tokens[:-1]) + " and " + tokens[-1]


@dataclass(frozen=True)
class ImageRef:
    """A training image by catalogue key, possibly mirrored (horizontal-flip augmentation)."""

    key: str
    flip: bool = False


@dataclass(frozen=True)
class CatalogEntry:
    key: str
    path: str
    mask_path: str | None
    present: frozenset[str]  # concept ids shown in the image (empty for generic negatives)


@dataclass
class Sample:
    question: str
    answer: str
    image: ImageRef | None
    kind: str  # "positive" | "negative" | "group" | "text" | "caption" | "open"
    concepts: tuple[str, ...] = ()


@dataclass
class DataOptions:
    flip: bool = True  # horizontal-flip augmentation
    balance: bool = True  # as many No as Yes for every concept, every epoch
    text: bool = True  # text-only questions from descriptions and facts
    # per concept and epoch, this many of those (drawn without repeats from its description and facts); None = all.
    # A few keep a bank's facts without their long answers outweighing the one-token recognition answers.
    text_per_concept: int | None = None
    group: bool = True  # "are A and B both here?" on group photos
    # (Yes, No) pairs of such questions per group photo and epoch: the first No pairs a shown concept with an
    # absent one on the group photo, later ones ask about two of its concepts on a photo of only one of them
    group_pairs: int = 1
    short_answers: bool = False  # plain `yes_no` answers (for small bases that never learned fuller phrasings)
    yes_no: tuple[str, str] = ("Yes.", "No.")  # the short answers, in the form the base was trained on
    # per concept, the generic negatives (--negatives) that look most like it are mined before training, and
    # half of its negatives each epoch come from them (Yo'LLaVA's hard negatives, without a retrieval corpus)
    hard_negatives: int = 0
    # caption answers per concept and epoch, from its photos that have one (`captions.distil_captions`: the base's
    # own caption, written from word definitions, naming the concepts shown); 0 = no captions
    captions: int = 0
    # open answers per concept and epoch (`open_answers.distil_answers`: the base's answers to `open_questions` about
    # the concept's photos, written from its description); 0 = none
    open_answers: int = 0
    open_questions: tuple[str, ...] = OPEN_QUESTIONS


@dataclass
class ConceptFacts:
    cid: str
    description: str | None = None
    facts: list[dict[str, str]] = field(default_factory=list)
    hard_negatives: tuple[str, ...] = ()  # catalogue keys of the generic negatives most like the concept


def build_epoch(
    catalog: list[CatalogEntry],
    concepts: list[ConceptFacts],
    rng: random.Random,
    options: DataOptions = DataOptions(),
    captions: dict[str, str] | None = None,
    frozen: list[str] = (),
    answers: dict[str, list[list[str]]] | None = None,
) -> list[Sample]:
    """All samples of one epoch, shuffled. Deterministic for the state of `rng`. `captions` maps catalogue keys to
    caption answers (used when `options.captions` > 0), `answers` to [concept id, question, answer] triples about
    the photo's concepts (`options.open_answers` > 0). `frozen` names concepts of the catalogue whose rows do not
    train (a bank being extended): their photos are the trained concepts' negatives, and `_frozen_samples` asks
    about them too, as many times as the trained concepts have photos."""
    samples: list[Sample] = []
    for concept in concepts:
        cid, tok = concept.cid, f"<{concept.cid}>"
        pos = [e for e in catalog if cid in e.present]
        neg_pool = [e for e in catalog if cid not in e.present]
        n_neg = len(pos) if options.balance else len(neg_pool)
        mined = set(concept.hard_negatives)
        hard = [e for e in neg_pool if e.key in mined]
        neg = rng.sample(hard, min(len(hard), n_neg // 2))
        chosen = {e.key for e in neg}
        rest = [e for e in neg_pool if e.key not in chosen]
        n_rest = n_neg - len(neg)
        if rest and n_rest:
            neg += rng.sample(rest, n_rest) if n_rest <= len(rest) else rng.choices(rest, k=n_rest)
        yes, no = ([options.yes_no[0]], [options.yes_no[1]]) if options.short_answers else (YES_ANSWERS, NO_ANSWERS)
        for entries, replies, kind in ((pos, yes, "positive"), (neg, no, "negative")):
            for e in entries:
                samples.append(
                    Sample(
                        question=rng.choice(RECOGNITION_QUESTIONS).format(c=tok),
                        answer=rng.choice(replies).format(c=tok),
                        image=ImageRef(e.key, options.flip and rng.random() < 0.5),
                        kind=kind,
                        concepts=(cid,),
                    )
                )
        if options.text:
            text = [(fact["question"], fact["answer"]) for fact in concept.facts]
            if concept.description:
                text.insert(0, (rng.choice(DESCRIBE_QUESTIONS).format(c=tok), f"{tok} is {concept.description}"))
            if options.text_per_concept is not None:
                text = rng.sample(text, min(options.text_per_concept, len(text)))
            samples += [Sample(q, a, None, "text", (cid,)) for q, a in text]
        if options.captions and captions:
            captioned = [e for e in catalog if cid in e.present and e.key in captions]
            for e in rng.sample(captioned, min(options.captions, len(captioned))):
                # never mirrored: a caption says who is on the left and who on the right
                samples.append(
                    Sample(CAPTION_QUESTION, captions[e.key], ImageRef(e.key), "caption", tuple(sorted(e.present)))
                )
        if options.open_answers and answers:
            mine = [
                (e.key, q, a) for e in catalog if cid in e.present for c, q, a in answers.get(e.key, []) if c == cid
            ]
            for key, q, a in rng.sample(mine, min(options.open_answers, len(mine))):
                # never mirrored either: an answer may say where in the photo the concept is
                samples.append(Sample(q.format(c=tok), a, ImageRef(key), "open", (cid,)))
    if options.group:
        samples += _group_samples(catalog, [c.cid for c in concepts], rng, options)
    if frozen:
        samples += _frozen_samples(catalog, [c.cid for c in concepts], list(frozen), rng, options)
    rng.shuffle(samples)
    return samples


def _frozen_samples(
    catalog: list[CatalogEntry], trained: list[str], frozen: list[str], rng: random.Random, options: DataOptions
) -> list[Sample]:
    """Questions about concepts whose rows are frozen, so that the new rows learn not to disturb them: for each photo
    of a trained concept, 'is <old> here?' -> No about a frozen concept it does not show, and as many -> Yes on a
    frozen concept's own photo. Their number follows the trained concepts' photos, not the frozen concepts'."""
    new_photos = [e for e in catalog if e.present & set(trained)]
    own = {c: [e for e in catalog if c in e.present] for c in frozen}
    shown = [c for c in frozen if own[c]]
    yes, no = ([options.yes_no[0]], [options.yes_no[1]]) if options.short_answers else (YES_ANSWERS, NO_ANSWERS)

    def ask(cid: str, entry: CatalogEntry, answers: list[str], kind: str) -> Sample:
        tok = f"<{cid}>"
        return Sample(
            rng.choice(RECOGNITION_QUESTIONS).format(c=tok),
            rng.choice(answers).format(c=tok),
            ImageRef(entry.key, options.flip and rng.random() < 0.5),
            kind,
            (cid,),
        )

    out = []
    for e in new_photos:
        absent = [c for c in frozen if c not in e.present]
        if absent:
            out.append(ask(rng.choice(absent), e, no, "negative"))
        if shown:
            cid = rng.choice(shown)
            out.append(ask(cid, rng.choice(own[cid]), yes, "positive"))
    return out


def _group_samples(
    catalog: list[CatalogEntry], cids: list[str], rng: random.Random, options: DataOptions
) -> list[Sample]:
    """For each group photo: 'are A and B both here?' -> Yes, and the same about a pair that is not all there -> No
    (`options.group_pairs` times: the model must learn "both", not "either")."""
    out = []
    known = set(cids)
    alone = {c: [e for e in catalog if e.present & known == {c}] for c in cids}  # photos of one concept only

    def flip() -> bool:
        return options.flip and rng.random() < 0.5

    for e in catalog:
        shown = sorted(e.present & known)
        if len(shown) < 2:
            continue
        absent = sorted(known - e.present)
        for i in range(options.group_pairs):
            q = rng.choice(GROUP_QUESTIONS)
            out.append(
                Sample(
                    q.format(cs=join_names([f"<{c}>" for c in shown])),
                    options.yes_no[0],
                    ImageRef(e.key, flip()),
                    "group",
                    tuple(shown),
                )
            )
            if not options.balance:
                continue
            if i == 0 and absent:  # a shown concept and an absent one, on the group photo
                pair, image = [rng.choice(shown), rng.choice(absent)], e
            else:  # two of its concepts, on a photo of only one of them
                pair = rng.sample(shown, 2)
                if not alone[pair[0]]:
                    continue
                image = rng.choice(alone[pair[0]])
            rng.shuffle(pair)
            out.append(
                Sample(
                    q.format(cs=join_names([f"<{c}>" for c in pair])),
                    options.yes_no[1],
                    ImageRef(image.key, flip()),
                    "group",
                    tuple(pair),
                )
            )
    return out


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], -100 outside answers
    images: list[ImageRef | None]  # per row


def collate(encoded: list, images: list[ImageRef | None], pad_id: int) -> Batch:
    """Right-pad a list of `Encoded` turns into one batch (labels -100 on padding)."""
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return Batch(ids, mask, labels, images)
