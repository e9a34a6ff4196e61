"""mitmproxy addon: answer OpenAI API calls with Poe bots.

    mitmdump -s addon/poe_openai.py

Answered flows are pointed at the OpenAI-compatible app (app.py) that this addon serves on a
loopback port inside mitmproxy's own event loop, and their responses are streamed back; nothing
is ever sent to OpenAI. Every other flow passes through untouched.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import difflib
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, "") or __package__.startswith("__mitmproxy_script__"):
    # Loaded by `mitmdump -s addon/poe_openai.py`: make the `addon` package importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mitmproxy import command, contentviews, ctx, exceptions, http, optmanager
from mitmproxy.addonmanager import Loader
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy.mode_specs import (
    DnsMode,
    LocalMode,
    OsProxyMode,
    ProxyMode,
    RegularMode,
    ReverseMode,
    TunMode,
    WireGuardMode,
)

from addon import catalog, gctune, inprocess, views
from addon.app import FLOW_HEADER, create_app
from addon.config import (
    DEFAULT_BASE_URL,
    DEFAULT_HOSTS,
    DEFAULT_MAPPINGS,
    DEFAULT_MODELS_URL,
    DEFAULT_UPLOAD_URL,
    DEFAULTS,
    ConfigError,
    Settings,
    fingerprint,
    is_loopback_host,
    parse_bool,
    parse_int,
    parse_settings,
)
from addon.errors import NO_RETRY, OpenAIError, internal_error, method_not_allowed
from addon.mappings import MappingError, ModelMap, load_mappings
from addon.poe import PoeClient
from addon.quietlog import OwnStreamNotices, quiet_cancelled_client_tasks
from addon.routing import is_answered
from addon.server import LoopbackServer
from addon.service import Service
from addon.state import open_state, state_line
from addon.status import client_key_advice, summary
from addon.status import status as status_report

logger = logging.getLogger(__name__)

METADATA_KEY = views.METADATA_KEY
_CLOSING: set[asyncio.Task[None]] = set()  # replaced shared-state clients, closing
# Methods the app has routes or answers for (the rest get a 405 from the addon itself).
APP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
SECRET_HEADERS = ("authorization", "api-key", "x-api-key")
SEQUENCE = collections.abc.Sequence[str]  # (typing.Sequence[str] breaks --set in mitmproxy 12)

# name, type, default, help: declared in load(), listed by `mitmdump -s ... --options`.
OPTIONS: tuple[tuple[str, Any, Any, str], ...] = (
    (
        "poe_api_key",
        str,
        "",
        "Poe API key(s) from poe.com/api_key, comma-separated. Empty: use the POE_API_KEY "
        "environment variable; if that is empty too, each client's own Bearer key is "
        "passed to Poe.",
    ),
    (
        "poe_access_tokens",
        SEQUENCE,
        [],
        "Tokens clients must present as their Bearer key (needs a configured Poe key).",
    ),
    (
        "poe_mappings",
        str,
        DEFAULT_MAPPINGS,
        "YAML map of OpenAI model names to Poe bot names; relative paths resolve against "
        "the addon's repository.",
    ),
    (
        "poe_hosts",
        SEQUENCE,
        list(DEFAULT_HOSTS),
        "Hosts whose OpenAI API calls are answered with Poe.",
    ),
    ("poe_base_url", str, DEFAULT_BASE_URL, "Poe bot API base URL."),
    ("poe_upload_url", str, DEFAULT_UPLOAD_URL, "Poe file upload base URL."),
    (
        "poe_proxy",
        str,
        "",
        "Proxy for reaching Poe (http://, https://, socks5://). Poe calls never use the "
        "environment's proxy or CA settings.",
    ),
    (
        "poe_max_file_mb",
        int,
        DEFAULTS["poe_max_file_mb"],
        "Largest picture or file (MB) accepted in a chat message; larger ones get a 413.",
    ),
    (
        "poe_api_key_file",
        str,
        "",
        "File with Poe keys, one a line (keeps keys out of the process list).",
    ),
    (
        "poe_max_body_mb",
        int,
        DEFAULTS["poe_max_body_mb"],
        "Largest request body (MB); larger ones get a 413.",
    ),
    (
        "poe_first_event_timeout_s",
        int,
        DEFAULTS["poe_first_event_timeout_s"],
        "Seconds to wait for Poe's first event (504 before the answer starts).",
    ),
    (
        "poe_idle_timeout_s",
        int,
        DEFAULTS["poe_idle_timeout_s"],
        "Seconds Poe may stay silent between two events.",
    ),
    (
        "poe_total_timeout_s",
        int,
        DEFAULTS["poe_total_timeout_s"],
        "Seconds an answer may take in all.",
    ),
    (
        "poe_header_hold_s",
        int,
        DEFAULTS["poe_header_hold_s"],
        "Streams: seconds to hold the status line for Poe's first event; then 200 is "
        "sent and SSE keep-alives follow while Poe is silent.",
    ),
    (
        "poe_keepalive_s",
        int,
        DEFAULTS["poe_keepalive_s"],
        "Streams: SSE keep-alive comment interval while Poe is silent.",
    ),
    (
        "poe_allow_open_relay",
        bool,
        False,
        "Start even though a configured Poe key would be usable by anyone who can reach a "
        "non-loopback listener (no poe_access_tokens, no proxyauth).",
    ),
    (
        "poe_models_url",
        str,
        DEFAULT_MODELS_URL,
        "Poe's model list, fetched in the background at start-up: a model name the map does "
        "not hold is matched against Poe's bots whatever its case. 'auto': /v1/models on "
        "poe_base_url's host (https://api.poe.com/v1/models); empty: the map alone.",
    ),
    (
        "poe_response_store_size",
        int,
        1000,
        "Responses API: how many responses are kept for previous_response_id and GET.",
    ),
    (
        "poe_response_store_minutes",
        int,
        60,
        "Responses API: how long (minutes) a response is kept.",
    ),
    (
        "poe_state_url",
        str,
        "",
        "Share stored responses, key health and uploads with other instances through Redis "
        "or Valkey: redis://host:port/db (rediss:// for TLS; a password in the URL or in "
        "POE_STATE_PASSWORD). Empty: this instance's own memory.",
    ),
    (
        "poe_stream_store_limit",
        int,
        1_000_000,
        "Bytes of each streamed answer kept on the flow for inspection (0: keep none).",
    ),
    (
        "poe_in_process",
        bool,
        True,
        "Answer requests that need no stream inside mitmproxy, without the loopback hop "
        "(false: every answer takes the hop, as streams do).",
    ),
)
OPTION_TYPES: dict[str, Any] = {name: kind for name, kind, _, _ in OPTIONS}
# The options parse_settings() takes (the others are read where they are used).
SETTINGS_OPTIONS = (
    "poe_api_key",
    "poe_access_tokens",
    "poe_mappings",
    "poe_hosts",
    "poe_base_url",
    "poe_upload_url",
    "poe_proxy",
    "poe_max_file_mb",
    "poe_api_key_file",
    "poe_max_body_mb",
    "poe_first_event_timeout_s",
    "poe_idle_timeout_s",
    "poe_total_timeout_s",
    "poe_header_hold_s",
    "poe_keepalive_s",
    "poe_models_url",
    "poe_state_url",
)


def error_response(error: OpenAIError) -> http.Response:
    # CORS too: browser front ends otherwise see these as network errors
    headers = {
        "content-type": "application/json",
        "access-control-allow-origin": "*",
        **error.headers,
    }
    return http.Response.make(error.status, json.dumps(error.body()), headers)


def refuse(flow: http.HTTPFlow, error: OpenAIError) -> None:
    """Answer an answered host's request right here, without the loopback app."""
    flow.metadata.setdefault(METADATA_KEY, {"url": flow.request.pretty_url})
    flow.response = error_response(error)
    redact(flow)


