"""What every HTTP route of ours checks before it does anything: the API key, the site a
browser's request comes from, and the size of the body.

- **API keys.** With `ControlPlaneConfig(api_key=...)` set, every route but `GET /health`
  answers 401 to a request without `Authorization: Bearer <key>`. Digests are compared in
  constant time; the keys themselves are never stored or logged.
- **Cross-site requests.** A request that changes something and carries an `Origin` header
  naming another site than the one it was sent to (a web page the developer visits, posting to
  `127.0.0.1:8000`) is refused with 403, unless that origin is in `allowed_origins`; CORS is
  off, except for those origins (their preflights are answered, their answers readable).
- **Body size.** Past `max_request_bytes` a request is refused with 413 before its body is
  parsed, whether it says its length or not.

`deploy_core` keeps these settings (the keys as SHA-256 digests) in Ray's internal key-value
store, where the API's and every workflow's replicas read them, again every `REFRESH_S`:
running `deploy_core` with `api_key="new,old"` rotates keys without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from ray.experimental import internal_kv
from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._shared.config import ControlPlaneConfig
from .._shared.errors import (
    ForbiddenError,
    LlamaDeployError,
    PayloadTooLargeError,
    UnauthorizedError,
    error_to_json,
)

HEALTH_PATH = "/health"
REFRESH_S = 10.0
_KV_KEY = b"api_key_digests"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_PREFLIGHT_HEADERS = {
    "Access-Control-Allow-Methods": "GET, POST, PUT, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, Last-Event-ID",
    "Access-Control-Max-Age": "600",
}


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def publish_guard(config: ControlPlaneConfig) -> None:
    """Make the config's settings the ones every route checks (called by `deploy_core`). A core
    started with API keys keeps them when `deploy_core` runs again without any: protection is
    never dropped by a script that forgot its environment."""
    keys = config.api_keys()
    digests = sorted(_digest(k) for k in keys) if keys else _read(config.namespace)["digests"]
    settings = {
        "digests": digests,
        "max_request_bytes": config.max_request_bytes,
        "allowed_origins": [o.rstrip("/") for o in config.allowed_origins],
    }
    # Ray's own key-value store (in its GCS), where Serve keeps its state too: it outlives our
    # actors and every replica reads it
    internal_kv._internal_kv_put(
        _KV_KEY, json.dumps(settings).encode(), overwrite=True, namespace=config.namespace
    )


def _read(namespace: str) -> dict[str, Any]:
    value = internal_kv._internal_kv_get(_KV_KEY, namespace=namespace)
    if value:
        return json.loads(value)
    defaults = ControlPlaneConfig.model_fields
    return {
        "digests": [],
        "max_request_bytes": defaults["max_request_bytes"].default,
        "allowed_origins": [],
    }


class RequestGuard:
    """The checks, for the API's middleware and the workflow replicas' run route."""

    def __init__(self, namespace: str) -> None:
        self._namespace = namespace
        self._load()

    def _load(self) -> None:
        settings = _read(self._namespace)
        self._digests = frozenset(settings["digests"])
        self.max_request_bytes: int = settings["max_request_bytes"]
        self._allowed_origins = frozenset(settings["allowed_origins"])
        self._read_at = time.monotonic()

    def refusal(
        self, method: str, path: str, headers: Mapping[str, str]
    ) -> LlamaDeployError | None:
        """Why the request must not go further, or None."""
        if path == HEALTH_PATH:
            return None
        if time.monotonic() - self._read_at > REFRESH_S:
            self._load()
        if self._digests and not self._authorized(headers.get("authorization", "")):
            return UnauthorizedError(
                "this llama-deploy-ray core requires an API key: send 'Authorization: Bearer "
                "<key>' (the clients do, from ControlPlaneConfig(api_key=...) or "
                "CONTROL_PLANE_API_KEY)"
            )
        origin = headers.get("origin")
        if method not in _SAFE_METHODS and origin and not self._same_site(origin, headers):
            return ForbiddenError(
                f"a cross-site request from {origin!r} is refused; to allow a web app there, "
                "add it to ControlPlaneConfig(allowed_origins=[...])"
            )
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_request_bytes):
            return self.too_large()
        return None

    def cors_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """What lets a browser app of an allowed origin read the answer (nothing for others)."""
        origin = headers.get("origin", "")
        if origin.rstrip("/") not in self._allowed_origins:
            return {}
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}

    def preflight(self, method: str, headers: Mapping[str, str]) -> Response | None:
        """The answer to a browser's CORS preflight (which carries no API key), or None."""
        if method != "OPTIONS" or "access-control-request-method" not in headers:
            return None
        cors = self.cors_headers(headers)
        if not cors:
            return Response(status_code=403)
        return Response(status_code=204, headers={**cors, **_PREFLIGHT_HEADERS})

    def too_large(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"the request body is larger than {self.max_request_bytes} bytes "
            "(ControlPlaneConfig.max_request_bytes); send large data by reference"
        )

    async def read_body(self, chunks: AsyncIterator[bytes]) -> bytes:
        """The body, read no further than the size limit (for bodies sent without a length)."""
        body = bytearray()
        async for chunk in chunks:
            body += chunk
            if len(body) > self.max_request_bytes:
                raise self.too_large()
        return bytes(body)

    def _authorized(self, authorization: str) -> bool:
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key:
            return False
        presented = _digest(key.strip())
        # every digest is compared, so the time taken does not say which one matched
        return sum(hmac.compare_digest(presented, d) for d in self._digests) > 0

    def _same_site(self, origin: str, headers: Mapping[str, str]) -> bool:
        if origin.rstrip("/") in self._allowed_origins:
            return True
        return urlsplit(origin).netloc.lower() == headers.get("host", "").lower()


class GuardMiddleware:
    """Runs a `RequestGuard`'s checks (the app's `state.guard`) before any route of an ASGI
    app, and answers a refusal as our API answers errors."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        guard: RequestGuard = scope["app"].state.guard
        headers = Headers(scope=scope)
        preflight = guard.preflight(scope["method"], headers)
        if preflight is not None:
            await preflight(scope, receive, send)
            return
        cors = guard.cors_headers(headers)
        if cors:
            send = _with_headers(send, cors)
        refusal = guard.refusal(scope["method"], scope["path"], headers)
        has_body = scope["method"] not in _SAFE_METHODS
        if refusal is None and has_body and "content-length" not in headers:
            try:
                body = await guard.read_body(_chunks(receive))
            except PayloadTooLargeError as exc:
                refusal = exc
            else:
                receive = _replay(body, receive)
        if refusal is not None:
            response = JSONResponse(status_code=refusal.status_code, content=error_to_json(refusal))
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _chunks(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            return
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


def _with_headers(send: Send, extra: dict[str, str]) -> Send:
    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {
                **message,
                "headers": [
                    *message.get("headers", []),
                    *((k.lower().encode(), v.encode()) for k, v in extra.items()),
                ],
            }
        await send(message)

    return send_with_headers


def _replay(body: bytes, then: Receive) -> Receive:
    """The body read already, then what the connection says next (its disconnect)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return await then()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive
