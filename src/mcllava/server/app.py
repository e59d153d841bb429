"""`create_app`: the FastAPI app, its routes, its error handlers and its API description."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from .. import __version__
from ..assistant import PersonalAssistant
from ..errors import McLlavaError
from .banks import ModelError, bank_name, visible
from .guards import BodyLimit, RequestGuard
from .keys import KeyRing, key_banks
from .limits import ApiError, ServerLimits, error_body
from .schemas import (
    ERRORS,
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    ConceptList,
    Health,
    LocateRequest,
    LocateResponse,
    ModelCard,
    ModelList,
)
from .service import Server

STATIC = Path(__file__).resolve().parent.parent / "static"


LOCATE_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/LocateRequest"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {
                    "image": {
                        "type": "string",
                        "format": "binary",
                        "description": "The photo (JPEG, PNG, WebP or BMP).",
                    },
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
    assistant_or_bank_path,
    api_key: str | KeyRing | None = None,
    limits: ServerLimits = ServerLimits(),
    concepts_dir: str | Path | None = None,
    allowed_hosts: Iterable[str] = (),
    base: str | None = None,
) -> FastAPI:
    """The FastAPI app serving one assistant (or the bank at a path, on the base model it names or on `base`), or
    the banks of a `SharedBase` (several banks on one base; a request's `model` picks one).

    With `api_key` (a key, or a `KeyRing` of keys each limited to some banks), every route but /health, the web
    page and the API description answers 401 without ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``, and
    403 for a bank the key may not use. Without one, only requests naming a loopback host or one of
    `allowed_hosts` in Host are answered (``"*"``: any), and none from a page of another origin.
    """
    if isinstance(api_key, str) and not api_key.strip():
        raise McLlavaError("the API key is empty: give a real key, or none to serve on this machine only")
    if isinstance(assistant_or_bank_path, (str, Path)):
        assistant_or_bank_path = PersonalAssistant.load(assistant_or_bank_path, base)
    server = Server(assistant_or_bank_path, limits, concepts_dir)
    if isinstance(api_key, KeyRing):
        api_key.check_banks(bank_name(b) for b in server.banks.values())
    app = FastAPI(
        title="mcllava",
        version=__version__,
        summary="A vision-language model personalised with your concepts: OpenAI-compatible chat, locate, concepts.",
    )
    app.state.server = server
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, timeout_s=limits.body_timeout_s)
    app.add_middleware(
        RequestGuard, api_key=api_key, allowed_hosts=allowed_hosts
    )  # outermost: no body is read before the key is checked
    _install_error_handlers(app, server)

    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: KEY")

    def require_key(
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer), key: str | None = Depends(header)
    ) -> None:
        """Declares the two key schemes in the OpenAPI schema; `RequestGuard` checks the key, before any body is read."""

    guarded = {"dependencies": [Depends(require_key)]} if api_key else {}

    @app.get("/health", response_model=Health, tags=["service"])
    def health() -> Health:
        """Liveness: answers without a key and says nothing about the concepts."""
        return Health(version=__version__)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={200: STREAM_DOC, **ERRORS},
        tags=["chat"],
        **guarded,
    )
    def chat_completions(req: ChatRequest, request: Request):
        """Answer the last user message's question about its photo (OpenAI chat completions, with `stream`); `model`
        names the bank (any name will do on a server of one bank)."""
        return server.chat(req, key_banks(request))

    @app.post(
        "/v1/locate",
        response_model=LocateResponse,
        responses=ERRORS,
        openapi_extra={"requestBody": LOCATE_BODY},
        tags=["concepts"],
        **guarded,
    )
    async def locate(request: Request, model: str | None = None) -> LocateResponse:
        """Each concept's presence score, peak and box in a photo (JSON with a data URL, or a multipart upload);
        `?model=` names the bank where the server holds several."""
        bank = server.pick(model, key_banks(request))
        image, return_image = await _locate_input(request, server)
        return await run_in_threadpool(server.locate, image, return_image, bank)

    @app.get("/v1/concepts", response_model=ConceptList, responses=ERRORS, tags=["concepts"], **guarded)
    def concepts(request: Request, model: str | None = None) -> ConceptList:
        """The bank's concepts: ids, tokens to use in questions, display names, categories and thumbnails; `?model=`
        names the bank where the server holds several."""
        return ConceptList(data=server.pick(model, key_banks(request)).concepts)

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS, tags=["chat"], **guarded)
    def models(request: Request) -> ModelList:
        """The banks served, as models (for OpenAI clients that list models first): those the key may use."""
        return ModelList(
            data=[ModelCard(id=b.model_id, created=b.created) for b in visible(server.banks, key_banks(request))]
        )

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses=ERRORS, tags=["chat"], **guarded)
    def model(model_id: str, request: Request) -> ModelCard:
        """A served bank, by its id (404 for any other, or one the key may not use)."""
        served = visible(server.banks, key_banks(request))
        for b in served:
            if b.model_id == model_id:
                return ModelCard(id=b.model_id, created=b.created)
        ids = ", ".join(f"'{b.model_id}'" for b in served[:10]) + (
            " and more (GET /v1/models)" if len(served) > 10 else ""
        )
        raise ApiError(
            404,
            f"no model '{model_id[:200]}' here: this server serves {ids or 'no model you may use'}",
            param="model",
            code="model_not_found",
        )

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


def _param(loc: tuple) -> str | None:
    """A pydantic error location as OpenAI names a parameter: ('body', 'messages', 0, 'role') -> 'messages[0].role'."""
    out = ""
    for part in loc:
        if part == "body":
            continue
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or None


def _install_error_handlers(app: FastAPI, server: Server) -> None:
    """Every error becomes OpenAI's ``{"error": {"message", "type", "param", "code"}}``; nothing leaks paths or tracebacks."""

    def reply(
        status: int,
        message: str,
        kind: str,
        headers: dict | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> JSONResponse:
        return JSONResponse(error_body(message, kind, param, code), status_code=status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if isinstance(exc, ModelError):
            return reply(
                exc.status_code,
                server.scrub(str(exc.detail)),
                exc.kind,
                exc.headers,
                param=exc.param,
                code=exc.code,
            )
        if isinstance(exc, ApiError):
            return reply(exc.status_code, server.scrub(str(exc.detail)), exc.kind, exc.headers, exc.param, exc.code)
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request_error")
        return reply(exc.status_code, str(exc.detail), kind, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        """A request that does not match the schema: 400 naming the first parameter at fault, as OpenAI does."""
        errors = exc.errors()
        problems = [f"{_param(e.get('loc', ())) or 'body'}: {e.get('msg', 'invalid')}" for e in errors[:5]]
        first = errors[0] if errors else {}
        code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_value"
        return reply(
            400,
            ("invalid request: " + "; ".join(problems))[:1000],
            "invalid_request_error",
            param=_param(first.get("loc", ())),
            code=code,
        )

    @app.exception_handler(McLlavaError)
    async def refused(request: Request, exc: McLlavaError) -> JSONResponse:
        return reply(*server.describe(exc))

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        return reply(*server.describe(exc))


def _document_extra_schemas(app: FastAPI) -> None:
    """Add to the OpenAPI components the models that routes use outside FastAPI's view: the streamed chunk
    (inside the event stream) and the locate request (parsed by hand, as it may also come as a form); and drop
    FastAPI's 422, which this API never answers."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for operations in schema.get("paths", {}).values():  # schema errors are 400s here, as in OpenAI's API
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            for model, mode in ((ChatCompletionChunk, "serialization"), (LocateRequest, "validation")):
                sub = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
                for name, definition in sub.pop("$defs", {}).items():
                    components.setdefault(name, definition)
                components[model.__name__] = sub
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
