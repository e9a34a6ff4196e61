"""The OpenAI-compatible ASGI application that answers with Poe bots.

mitmproxy's addon (poe_openai.py) serves it on a loopback port and routes answered flows to it;
it can also run alone under any ASGI server. Translation lives in chat.py / answer.py, Poe I/O
in poe.py; this module is the HTTP surface: routes, auth, status codes and the SSE stream.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from addon import chat
from addon.answer import AnswerStream
from addon.config import Settings, fingerprint
from addon.errors import OpenAIError, bad_request, classify_failure, internal_error, not_found
from addon.mappings import ModelMap
from addon.poe import PoeClient, PoeError, PoeEvent

logger = logging.getLogger(__name__)

# Headers the mitmproxy addon adds to the requests it routes here.
ROUTE_HEADER = "x-poe-openai-route"
FLOW_HEADER = "x-poe-openai-flow"

MODEL_CREATED = 1_700_000_000  # a fixed date: Poe does not say when a bot was made
MAX_BODY = 64 * 1024 * 1024


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
    _turn: itertools.count[int] = field(default_factory=itertools.count)
    _running: dict[str, asyncio.Task[Any]] = field(default_factory=dict)

    def authenticate(self, request: Request) -> Auth:
        presented = _client_key(request)
        keys = self.settings.api_keys
        if self.settings.access_tokens:
            if presented is None:
                raise _missing_key()
            # Compare against every token, in constant time, so timing tells nothing.
            matches = [hmac.compare_digest(presented, t) for t in self.settings.access_tokens]
            if not any(matches):
                raise errors_invalid_token()
        elif not keys:
            if presented is None:
                raise _missing_key()
            return Auth(presented, client_key=True)
        return Auth(keys[next(self._turn) % len(keys)], client_key=False)

    def cancel(self, flow_id: str) -> bool:
        """Stop the Poe query of a flow whose client went away."""
        task = self._running.pop(flow_id, None)
        if task is None or task.done():
            return False
        task.cancel()
        return True


def _client_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    api_key = request.headers.get("api-key", "").strip()  # Azure-style clients
    return api_key or None


def _missing_key() -> OpenAIError:
    return OpenAIError(
        401,
        "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
        "invalid_request_error",
        "invalid_api_key",
    )


def errors_invalid_token() -> OpenAIError:
    return OpenAIError(
        401,
        "Incorrect API key provided: this proxy expects one of its access tokens.",
        "invalid_request_error",
        "invalid_api_key",
    )


def error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def openai_errors(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """Every failure leaves as an OpenAI-shaped error, never a traceback."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except OpenAIError as e:
            return error_response(e)
        except Exception:
            logger.exception("poe-openai: internal error on %s", request.url.path)
            return error_response(internal_error())

    return wrapped


