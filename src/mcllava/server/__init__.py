"""HTTP API and web page for a personalised model (FastAPI): OpenAI-compatible chat, locate, concepts.

`create_app` wraps one `PersonalAssistant`, or the banks of a `multibank.SharedBase`, in a FastAPI app. The
model runs in one worker at a time behind a lock (`ModelGate`); requests queue for it and are refused with 503
when the queue is full. Every input is untrusted: bodies, images (decoded with `concepts.load_image`'s checks),
texts and message counts are bounded by `ServerLimits`, and every error is OpenAI's JSON body
``{"error": {"message", "type", "param", "code"}}`` that names no path. Without an API key, only the hosts the
server was started for are answered (DNS rebinding). See docs/server.md for the routes and examples.

Modules, bottom to top: `limits` (limits, the error), `schemas` (bodies), `images` (decoding), `keys` (API keys
and the banks each may use), `guards` (ASGI middleware), `served` (one bank's assistant and its model gate),
`banks` (which bank a request is for, with several banks on one base), `params` (a chat request's parameters),
`service` (the routes' work), `app` (the app), `runner` (uvicorn with timeouts and a cap on connections).
"""

from .app import create_app
from .limits import ApiError, ServerLimits, error_body
from .runner import run, uvicorn_config
from .schemas import ChatCompletion, ChatCompletionChunk, ChatRequest, LocateResponse
from .served import ModelGate, ServedBank
from .service import Server

__all__ = [
    "ApiError",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatRequest",
    "LocateResponse",
    "ModelGate",
    "ServedBank",
    "Server",
    "ServerLimits",
    "create_app",
    "error_body",
    "run",
    "uvicorn_config",
]
