"""The OpenAI-compatible ASGI application that answers with Poe bots: routes and guards.

mitmproxy's addon (poe_openai.py) serves it on a loopback port and routes answered flows to it;
it can also run alone under any ASGI server. The endpoints live in handlers.py.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Lifespan

from addon import handlers
from addon.bounds import too_deep
from addon.errors import OpenAIError, internal_error, method_not_allowed, not_found
from addon.service import FLOW_HEADER, Service, error_response

logger = logging.getLogger(__name__)

__all__ = ["FLOW_HEADER", "Service", "create_app"]

Handler = Callable[[Service, Request], Awaitable[Response]]

# OpenAI endpoints Poe has no counterpart for: a clear 404 naming them.
UNAVAILABLE = {
    "embeddings": "embeddings",
    "audio": "audio (speech, transcription, translation)",
    "files": "the Files API",
    "uploads": "the Uploads API",
    "batches": "the Batch API",
    "fine_tuning": "fine-tuning",
    "fine-tunes": "fine-tuning",
    "moderations": "moderations",
    "assistants": "the Assistants API",
    "threads": "the Assistants API (threads)",
    "vector_stores": "vector stores",
    "realtime": "the Realtime API",
    "evals": "evals",
    "containers": "containers",
    "conversations": "the Conversations API",
    "organization": "organization administration",
    "images": "image edits and variations",
    "videos": "video generation",
    "chatkit": "ChatKit",
}


def create_app(service: Service, lifespan: Lifespan[Starlette] | None = None) -> Starlette:
    def endpoint(handler: Handler, path: str) -> Callable[[Request], Awaitable[Response]]:
        """Guarded, and every failure answered in OpenAI's shape, never as a traceback."""
        # Counted by route template, not by the URL: ids and unknown paths would add a key
        # per request to the stats.
        label = path.removeprefix("/v1")

        async def run(request: Request) -> Response:
            if not service.admits(request):
                return error_response(
                    OpenAIError(
                        403,
                        "This port only serves requests routed by the Poe addon.",
                        "invalid_request_error",
                        "forbidden",
                    )
                )
            flow_id = service.flow_id(request)
            service.track(flow_id)  # a client that leaves cancels this task
            try:
                await service.tokenizer_loaded()
                response = await handler(service, request)
                service.stats[f"{response.status_code} {label}"] += 1
                return response
            except OpenAIError as e:
                service.stats[f"{e.status} {e.code or e.type}"] += 1
                return error_response(e)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if flow_id in service.gone and task is not None and task.uncancel() == 0:
                    return Response(status_code=499)  # nobody is listening any more
                raise
            except RecursionError:
                # JSON nested just shallow enough to parse, too deep for a walk over it
                service.stats["400 too_deep"] += 1
                return error_response(too_deep())
            except Exception:
                service.stats["500 internal"] += 1
                logger.exception("poe-openai: internal error on %s", request.url.path)
                return error_response(internal_error())
            finally:
                service.untrack(flow_id)
                if flow_id is not None:
                    service.routed.pop(flow_id, None)

        return run

    async def preflight(service: Service, request: Request) -> Response:
        return Response(status_code=204)

    async def unknown(service: Service, request: Request) -> Response:
        raise unknown_url(request)

    def route(path: str, handler: Handler, *methods: str) -> Route:
        return Route(path, endpoint(handler, path), methods=list(methods))

    routes = []
    for prefix in ("/v1", ""):
        routes += [
            route(f"{prefix}/models", handlers.list_models, "GET"),
            route(f"{prefix}/models/{{model:path}}", handlers.get_model, "GET"),
            route(f"{prefix}/chat/completions", handlers.chat_completions, "POST"),
            route(f"{prefix}/completions", handlers.legacy_completions, "POST"),
            route(f"{prefix}/responses", handlers.responses_create, "POST"),
            route(f"{prefix}/responses/{{response_id}}", handlers.responses_get, "GET"),
            route(f"{prefix}/responses/{{response_id}}", handlers.responses_delete, "DELETE"),
            route(f"{prefix}/images/generations", handlers.image_generations, "POST"),
        ]
    routes += [
        route("/{path:path}", preflight, "OPTIONS"),
        route("/{path:path}", unknown, "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"),
    ]
    middleware = [
        Middleware(
            OpenAICORSMiddleware,
            allow_origins=["*"],
            allow_methods=["*"],
            allow_headers=["*"],
            # Browsers ask before a public page may call a proxy on localhost (Private
            # Network Access); that is this proxy's normal use.
            allow_private_network=True,
            expose_headers=["*"],
            max_age=600,
        )
    ]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.add_exception_handler(HTTPException, _http_exception)
    app.state.service = service  # for the status of the plain server (and its tests)
    return app


def unknown_url(request: Request) -> OpenAIError:
    path = request.url.path
    first = re.sub(r"^/(v1/)?", "", path).split("/", 1)[0]
    what = UNAVAILABLE.get(first)
    served = (
        "This proxy answers /v1/models, /v1/chat/completions, /v1/completions, "
        "/v1/responses and /v1/images/generations with Poe bots."
    )
    if what is not None:
        message = f"{request.method} {path}: {what} is not available through Poe. {served}"
    else:
        message = f"Unknown request URL: {request.method} {path!r}. {served}"
    return not_found(message, "unknown_url")


class OpenAICORSMiddleware(CORSMiddleware):
    """Starlette's CORS middleware, with its refused preflights (a method outside the
    standard ones, say) answered in OpenAI's error shape instead of plain text."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        refused = bytes(response.body).decode("utf-8", "replace")
        error = OpenAIError(
            response.status_code, f"CORS preflight refused: {refused}.", "invalid_request_error"
        )
        answer = error_response(error)
        for name, value in response.headers.items():
            if name.lower().startswith("access-control-"):
                answer.headers[name] = value
        return answer


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no route matched, a method a route does not take) in
    OpenAI's shape: paths the catch-all route cannot match (a newline in them) end here."""
    assert isinstance(exc, HTTPException)  # registered for HTTPException only
    if exc.status_code == 404:
        return error_response(unknown_url(request))
    if exc.status_code == 405:
        return _method_not_allowed(request)
    return error_response(OpenAIError(exc.status_code, exc.detail, "invalid_request_error"))


def _method_not_allowed(request: Request) -> Response:
    return error_response(method_not_allowed(request.method, request.url.path))
