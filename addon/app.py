"""The OpenAI-compatible ASGI application that answers with Poe bots.

mitmproxy's addon (poe_openai.py) serves it on a loopback port and routes answered flows to it;
it can also run alone under any ASGI server. Translation lives in chat.py / answer.py, Poe I/O
in poe.py; this module is the HTTP surface: routes, auth, status codes and the SSE stream.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import itertools
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi_poe.types import ProtocolMessage
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from addon import chat, images
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

    async def attach(req: chat.ChatRequest, query: Any, auth: Auth) -> Any:
        """Upload the request's pictures and files (once each) and put them on the query."""
        if not req.files:
            return query
        index_of = [i for i, files in req.files.items() for _ in files]
        uploads = [f for files in req.files.values() for f in files]
        attachments = await asyncio.gather(*(service.poe.upload(f, auth.poe_key) for f in uploads))
        by_message: dict[int, list[Any]] = {}
        for i, attachment in zip(index_of, attachments, strict=True):
            by_message.setdefault(i, []).append(attachment)
        return chat.with_attachments(query, by_message)

    @openai_errors
    async def chat_completions(request: Request) -> Response:
        guard(request)
        auth = service.authenticate(request)
        body = await _json_body(request)
        req = chat.parse_chat_request(body, service.model_map, service.settings.max_file_bytes)
        label = f"{req.model}->{req.bot} {fingerprint(auth.poe_key)}"
        try:
            query = await attach(req, chat.to_query(req, new_id), auth)
        except PoeError as e:
            err = classify_failure(e.failure, client_key=auth.client_key)
            logger.info("poe-openai: %s: upload failed: %s", label, err)
            return error_response(err)
        events = service.poe.stream(query, req.bot, auth.poe_key)
        started = time.monotonic()
        completion_id = "chatcmpl-" + new_id()[:24]
        created = int(time.time())
        reply = chat.ChatReply(req.parallel_tool_calls)

        # The status is decided by Poe's first event that says something (meta aside).
        first: tuple[str, list[dict[str, Any]]] = ("", [])
        try:
            async for event in events:
                if event.kind != "meta":
                    first = _feed(reply, event)
                    break
        except PoeError as e:
            await events.aclose()
            err = classify_failure(e.failure, client_key=auth.client_key)
            logger.info("poe-openai: %s failed before answering: %s", label, err)
            return error_response(err)

        if not req.stream:
            try:
                async for event in events:
                    _feed(reply, event)
            except PoeError as e:
                err = classify_failure(e.failure, client_key=auth.client_key)
                logger.info("poe-openai: %s failed: %s", label, err)
                return error_response(err)
            finally:
                await events.aclose()
            reply.finish()
            text = reply.answer.answer
            logger.info(
                "poe-openai: %s answered in %.0f ms", label, (time.monotonic() - started) * 1000
            )
            return JSONResponse(
                chat.completion(
                    completion_id,
                    created,
                    req.model,
                    text,
                    chat.usage(req.messages, text),
                    reply.tools.merged(),
                )
            )

        chunks = chat.ChunkFactory(completion_id, created, req.model, req.include_usage)
        flow_id = request.headers.get(FLOW_HEADER)

        def pieces(text: str, deltas: list[dict[str, Any]]) -> list[bytes]:
            out = [_sse(chunks.content(text))] if text else []
            if deltas:
                out.append(_sse(chunks.tool_calls(deltas)))
            return out

        async def stream() -> AsyncIterator[bytes]:
            if flow_id:
                task = asyncio.current_task()
                if task is not None:
                    service._running[flow_id] = task
            try:
                yield _sse(chunks.role())
                for piece in pieces(*first):
                    yield piece
                try:
                    async for event in events:
                        for piece in pieces(*_feed(reply, event)):
                            yield piece
                except PoeError as e:
                    err = classify_failure(e.failure, client_key=auth.client_key)
                    logger.info("poe-openai: %s failed mid-stream: %s", label, err)
                    for piece in pieces(reply.finish(), []):
                        yield piece
                    yield _sse(err.body())
                    return
                for piece in pieces(reply.finish(), []):
                    yield piece
                yield _sse(chunks.finish(reply.finish_reason))
                if req.include_usage:
                    yield _sse(chunks.usage(chat.usage(req.messages, reply.answer.client)))
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

    async def one_image(req: images.ImageRequest, auth: Auth) -> list[str]:
        message = ProtocolMessage(role="user", content=req.prompt)
        query = chat.to_query(
            chat.ChatRequest(req.model, req.bot, [message], parameters=images.bot_parameters(req)),
            new_id,
        )
        reply = chat.ChatReply()
        events = service.poe.stream(query, req.bot, auth.poe_key)
        try:
            async for event in events:
                _feed(reply, event)
        finally:
            await events.aclose()
        reply.finish()
        urls = images.image_urls(reply.answer.answer)
        if not urls:
            raise OpenAIError(
                502,
                f"The bot `{req.bot}` answered without an image: "
                f"{reply.answer.answer[:200]!r}. Use an image bot (e.g. dall-e-3, FLUX-pro).",
                "server_error",
                "no_image",
            )
        return urls

    @openai_errors
    async def image_generations(request: Request) -> Response:
        guard(request)
        auth = service.authenticate(request)
        req = images.parse_image_request(await _json_body(request), service.model_map)
        try:
            batches = await asyncio.gather(*(one_image(req, auth) for _ in range(req.n)))
            urls = [batch[0] for batch in batches]
            if req.response_format == "b64_json":
                blobs = await asyncio.gather(*(service.poe.download(u) for u in urls))
                items = [{"b64_json": base64.b64encode(b).decode()} for b in blobs]
            else:
                items = [{"url": u} for u in urls]
        except PoeError as e:
            raise classify_failure(e.failure, client_key=auth.client_key) from None
        for item in items:
            item["revised_prompt"] = req.prompt
        return JSONResponse(images.images_response(int(time.time()), items))

    @openai_errors
    async def options(request: Request) -> Response:
        return Response(status_code=204)

    @openai_errors
    async def fallback(request: Request) -> Response:
        guard(request)
        raise not_found(
            f"Unknown request URL: {request.method} {request.url.path}. This proxy answers "
            "/v1/models, /v1/chat/completions and /v1/images/generations with Poe bots; other "
            "OpenAI endpoints are not "
            "available through Poe.",
            "unknown_url",
        )

    routes = []
    for prefix in ("/v1", ""):
        routes += [
            Route(f"{prefix}/models", list_models, methods=["GET"]),
            Route(f"{prefix}/models/{{model:path}}", get_model, methods=["GET"]),
            Route(f"{prefix}/chat/completions", chat_completions, methods=["POST"]),
            Route(f"{prefix}/images/generations", image_generations, methods=["POST"]),
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


def _feed(reply: chat.ChatReply, event: PoeEvent) -> tuple[str, list[dict[str, Any]]]:
    return reply.feed(event.kind, event.text, event.attachment, event.data)


def new_id() -> str:
    return secrets.token_hex(16)


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
