"""PersonalAssistant: a base model plus a concept bank, answering questions about new photos.

`answer` follows the MC-LLaVA inference path: the question's image is embedded once; each concept's location
confidence map is computed from those visual tokens; concepts that pass the threshold get numbered marks
drawn on the photo, and the system text gains `Mark n is <c>.`; the marked photo is embedded and answered.
A question whether several concepts are all in the photo ("Are <bo> and <ana> both in this photo?") is asked
one concept at a time on the same visual tokens, and answered Yes only when every one is there
(unless `joint`): small models tend to answer such a question for "either" rather than "both".
A request for a caption ("Describe this photo.") is answered the same way round (unless `free_captions`): each concept
is asked about on its own, the caption starts with the names of those found and the model writes the rest, with
no name in it; small models name one concept of a group photo at most when left to choose the names themselves.
A question that offers lettered options is answered by ranking them (unless `generate_choices`): each option's text
is scored as the answer to the question (`Backbone.answer_scores`) and the reply is the best one's letter. An
answer-format instruction ("Answer ... using a single word Yes or No.") is taken off the question and obeyed: a
yes/no answer is then the bare word (`question_forms`).

Decoding is greedy, so the same prompt on the same visual tokens always gives the same text: with `cache_size`
the assistant keeps that many recent model outputs and answers a repeated input from memory. An evaluation gains
most: a caption or a "both" question asks each concept the recognition question its photo was asked already, and
the same questions come back in other wordings' passes. Off by default, since a server streams and counts the
tokens of every answer from the model's own generation.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from .backbone import Backbone
from .bank import ConceptBank, config_hash
from .datasets.records import recognition_question
from .errors import McLlavaError
from .evaluate import parse_yes_no
from .locate import LocateConfig, Location, draw_marks, locate, mark_prompt
from .question_forms import asked_together, asks_caption, choice_question, split_format
from .tokens import ConceptTokens, add_concept_tokens, word_embedding_norm, write_rows
from .training_data import join_names

CAPTION_QUESTION = "Describe this photo. Name everyone you recognise."
MAX_QUESTION_CHARS = 4000
EVAL_CACHE_SIZE = 4096  # model outputs an evaluation keeps: a test set's repeated (photo, question) pairs


@dataclass
class Answer:
    """An answer with what led to it: the prompt's system text, the locations and the marked image."""

    text: str
    system: str
    locations: list[Location] = field(default_factory=list)
    marks: dict[int, str] = field(default_factory=dict)
    marked_image: Image.Image | None = None
    # concept id -> its own answer, for a split question or a caption; option letter -> its score, for a choice
    parts: dict[str, str] = field(default_factory=dict)


def together_answer(parts: dict[str, str], token=lambda c: f"<{c}>") -> str:
    """ "Yes." when every concept's own answer is yes; otherwise "No, <c> is not in this photo." naming the others."""
    missing = [token(c) for c, text in parts.items() if parse_yes_no(text) is not True]
    if not missing:
        return "Yes."
    return f"No, {join_names(missing)} {'is' if len(missing) == 1 else 'are'} not in this photo."


def digest(features: torch.Tensor | None) -> str | None:
    """A short fingerprint of a photo's visual tokens, exact to the bit (None without a photo)."""
    if features is None:
        return None
    return hashlib.blake2b(features.contiguous().view(torch.uint8).cpu().numpy(), digest_size=16).hexdigest()


