"""The routes' work: a chat request to an answer (plain or streamed), a photo to its concepts' locations."""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi.responses import StreamingResponse
from PIL import Image
from transformers import TextIteratorStreamer

from ..errors import McLlavaError
from ..locate import draw_marks
from .banks import pick, served_banks
from .images import ImageDecoder, image_data_url
from .limits import ApiError, ServerLimits, error_body
from .params import ChatPlan, StopText, plan_chat
from .schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatExtras,
    ChatOptions,
    ChatRequest,
    Choice,
    ChunkChoice,
    Delta,
    LocateResponse,
    LocationOut,
    Usage,
)
from .served import ServedBank, generation_hook

log = logging.getLogger("mcllava.server")


def _location(loc, names: dict[str, str]) -> LocationOut:
    return LocationOut(
        concept=loc.concept_id,
        name=names.get(loc.concept_id, loc.concept_id),
        score=round(float(loc.score), 6),
        present=bool(loc.present),
        peak=tuple(float(v) for v in loc.peak),
        box=None if loc.box is None else tuple(float(v) for v in loc.box),
    )


class Server:
    """What the routes share: the limits, the image decoder and the served banks (see `ServedBank`): one
    assistant's bank, or every bank of a `SharedBase`, by model id; `bank` is the first."""

    def __init__(self, assistant, limits: ServerLimits, concepts_dir: str | Path | None = None):
        self.limits = limits
        self._tmp = tempfile.TemporaryDirectory(prefix="mcllava-serve-")
        self.images = ImageDecoder(limits, Path(self._tmp.name))
        self.banks: dict[str, ServedBank] = served_banks(
            assistant, limits.max_queue, concepts_dir, private_paths=(self._tmp.name,)
        )
        self.bank = next(iter(self.banks.values()))

    def scrub(self, message: str) -> str:
        """Remove every served bank's server paths from a message meant for a client."""
        for bank in self.banks.values():
            message = bank.scrub(message)
        return message

    def pick(self, model: str | None, allowed: frozenset[str] | None = None) -> ServedBank:
        """The bank a request names (see `banks.pick`): 404 for an unknown model, 403 for one the key may not use."""
        return pick(self.banks, model, allowed)

    # ------------------------------------------------------------------ chat
    def extras(self, result, return_image: bool, bank: ServedBank | None = None) -> ChatExtras:
        names = (bank or self.bank).assistant.names
        marked = image_data_url(result.marked_image) if return_image and result.marked_image is not None else None
        return ChatExtras(
            marks={str(n): c for n, c in result.marks.items()},
            locations=[_location(loc, names) for loc in result.locations],
            marked_image=marked,
            parts=result.parts,
        )

    def chat(self, req: ChatRequest, allowed: frozenset[str] | None = None) -> ChatCompletion | StreamingResponse:
        bank = self.pick(req.model, allowed)
        plan = plan_chat(req, self.limits, bank, self.images)
        opts = req.mcllava
        if req.stream:
            return self._stream(bank, plan, opts)
        with bank.gate(), bank.in_use() as assistant, generation_hook(assistant.backbone.model) as stats:
            result = assistant.respond(
                plan.image, plan.question, visual_prompt=opts.visual_prompt, max_new_tokens=plan.max_tokens
            )
        stop = StopText(plan.stops)
        text = stop.cut(result.text)
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=bank.model_id,
            choices=[Choice(message=AssistantMessage(content=text), finish_reason=_finish(stats, stop))],
            usage=_usage(stats),
            mcllava=self.extras(result, opts.return_image, bank),
        )

    def _stream(self, bank: ServedBank, plan: ChatPlan, opts: ChatOptions) -> StreamingResponse:
        """Token streaming: generation runs in a worker thread and feeds a `TextIteratorStreamer`. An answer put
        together from one question per concept ("are <a> and <b> both here?", a caption) is sent whole when it is ready."""
        bank.gate.admit()  # a full queue is a 503 now, not an error inside the stream
        streamer = TextIteratorStreamer(bank.assistant.backbone.tokenizer, skip_prompt=True, skip_special_tokens=True)
        whole = bank.assistant.answers_whole(plan.question, plan.image is not None)
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                with (
                    bank.gate.hold(),
                    bank.in_use() as assistant,
                    generation_hook(assistant.backbone.model, None if whole else streamer) as stats,
                ):
                    outcome["result"] = assistant.respond(
                        plan.image, plan.question, visual_prompt=opts.visual_prompt, max_new_tokens=plan.max_tokens
                    )
                outcome["stats"] = stats
                if whole:
                    streamer.on_finalized_text(outcome["result"].text)
            except BaseException as exc:  # reported in the stream; the worker must always end it
                outcome["error"] = exc
            finally:
                streamer.end()

        worker = threading.Thread(target=work, name="mcllava-generate", daemon=True)
        worker.start()
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        stop = StopText(plan.stops)

        def chunk(**fields) -> str:
            body = ChatCompletionChunk(id=cid, created=created, model=bank.model_id, **fields)
            return f"data: {body.model_dump_json()}\n\n"

        def events() -> Iterator[str]:
            yield chunk(choices=[ChunkChoice(delta=Delta(role="assistant", content=""))])
            started = False
            for text in streamer:
                if not started:
                    text = text.lstrip()
                    started = bool(text)
                text = stop.feed(text)
                if text:
                    yield chunk(choices=[ChunkChoice(delta=Delta(content=text))])
            worker.join()  # generate ends the streamer before `respond` returns
            rest = stop.finish().rstrip()
            if rest:
                yield chunk(choices=[ChunkChoice(delta=Delta(content=rest))])
            error = outcome.get("error")
            if error is not None:
                status, message, kind = self.describe(error)
                yield f"data: {json.dumps(error_body(message, kind))}\n\n"
            else:
                stats = outcome["stats"]
                yield chunk(
                    choices=[ChunkChoice(delta=Delta(), finish_reason=_finish(stats, stop))],
                    mcllava=self.extras(outcome["result"], opts.return_image, bank),
                )
                if plan.include_usage:
                    yield chunk(choices=[], usage=_usage(stats))
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    def describe(self, exc: BaseException) -> tuple[int, str, str]:
        """(status, client message, type) of an exception; unexpected ones are logged and named only generically."""
        if isinstance(exc, ApiError):
            return exc.status_code, self.scrub(str(exc.detail)), exc.kind
        if isinstance(exc, McLlavaError):
            return 400, self.scrub(str(exc)), "invalid_request_error"
        log.error("internal error while serving a request", exc_info=exc)
        return 500, "internal server error (the details are in the server's log)", "server_error"

    # ------------------------------------------------------------------ locate
    def locate(self, image: Image.Image, return_image: bool, bank: ServedBank | None = None) -> LocateResponse:
        bank = bank or self.bank
        with bank.gate(), bank.in_use() as assistant:
            locations = assistant.locations(image)
        names = bank.assistant.names
        marked, marks = draw_marks(image, locations, max_marks=bank.assistant.locate_config.max_marks)
        return LocateResponse(
            width=image.size[0],
            height=image.size[1],
            locations=[_location(loc, names) for loc in locations],
            marks={str(n): c for n, c in marks.items()},
            marked_image=image_data_url(marked) if return_image else None,
        )


def _finish(stats: dict, stop: StopText) -> str:
    return "stop" if stop.stopped or stats.get("stopped", True) else "length"


def _usage(stats: dict) -> Usage:
    prompt, completion = stats.get("prompt", 0), stats.get("completion", 0)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
