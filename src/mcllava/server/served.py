"""One bank's assistant as the server holds it: its model gate, its id and concept cards, its secret paths."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import ImageOps

from ..concepts import ConceptSet, load_image
from ..errors import ConceptError
from .images import image_data_url
from .limits import ApiError
from .schemas import ConceptOut

log = logging.getLogger("mcllava.server")
THUMBNAIL_SIDE = 128
PROMPT_MARGIN = 64  # tokens beyond the system text, template and photo: the visual prompt's words about its marks


class ModelGate:
    """One model call at a time; at most `max_queue` callers wait, the rest are refused with 503."""

    def __init__(self, max_queue: int):
        self.lock = threading.Lock()
        self.max_queue = max_queue
        self._queued = 0
        self._count = threading.Lock()

    def admit(self) -> None:
        """Join the queue, or raise 503 when it is full."""
        with self._count:
            if self._queued >= self.max_queue:
                raise ApiError(503, "the server is busy (the model's queue is full); retry later", "server_busy")
            self._queued += 1

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Wait for the model (after `admit`), leave the queue, and hold the model for the block."""
        try:
            self.lock.acquire()
        finally:
            with self._count:
                self._queued -= 1
        try:
            yield
        finally:
            self.lock.release()

    @contextmanager
    def __call__(self) -> Iterator[None]:
        self.admit()
        with self.hold():
            yield


@contextmanager
def generation_hook(model, streamer=None) -> Iterator[dict]:
    """Wrap `model.generate` for one call (under the model lock): pass `streamer`, record token counts.

    `Backbone.generate` has no streamer or count of its own; this keeps the one generation path and learns
    from it the prompt and answer lengths and whether it stopped at the end of turn.
    """
    stats: dict[str, Any] = {}
    original = model.generate
    shadowed = "generate" in vars(model)

    def generate(*args, **kwargs):
        if streamer is not None:
            kwargs["streamer"] = streamer
        out = original(*args, **kwargs)
        given = kwargs.get("input_ids")
        prompt = given.shape[1] if given is not None else kwargs["inputs_embeds"].shape[1]
        new = out[0, (given.shape[1] if given is not None else 0) :]
        eos = kwargs.get("eos_token_id")
        # an answer may take several calls (one per concept for "are <a> and <b> both here?"): add them up
        stats.update(
            prompt=stats.get("prompt", 0) + int(prompt), completion=stats.get("completion", 0) + int(new.numel())
        )
        stopped = new.numel() < kwargs.get("max_new_tokens", 1 << 30) or (eos is not None and int(new[-1]) == eos)
        stats["stopped"] = stats.get("stopped", True) and stopped
        return out

    model.generate = generate
    try:
        yield stats
    finally:
        if shadowed:
            model.generate = original
        else:
            del model.generate


class ServedBank:
    """The assistant of one bank as the routes use it: the gate to its model, the model id clients name, the
    concept cards, and the server paths (bank, base, concept folder) that no message to a client may contain."""

    def __init__(
        self,
        assistant,
        max_queue: int,
        concepts_dir: str | Path | None = None,
        private_paths: tuple[str, ...] = (),
        gate: ModelGate | None = None,
        model_id: str | None = None,
        use=None,
    ):
        """With several banks on one base, they share `gate`, each is named by `model_id` (its folder's name) and
        `use` (`SharedBase.use` for this bank) puts it in the model for a request; one bank alone needs neither."""
        self.assistant = assistant
        self.gate = gate or ModelGate(max_queue)
        bank = assistant.bank
        self.model_id = model_id or (f"mcllava-{bank.path.name}" if bank.path is not None else "mcllava")
        self._use = use
        self.created = int(time.time())
        self.concepts = self._concept_cards(concepts_dir)
        backbone = assistant.backbone
        text_config = getattr(backbone.model.config, "text_config", backbone.model.config)
        self.context: int = getattr(text_config, "max_position_embeddings", None) or 1 << 20
        empty = backbone.format_prompt("", assistant.tokens.system_text(), image=True)
        self.prompt_overhead = len(backbone.encode(empty).input_ids) + PROMPT_MARGIN
        secret_paths = [str(p) for p in (bank.path, bank.base_model, concepts_dir, *private_paths) if p]
        self._secrets = sorted({s for s in secret_paths if os.sep in s or Path(s).exists()}, key=len, reverse=True)

    def count_tokens(self, text: str) -> int:
        """How many tokens `text` is as a question."""
        return len(self.assistant.backbone.tokenizer(text, add_special_tokens=False)["input_ids"])

    def question_room(self, max_tokens: int) -> int:
        """How many tokens of the model's context are left for a question answered in `max_tokens` tokens."""
        return max(0, self.context - self.prompt_overhead - max_tokens)

    @contextmanager
    def in_use(self) -> Iterator[Any]:
        """The assistant, with this bank's rows in the model for the block (hold the gate around it)."""
        if self._use is None:
            yield self.assistant
        else:
            with self._use() as assistant:
                yield assistant

    @property
    def names(self) -> dict[str, str]:
        return self.assistant.names

    def scrub(self, message: str) -> str:
        """Remove server paths (bank, base model, temporary folder) from a message meant for a client."""
        for secret in self._secrets:
            message = message.replace(secret, "<server path>")
        return message

    def _concept_cards(self, concepts_dir) -> list[ConceptOut]:
        bank = self.assistant.bank
        thumbs: dict[str, str] = {}
        for cid in bank.concept_ids:
            given = (bank.display.get(cid) or {}).get("thumbnail")
            if isinstance(given, str) and given.startswith("data:image/"):
                thumbs[cid] = given
        if concepts_dir is not None:
            for concept in ConceptSet.load(concepts_dir, check_images=False).concepts:
                if concept.id in bank.concept_ids and concept.id not in thumbs and concept.images:
                    try:
                        photo = ImageOps.fit(load_image(concept.images[0].path), (THUMBNAIL_SIDE, THUMBNAIL_SIDE))
                        thumbs[concept.id] = image_data_url(photo, THUMBNAIL_SIDE)
                    except ConceptError as exc:
                        log.warning("no thumbnail for %s: %s", concept.id, exc)
        cards = []
        for cid in bank.concept_ids:
            info = {k: v for k, v in (bank.display.get(cid) or {}).items() if isinstance(v, str)}
            cards.append(
                ConceptOut(
                    id=cid,
                    token=f"<{cid}>",
                    name=self.assistant.names[cid],
                    category=info.get("category"),
                    description=info.get("description"),
                    thumbnail=thumbs.get(cid),
                )
            )
        return cards