class PersonalAssistant:
    """Answers questions that name personal concepts as `<id>`, with or without a photo."""

    def __init__(
        self,
        backbone: Backbone,
        bank: ConceptBank,
        reference: Literal["tokens", "features"] = "features",
        locate_config: LocateConfig | None = None,
        introduce: Literal["all", "relevant"] | None = None,
        joint: bool = False,
        free_captions: bool = False,
        generate_choices: bool = False,
        tokens: ConceptTokens | None = None,
        never_say: Iterable[int] = (),
        cache_size: int = 0,
    ):
        """`tokens` and `never_say` serve several banks on one base (`multibank.SharedBase`): the bank's tokens are
        already in the tokenizer, its rows are written before each use, and `never_say` (the other banks' token ids)
        is never generated. By default the bank's tokens are added and its rows written here. `cache_size`: how
        many model outputs (generated texts, option scores) are kept to answer repeated inputs (0: none)."""
        self.backbone = backbone
        self.bank = bank
        n = bank.tokenizer_len_before
        bank.check_base(config_hash(backbone.model.config), None if tokens else len(backbone.tokenizer))
        head = (
            None
            if bank.tied_head
            else backbone.model.get_output_embeddings().weight[:n].float().norm(dim=-1).mean().item()
        )
        bank.check_row_norms(word_embedding_norm(backbone.model, n), head)
        if tokens is None:
            tokens = add_concept_tokens(backbone.model, backbone.tokenizer, bank.concept_ids, bank.k)
            write_rows(backbone.model, tokens, bank.input_rows, bank.head_rows)
        self.tokens: ConceptTokens = tokens
        self.never_say = [*tokens.soft_ids, *never_say]  # token ids no answer may contain
        self.reference = reference
        self.joint = joint  # ask "are A and B both here?" as one question (`--joint`)
        self.free_captions = free_captions  # let the model choose a caption's names (`--free-captions`)
        self.generate_choices = generate_choices  # let the model write an option's letter (`--generate-choices`)
        self.introduce = introduce or bank.recipe.get("introduce", "all")  # default: as the bank was trained
        self.locate_config = locate_config or LocateConfig(reduce=backbone.layout.reference_reduce)
        self.names = {cid: (bank.display.get(cid) or {}).get("name") or cid for cid in bank.concept_ids}
        self.cache_size = cache_size
        self._outputs: OrderedDict[Hashable, object] = OrderedDict()
        self.cache_hits = 0

    @classmethod
    def load(cls, bank: str | Path | ConceptBank, base: str | Backbone | None = None, **kwargs) -> PersonalAssistant:
        """Load a bank and the base model it remembers (or `base`, which must be the same model)."""
        bank = bank if isinstance(bank, ConceptBank) else ConceptBank.load(bank)
        backbone = base if isinstance(base, Backbone) else Backbone.load(bank.base_to_load(base))
        return cls(backbone, bank, **kwargs)

    # ------------------------------------------------------------------ locating
    def references(self) -> dict[str, torch.Tensor]:
        """Per-concept reference vectors for location maps: learned soft tokens, or masked training features."""
        if self.reference == "tokens" or not self.bank.locator_refs:
            return {cid: self.bank.input_rows[i, 1:] for i, cid in enumerate(self.bank.concept_ids)}
        return {cid: self.bank.locator_refs[cid] for cid in self.bank.concept_ids}

    def locations(self, image: Image.Image, features: torch.Tensor | None = None) -> list[Location]:
        """Each concept's presence score, peak and box in this image."""
        if features is None:
            features = self.backbone.visual_tokens([image]).features[0]
        gh, gw = self.backbone.grid
        return locate(
            features[-gh * gw :].float().cpu(),
            self.references(),
            (gh, gw),
            image.size,
            self.locate_config,
            self.backbone.layout.spatial,
        )

    def locate(self, image: Image.Image) -> dict[str, tuple[float, float] | None]:
        """Predicted point of each concept (None where it looks absent) — the evaluation runner's grounding hook."""
        return {loc.concept_id: (loc.peak if loc.present else None) for loc in self.locations(image)}

    # ------------------------------------------------------------------ answering
    def clear_cache(self) -> None:
        """Forget the remembered model outputs (after the model or the bank's rows were changed in place)."""
        self._outputs.clear()

    def _remembered(self, key: Hashable, compute: Callable[[], object]) -> object:
        """The model's output for these exact inputs, from the cache when it was computed before (LRU)."""
        if self.cache_size <= 0:
            return compute()
        if key in self._outputs:
            self._outputs.move_to_end(key)
            self.cache_hits += 1
            return self._outputs[key]
        value = self._outputs[key] = compute()
        while len(self._outputs) > self.cache_size:
            self._outputs.popitem(last=False)
        return value

    def introduced(self, question: str, locations: list[Location]) -> list[str]:
        """The concepts the system text introduces: all of them, or with `introduce="relevant"` only those the
        question names as `<id>` or the locator finds in the photo, so that the prompt stays short however many
        concepts the bank holds. A bank trained with `introduce="relevant"` answers that way by default."""
        if self.introduce == "all":
            return list(self.bank.concept_ids)
        return self.tokens.relevant(question, [loc.concept_id for loc in locations if loc.present])

    def respond(
        self,
        image: Image.Image | None,
        question: str,
        visual_prompt: bool = True,
        max_new_tokens: int = 64,
        locate: bool = False,
    ) -> Answer:
        """Answer with details (system text, locations, marks); `locate` also locates the concepts (in the answer's
        `locations`, from the same visual tokens) when the visual prompt is off. A question about a photo that asks
        whether several concepts are all there is asked once per concept (`parts`), unless `joint` is on."""
        question = (question or "").strip()
        if not question:
            raise McLlavaError("the question is empty")
        if len(question) > MAX_QUESTION_CHARS:
            raise McLlavaError(f"the question is {len(question)} characters long; the limit is {MAX_QUESTION_CHARS}")
        # a format instruction is taken off where the assistant puts the answer in that form itself
        stripped, form = split_format(question)
        choice = None if self.generate_choices else choice_question(stripped)
        if form == "word" or choice:
            question = stripped
        features, locations, marks, marked = None, [], {}, None
        if image is not None:
            image = image.convert("RGB")
            features = self.backbone.visual_tokens([image]).features[0]
            if visual_prompt or locate or self.introduce == "relevant":
                locations = self.locations(image, features)
            if visual_prompt and any(loc.present for loc in locations):
                marked, marks = draw_marks(image, locations, max_marks=self.locate_config.max_marks)
                features = self.backbone.visual_tokens([marked]).features[0]

        def system_for(q: str) -> str:
            return self.tokens.system_text(self.introduced(q, locations), extra=mark_prompt(marks, self.tokens.token))

        def prompt(q: str, system: str) -> str:
            return self.backbone.format_prompt(q, system, image=features is not None)

        seen = digest(features) if self.cache_size > 0 else None  # hashing large visual tokens costs when unused

        def reply(q: str, system: str, prefix: str = "", suppress: list[int] = ()) -> str:
            asked, avoid = prompt(q, system), [*self.never_say, *suppress]
            return self._remembered(
                ("generate", asked, seen, max_new_tokens, tuple(avoid), prefix),
                lambda: self.backbone.generate(asked, features, max_new_tokens, suppress=avoid, prefix=prefix),
            )

        def recognise(cids: list[str]) -> dict[str, str]:  # each concept asked about on its own, same visual tokens
            return {c: reply(q, system_for(q)) for c in cids for q in [recognition_question([c])]}

        parts: dict[str, str] = {}
        system = system_for(question)
        together = self.asked_together(question) if image is not None else None
        if choice:  # the options ranked by the model, the reply the best one's letter
            stem, options = choice
            system = system_for(stem)
            asked, answers = prompt(stem, system), list(options.values())
            scores = self._remembered(
                ("scores", asked, seen, tuple(answers)), lambda: self.backbone.answer_scores(asked, answers, features)
            )
            parts = {letter: f"{score:.4f}" for letter, score in zip(options, scores)}
            text = max(zip(scores, options))[1]
        elif together:  # Yes only if all are there
            parts = recognise(together)
            text = together_answer(parts, self.tokens.token)
        elif image is not None and self.asks_caption(
            question
        ):  # the names are the recognition's, the words the model's
            parts = recognise(self.introduced(question, locations))
            found = [self.tokens.token(c) for c, t in parts.items() if parse_yes_no(t) is True]
            # every name is said once, at the start, or never
            text = reply(question, system, prefix=join_names(found) if found else "", suppress=self.tokens.name_ids)
        else:
            text = reply(question, system)
        if form == "word" and (yes := parse_yes_no(text)) is not None:
            text = "Yes" if yes else "No"
        return Answer(
            text=text,
            system=system,
            locations=locations if visual_prompt or locate else [],
            marks=marks,
            marked_image=marked,
            parts=parts,
        )

    def asks_caption(self, question: str) -> bool:
        """Whether `respond` answers this question about a photo as a caption built on per-concept recognition."""
        return not self.free_captions and asks_caption(question)

    def answers_whole(self, question: str, with_image: bool) -> bool:
        """Whether `respond` puts its answer together itself, so that the model's own output is not the final text
        (a server cannot stream it token by token): a ranked choice, a yes/no answer reduced to the word asked
        for, and about a photo a "both" question or a caption (one question per concept first)."""
        stripped, form = split_format(question)
        if form == "word" or (not self.generate_choices and choice_question(stripped)):
            return True
        return with_image and (bool(self.asked_together(stripped)) or self.asks_caption(stripped))

    def asked_together(self, question: str) -> list[str] | None:
        """The concepts `respond` will ask about one at a time for this question about a photo (None: asked as is)."""
        return asked_together(question, self.bank.concept_ids) if not self.joint else None

    def answer(
        self, image: Image.Image | None, question: str, visual_prompt: bool = True, max_new_tokens: int = 64
    ) -> str:
        """The answer text to a question about a photo (or about the concepts alone, with no photo)."""
        return self.respond(image, question, visual_prompt, max_new_tokens).text

    def caption(self, image: Image.Image, visual_prompt: bool = True) -> str:
        """A caption that names the personal concepts it recognises."""
        return self.answer(image, CAPTION_QUESTION, visual_prompt)