def create_app(service: Service) -> Starlette:
    def guard(request: Request) -> None:
        token = service.route_token
        if token is not None and not hmac.compare_digest(
            request.headers.get(ROUTE_HEADER, ""), token
        ):
            raise OpenAIError(
                403,
                "This port only serves requests routed by the Poe addon.",
                "invalid_request_error",
                "forbidden",
            )

    @openai_errors
    async def list_models(request: Request) -> Response:
        guard(request)
        service.authenticate(request)
        data = [_model(name) for name in service.model_map.models]
        return JSONResponse({"object": "list", "data": data})

    @openai_errors
    async def get_model(request: Request) -> Response:
        guard(request)
        service.authenticate(request)
        name = request.path_params["model"]
        if not service.model_map.is_mapped(name):
            raise not_found(
                f"The model `{name}` is not in this proxy's model map. Chat requests still "
                f"send unmapped names to Poe as bot names, so `{name}` works if Poe has a bot "
                "of that name.",
                "model_not_found",
            )
        return JSONResponse(_model(name))

    @openai_errors
    async def chat_completions(request: Request) -> Response:
        guard(request)
        auth = service.authenticate(request)
        body = await _json_body(request)
        req = chat.parse_chat_request(body, service.model_map)
        query = chat.to_query(req, lambda: secrets.token_hex(16))
        events = service.poe.stream(query, req.bot, auth.poe_key)
        started = time.monotonic()
        completion_id = "chatcmpl-" + secrets.token_urlsafe(18).replace("-", "x").replace("_", "y")
        created = int(time.time())
        answer = AnswerStream()
        label = f"{req.model}->{req.bot} {fingerprint(auth.poe_key)}"

        # The status is decided by Poe's first event that says something (meta aside).
        first: list[str] = []
        try:
            async for event in events:
                if event.kind == "meta":
                    continue
                first.append(_apply(answer, event))
                break
            else:
                pass
        except PoeError as e:
            await events.aclose()
            err = classify_failure(e.failure, client_key=auth.client_key)
            logger.info("poe-openai: %s failed before answering: %s", label, err)
            return error_response(err)

        if not req.stream:
            try:
                async for event in events:
                    _apply(answer, event)
            except PoeError as e:
                err = classify_failure(e.failure, client_key=auth.client_key)
                logger.info("poe-openai: %s failed: %s", label, err)
                return error_response(err)
            answer.finish()
            logger.info(
                "poe-openai: %s answered in %.0f ms", label, (time.monotonic() - started) * 1000
            )
            return JSONResponse(
                chat.completion(
                    completion_id,
                    created,
                    req.model,
                    answer.answer,
                    chat.usage(req.messages, answer.answer),
                )
            )

        chunks = chat.ChunkFactory(completion_id, created, req.model, req.include_usage)
        flow_id = request.headers.get(FLOW_HEADER)

        async def stream() -> AsyncIterator[bytes]:
            if flow_id:
                task = asyncio.current_task()
                if task is not None:
                    service._running[flow_id] = task
            try:
                yield _sse(chunks.role())
                if first and first[0]:
                    yield _sse(chunks.content(first[0]))
                try:
                    async for event in events:
                        delta = _apply(answer, event)
                        if delta:
                            yield _sse(chunks.content(delta))
                except PoeError as e:
                    err = classify_failure(e.failure, client_key=auth.client_key)
                    logger.info("poe-openai: %s failed mid-stream: %s", label, err)
                    rest = answer.finish()
                    if rest:
                        yield _sse(chunks.content(rest))
                    yield _sse(err.body())
                    return
                rest = answer.finish()
                if rest:
                    yield _sse(chunks.content(rest))
                yield _sse(chunks.finish("stop"))
                if req.include_usage:
                    yield _sse(chunks.usage(chat.usage(req.messages, answer.client)))
                yield SSE_DONE
                logger.info(
                    "poe-openai: %s streamed in %.0f ms",
                    label,
                    (time.monotonic() - started) * 1000,
                )
            finally:
                if flow_id:
                    service._running.pop(flow_id, None)
                await events.aclose()

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    @openai_errors
    async def options(request: Request) -> Response:
        return Response(status_code=204)

    @openai_errors
    async def fallback(request: Request) -> Response:
        guard(request)
        raise not_found(
            f"Unknown request URL: {request.method} {request.url.path}. This proxy answers "
            "/v1/models and /v1/chat/completions with Poe bots; other OpenAI endpoints are not "
            "available through Poe.",
            "unknown_url",
        )

    routes = []
    for prefix in ("/v1", ""):
        routes += [
            Route(f"{prefix}/models", list_models, methods=["GET"]),
            Route(f"{prefix}/models/{{model:path}}", get_model, methods=["GET"]),
            Route(f"{prefix}/chat/completions", chat_completions, methods=["POST"]),
        ]
    routes += [
        Route("/{path:path}", options, methods=["OPTIONS"]),
        Route("/{path:path}", fallback, methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]),
    ]
    middleware = [
        Middleware(
            CORSMiddleware,
            allow_origins=["*"],
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["*"],
            max_age=600,
        )
    ]
    app = Starlette(routes=routes, middleware=middleware)
    app.add_exception_handler(405, _method_not_allowed)
    return app


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    return error_response(
        OpenAIError(
            405,
            f"Method {request.method} is not allowed on {request.url.path}.",
            "invalid_request_error",
            "method_not_allowed",
        )
    )


def _apply(answer: AnswerStream, event: PoeEvent) -> str:
    if event.kind == "text":
        return answer.text(event.text)
    if event.kind == "replace":
        return answer.replace(event.text)
    if event.kind == "file" and event.attachment is not None:
        return answer.file(event.attachment)
    return ""  # meta, suggested replies and unknown data are not part of the answer


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise OpenAIError(413, "The request body is too large.", "invalid_request_error")
    if not raw.strip():
        raise bad_request("The request body is empty; send a JSON object.")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"The request body is not valid JSON: {e}.") from None


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": MODEL_CREATED, "owned_by": "poe"}
