"""HTTP API and web page for a personalised model (FastAPI): OpenAI-compatible chat, locate, concepts.

`create_app` wraps one `PersonalAssistant` in a FastAPI app. The model runs in one worker at a time behind a
lock (`ModelGate`); requests queue for it and are refused with 503 when the queue is full. Every input is
untrusted: bodies, images (decoded with `concepts.load_image`'s checks), texts and message counts are bounded
by `ServerLimits`, and every error is a JSON body ``{"error": {"message", "type"}}`` that names no path.
See docs/server.md for the routes and examples.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import logging
import os
import tempfile
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Union

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from transformers import TextIteratorStreamer

from .assistant import PersonalAssistant
from .concepts import IMAGE_FORMATS, ConceptSet, ImageLimits, load_image
from .errors import ConceptError, McLlavaError
from .locate import draw_marks
from .version import __version__

log = logging.getLogger("mcllava.server")
STATIC = Path(__file__).with_name("static")
DEFAULT_MAX_TOKENS = 64
RETURNED_IMAGE_SIDE = 1024  # marked images come back at most this large (JPEG)
THUMBNAIL_SIDE = 128


@dataclass(frozen=True)
class ServerLimits:
    """What one request may send; each limit is answered with 413 and a message naming it."""

    max_body_bytes: int = 16 * 2**20
    max_image_bytes: int = 10 * 2**20
    max_pixels: int = 25_000_000
    max_text_chars: int = 4000
    max_messages: int = 32
    max_new_tokens: int = 256
    max_queue: int = 32  # requests waiting for the model; more are refused with 503


class ApiError(HTTPException):
    """An error answered as ``{"error": {"message", "type"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.kind = kind


# --------------------------------------------------------------------------------------------- schemas


class ErrorBody(BaseModel):
    message: str
    type: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class ImageURL(BaseModel):
    url: str = Field(description="A data URL, data:image/png;base64,... (JPEG, PNG, WebP or BMP). Remote URLs are refused.")
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]] | None = None
    name: str | None = None

    def texts(self) -> list[str]:
        if isinstance(self.content, str):
            return [self.content]
        return [p.text for p in self.content or [] if isinstance(p, TextPart)]

    def images(self) -> list[str]:
        return [] if isinstance(self.content, (str, type(None))) else [p.image_url.url for p in self.content if isinstance(p, ImagePart)]


class ChatOptions(BaseModel):
    """mcllava's extension of the request: the personalised visual prompt and the marked image."""

    visual_prompt: bool = Field(True, description="Locate the concepts and draw numbered marks before answering.")
    return_image: bool = Field(False, description="Return the marked image (when marks were drawn) as a data URL.")


class ChatRequest(BaseModel):
    """OpenAI's chat request. The last user message is the question (its image, if any, the photo); earlier
    turns and system messages are ignored: the model answers one question at a time, and its system text is
    the concept introductions. Decoding is greedy: sampling fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    mcllava: ChatOptions = Field(default_factory=ChatOptions)


class LocationOut(BaseModel):
    concept: str
    name: str
    score: float = Field(description="Presence score in [0, 1].")
    present: bool
    peak: tuple[float, float] = Field(description="(x, y) in pixels of the sent image.")
    box: tuple[float, float, float, float] | None = Field(description="(x0, y0, x1, y1) in pixels, when present.")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Prompt tokens, image tokens included.")
    completion_tokens: int
    total_tokens: int


class ChatExtras(BaseModel):
    marks: dict[str, str] = Field(description="Mark number -> concept id, as drawn on the image.")
    locations: list[LocationOut]
    marked_image: str | None = Field(None, description="The marked image (JPEG data URL) when asked for and marks were drawn.")
    parts: dict[str, str] = Field(default_factory=dict, description="For 'are <a> and <b> both here?' and captions: concept id -> its own answer to 'Is <c> in this photo?'.")


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    mcllava: ChatExtras


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed answer; the last one carries finish_reason, usage and mcllava."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    mcllava: ChatExtras | None = None


class LocateRequest(BaseModel):
    image: str = Field(description="A data URL, data:image/png;base64,...")
    return_image: bool = False


class LocateResponse(BaseModel):
    width: int
    height: int
    locations: list[LocationOut]
    marks: dict[str, str]
    marked_image: str | None = Field(None, description="The image with numbered marks (JPEG data URL), if asked for.")


class ConceptOut(BaseModel):
    id: str
    token: str = Field(description="How to name the concept in a question, e.g. <bo>.")
    name: str
    category: str | None = None
    description: str | None = None
    thumbnail: str | None = Field(None, description="A small JPEG data URL, when the bank or --concepts folder has one.")


class ConceptList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ConceptOut]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mcllava"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": words}
    for code, words in {
        400: "Invalid input (bad image, empty question, ...)",
        401: "Missing or wrong API key",
        413: "A limit was exceeded (body, image bytes, pixels, text, messages, tokens)",
        415: "Unsupported content type (chat: application/json; locate: JSON or multipart/form-data)",
        422: "The request does not match the schema",
        500: "Internal error (details are logged by the server, never sent)",
        503: "The queue for the model is full; retry later",
    }.items()
}


# ---------------------------------------------------------------------------------------------- plumbing


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
        stats.update(prompt=stats.get("prompt", 0) + int(prompt), completion=stats.get("completion", 0) + int(new.numel()))
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


class BodyLimit:
    """ASGI middleware: refuse bodies over `max_bytes` (by Content-Length, or while they stream in)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            status, message = (413, self._message()) if length.isdigit() else (400, "invalid Content-Length header")
            body = json.dumps({"error": {"message": message, "type": "limit_exceeded" if status == 413 else "invalid_request_error"}}).encode()
            await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise ApiError(413, self._message(), "limit_exceeded")
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"the request body is larger than the limit of {self.max_bytes:,} bytes"


