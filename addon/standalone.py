"""The same OpenAI-to-Poe application without mitmproxy, for clients that can set a base URL
and for running several instances behind a load balancer.

    python -m addon serve --host 127.0.0.1 --port 8000
    uvicorn addon.standalone:create --factory --host 127.0.0.1 --port 8000

Configuration comes from the environment, with the addon's option names in capitals:
POE_API_KEY, POE_API_KEY_FILE, POE_ACCESS_TOKENS (comma-separated), POE_MAPPINGS, POE_BASE_URL,
POE_UPLOAD_URL, POE_PROXY, POE_MAX_FILE_MB, POE_MAX_BODY_MB, the POE_*_TIMEOUT_S /
POE_HEADER_HOLD_S / POE_KEEPALIVE_S durations, POE_RESPONSE_STORE_SIZE /
POE_RESPONSE_STORE_MINUTES, POE_MODELS_URL, POE_ALLOW_OPEN_RELAY, and POE_STATE_URL (with
POE_STATE_PASSWORD) for state shared between workers and machines.

It logs as the addon does: a start-up summary and one line per answer, on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import logging
import os
import sys
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from addon import catalog
from addon.app import create_app
from addon.config import (
    DEFAULT_BASE_URL,
    DEFAULT_HOSTS,
    DEFAULT_MAPPINGS,
    DEFAULT_MODELS_URL,
    DEFAULT_UPLOAD_URL,
    ENV,
    ConfigError,
    Settings,
    is_loopback_host,
    parse_bool,
    parse_int,
    parse_settings,
    split_secrets,
)
from addon.errors import NO_RETRY, OpenAIError
from addon.mappings import MappingError, load_mappings
from addon.poe import PoeClient
from addon.service import Service, error_response
from addon.state import open_state, state_line
from addon.status import client_key_advice, summary

logger = logging.getLogger(__name__)

INTEGER_OPTIONS = (
    "poe_max_file_mb",
    "poe_max_body_mb",
    "poe_first_event_timeout_s",
    "poe_idle_timeout_s",
    "poe_total_timeout_s",
    "poe_header_hold_s",
    "poe_keepalive_s",
)
STORE_OPTIONS = {"poe_response_store_size": 1000, "poe_response_store_minutes": 60}
ENV_NAMES = frozenset(
    name.upper()
    for name in (
        "poe_api_key",
        "poe_api_key_file",
        "poe_access_tokens",
        "poe_mappings",
        "poe_base_url",
        "poe_upload_url",
        "poe_proxy",
        "poe_models_url",
        "poe_allow_open_relay",
        "poe_state_url",
        "poe_state_password",
        *INTEGER_OPTIONS,
        *STORE_OPTIONS,
    )
)


def settings_from_env(env: Mapping[str, str] | None = None) -> Settings:
    """The settings; a ConfigError names the environment variable to fix."""
    env = os.environ if env is None else env
    check_names(env)
    integers = {
        name: parse_int(env[name.upper()], name, ENV)
        for name in INTEGER_OPTIONS
        if env.get(name.upper(), "").strip()
    }
    return parse_settings(
        poe_api_key=env.get("POE_API_KEY", ""),
        poe_api_key_file=env.get("POE_API_KEY_FILE", ""),
        poe_access_tokens=split_secrets([env.get("POE_ACCESS_TOKENS", "")]),
        poe_mappings=env.get("POE_MAPPINGS", DEFAULT_MAPPINGS),
        poe_hosts=DEFAULT_HOSTS,
        poe_base_url=env.get("POE_BASE_URL", DEFAULT_BASE_URL),
        poe_upload_url=env.get("POE_UPLOAD_URL", DEFAULT_UPLOAD_URL),
        poe_proxy=env.get("POE_PROXY", ""),
        poe_models_url=env.get("POE_MODELS_URL", DEFAULT_MODELS_URL),
        poe_state_url=env.get("POE_STATE_URL", ""),
        environ=env,
        spelling=ENV,
        **integers,
    )


def check_names(env: Mapping[str, str]) -> None:
    """A misspelt setting would silently keep its default: refuse names one typo away."""
    for name in env:
        if not name.startswith("POE_") or name in ENV_NAMES:
            continue
        close = difflib.get_close_matches(name, ENV_NAMES, n=1, cutoff=0.85)
        if close:
            raise ConfigError(
                f"{name} is set but is not a setting of the plain server; did you mean {close[0]}?"
            )


def allows_open_relay(env: Mapping[str, str]) -> bool:
    value = env.get("POE_ALLOW_OPEN_RELAY", "").strip()
    return parse_bool(value, "poe_allow_open_relay", ENV) if value else False


def open_relay(settings: Settings, env: Mapping[str, str]) -> bool:
    """Would a configured key serve any client, with nothing to tell clients apart?"""
    return bool(settings.api_keys) and not settings.access_tokens and not allows_open_relay(env)


def build(env: Mapping[str, str], address: str | None = None) -> Starlette:
    """The app for this environment; a ConfigError names the environment variable to fix.
    ``address`` (host:port), when the caller knows it, goes into the start-up summary."""
    settings = settings_from_env(env)
    relay = open_relay(settings, env)
    allows_open_relay(env)  # judged even when no key makes it moot: a typo is still a typo
    store = {
        name: parse_int(env[name.upper()], name, ENV)
        for name in STORE_OPTIONS
        if env.get(name.upper(), "").strip()
    }
    for name, value in store.items():
        if value < 1:
            raise ConfigError(
                f"{name.upper()}={value} must be at least 1; use e.g. "
                f"{name.upper()}={STORE_OPTIONS[name]}"
            )
    published = catalog.PoeBots()
    try:
        model_map = load_mappings(settings.mappings_path).with_published(published)
    except MappingError as e:
        raise ConfigError(f"POE_MAPPINGS: {e}") from None
    poe = PoeClient(settings.base_url, settings.proxy, settings.upload_url)
    service = Service(settings, model_map, poe, state=open_state(settings.state_url))
    service.state.max_entries = store.get("poe_response_store_size", 1000)
    service.state.max_age_s = store.get("poe_response_store_minutes", 60) * 60

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        log_to_stderr()  # (once serving: building the app alone changes no logging)
        service.load_tokenizer()
        learning = None
        if settings.models_url is not None:  # in the background: nothing waits for it
            learning = asyncio.create_task(
                catalog.learn(published, settings.models_url, settings.proxy)
            )
        for line in start_up_lines(service, address):
            logger.info("poe-openai: %s", line)
        logger.info("poe-openai: %s", state_line(service.state))
        try:
            yield
        finally:
            if learning is not None:
                learning.cancel()
            await poe.aclose()
            await service.state.aclose()

    app = create_app(service, lifespan)
    if relay:
        app.add_middleware(LoopbackClientsOnly)
    return app


def start_up_lines(service: Service, address: str | None) -> list[str]:
    """The plain server's start-up summary, in the addon's words."""
    settings = service.settings
    where = address or "the address uvicorn reports"
    return [
        summary(settings, service.model_map, "OpenAI API calls", ENV),
        f"clients set base URL http://{where}/v1; API key: {client_key_advice(settings, ENV)}",
    ]


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when a line is logged (as logging's last resort
    does), not to the stream of the moment the handler was made."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _Clock(logging.Formatter):
    """mitmproxy's look: "[21:58:24.457] poe-openai: ..."."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return super().formatTime(record, "%H:%M:%S") + f".{int(record.msecs):03d}"


