"""What every request handler shares: settings, the model map, the Poe client, auth, and the
HTTP helpers (JSON bodies, OpenAI error responses, SSE framing)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import re
import secrets
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from addon import tokens
from addon.bounds import too_deep
from addon.config import Settings
from addon.errors import OpenAIError, bad_request, invalid_api_key
from addon.keys import KeyPool
from addon.mappings import ModelMap
from addon.poe import PoeClient
from addon.state import LocalState, State

MAX_BODY = 64 * 1024 * 1024
# The mitmproxy addon tags each request it routes to the app with its flow id.
FLOW_HEADER = "x-poe-openai-flow"
SSE_DONE = b"data: [DONE]\n\n"


@dataclass
class Auth:
    poe_key: str  # "" until a configured key is picked (see Service.pick_key)
    client_key: bool  # the client's own key is the Poe key (pass-through)
    # Who asked, as a digest of their key or token ("" when the proxy knows no callers):
    # what a caller stores (Responses) is theirs alone.
    owner: str = ""


@dataclass
class Service:
    """Everything a request needs; the addon swaps fields when options or mappings change."""

    settings: Settings
    model_map: ModelMap
    poe: PoeClient
    # Behind mitmproxy: only flows the addon routed here are served, and their keys never
    # travel on the flow: the addon keeps them here, by flow id, until the request takes them.
    routed_only: bool = False
    routed: dict[str, dict[str, str]] = field(default_factory=dict)
    # Stored responses, key health and uploads: this process's own, or shared (poe_state_url)
    state: State = field(default_factory=LocalState)
    running: dict[str, asyncio.Task[Any]] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)  # flows whose client left
    stats: Counter[str] = field(default_factory=Counter)  # answers and errors, by kind
    flow_info: dict[str, dict[str, Any]] = field(default_factory=dict)  # for mitmproxy's views
    tokenizer: asyncio.Future[None] | None = None  # the token tables loading (tokens.warm_up)
    pool: KeyPool = field(init=False)

    def __post_init__(self) -> None:
        self.pool = KeyPool(self.settings.api_keys, state=self.state)
        self.share_uploads(self.poe)

    def share_uploads(self, poe: PoeClient) -> None:
        """Let ``poe`` find and leave uploads in the shared state (its own cache is enough
        for the in-process one)."""
        poe.shared = None if isinstance(self.state, LocalState) else self.state

    def use_state(self, state: State, size: int, minutes: int) -> State:
        """Share through ``state`` from now on, keeping the store's limits; returns the state
        it replaces (for the caller to close)."""
        state.max_entries, state.max_age_s = size, minutes * 60
        previous, self.state = self.state, state
        if previous is not state:
            self.pool = KeyPool(self.settings.api_keys, state=state)
            self.share_uploads(self.poe)
        return previous

    def reconfigure(self, settings: Settings, model_map: ModelMap) -> None:
        if settings.api_keys != self.settings.api_keys:
            self.pool = KeyPool(settings.api_keys, state=self.state)
        self.settings = settings
        self.model_map = model_map

    def load_tokenizer(self) -> None:
        """Load the token tables in a thread, from the running loop, once: they take about a
        second, and loaded by the first request they would stall every flow meanwhile."""
        if self.tokenizer is None:
            self.tokenizer = asyncio.get_running_loop().run_in_executor(None, tokens.warm_up)

    async def tokenizer_loaded(self) -> None:
        if self.tokenizer is not None and not self.tokenizer.done():
            await asyncio.shield(self.tokenizer)  # waits off the loop; other flows go on

    async def json(self, request: Request) -> dict[str, Any]:
        return await json_body(request, self.settings.max_body_bytes)

    def authenticate(self, request: Request) -> Auth:
        """Check the client's key or token. No Poe key is picked here: a request is judged
        (body, fields, model) before a key is spent on it; see pick_key."""
        presented = client_key(self.secret_headers(request))
        if self.settings.access_tokens:
            if presented is None:
                raise missing_key()
            # Compare against every token, in constant time, so timing tells nothing.
            given = presented.encode("utf-8", "surrogateescape")
            matches = [
                hmac.compare_digest(given, t.encode("utf-8", "surrogateescape"))
                for t in self.settings.access_tokens
            ]
            if not any(matches):
                raise invalid_api_key(
                    "Incorrect API key provided: this proxy expects one of its access tokens."
                )
            return Auth("", client_key=False, owner=owner_of(presented))
        if not self.settings.api_keys:
            if presented is None:
                raise missing_key()
            return Auth(presented, client_key=True, owner=owner_of(presented))
        return Auth("", client_key=False)

    async def pick_key(self, auth: Auth) -> Auth:
        """The Poe key that answers: the client's own, or the next usable configured one."""
        if auth.client_key:
            return auth
        key = await self.pool.pick()
        if key is None:
            raise self.pool.exhausted()
        return Auth(key, client_key=False, owner=auth.owner)

    def secret_headers(self, request: Request) -> Mapping[str, str]:
        flow_id = request.headers.get(FLOW_HEADER)
        if flow_id is not None and flow_id in self.routed:
            return self.routed[flow_id]
        return request.headers

    def admits(self, request: Request) -> bool:
        return not self.routed_only or request.headers.get(FLOW_HEADER, "") in self.routed

    def flow_id(self, request: Request) -> str | None:
        """The mitmproxy flow a request answers, while the addon has it routed here. None in
        the plain server, where the header is just something a client sent: per-flow state
        kept for it would never be collected."""
        flow_id = request.headers.get(FLOW_HEADER)
        return flow_id if self.routed_only and flow_id in self.routed else None

    def track(self, flow_id: str | None) -> None:
        """Remember the task answering a flow, so a client that leaves can cancel it."""
        task = asyncio.current_task()
        if flow_id and task is not None:
            self.running[flow_id] = task

    def untrack(self, flow_id: str | None) -> None:
        if not flow_id:
            return
        if self.running.get(flow_id) is asyncio.current_task():
            del self.running[flow_id]
        self.gone.discard(flow_id)

    def cancel(self, flow_id: str) -> bool:
        """Stop the Poe query of a flow whose client went away."""
        self.routed.pop(flow_id, None)
        task = self.running.pop(flow_id, None)
        if task is None or task.done():
            return False
        self.gone.add(flow_id)
        task.cancel()
        return True