class RequestGuard:
    """ASGI middleware that answers before any body is read: with an API key, 401 on /v1/* without the right key
    (else a malformed body would get 422 first); and 415 for a chat request whose body is not JSON."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.expected = api_key.encode("utf-8") if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None:
            auth = headers.get(b"authorization", b"")
            given = [g for g in (auth[7:].strip() if auth[:7].lower() == b"bearer " else None, headers.get(b"x-api-key"))
                     if g is not None]
            if not any(hmac.compare_digest(g, self.expected) for g in given):
                return await _refuse(send, 401, "missing or wrong API key: send Authorization: Bearer KEY or X-API-Key: KEY",
                                     "authentication_error", [(b"www-authenticate", b"Bearer")])
        if scope["path"] == "/v1/chat/completions" and scope["method"] == "POST":
            ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if ctype != b"application/json":
                return await _refuse(send, 415 if ctype else 400, "send the chat request as JSON (Content-Type: application/json)",
                                     "invalid_request_error")
        await self.app(scope, receive, send)


async def _refuse(send, status: int, message: str, kind: str, headers: list | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": kind}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _location(loc, names: dict[str, str]) -> LocationOut:
    return LocationOut(
        concept=loc.concept_id, name=names.get(loc.concept_id, loc.concept_id), score=round(float(loc.score), 6),
        present=bool(loc.present), peak=tuple(float(v) for v in loc.peak), box=None if loc.box is None else tuple(float(v) for v in loc.box),
    )


def image_data_url(image: Image.Image, side: int = RETURNED_IMAGE_SIDE, fmt: str = "JPEG") -> str:
    """A (downscaled) copy of `image` as a data URL."""
    image = image.convert("RGB")
    if max(image.size) > side:
        image = image.copy()
        image.thumbnail((side, side))
    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=88)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class ImageDecoder:
    """Untrusted image bytes or data URLs -> RGB images, with `ServerLimits` and `load_image`'s validation.

    Bytes are checked for size and header pixel count in memory, then written under a private temporary
    folder with a random name (never the client's file name) for `load_image`, and deleted at once.
    """

    def __init__(self, limits: ServerLimits, folder: Path):
        self.limits, self.folder = limits, folder

    def from_data_url(self, url: str) -> Image.Image:
        if not url.startswith("data:"):
            raise ApiError(400, "images must be sent as data URLs (data:image/png;base64,...); remote image URLs are not fetched", "invalid_image")
        head, comma, payload = url.partition(",")
        if not comma or not head.lower().endswith(";base64") or not head.lower().startswith("data:image/"):
            raise ApiError(400, "the image data URL must be of the form data:image/<type>;base64,<data>", "invalid_image")
        payload = "".join(payload.split())
        if len(payload) // 4 * 3 > self.limits.max_image_bytes + 2:
            raise self._too_many_bytes()
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "the image data URL is not valid base64", "invalid_image") from None
        return self.from_bytes(data)

    def _too_many_bytes(self) -> ApiError:
        return ApiError(413, f"the image is larger than the limit of {self.limits.max_image_bytes:,} bytes", "limit_exceeded")

    def from_bytes(self, data: bytes) -> Image.Image:
        if not data:
            raise ApiError(400, "the image is empty (0 bytes)", "invalid_image")
        if len(data) > self.limits.max_image_bytes:
            raise self._too_many_bytes()
        too_many = ApiError(413, f"the image has more pixels than the limit of {self.limits.max_pixels:,}", "limit_exceeded")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
                    width, height = im.size
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise too_many from None
        except Exception:
            raise ApiError(400, "cannot read the image: corrupt, truncated, or not JPEG, PNG, WebP or BMP", "invalid_image") from None
        if width * height > self.limits.max_pixels:
            raise too_many
        path = self.folder / f"{uuid.uuid4().hex}.img"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return load_image(path, ImageLimits(max_pixels=self.limits.max_pixels, max_bytes=self.limits.max_image_bytes))
        except ConceptError as exc:
            raise ApiError(400, str(exc).replace(str(path), "image"), "invalid_image") from None
        finally:
            path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------- app


class Server:
    """The assistant plus what the routes share: limits, the model gate, the image decoder, concept cards."""

    def __init__(self, assistant, limits: ServerLimits, concepts_dir: str | Path | None = None):
        self.assistant = assistant
        self.limits = limits
        self.gate = ModelGate(limits.max_queue)
        self._tmp = tempfile.TemporaryDirectory(prefix="mcllava-serve-")
        self.images = ImageDecoder(limits, Path(self._tmp.name))
        bank = assistant.bank
        self.model_id = f"mcllava-{bank.path.name}" if bank.path is not None else "mcllava"
        self.created = int(time.time())
        self.concepts = self._concept_cards(concepts_dir)
        secret_paths = [str(p) for p in (bank.path, bank.base_model, self._tmp.name, concepts_dir) if p]
        self._secrets = sorted({s for s in secret_paths if os.sep in s or Path(s).exists()}, key=len, reverse=True)

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
            cards.append(ConceptOut(id=cid, token=f"<{cid}>", name=self.assistant.names[cid], category=info.get("category"), description=info.get("description"), thumbnail=thumbs.get(cid)))
        return cards

    # ------------------------------------------------------------------ chat
    def parse_chat(self, req: ChatRequest) -> tuple[str, Image.Image | None, int]:
        """The question, the photo and the answer length of a chat request, with every limit checked."""
        lim = self.limits
        if len(req.messages) > lim.max_messages:
            raise ApiError(413, f"{len(req.messages)} messages; the limit is {lim.max_messages}", "limit_exceeded")
        for m in req.messages:
            if sum(len(t) for t in m.texts()) > lim.max_text_chars:
                raise ApiError(413, f"a {m.role} message is longer than the limit of {lim.max_text_chars:,} characters", "limit_exceeded")
        users = [m for m in req.messages if m.role == "user"]
        if not users:
            raise ApiError(400, "there is no user message to answer")
        question = "\n".join(users[-1].texts()).strip()
        if not question:
            raise ApiError(400, "the last user message has no text: ask a question")
        urls = users[-1].images()
        if len(urls) > 1:
            raise ApiError(400, f"the last user message has {len(urls)} images; send one photo per question")
        max_tokens = req.max_completion_tokens or req.max_tokens or min(DEFAULT_MAX_TOKENS, lim.max_new_tokens)
        if max_tokens > lim.max_new_tokens:
            raise ApiError(413, f"max_tokens is {max_tokens}; the limit is {lim.max_new_tokens}", "limit_exceeded")
        image = self.images.from_data_url(urls[0]) if urls else None
        return question, image, max_tokens

    def extras(self, result, return_image: bool) -> ChatExtras:
        names = self.assistant.names
        marked = image_data_url(result.marked_image) if return_image and result.marked_image is not None else None
        return ChatExtras(marks={str(n): c for n, c in result.marks.items()}, locations=[_location(l, names) for l in result.locations],
                          marked_image=marked, parts=result.parts)

    def chat(self, req: ChatRequest) -> ChatCompletion | StreamingResponse:
        question, image, max_tokens = self.parse_chat(req)
        opts = req.mcllava
        if req.stream:
            return self._stream(question, image, max_tokens, opts)
        with self.gate(), generation_hook(self.assistant.backbone.model) as stats:
            result = self.assistant.respond(image, question, visual_prompt=opts.visual_prompt, max_new_tokens=max_tokens)
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=self.model_id,
            choices=[Choice(message=AssistantMessage(content=result.text), finish_reason="stop" if stats.get("stopped", True) else "length")],
            usage=_usage(stats), mcllava=self.extras(result, opts.return_image),
        )

    def _stream(self, question: str, image, max_tokens: int, opts: ChatOptions) -> StreamingResponse:
        """Token streaming: generation runs in a worker thread and feeds a `TextIteratorStreamer`. An answer put
        together from one question per concept ("are <a> and <b> both here?", a caption) is sent whole when it is ready."""
        self.gate.admit()  # a full queue is a 503 now, not an error inside the stream
        streamer = TextIteratorStreamer(self.assistant.backbone.tokenizer, skip_prompt=True, skip_special_tokens=True)
        whole = image is not None and self.assistant.asks_per_concept(question)
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                with self.gate.hold(), generation_hook(self.assistant.backbone.model, None if whole else streamer) as stats:
                    outcome["result"] = self.assistant.respond(image, question, visual_prompt=opts.visual_prompt, max_new_tokens=max_tokens)
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

        def chunk(**fields) -> str:
            body = ChatCompletionChunk(id=cid, created=created, model=self.model_id, **fields)
            return f"data: {body.model_dump_json()}\n\n"

        def events() -> Iterator[str]:
            yield chunk(choices=[ChunkChoice(delta=Delta(role="assistant", content=""))])
            started = False
            for text in streamer:
                if not started:
                    text = text.lstrip()
                    started = bool(text)
                if text:
                    yield chunk(choices=[ChunkChoice(delta=Delta(content=text))])
            worker.join()  # generate ends the streamer before `respond` returns
            error = outcome.get("error")
            if error is not None:
                status, message, kind = self.describe(error)
                yield f"data: {json.dumps({'error': {'message': message, 'type': kind}})}\n\n"
            else:
                stats = outcome["stats"]
                yield chunk(
                    choices=[ChunkChoice(delta=Delta(), finish_reason="stop" if stats.get("stopped", True) else "length")],
                    usage=_usage(stats), mcllava=self.extras(outcome["result"], opts.return_image),
                )
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def describe(self, exc: BaseException) -> tuple[int, str, str]:
        """(status, client message, type) of an exception; unexpected ones are logged and named only generically."""
        if isinstance(exc, ApiError):
            return exc.status_code, self.scrub(str(exc.detail)), exc.kind
        if isinstance(exc, McLlavaError):
            return 400, self.scrub(str(exc)), "invalid_request_error"
        log.error("internal error while serving a request", exc_info=exc)
        return 500, "internal server error (the details are in the server's log)", "server_error"

    # ------------------------------------------------------------------ locate
    def locate(self, image: Image.Image, return_image: bool) -> LocateResponse:
        with self.gate():
            locations = self.assistant.locations(image)
        names = self.assistant.names
        marked, marks = draw_marks(image, locations, max_marks=self.assistant.locate_config.max_marks)
        return LocateResponse(
            width=image.size[0], height=image.size[1], locations=[_location(l, names) for l in locations],
            marks={str(n): c for n, c in marks.items()}, marked_image=image_data_url(marked) if return_image else None,
        )


def _usage(stats: dict) -> Usage:
    prompt, completion = stats.get("prompt", 0), stats.get("completion", 0)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


LOCATE_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/LocateRequest"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {
                    "image": {"type": "string", "format": "binary", "description": "The photo (JPEG, PNG, WebP or BMP)."},
                    "return_image": {"type": "boolean", "default": False},
                },
            }
        },
    },
}

STREAM_DOC = {
    "description": "The answer; with stream: true, server-sent events `data: <ChatCompletionChunk>` ending with `data: [DONE]`.",
    "content": {"text/event-stream": {"schema": {"$ref": "#/components/schemas/ChatCompletionChunk"}}},
}


def create_app(
    assistant_or_bank_path, api_key: str | None = None, limits: ServerLimits = ServerLimits(), concepts_dir: str | Path | None = None
) -> FastAPI:
    """The FastAPI app serving one assistant (or the bank at a path, on the base model it remembers).

    With `api_key`, every route but /health, the web page and the API description answers 401 without
    ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``.
    """
    if isinstance(assistant_or_bank_path, (str, Path)):
        assistant_or_bank_path = PersonalAssistant.load(assistant_or_bank_path)
    server = Server(assistant_or_bank_path, limits, concepts_dir)
    app = FastAPI(
        title="mcllava",
        version=__version__,
        summary="A vision-language model personalised with your concepts: OpenAI-compatible chat, locate, concepts.",
    )
    app.state.server = server
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(RequestGuard, api_key=api_key)  # outermost: no body is read before the key is checked
    _install_error_handlers(app, server)

    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: KEY")

    def require_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer), key: str | None = Depends(header)) -> None:
        """Declares the two key schemes in the OpenAPI schema; `RequestGuard` checks the key, before any body is read."""

    guarded = {"dependencies": [Depends(require_key)]} if api_key else {}

    @app.get("/health", response_model=Health, tags=["service"])
    def health() -> Health:
        """Liveness: answers without a key and says nothing about the concepts."""
        return Health(version=__version__)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses={200: STREAM_DOC, **ERRORS}, tags=["chat"], **guarded)
    def chat_completions(req: ChatRequest):
        """Answer the last user message's question about its photo (OpenAI chat completions, with `stream`)."""
        return server.chat(req)

    @app.post("/v1/locate", response_model=LocateResponse, responses=ERRORS, openapi_extra={"requestBody": LOCATE_BODY}, tags=["concepts"], **guarded)
    async def locate(request: Request) -> LocateResponse:
        """Each concept's presence score, peak and box in a photo (JSON with a data URL, or a multipart upload)."""
        image, return_image = await _locate_input(request, server)
        return await run_in_threadpool(server.locate, image, return_image)

    @app.get("/v1/concepts", response_model=ConceptList, responses=ERRORS, tags=["concepts"], **guarded)
    def concepts() -> ConceptList:
        """The bank's concepts: ids, tokens to use in questions, display names, categories and thumbnails."""
        return ConceptList(data=server.concepts)

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS, tags=["chat"], **guarded)
    def models() -> ModelList:
        """The one model served (for OpenAI clients that list models first)."""
        return ModelList(data=[ModelCard(id=server.model_id, created=server.created)])

    page_headers = {
        "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=page_headers)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _document_extra_schemas(app)
    return app


async def _locate_input(request: Request, server: Server) -> tuple[Image.Image, bool]:
    """The photo and `return_image` of a locate request, from JSON or from a multipart form."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=4)
        except HTTPException:
            raise
        except Exception:
            raise ApiError(400, "the multipart form could not be parsed") from None
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "the form needs a file field named 'image'")
        data = await upload.read(server.limits.max_image_bytes + 1)
        flag = str(form.get("return_image", "false")).strip().lower()
        if flag not in ("true", "false", "1", "0", "on", "off", "yes", "no"):
            raise ApiError(400, "return_image must be true or false")
        return await run_in_threadpool(server.images.from_bytes, data), flag in ("true", "1", "on", "yes")
    if ctype != "application/json":
        raise ApiError(415 if ctype else 400, "send JSON (application/json) or a multipart form (multipart/form-data)")
    try:
        req = LocateRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_input=False)) from None
    return await run_in_threadpool(server.images.from_data_url, req.image), req.return_image


def _install_error_handlers(app: FastAPI, server: Server) -> None:
    """Every error becomes ``{"error": {"message", "type"}}``; nothing leaks paths or tracebacks."""

    def reply(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if isinstance(exc, ApiError):
            return reply(exc.status_code, server.scrub(str(exc.detail)), exc.kind, exc.headers)
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request_error")
        return reply(exc.status_code, str(exc.detail), kind, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for e in exc.errors()[:5]:
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            problems.append(f"{where or 'body'}: {e.get('msg', 'invalid')}")
        return reply(422, ("invalid request: " + "; ".join(problems))[:1000], "invalid_request_error")

    @app.exception_handler(McLlavaError)
    async def refused(request: Request, exc: McLlavaError) -> JSONResponse:
        return reply(*server.describe(exc))

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        return reply(*server.describe(exc))


def _document_extra_schemas(app: FastAPI) -> None:
    """Add to the OpenAPI components the models that routes use outside FastAPI's view: the streamed chunk
    (inside the event stream) and the locate request (parsed by hand, as it may also come as a form)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model, mode in ((ChatCompletionChunk, "serialization"), (LocateRequest, "validation")):
                sub = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
                for name, definition in sub.pop("$defs", {}).items():
                    components.setdefault(name, definition)
                components[model.__name__] = sub
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