def log_to_stderr() -> None:
    """The addon's log lines (start-up, one per answer, warnings) on stderr, as mitmproxy
    shows them; without this, Python drops every INFO line outside mitmproxy."""
    package = logging.getLogger("addon")
    if any(getattr(h, "poe_openai", False) for h in package.handlers):
        return
    handler = _Stderr()
    handler.setFormatter(_Clock("[%(asctime)s] %(message)s"))
    handler.poe_openai = True  # type: ignore[attr-defined]
    package.addHandler(handler)
    package.setLevel(logging.INFO)


def create(env: Mapping[str, str] | None = None) -> Starlette:
    """The factory for `uvicorn addon.standalone:create --factory` (and other ASGI servers).

    A configuration mistake ends the process with one line naming the environment variable
    (servers print a traceback for any other exception a factory raises).
    """
    try:
        return build(os.environ if env is None else env)
    except ConfigError as e:
        print(f"poe-openai: cannot start: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


class LoopbackClientsOnly:
    """Refuses requests from other machines: a configured Poe key with no POE_ACCESS_TOKENS
    would let anyone who reaches the server spend its points.

    Judged per request from the peer's address rather than from the listening address, which
    the app cannot see: uvicorn binds its sockets after the app has started, and a socket can
    come from --fd, a process manager or a container's port mapping. The peer is what matters
    anyway: a local client is fine whatever the server listens on. A Unix socket (no peer
    address) only takes local clients. Behind a reverse proxy that forwards clients' addresses
    (uvicorn trusts X-Forwarded-For from 127.0.0.1), the remote client is what is judged.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.warned = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if scope["type"] == "http" and client and not is_loopback_host(str(client[0])):
            if not self.warned:
                self.warned = True
                logger.warning(
                    "poe-openai: refusing requests from other machines (first: %s): a Poe key "
                    "is configured and POE_ACCESS_TOKENS is not set; set POE_ACCESS_TOKENS, "
                    "or POE_ALLOW_OPEN_RELAY=true to serve anyone",
                    client[0],
                )
            await error_response(open_relay_refused())(scope, receive, send)
            return
        await self.app(scope, receive, send)


def open_relay_refused() -> OpenAIError:
    return OpenAIError(
        403,
        "This server answers only its own machine: it holds a Poe key and POE_ACCESS_TOKENS "
        "is not set, so anyone who can reach it would spend the key's points. On the server, "
        "set POE_ACCESS_TOKENS=<token> (clients then send the token as their API key), or "
        "POE_ALLOW_OPEN_RELAY=true to serve anyone.",
        "invalid_request_error",
        "open_relay_refused",
        # (outside the CORS middleware: a browser front end still gets to read why)
        headers={**NO_RETRY, "access-control-allow-origin": "*"},
    )