def take_secrets(flow: http.HTTPFlow) -> dict[str, str]:
    """Take keys and tokens off the flow, leaving fingerprints: what mitmproxy shows, saves
    (-w) or sends on to the loopback app never holds a secret. Returns the originals."""
    taken: dict[str, str] = {}
    headers = flow.request.headers
    for name in SECRET_HEADERS:
        value = headers.get(name)
        if not value or "[redacted " in value:
            continue
        taken[name] = value
        scheme, _, secret = value.partition(" ")
        if not secret:
            scheme, secret = "", scheme
        tag = f"[redacted {fingerprint(secret.strip())}]"
        headers[name] = f"{scheme} {tag}" if scheme else tag
    return taken


def redact(flow: http.HTTPFlow) -> None:
    take_secrets(flow)
    flow.request.headers.pop(FLOW_HEADER, None)


def exposed_listeners() -> list[str]:
    """The listeners that other machines can use without a key of their own."""
    if "mode" not in ctx.options:
        return []
    exposed = []
    for spec in ctx.options.mode:
        try:
            mode = ProxyMode.parse(spec)
        except ValueError:
            continue
        if isinstance(mode, LocalMode | OsProxyMode | TunMode | DnsMode | WireGuardMode):
            # Local capture and TUN take this machine's own programs; a WireGuard peer needs
            # its own key from the confdir; DNS mode answers lookups, never an API call.
            continue
        host = mode.listen_host(ctx.options.listen_host) or "0.0.0.0"
        if not is_loopback_host(host):
            exposed.append(f"{spec} (listening on {host})")
    return exposed


