"""ASGI middleware that answers before the app reads a body: the API key, the content type, the body's size."""

from __future__ import annotations

import json

from .keys import KEY_BANKS, KeyRing
from .limits import ApiError


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

    def __init__(self, app, api_key: "str | KeyRing | None"):
        self.app = app
        self.keys = api_key if isinstance(api_key, KeyRing) else KeyRing({api_key: None} if api_key else {})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.keys:
            auth = headers.get(b"authorization", b"")
            given = [g for g in (auth[7:].strip() if auth[:7].lower() == b"bearer " else None, headers.get(b"x-api-key"))
                     if g is not None]
            found, banks = self.keys.match(given)
            if not found:
                return await _refuse(send, 401, "missing or wrong API key: send Authorization: Bearer KEY or X-API-Key: KEY",
                                     "authentication_error", [(b"www-authenticate", b"Bearer")])
            scope.setdefault("state", {})[KEY_BANKS] = banks  # the routes refuse the banks this key may not use
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

