"""What every part of the server shares: the request limits and the error it answers with."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.exceptions import HTTPException

DEFAULT_MAX_TOKENS = 64


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