class AssistantAnswerer:
    """Adapts a PersonalAssistant to the evaluation runner's `Answerer` protocol (visual prompt on or off).

    With `keep_marks`, `marked` maps each question's index (the runner asks in record order) to the photo with
    its concept marks, for the HTML report; without the visual prompt the marks are computed for the report only.
    """

    def __init__(
        self,
        assistant: PersonalAssistant,
        visual_prompt: bool = True,
        max_new_tokens: int = 64,
        keep_marks: bool = False,
    ):
        self.assistant, self.visual_prompt, self.max_new_tokens = assistant, visual_prompt, max_new_tokens
        self.names, self.keep_marks, self.marked = assistant.names, keep_marks, {}
        self._n = 0

    def answer(self, image: Image.Image | None, question: str) -> str:
        reply = self.assistant.respond(image, question, self.visual_prompt, self.max_new_tokens, locate=self.keep_marks)
        if self.keep_marks and image is not None:
            marked = reply.marked_image
            if marked is None and any(
                loc.present for loc in reply.locations
            ):  # visual prompt off: marks for the report
                marked = draw_marks(
                    image.convert("RGB"), reply.locations, max_marks=self.assistant.locate_config.max_marks
                )[0]
            if marked is not None:
                self.marked[self._n] = marked
        self._n += 1
        return reply.text

    def locate(self, image: Image.Image) -> dict[str, tuple[float, float] | None]:
        self._n += 1
        return self.assistant.locate(image)
