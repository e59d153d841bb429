"""ASGI middleware that answers before the app reads a body: the API key, the Host and Origin of a server
without a key, the content type, the body's size and how long it takes to arrive."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from urllib.parse import urlsplit

from .keys import KEY_BANKS, KeyRing
from .limits import ApiError, error_body

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
ANY_HOST = "*"


def host_name(value: str) -> str:
    """The host of a Host header or of a URL's netloc, without port, brackets or a trailing dot, lower-cased."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


class BodyLimit:
    """ASGI middleware: refuse bodies over `max_bytes` (by Content-Length, or while they stream in) with 413, and
    bodies that have not all arrived `timeout_s` seconds after the request began with 408 (a client sending a
    byte at a time holds no connection for long)."""

    def __init__(self, app, max_bytes: int, timeout_s: float = 60.0):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            status, message = (413, self._message()) if length.isdigit() else (400, "invalid Content-Length header")
            return await refuse(
                send,
                status,
                message,
                "limit_exceeded" if status == 413 else "invalid_request_error",
                [(b"connection", b"close")],
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        seen, done = 0, False

        async def limited():
            nonlocal seen, done
            if done:  # the body is in: later calls wait for a disconnect, as long as a streamed answer lasts
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise ApiError(
                    408,
                    f"the request body did not arrive within {self.timeout_s:g} s of its headers",
                    "timeout",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise ApiError(413, self._message(), "limit_exceeded")
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"the request body is larger than the limit of {self.max_bytes:,} bytes"


class RequestGuard:
    """ASGI middleware that answers before any body is read.

    With an API key: 401 on /v1/* without a right key (else a malformed body would get 422 first), and the banks
    that key may use are left in the request's state. Without one: only the hosts the server was started for may
    be named in Host (else a web page could reach a local server through DNS rebinding), and a request from a page
    of another origin is refused. Always: 415 for a chat request whose body is not JSON.
    """

    def __init__(self, app, api_key: str | KeyRing | None, allowed_hosts: Iterable[str] = ()):
        self.app = app
        self.keys = api_key if isinstance(api_key, KeyRing) else KeyRing({api_key: None} if api_key is not None else {})
        hosts = {host_name(h) for h in allowed_hosts if h and h not in ("0.0.0.0", "::")}
        self.any_host = ANY_HOST in hosts
        self.hosts = frozenset(LOOPBACK_HOSTS | hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if not self.keys and not self.any_host:
            host = host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.hosts:
                return await refuse(
                    send,
                    400,
                    f"this server answers without an API key only to the hosts it was started for; "
                    f"'{host[:100]}' is not one of them (start it with --allowed-host, or with --api-key)",
                    "invalid_request_error",
                    code="invalid_host",
                )
            origin = headers.get(b"origin")
            if origin is not None and host_name(urlsplit(origin.decode("latin-1")).netloc) not in self.hosts:
                return await refuse(
                    send,
                    403,
                    "a request from a page of another origin needs the server's API key (start it with --api-key)",
                    "permission_error",
                    code="cross_origin",
                )
        if not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        if self.keys:
            auth = headers.get(b"authorization", b"")
            given = [
                g
                for g in (auth[7:].strip() if auth[:7].lower() == b"bearer " else None, headers.get(b"x-api-key"))
                if g is not None
            ]
            found, banks = self.keys.match(given)
            if not found:
                return await refuse(
                    send,
                    401,
                    "missing or wrong API key: send Authorization: Bearer KEY or X-API-Key: KEY",
                    "authentication_error",
                    [(b"www-authenticate", b"Bearer")],
                    code="invalid_api_key",
                )
            scope.setdefault("state", {})[KEY_BANKS] = banks  # the routes refuse the banks this key may not use
        if scope["path"] == "/v1/chat/completions" and scope["method"] == "POST":
            ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if ctype != b"application/json":
                return await refuse(
                    send,
                    415 if ctype else 400,
                    "send the chat request as JSON (Content-Type: application/json)",
                    "invalid_request_error",
                )
        await self.app(scope, receive, send)


async def refuse(
    send, status: int, message: str, kind: str, headers: list | None = None, code: str | None = None
) -> None:
    """Answer at once with an error body (from middleware, where no exception handler runs)."""
    body = json.dumps(error_body(message, kind, code=code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