def guard_open_relay(settings: Settings) -> None:
    """A configured key + a reachable listener + no client auth = anyone spends your points."""
    if not settings.api_keys or settings.access_tokens:
        return
    if "proxyauth" in ctx.options and ctx.options.proxyauth:
        return
    if ctx.options.poe_allow_open_relay:
        return
    exposed = exposed_listeners()
    if exposed:
        raise ConfigError(
            "Refusing to start an open relay: a Poe key is configured and "
            f"{', '.join(exposed)} can be reached from other machines by anyone, with no "
            "client auth. Do one of: listen on 127.0.0.1 (e.g. --mode regular@127.0.0.1:8080 or "
            "--listen-host 127.0.0.1); set --set poe_access_tokens=<token> so clients must "
            "present it; set mitmproxy's --set proxyauth=user:pass. To start anyway, "
            "--set poe_allow_open_relay=true."
        )


def take_own_deferred(options: optmanager.OptManager) -> tuple[dict[str, Any], list[str]]:
    """This addon's values among the options mitmproxy deferred until a script declares them
    (`--set`, config.yaml), parsed here: returns the values and the mistakes found.

    mitmproxy would parse them itself once load() returns, and a value its parser refuses
    (`poe_idle_timeout_s=abc`, `poe_allow_open_relay=yes`, an option given twice) makes it
    drop the script without a word: the proxy would run without the addon and send OpenAI
    calls to OpenAI. Taken here, every mistake is reported by name and stops start-up.
    """
    values: dict[str, Any] = {}
    problems: list[str] = []
    for name in [n for n in options.deferred if n.startswith("poe_")]:
        raw = options.deferred.pop(name)
        kind = OPTION_TYPES.get(name)
        if kind is None:
            close = difflib.get_close_matches(name, OPTION_TYPES, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            problems.append(
                f"{name} is not an option of this addon; {hint}"
                "mitmdump -s addon/poe_openai.py --options lists them"
            )
            continue
        try:
            values[name] = option_value(name, kind, raw)
        except ConfigError as e:
            problems.append(str(e))
    return values, problems


def option_value(name: str, kind: Any, raw: Any) -> Any:
    """One deferred value as the option's type: `--set` gives the list of strings typed for
    the name (mitmproxy's own wrapper), config.yaml a YAML value."""
    strings = getattr(raw, "val", None)
    if isinstance(strings, list):
        if kind is SEQUENCE:
            return list(strings)  # `--set poe_hosts=a --set poe_hosts=b` is a list
        if len(strings) > 1:
            # (the values are not shown: they may be keys)
            raise ConfigError(
                f"{name} is given {len(strings)} times (--set {name}=... more than once); "
                "give it once" + (", with several keys comma-separated" * (name == "poe_api_key"))
            )
        if not strings:  # `--set name` without "="
            if kind is bool:
                return True  # mitmproxy's meaning: a bare boolean switches it on
            raise ConfigError(f"--set {name} needs a value: --set {name}=VALUE")
        text = strings[0]
    elif kind is SEQUENCE:
        if isinstance(raw, str):
            return [raw]
        if isinstance(raw, list) and all(isinstance(v, str) for v in raw):
            return raw
        raise ConfigError(f"{name} in config.yaml must be a list of strings")
    elif (isinstance(raw, bool) and kind is not bool) or not isinstance(raw, str | int | float):
        raise ConfigError(f"{name}: {raw!r} in config.yaml is not a {kind.__name__}")
    elif isinstance(raw, kind):
        return raw
    else:
        text = str(raw)
    if kind is bool:
        return parse_bool(text, name)
    if kind is int:
        return parse_int(text, name)
    return text


def not_configured() -> OpenAIError:
    return OpenAIError(
        503,
        "The Poe addon refused its configuration (see the proxy's log) and answers nothing "
        "until it is fixed; this request was not sent anywhere.",
        "server_error",
        "proxy_not_configured",
        headers=dict(NO_RETRY),
    )


class StoredStream:
    """A response stream callable: forwards every chunk at once and keeps a capped copy."""

    def __init__(self, flow: http.HTTPFlow, limit: int) -> None:
        self.flow = flow
        self.limit = limit
        self.buffer = bytearray()
        self.truncated = False

    def __call__(self, data: bytes) -> bytes:
        if data:
            room = self.limit - len(self.buffer)
            if room > 0:
                self.buffer += data[:room]
            if len(data) > room:
                self.truncated = True
        elif self.flow.response is not None:  # b"": the end of the stream
            self.flow.response.data.content = bytes(self.buffer)
            if self.truncated:
                self.flow.comment = (self.flow.comment + "\n" if self.flow.comment else "") + (
                    f"stored body truncated at {self.limit} bytes"
                )
        return data


class StreamedRequest:
    """A request stream callable for a body of unknown size (chunked, or HTTP/2 without
    content-length) or one declared too large: mitmproxy would read it whole before any hook
    could judge it, so it is streamed to the app, which refuses it (413) the moment it passes
    poe_max_body_mb. A copy, up to that limit, is kept for the flow view."""

    def __init__(self, flow: http.HTTPFlow, limit: int) -> None:
        self.flow = flow
        self.limit = limit
        self.buffer = bytearray()

    def __call__(self, data: bytes) -> bytes:
        if data:
            room = self.limit - len(self.buffer)
            if room > 0:
                self.buffer += data[:room]
        else:  # b"": the end of the body
            self.flow.request.data.content = bytes(self.buffer)
        return data


class PoeOpenAI:
    def __init__(self) -> None:
        self.settings: Settings | None = None
        self.service: Service | None = None
        self.server: LoopbackServer | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.published = catalog.PoeBots()  # Poe's bots, shared by every map loaded
        self.learning: asyncio.Task[None] | None = None
        self.notices = OwnStreamNotices()
        self.configured = False  # configure() ran (mitmproxy applied the options)
        self.refusals: list[str] = []  # why start-up was refused (each logged once)
        self.tail = InProcessAnswers(self)

    def load(self, loader: Loader) -> None:
        self.notices.install()
        quiet_cancelled_client_tasks()  # (stays: the noise comes after done())
        for view in views.VIEWS:
            contentviews.add(view)
        with contextlib.suppress(RuntimeError):  # no event loop: nothing runs anyway
            # Once script loading is over: had mitmproxy failed to apply the options for any
            # other reason, it would have dropped the addon silently. Stop start-up instead.
            asyncio.get_running_loop().call_soon(self._check_configured)
        for name, kind, default, help in OPTIONS:
            loader.add_option(name, kind, default, help)
        options = loader.master.options
        values, problems = take_own_deferred(options)
        for problem in problems:
            self._refuse(problem)
        options.update(**values)

    def _check_configured(self) -> None:
        if not self.configured:
            self._refuse(
                "mitmproxy did not apply this addon's options, so the addon would not run and "
                "OpenAI calls would go to OpenAI; check the poe_* --set values and config.yaml "
                "in the confdir"
            )

    def _refuse(self, message: str) -> None:
        """A configuration mistake. Before the addon has a working configuration this stops
        start-up: one error line (mitmproxy exits on errors logged during start-up), and every
        flow gets a 503 meanwhile. Later, mitmproxy rolls the change back."""
        if self.settings is not None:
            raise exceptions.OptionsError(message)
        if message not in self.refusals:
            # Each once: a refused configuration is not rolled back (there is nothing to roll
            # back to), so nothing here loops; later configure calls would repeat it.
            self.refusals.append(message)
            logger.error("poe-openai: cannot start: %s", message)

    def configure(self, updated: set[str]) -> None:
        self.configured = True
        if self.refusals:
            self._force_lazy_connections()
            return
        try:
            settings, model_map = self._parse(updated)
            for name in ("poe_response_store_size", "poe_response_store_minutes"):
                if getattr(ctx.options, name) < 1:
                    raise ConfigError(f"{name}={getattr(ctx.options, name)} must be at least 1")
            if ctx.options.poe_stream_store_limit < 0:
                raise ConfigError(
                    f"poe_stream_store_limit={ctx.options.poe_stream_store_limit} must be 0 or "
                    "more (bytes); use 0 to keep no streamed body"
                )
            guard_open_relay(settings)
        except ConfigError as e:
            self._refuse(str(e))
            self._force_lazy_connections()
            return
        if settings is not self.settings:
            self._apply(settings, model_map)
        assert self.service is not None
        self._use_state(settings)
        self._force_lazy_connections()

    def _use_state(self, settings: Settings) -> None:
        """Open the shared state the options name (once per URL) and give it the store's
        limits."""
        assert self.service is not None
        size = ctx.options.poe_response_store_size
        minutes = ctx.options.poe_response_store_minutes
        current = getattr(self.service.state, "url", None)
        if current != settings.state_url:
            state = open_state(settings.state_url)
            previous = self.service.use_state(state, size, minutes)
            logger.info("poe-openai: %s", state_line(state))
            with contextlib.suppress(RuntimeError):  # no loop: nothing was ever connected
                task = asyncio.get_running_loop().create_task(previous.aclose())
                _CLOSING.add(task)
                task.add_done_callback(_CLOSING.discard)
        else:
            self.service.use_state(self.service.state, size, minutes)

    def _parse(self, updated: set[str]) -> tuple[Settings, ModelMap]:
        unchanged = not updated.intersection(SETTINGS_OPTIONS)
        if unchanged and self.settings is not None and self.service is not None:
            return self.settings, self.service.model_map
        settings = parse_settings(**{name: getattr(ctx.options, name) for name in SETTINGS_OPTIONS})
        try:
            return settings, load_mappings(settings.mappings_path).with_published(self.published)
        except MappingError as e:
            raise ConfigError(f"poe_mappings: {e}") from None

    def _force_lazy_connections(self) -> None:
        # With "eager", mitmproxy connects to api.openai.com before any hook sees the request:
        # offline clients are dropped, online ones leak a connection to OpenAI. Set only once
        # this configuration is judged: the change runs configure() again, and a refusal
        # raised inside it would be rolled back by resetting the strategy, again and again.
        if "connection_strategy" in ctx.options and ctx.options.connection_strategy != "lazy":
            if not self.refusals:
                logger.info("poe-openai: setting connection_strategy=lazy")
            ctx.options.connection_strategy = "lazy"

    def _apply(self, settings: Settings, model_map: ModelMap) -> None:
        old = self.settings
        self.settings = settings
        if self.service is None:
            self.service = Service(
                settings,
                model_map,
                PoeClient(settings.base_url, settings.proxy, settings.upload_url),
                routed_only=True,
            )
            return
        self.service.reconfigure(settings, model_map)
        if self.watcher is not None and (old is None or old.models_url != settings.models_url):
            self._learn_bots()
        endpoints = (settings.base_url, settings.proxy, settings.upload_url)
        if old is None or (old.base_url, old.proxy, old.upload_url) != endpoints:
            previous = self.service.poe
            self.service.poe = PoeClient(*endpoints)
            self.service.share_uploads(self.service.poe)
            # Answers still streaming use the old client: close it once they must be over.
            _close_later(previous, settings.timeouts.total + 60)

    def running(self) -> None:
        if self.service is None or self.settings is None:
            return  # refused (logged); answered hosts get a 503 until mitmproxy exits
        raise_open_file_limit()
        if self.tail not in ctx.master.addons.chain:
            ctx.master.addons.add(self.tail)
        if self.watcher is None:
            gctune.tune()
            self._ensure_server()
            self.service.load_tokenizer()
            loop = asyncio.get_running_loop()
            with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
                loop.add_signal_handler(signal.SIGUSR1, self.log_status)
            self.watcher = loop.create_task(self.watch_mappings())
            self._learn_bots()
        s = self.settings
        answering = ", ".join(sorted(s.hosts))
        logger.info("poe-openai: %s", summary(s, self.service.model_map, answering))
        for line in client_settings(ctx.options.mode if "mode" in ctx.options else [], s):
            logger.info("poe-openai: %s", line)

    def _learn_bots(self) -> None:
        """(Re)start learning Poe's published bots in the background: nothing waits for it."""
        if self.learning is not None:
            self.learning.cancel()
            self.learning = None
        assert self.settings is not None
        url = self.settings.models_url
        if url is None:
            self.published.forget()
            return
        self.learning = asyncio.get_running_loop().create_task(
            catalog.learn(self.published, url, self.settings.proxy)
        )

    def _ensure_server(self) -> LoopbackServer:
        """The loopback app server; started on first need, since a request can arrive
        between the listeners opening and the ``running`` hook."""
        if self.server is None:
            assert self.service is not None
            server = LoopbackServer(create_app(self.service))
            try:
                server.start()
            except RuntimeError:  # no running event loop
                server.stop()
                raise
            self.server = server
        return self.server

    def done(self) -> None:
        if self.tail in ctx.master.addons.chain:
            ctx.master.addons.remove(self.tail)
        self.notices.uninstall()
        for view in views.VIEWS:
            with contextlib.suppress(Exception):
                contentviews.remove(view)
        if self.watcher is not None:
            self.watcher.cancel()
            self.watcher = None
        if self.learning is not None:
            self.learning.cancel()
            self.learning = None
        with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.service is not None:
            _close_later(self.service.poe)

    # --- daily use ---------------------------------------------------------------------------

    @command.command("poe.status")
    def status(self) -> str:
        """Mappings, key pool and request counts since start, as JSON (keys as fingerprints)."""
        if self.service is None:
            return "{}"
        report = status_report(self.service)
        report["stream_notices_expected"] = len(self.notices.expected)
        return json.dumps(report)

    def log_status(self) -> None:
        logger.info("poe-openai status: %s", self.status())

    @command.command("poe.reload")
    def reload(self) -> str:
        """Read the mappings file again (a broken file keeps the previous map)."""
        if self.service is None or self.settings is None:
            return "not configured"
        try:
            model_map = load_mappings(self.settings.mappings_path).with_published(self.published)
        except MappingError as e:
            logger.error("poe-openai: %s; keeping the previous map", e)
            return f"error: {e}"
        self.service.model_map = model_map
        logger.info("poe-openai: %d mapped models from %s", len(model_map.models), model_map.source)
        return f"{len(model_map.models)} mapped models"

    async def watch_mappings(self, interval: float = 1.0) -> None:
        """Reload the mappings when their file changes."""
        seen: tuple[float, int] | None = None
        while True:
            if self.settings is not None:
                try:
                    stat = self.settings.mappings_path.stat()
                    current = (stat.st_mtime, stat.st_size)
                except OSError:
                    current = None
                if seen is not None and current is not None and current != seen:
                    self.reload()
                seen = current
            await asyncio.sleep(interval)

    # --- flows ------------------------------------------------------------------------------

    def _answers(self, flow: http.HTTPFlow) -> bool:
        if self.settings is None:
            return False
        return is_answered(
            flow.client_conn.proxy_mode,
            self.settings.hosts,
            host=flow.request.host,
            host_header=flow.request.host_header,
            sni=flow.client_conn.sni,
        )

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # Route here already, so that a request whose body streams (stream_large_bodies)
        # also goes to the loopback app and never to the real host.
        if self.settings is None and flow.response is None:
            refuse(flow, not_configured())  # fail closed until mitmproxy exits
            return
        if flow.response is not None or not self._answers(flow):
            return
        assert self.settings is not None
        if flow.request.method not in APP_METHODS:
            # No route takes it, and the loopback server's parser (llhttp) would refuse a
            # method outside HTTP's registry with a plain-text 400.
            path = flow.request.path.split("?", 1)[0]
            refuse(flow, method_not_allowed(flow.request.method, path))
            return
        try:
            secrets = take_secrets(flow)
            assert self.service is not None
            self.service.routed[flow.id] = secrets
            self._route(flow)
            size = flow.request.headers.get("content-length", "")
            bodiless = (
                not size
                and "transfer-encoding" not in flow.request.headers
                and not (flow.request.is_http2 or flow.request.is_http3)
            )  # HTTP/1 with neither header: no body (a GET), nothing to stream
            if not bodiless and (not size.isdigit() or int(size) > self.settings.max_body_bytes):
                # Not read (and buffered) whole here: the app judges the request in order
                # (auth, then size) and refuses the body the moment it is too large.
                flow.request.stream = StreamedRequest(flow, self.settings.max_body_bytes)
                unframed = flow.request.is_http2 or flow.request.is_http3
                if unframed and not size and "transfer-encoding" not in flow.request.headers:
                    # HTTP/2 (or 3) without a length: mitmproxy would pass it on to the
                    # HTTP/1.1 app unframed; chunked framing tells the app where it ends.
                    flow.request.headers["transfer-encoding"] = "chunked"
        except Exception:
            logger.exception("poe-openai: could not route %s", flow.request.pretty_url)
            flow.response = error_response(internal_error())
            redact(flow)

    async def request(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get(METADATA_KEY)
        if meta is None or flow.response is not None:
            return
        try:
            assert self.server is not None
            if (flow.request.host, flow.request.port) != (self.server.host, self.server.port):
                self._route(flow)  # another addon moved it: put it back
            here = ctx.options.poe_in_process and not inprocess.needs_stream(flow.request)
            if here and self.tail in ctx.master.addons.chain:
                return  # the tail answers it, once every addon's request hook has run
            await self.server.wait_started()
        except Exception:
            # Fail closed: an answered host must never reach the real upstream.
            logger.exception("poe-openai: could not route %s", meta["url"])
            flow.response = error_response(internal_error())
            redact(flow)

    async def answer_in_process(self, flow: http.HTTPFlow) -> None:
        """The app's answer, set on the flow: no loopback connection, no second parse. The
        flow stays routed to the loopback server, so a failure here still fails closed."""
        meta = flow.metadata.get(METADATA_KEY)
        if meta is None or flow.response is not None or self.server is None:
            return  # not ours, or another addon answered it (as it would before the hop)
        if not ctx.options.poe_in_process or inprocess.needs_stream(flow.request):
            return
        try:
            await self._answer_in_process(flow)
        except Exception:
            logger.exception("poe-openai: could not answer %s", meta["url"])
            flow.response = error_response(internal_error())
            redact(flow)

    async def _answer_in_process(self, flow: http.HTTPFlow) -> None:
        assert self.server is not None and self.service is not None
        service = self.service
        client = flow.client_conn

        def client_left() -> bool:
            # HTTP/1: mitmproxy clears CAN_READ the moment the client closes its socket,
            # while the `error` hook waits for this hook to return.
            return not client.state & ConnectionState.CAN_READ

        def on_client_left() -> None:
            if service.cancel(flow.id):
                service.stats["client left"] += 1

        flow.metadata[METADATA_KEY]["in_process"] = True
        flow.response = await inprocess.answer(
            self.server.app,
            flow.request,
            (self.server.host, self.server.port),
            client_left,
            on_client_left,
        )

    def _route(self, flow: http.HTTPFlow) -> None:
        server = self._ensure_server()
        flow.metadata.setdefault(METADATA_KEY, {"url": flow.request.pretty_url})
        flow.request.scheme = "http"
        flow.request.host = server.host
        flow.request.port = server.port
        flow.request.headers[FLOW_HEADER] = flow.id
        # In upstream mode the connection would otherwise go through the upstream proxy.
        flow.server_conn.via = None

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get(METADATA_KEY)
        if meta is None or flow.response is None:
            return
        flow.request.url = meta["url"]  # the flow list shows the OpenAI URL, not loopback
        redact(flow)
        flow.marked = ":speech_balloon:"
        streamed = not meta.get("in_process")  # a response set by the hook is sent whole
        if streamed and flow.response.headers.get("content-type", "").startswith(
            "text/event-stream"
        ):
            limit = ctx.options.poe_stream_store_limit
            flow.response.stream = StoredStream(flow, limit) if limit else True
            self.notices.expect(flow.client_conn.peername, flow.request.host)

    def response(self, flow: http.HTTPFlow) -> None:
        self._explain(flow)
        if self.service is not None:
            # Usually gone already; not for answers the app's endpoints never saw (a CORS
            # preflight, answered by the middleware; a flow refused while routing).
            self.service.routed.pop(flow.id, None)

    def _explain(self, flow: http.HTTPFlow) -> None:
        """The flow's comment and views: the Poe bot, key fingerprint, timing, errors."""
        meta = flow.metadata.get(METADATA_KEY)
        if meta is None or self.service is None:
            return
        self.notices.forget(flow.client_conn.peername, flow.request.host)
        info = self.service.flow_info.pop(flow.id, None)
        if info is None:
            return
        meta["poe"] = info
        parts = [f"Poe bot {info.get('bot')}", str(info.get("key"))]
        if "first_event_ms" in info:
            parts.append(f"first event {info['first_event_ms']} ms")
        if "total_ms" in info:
            parts.append(f"total {info['total_ms']} ms")
        if "completion_tokens" in info:  # the usage's figure, when the client asked for usage
            parts.append(f"{info['completion_tokens']} completion tokens")
        comment = " | ".join(parts)
        if info.get("error"):
            comment += f"\nerror: {info['error']}"
        flow.comment = f"{flow.comment}\n{comment}" if flow.comment else comment

    def error(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get(METADATA_KEY)
        if meta is None:
            return
        self._explain(flow)
        if self.service is not None:
            self.service.routed.pop(flow.id, None)
        # The client went away (or the stream was reset): stop the Poe query now.
        if self.service is not None and self.service.cancel(flow.id):
            self.service.stats["client left"] += 1  # (no log line: 50 leaving at once add up)
        flow.request.url = meta["url"]
        redact(flow)


class InProcessAnswers:
    """The end of mitmproxy's addon chain: answers that need no stream are given here, after
    every addon's `request` hook has run (save, modifyheaders, maplocal, ...), as they have
    when the request leaves over the loopback hop. Added by PoeOpenAI once running."""

    def __init__(self, owner: PoeOpenAI) -> None:
        self.owner = owner

    async def request(self, flow: http.HTTPFlow) -> None:
        await self.owner.answer_in_process(flow)


def client_settings(modes: collections.abc.Sequence[str], settings: Settings) -> list[str]:
    """For the start-up banner: what a client should set, per listener."""
    confdir = ctx.options.confdir if "confdir" in ctx.options else "~/.mitmproxy"
    ca = f"{confdir}/mitmproxy-ca-cert.pem"
    key = client_key_advice(settings)
    lines = []
    for spec in modes:
        try:
            mode = ProxyMode.parse(spec)
        except ValueError:
            continue
        host = mode.listen_host(ctx.options.listen_host if "listen_host" in ctx.options else "")
        port = mode.listen_port()
        where = f"{host or '127.0.0.1'}:{port}"
        if isinstance(mode, ReverseMode):
            lines.append(f"{spec}: clients set base URL http://{where}/v1; API key: {key}")
        elif isinstance(mode, RegularMode):
            lines.append(
                f"{spec}: clients set HTTPS_PROXY=http://{where} and trust {ca} "
                f"(Python: SSL_CERT_FILE={ca}); API key: {key}"
            )
            # Node's built-in fetch ignores HTTPS_PROXY: the CA alone sends calls to OpenAI.
            lines.append(
                f"{spec}: Node clients also need NODE_EXTRA_CA_CERTS={ca} and, since Node's "
                "fetch ignores HTTPS_PROXY, NODE_USE_ENV_PROXY=1 (Node 24+) or undici's "
                "EnvHttpProxyAgent (fetchOptions: { dispatcher: new EnvHttpProxyAgent() })"
            )
        else:
            lines.append(
                f"{spec}: clients trust {ca}; see mitmproxy's docs for this mode; API key: {key}"
            )
    return lines


def raise_open_file_limit() -> None:
    """Each answered stream holds four sockets here (client, loopback both ends, Poe): the
    common default of 1024 open files would cap the proxy near 250 concurrent streams."""
    try:
        import resource
    except ImportError:  # Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            logger.info("poe-openai: open-file limit raised from %d to %d", soft, wanted)


def _close_later(client: PoeClient, delay: float = 0) -> None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return

    async def close() -> None:
        await asyncio.sleep(delay)
        await client.aclose()

    task = loop.create_task(close())
    _background.add(task)
    task.add_done_callback(_background.discard)


_background: set[asyncio.Task[Any]] = set()

addons = [PoeOpenAI()]
