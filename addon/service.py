"""What every request handler shares: settings, the model map, the Poe client, auth, and the
HTTP helpers (JSON bodies, OpenAI error responses, SSE framing)."""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from addon.config import Settings
from addon.errors import OpenAIError, bad_request, invalid_api_key
from addon.keys import KeyPool
from addon.mappings import ModelMap
from addon.poe import PoeClient
from addon.responses import ResponseStore

MAX_BODY = 64 * 1024 * 1024
SSE_DONE = b"data: [DONE]\n\n"


@dataclass
class Auth:
    poe_key: str
    client_key: bool  # the client's own key is the Poe key (pass-through)


@dataclass
class Service:
    """Everything a request needs; the addon swaps fields when options or mappings change."""

    settings: Settings
    model_map: ModelMap
    poe: PoeClient
    route_token: str | None = None  # when set, only requests carrying it are served
    responses: ResponseStore = field(default_factory=ResponseStore)
    running: dict[str, asyncio.Task[Any]] = field(default_factory=dict)
    pool: KeyPool = field(init=False)

    def __post_init__(self) -> None:
        self.pool = KeyPool(self.settings.api_keys)

    def reconfigure(self, settings: Settings, model_map: ModelMap) -> None:
        if settings.api_keys != self.settings.api_keys:
            self.pool = KeyPool(settings.api_keys)
        self.settings = settings
        self.model_map = model_map

    async def json(self, request: Request) -> dict[str, Any]:
        return await json_body(request, self.settings.max_body_bytes)

    def authenticate(self, request: Request) -> Auth:
        presented = client_key(request)
        keys = self.settings.api_keys
        if self.settings.access_tokens:
            if presented is None:
                raise missing_key()
            # Compare against every token, in constant time, so timing tells nothing.
            matches = [hmac.compare_digest(presented, t) for t in self.settings.access_tokens]
            if not any(matches):
                raise invalid_api_key(
                    "Incorrect API key provided: this proxy expects one of its access tokens."
                )
        elif not keys:
            if presented is None:
                raise missing_key()
            return Auth(presented, client_key=True)
        key = self.pool.pick()
        if key is None:
            raise self.pool.exhausted()
        return Auth(key, client_key=False)

    def track(self, flow_id: str | None) -> None:
        """Remember the task answering a flow, so a client that leaves can cancel it."""
        task = asyncio.current_task()
        if flow_id and task is not None:
            self.running[flow_id] = task

    def untrack(self, flow_id: str | None) -> None:
        if flow_id:
            self.running.pop(flow_id, None)

    def cancel(self, flow_id: str) -> bool:
        """Stop the Poe query of a flow whose client went away."""
        task = self.running.pop(flow_id, None)
        if task is None or task.done():
            return False
        task.cancel()
        return True


def client_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    api_key = request.headers.get("api-key", "").strip()  # Azure-style clients
    return api_key or None


def missing_key() -> OpenAIError:
    return invalid_api_key(
        "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
    )


def error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def new_id() -> str:
    return secrets.token_hex(16)


def body_too_large(limit: int) -> OpenAIError:
    return OpenAIError(
        413,
        f"The request body is larger than this proxy accepts ({limit // (1024 * 1024)} MB; "
        "see poe_max_body_mb).",
        "invalid_request_error",
        "request_too_large",
    )


async def json_body(request: Request, limit: int = MAX_BODY) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > limit:
        raise body_too_large(limit)
    if not raw.strip():
        raise bad_request("The request body is empty; send a JSON object.")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"The request body is not valid JSON: {e}.") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body