def client_key(headers: Mapping[str, str]) -> str | None:
    header = headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    api_key = headers.get("api-key", "").strip() or headers.get("x-api-key", "").strip()
    return api_key or None  # Azure-style and Anthropic-style clients


def owner_of(secret: str) -> str:
    """A caller's identity for what they store: a full digest, never the secret itself."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def missing_key() -> OpenAIError:
    return invalid_api_key(
        "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
    )


def error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


_HOLE = "\x00poe-openai text goes here\x00"


class TextEvents:
    """The SSE events of one stream that differ only in one text (a content delta): the rest
    of the event is rendered once, so each token costs one string escape, not a JSON dump."""

    def __init__(self, render: Callable[[str], dict[str, Any]]) -> None:
        self._render = render
        template, hole = sse(render(_HOLE)), json.dumps(_HOLE).encode()
        self._prefix, _, self._suffix = template.partition(hole)
        # The hole must be the template's only text of that kind; a client's model name
        # could in theory hold it too, and then every event is rendered in full.
        self._exact = template.count(hole) == 1

    def __call__(self, text: str) -> bytes:
        if not self._exact:
            return sse(self._render(text))
        # json.dumps of a str is the C escaper (ASCII out), the same bytes sse() would write
        return self._prefix + json.dumps(text).encode() + self._suffix


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


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit``: a chunked (or HTTP/2) body
    has no content-length to check first, and must not be read whole before it is judged."""
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > limit:
        raise body_too_large(limit)
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise body_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request, limit: int = MAX_BODY) -> dict[str, Any]:
    raw = await read_body(request, limit)
    if not raw.strip():
        raise bad_request("The request body is empty; send a JSON object.")
    try:
        body = json.loads(raw, parse_constant=_not_json, parse_float=_finite)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"The request body is not valid JSON: {e}.") from None
    except RecursionError:
        raise too_deep() from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    if _ESCAPED_SURROGATE.search(raw) and _has_lone_surrogate(body):
        raise bad_request(
            "The request body is not valid JSON: it escapes a lone UTF-16 surrogate (\\uD800-"
            "\\uDFFF without its pair), which is not a character."
        )
    return body


def _not_json(name: str) -> float:
    # Python reads NaN and Infinity, which JSON has not: nothing downstream (Poe's own JSON)
    # could carry them.
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e999: valid JSON, but no double holds it
        raise ValueError(f"the number {text[:40]} is too large")
    return value


# JSON can escape UTF-16 surrogates (\ud83d\ude00 is one emoji). json.loads joins pairs and
# keeps a lone one as an unencodable str that would break every later .encode(); only bodies
# that escape a surrogate at all are walked.
_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(value: object) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
