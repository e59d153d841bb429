"""What every part of the server shares: the request limits and the error it answers with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException

DEFAULT_MAX_TOKENS = 64


@dataclass(frozen=True)
class ServerLimits:
    """What one request may send and how long it may take; each size limit is answered with 413 and a message
    naming it, a slow body with 408, a full model queue with 503."""

    max_body_bytes: int = 16 * 2**20
    max_image_bytes: int = 10 * 2**20
    max_pixels: int = 25_000_000
    max_aspect_ratio: float = 20.0  # longer side / shorter side of a photo
    max_text_chars: int = 4000
    max_question_tokens: int = 2048  # and never more than the model's context leaves for the question
    max_messages: int = 32
    max_new_tokens: int = 256
    max_queue: int = 32  # requests waiting for the model; more are refused with 503
    header_timeout_s: float = 10.0  # a connection must send a request's headers within this
    body_timeout_s: float = 60.0  # and its whole body within this after the headers
    keep_alive_s: float = 5.0  # an idle connection is closed after this
    max_header_bytes: int = 16 * 1024
    max_connections: int = 64  # open connections; a request beyond them gets 503


def error_body(
    message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ApiError(HTTPException):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        headers: dict | None = None,
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.kind, self.param, self.code = kind, param, code
